"""Why int4 batches gain little on the CPU: the cost of one transformer block's linear layers against the number of
input rows, for `Int4Linear` (torch's packed 4-bit kernel, `_weight_int4pack_mm_for_cpu`) and for the same
weights as a dense float32 product (the float32 model's, our peer) and a dense bfloat16 product (what a bfloat16
copy of the weights would give; on CPUs with AMX it is the fastest).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/int4_kernel.py [--threads 1] [--rows 1 2 4 8 16 32 64]

The block is SmolLM2-135M's (hidden 576, 9 query heads and 3 key-value heads of 64, MLP 1,536): q, k, v, o, gate,
up and down, random weights quantized as `torchbook.load(..., quantize="int4")` does (group 32). For each row
count it prints the block's time in each form, the time per row, and the ratio to the float32 product; then the
time of 16 rows over 1 row, the figure that bounds what continuous batching can gain (16 rows costing 16 times
one row would gain nothing). Also the time to unpack the block's codes to bfloat16 (`Int4Linear.dequantize`),
the cost the > 64-row path pays on every call. Medians of `--repeats` timings of `--number` calls each.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from torchbook.nn.quantized import COMPUTE_DTYPE, KERNEL_MAX_ROWS, Int4Linear

HIDDEN, MLP, HEAD_DIM, HEADS, KV_HEADS = 576, 1536, 64, 9, 3
BLOCK_SHAPES = {  # (in, out) of each linear layer of one SmolLM2-135M block
    "q": (HIDDEN, HEADS * HEAD_DIM), "k": (HIDDEN, KV_HEADS * HEAD_DIM), "v": (HIDDEN, KV_HEADS * HEAD_DIM),
    "o": (HEADS * HEAD_DIM, HIDDEN), "gate": (HIDDEN, MLP), "up": (HIDDEN, MLP), "down": (MLP, HIDDEN),
}


def median_ms(fn: Callable[[], object], number: int, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number * 1e3)
    return statistics.median(times)


def run_int4(layers: list[Int4Linear], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [layer(x) for layer, x in zip(layers, inputs)]


def run_dense(weights: list[torch.Tensor], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [F.linear(x, w) for x, w in zip(inputs, weights)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--number", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if any(r > KERNEL_MAX_ROWS for r in args.rows):
        parser.error(f"--rows: at most {KERNEL_MAX_ROWS} (above that, Int4Linear unpacks to bfloat16 instead)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers = [Int4Linear.from_linear(torch.nn.Linear(i, o, bias=False)) for i, o in BLOCK_SHAPES.values()]
    float32 = [layer.dequantize(torch.float32) for layer in layers]
    bfloat16 = [layer.dequantize(COMPUTE_DTYPE) for layer in layers]
    print(f"torch {torch.__version__}, {args.threads} thread(s); one SmolLM2-135M block's 7 linear layers; "
          f"median of {args.repeats} x {args.number} calls")
    print(f"{'rows':>4} | {'int4 kernel ms':>14} {'per row':>8} | {'float32 ms':>10} {'per row':>8} | "
          f"{'bf16 ms':>8} {'per row':>8} | {'int4 / float32':>14}")
    results: dict[int, tuple[float, float, float]] = {}
    for rows in args.rows:
        x32 = [torch.randn(rows, i) for i, _ in BLOCK_SHAPES.values()]
        x16 = [x.to(COMPUTE_DTYPE) for x in x32]
        int4 = median_ms(partial(run_int4, layers, x32), args.number, args.repeats)
        f32 = median_ms(partial(run_dense, float32, x32), args.number, args.repeats)
        bf16 = median_ms(partial(run_dense, bfloat16, x16), args.number, args.repeats)
        results[rows] = (int4, f32, bf16)
        print(f"{rows:>4} | {int4:>14.3f} {int4 / rows:>8.3f} | {f32:>10.3f} {f32 / rows:>8.3f} | "
              f"{bf16:>8.3f} {bf16 / rows:>8.3f} | {int4 / f32:>13.2f}x", flush=True)
    unpack = median_ms(lambda: [layer.dequantize(COMPUTE_DTYPE) for layer in layers], 10, args.repeats)
    print(f"unpacking the block's codes to bfloat16 (the > {KERNEL_MAX_ROWS}-row path, every call): {unpack:.3f} ms")
    if 1 in results and 16 in results:
        one, sixteen = results[1], results[16]
        print("time of 16 rows / time of 1 row (16 = no gain from batching): "
              + ", ".join(f"{name} {s / o:.1f}x" for name, s, o in zip(["int4 kernel", "float32", "bf16"], sixteen, one)))


if __name__ == "__main__":
    main()
