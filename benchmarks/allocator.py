"""The memory allocator under training of varying shapes: peak RSS and time of the same work on glibc's malloc,
jemalloc with its own time-based purging, jemalloc keeping every freed page, and jemalloc as the `torchbook`
command runs it (purging off, freed pages capped by `torchbook.allocator.DirtyPageGuard`).

    OMP_NUM_THREADS=2 python benchmarks/allocator.py            # 10 steps, about 5 minutes on 2 cores

Fixed shapes (benchmarks/finetune.py) reuse freed buffers step after step; RLHF rollouts, scoring and updates, or a
server's batches, do not, and an allocator that keeps freed pages can grow without bound there (a chat-rlhf run
with purging off and no cap reached 20.7 GB). The work: full fine-tuning of SmolLM2's shape (random weights drawn as
transformers does), each step a random batch (4, 8 or 16 rows) of random length (48-200 tokens), then a no-grad
forward of another random size; the same seed in every process. Printed per setting: peak RSS, seconds, the
guard's purges, and both against glibc's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

from finetune import SHAPES, hf_like_init

from torchbook.allocator import JEMALLOC_CONF, guard_dirty_pages, with_faster_allocator

SETTINGS = {  # name: MALLOC_CONF under jemalloc (None: glibc)
    "glibc": None,
    "jemalloc-purging": "dirty_decay_ms:10000,muzzy_decay_ms:0",  # jemalloc's own defaults, stated
    "jemalloc-keep-all": JEMALLOC_CONF,  # purging off, no guard
    "jemalloc-guarded": JEMALLOC_CONF,  # purging off, the guard: what the torchbook command runs
}


def child(steps: int, threads: int, guarded: bool) -> dict[str, object]:
    import torch

    from torchbook.models.gpt import GPT, GPTConfig

    guard = guard_dirty_pages() if guarded else None
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    rng = random.Random(0)
    model = GPT(GPTConfig(**SHAPES["smollm2"]))  # type: ignore[arg-type]
    hf_like_init(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = model.config.vocab_size
    start = time.perf_counter()
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (rng.choice([4, 8, 16]), rng.randint(48, 200)))
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model(torch.randint(0, vocab, (rng.choice([8, 16]), rng.randint(20, 180))))
    return {"seconds": time.perf_counter() - start,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "guard_purges": guard.purges if guard else "-"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.steps, args.threads, args.child == "jemalloc-guarded")))
        return
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    results: dict[str, dict[str, object]] = {}
    for name in args.settings.split(","):
        if name not in SETTINGS:
            raise SystemExit(f"--settings: unknown {name!r}; accepted: {', '.join(SETTINGS)}")
        conf = SETTINGS[name]  # preloaded as the command does it (a given MALLOC_CONF is kept)
        env = base if conf is None else with_faster_allocator({**base, "MALLOC_CONF": conf})
        if env is None:
            print(json.dumps({"setting": name, "error": "libjemalloc2 not installed (make system-deps)"}))
            continue
        command = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--threads",
                   str(args.threads)]
        out = subprocess.run(command, capture_output=True, text=True, env=env)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(json.dumps({"setting": name, "error": out.stderr.strip().splitlines()[-1:]}), flush=True)
            continue
        result = {"setting": name, "malloc_conf": conf or "-", **json.loads(line[7:])}
        peer = results.get("glibc")
        if peer:
            result["peak_vs_glibc"] = float(result["peak_rss_gb"]) / float(peer["peak_rss_gb"])  # type: ignore[arg-type]
            result["time_vs_glibc"] = float(result["seconds"]) / float(peer["seconds"])  # type: ignore[arg-type]
        results[name] = result
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
