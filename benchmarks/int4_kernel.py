"""Why int4 batches gain little on the CPU: the cost of one transformer block's linear layers against the number of
input rows, for `Int4Linear` (torch's packed 4-bit kernel, `_weight_int4pack_mm_for_cpu`) and for the same
weights as a dense float32 product (the float32 model's, our peer) and a dense bfloat16 product (what a bfloat16
copy of the weights would give; on CPUs with AMX it is the fastest).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/int4_kernel.py [--threads 1] [--rows 1 2 4 8 16 ...]

The block is SmolLM2-135M's (hidden 576, 9 query heads and 3 key-value heads of 64, MLP 1,536): q, k, v, o, gate,
up and down, random weights quantized as `torchbook.load(..., quantize="int4")` does (group 32). For each row
count it prints the block's time with the packed kernel (bfloat16 rows in, as `Int4Linear` feeds it), with the
codes unpacked to bfloat16 for a dense product (what `Int4Linear` does above `KERNEL_MAX_ROWS` rows: the unpack is
paid on every call), as a dense float32 product and as a dense product with a kept bfloat16 copy, the time per
row, and the ratio of `Int4Linear`'s path to float32; then the time of 16 rows over 1 row, the figure that bounds
what continuous batching can gain (16 rows costing 16 times one row would gain nothing). Medians of `--repeats`
timings of `--number` calls each, on the allocator the `torchbook` command uses (jemalloc when installed).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from torchbook.allocator import allocator_in_use, guard_dirty_pages, reexec_with_faster_allocator
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


def run_kernel(layers: list[Int4Linear], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [layer.kernel(x) for layer, x in zip(layers, inputs)]


def run_unpacked(layers: list[Int4Linear], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [F.linear(x, layer.dequantize(COMPUTE_DTYPE)) for layer, x in zip(layers, inputs)]


def run_dense(weights: list[torch.Tensor], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [F.linear(x, w) for x, w in zip(inputs, weights)]


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=positive, default=1)
    parser.add_argument("--rows", type=positive, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 96, 128, 192])
    parser.add_argument("--number", type=positive, default=20)
    parser.add_argument("--repeats", type=positive, default=5)
    args = parser.parse_args()
    reexec_with_faster_allocator()  # the allocator the torchbook command runs on (the unpack allocates per call)
    guard_dirty_pages()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers = [Int4Linear.from_linear(torch.nn.Linear(i, o, bias=False)) for i, o in BLOCK_SHAPES.values()]
    float32 = [layer.dequantize(torch.float32) for layer in layers]
    bfloat16 = [layer.dequantize(COMPUTE_DTYPE) for layer in layers]
    print(f"torch {torch.__version__}, {args.threads} thread(s), {allocator_in_use()} allocator; one SmolLM2-135M block's 7 linear layers, ms; "
          f"median of {args.repeats} x {args.number} calls; * = the path Int4Linear takes (the kernel up to "
          f"{KERNEL_MAX_ROWS} rows)")
    print(f"{'rows':>4} | {'int4 kernel':>11} {'per row':>8} | {'unpack+bf16':>11} | {'float32':>8} {'per row':>8} | "
          f"{'bf16 copy':>9} {'per row':>8} | {'int4 / float32':>14}")
    results: dict[int, tuple[float, float, float]] = {}
    for rows in args.rows:
        x32 = [torch.randn(rows, i) for i, _ in BLOCK_SHAPES.values()]
        x16 = [x.to(COMPUTE_DTYPE) for x in x32]
        kernel = median_ms(partial(run_kernel, layers, x16), args.number, args.repeats)
        unpacked = median_ms(partial(run_unpacked, layers, x16), max(1, args.number // 4), args.repeats)
        f32 = median_ms(partial(run_dense, float32, x32), args.number, args.repeats)
        bf16 = median_ms(partial(run_dense, bfloat16, x16), args.number, args.repeats)
        int4 = kernel if rows <= KERNEL_MAX_ROWS else unpacked
        results[rows] = (int4, f32, bf16)
        marks = ("*", " ") if rows <= KERNEL_MAX_ROWS else (" ", "*")
        print(f"{rows:>4} | {kernel:>10.3f}{marks[0]} {kernel / rows:>8.3f} | {unpacked:>10.3f}{marks[1]} | "
              f"{f32:>8.3f} {f32 / rows:>8.3f} | {bf16:>9.3f} {bf16 / rows:>8.3f} | {int4 / f32:>13.2f}x", flush=True)
    if 1 in results and 16 in results:
        one, sixteen = results[1], results[16]
        print("time of 16 rows / time of 1 row (16 = no gain from batching): "
              + ", ".join(f"{name} {s / o:.1f}x" for name, s, o in zip(["int4 kernel", "float32", "bf16"], sixteen, one)))


if __name__ == "__main__":
    main()
