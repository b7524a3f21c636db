"""The serving engine under load: SmolLM2-135M-Instruct (float32 and int4) on the CPU, continuous batching against
one request at a time, time to first token under Poisson arrivals, and prefix reuse.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/serve_engine.py

Workload (seeded): `--requests` requests; prompt lengths uniform in `--prompt-range` (default [32, 160]) tokens
(real text: this file's paragraph, repeated and cut), answer lengths uniform in `--answer-range` (default [16, 64]); greedy, no end token (each answer has
exactly its length). Measures, per dtype:
- throughput: completion tokens / wall-clock for all requests submitted at once (a burst: the batch fills, then
  drains to one row as the answers end), on an engine with `--slots` slots, against the same requests one after
  the other (an engine with 1 slot);
- throughput with `--requests` clients in a closed loop (each submits its next request when its last one ends;
  `--closed-requests` in all, a second seeded workload): the engine kept at that many requests in flight, as a
  busy server is, against the same requests one after the other; over the whole run, and while all the clients
  had a request in flight (up to the last submission, after which the engine drains as a burst does: the
  throughput "at 16 concurrent requests"); and, unless `--no-separate`, also with a separate forward per prompt
  chunk (the engine before mixed steps);
- time to first token (TTFT) p50/p95 with the requests arriving as a Poisson process at half the batched
  engine's measured capacity (requests/s), for the batched engine and for the one-slot engine under the same
  arrivals, against a lone request's (each request alone on an idle engine: the mean of a pass before and a pass
  after the batched engine's arrivals). Prompts differ in length, so three comparisons: p95 against the lone
  requests' mean (what this benchmark printed first: it mixes the load's delay with the longest prompts' own
  time), p95 against the lone requests' p95 (like for like), and each request's TTFT against its own alone (the
  slowdown the load causes: its p50 and p95);
- prefix reuse: a 10-turn conversation (chat template; each turn adds the answer and a new user message), the
  time to first token of the last turn with the earlier turns cached and cold (prefix_cache=False).
Ratios are from the same run.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generate import TEXT  # noqa: E402  (benchmarks/generate.py: the same paragraph of real text)

PREFILL_FIRST = False  # --prefill-first: every engine of the run gives a step with prompt tokens to them alone
DENSE_COPY = True  # --no-dense-copy: no engine of the run keeps a bfloat16 copy of a quantized model's weights


def workload(tokenizer: Any, n: int, prompts: tuple[int, int], answers: tuple[int, int],
             seed: int = 0) -> list[tuple[list[int], int]]:
    """`n` (prompt, answer length) pairs: lengths uniform in the given [low, high] ranges."""
    rng = random.Random(seed)
    ids = tokenizer.encode(TEXT * 4, add_special_tokens=False).ids
    out = []
    for _ in range(n):
        start = rng.randrange(0, 100)
        out.append((ids[start : start + rng.randint(*prompts)], rng.randint(*answers)))
    return out


def cpu_seconds() -> float:
    """CPU seconds of this process (all its threads): a measure that a machine shared with other jobs slows less
    than the wall clock."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Rate:
    """Completion tokens per wall-clock second and per CPU second of one run."""

    def __init__(self, tokens: int, wall: float, cpu: float):
        self.wall, self.cpu = tokens / wall, tokens / cpu

    def __str__(self) -> str:
        return f"{self.wall:.1f} tok/s ({self.cpu:.1f} per CPU s)"

    def ratio(self, other: Rate) -> str:
        return f"{self.wall / other.wall:.2f}x (per CPU s {self.cpu / other.cpu:.2f}x)"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_closed(model: Any, work: list[tuple[list[int], int]], slots: int, prefill_chunk: int = 128,
               packed: bool = True) -> Rate:
    """All requests at once."""
    from torchbook.generate.sampling import SamplingConfig
    from torchbook.generate.serving import Engine, Request

    engine = Engine(model, slots=slots, max_len=256, max_queue=len(work), prefill_chunk=prefill_chunk,
                    prefill_first=PREFILL_FIRST, dense_copy=DENSE_COPY)
    engine.packed = packed
    start, cpu = time.perf_counter(), cpu_seconds()
    for prompt, n in work:
        engine.submit(Request(prompt, n, SamplingConfig(temperature=0.0), end_ids=[]))
    engine.run()
    return Rate(sum(n for _, n in work), time.perf_counter() - start, cpu_seconds() - cpu)


def run_clients(model: Any, work: list[tuple[list[int], int]], clients: int, slots: int,
                prefill_chunk: int = 128, packed: bool = True) -> tuple[Rate, Rate]:
    """`clients` clients in a closed loop: each submits its next request when its last one ends, until `work` is
    done (so `clients` requests are in flight until the last ones). The rate of the whole run, and the rate while
    `clients` requests were in flight (up to the submission of the last request: the completion tokens made by
    then, finished or not), before the last ones drain the engine down to one row."""
    from torchbook.generate.sampling import SamplingConfig
    from torchbook.generate.serving import Engine, Request

    engine = Engine(model, slots=slots, max_len=256, max_queue=len(work), prefill_chunk=prefill_chunk,
                    prefill_first=PREFILL_FIRST, dense_copy=DENSE_COPY)
    engine.packed = packed
    pending = list(work)
    submit = lambda: engine.submit(Request(*pending.pop(0), SamplingConfig(temperature=0.0), end_ids=[]))  # noqa: E731
    start, cpu = time.perf_counter(), cpu_seconds()
    live = [submit() for _ in range(min(clients, len(pending)))]
    handles = list(live)
    steady: Rate | None = None
    while live:
        engine.step()
        for handle in [h for h in live if h.done.is_set()]:
            live.remove(handle)
            if pending:
                live.append(submit())
                handles.append(live[-1])
                if not pending:  # the last request: from here on, fewer and fewer requests are in flight
                    made = sum(len(s.tokens) for h in handles for s in h.sequences)
                    steady = Rate(made, time.perf_counter() - start, cpu_seconds() - cpu)
    whole = Rate(sum(n for _, n in work), time.perf_counter() - start, cpu_seconds() - cpu)
    return whole, steady or whole


def run_poisson(model: Any, work: list[tuple[list[int], int]], slots: int, rate: float, seed: int = 1,
                prefill_chunk: int = 128) -> list[float]:
    """Requests arriving at `rate` per second (Poisson) on the engine thread; each request's TTFT."""
    from torchbook.generate.sampling import SamplingConfig
    from torchbook.generate.serving import Engine, Request

    rng = random.Random(seed)
    engine = Engine(model, slots=slots, max_len=256, max_queue=len(work), prefill_chunk=prefill_chunk,
                    prefill_first=PREFILL_FIRST, dense_copy=DENSE_COPY).start()
    handles = []
    next_at = time.perf_counter()
    for prompt, n in work:
        next_at += rng.expovariate(rate)
        time.sleep(max(0.0, next_at - time.perf_counter()))
        handles.append(engine.submit(Request(prompt, n, SamplingConfig(temperature=0.0), end_ids=[])))
    engine.shutdown(drain=True)
    return [h.result().first_token_s for h in handles]


def lone_ttft(model: Any, work: list[tuple[list[int], int]]) -> list[float]:
    from torchbook.generate.sampling import SamplingConfig
    from torchbook.generate.serving import Engine, Request

    # Served as every request is, by the engine's own thread (a prompt prefilled on the main thread is faster here:
    # libgomp spins less in a second thread's OpenMP team once the process has more OpenMP threads than cores).
    engine = Engine(model, slots=1, max_len=256, prefill_first=PREFILL_FIRST, dense_copy=DENSE_COPY).start()
    times = []
    for prompt, _ in work:
        handle = engine.submit(Request(prompt, 1, SamplingConfig(temperature=0.0), end_ids=[]))
        times.append(handle.result(timeout=600).first_token_s)
    engine.shutdown(drain=True)
    return times


def conversation_ttft(loaded: Any, turns: int = 10, answer: int = 16) -> tuple[float, float, int, int]:
    """TTFT of the last turn with prefix reuse and cold; the last prompt's length and its cached tokens."""
    from torchbook.generate.sampling import SamplingConfig
    from torchbook.generate.serving import Engine, Request
    from torchbook.hub.prompts import chat_token_ids

    questions = ["What is machine learning?", "Give an example.", "What is a training set?", "And a model?",
                 "Name two models.", "What is a spam filter?", "How does it learn?", "What is an instance?",
                 "Why use data?", "Summarize all this."]
    results = []
    for cache in (True, False):
        engine = Engine(loaded.model, loaded.tokenizer, slots=2, max_len=2048, prefix_cache=cache,
                        dense_copy=DENSE_COPY)
        history: list[dict[str, str]] = []
        for q in questions[:turns]:
            history.append({"role": "user", "content": q})
            prompt = chat_token_ids(loaded.tokenizer, history, loaded.meta)
            handle = engine.submit(Request(prompt, answer, SamplingConfig(temperature=0.0),
                                           end_ids=loaded.meta["end_token_ids"]))
            engine.run()
            result = handle.result()
            history.append({"role": "assistant", "content": result.choices[0].text})
        results.append((result.first_token_s, len(prompt), result.usage.cached_tokens))
    return results[0][0], results[1][0], results[0][1], results[0][2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "int4"])
    parser.add_argument("--prompt-range", type=int, nargs=2, default=[32, 160])
    parser.add_argument("--answer-range", type=int, nargs=2, default=[16, 64])
    parser.add_argument("--poisson-requests", type=int, default=64,
                        help="requests of the time-to-first-token phase (a third seeded workload): its p95 needs more "
                             "than --requests")
    parser.add_argument("--turn-tokens", type=int, default=16, help="answer length of each conversation turn")
    parser.add_argument("--closed-requests", type=int, default=64,
                        help="requests of the closed loop (--requests clients, each sends its next when one ends)")
    parser.add_argument("--separate", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the 16-slot throughputs with a separate forward per prompt chunk (the "
                             "engine before mixed steps)")
    parser.add_argument("--phases", nargs="+", default=["ttft", "serial-ttft", "chat"],
                        help="what to measure after the throughputs: ttft (Poisson arrivals on the batched engine, "
                             "against a lone request), serial-ttft (the same arrivals one at a time), chat")
    parser.add_argument("--prefill-chunk", type=int, default=128, help="the engine's prompt tokens per step")
    parser.add_argument("--prefill-first", action="store_true",
                        help="Engine(prefill_first=True): a step with prompt tokens carries no decoding rows")
    parser.add_argument("--dense-copy", action=argparse.BooleanOptionalAction, default=True,
                        help="Engine(dense_copy=True) for every engine of the run, the one-slot ones too: a quantized "
                             "model keeps a bfloat16 copy of its weights for steps of 12 rows or more (batched steps "
                             "and prefills); --no-dense-copy: the 4-bit kernel, and unpacking above 64 rows")
    args = parser.parse_args()
    global PREFILL_FIRST, DENSE_COPY
    PREFILL_FIRST, DENSE_COPY = args.prefill_first, args.dense_copy

    import torchbook
    from torchbook.hub.gguf import default_chat_model

    print(f"threads {torch.get_num_threads()}, {args.requests} requests, {args.slots} slots, prompts "
          f"{args.prompt_range}, answers {args.answer_range} tokens")
    for dtype in args.dtypes:
        loaded = torchbook.load(str(default_chat_model()), quantize=None if dtype == "float32" else dtype)
        work = workload(loaded.tokenizer, args.requests, args.prompt_range, args.answer_range)
        run_closed(loaded.model, work[:2], 2)  # warm-up
        chunk = args.prefill_chunk
        serial = run_closed(loaded.model, work, 1)
        batched = run_closed(loaded.model, work, args.slots, chunk)
        print(f"{dtype}: throughput, {args.requests} requests at once: one-at-a-time {serial}, {args.slots} slots "
              f"{batched}, ratio {batched.ratio(serial)}", flush=True)
        if args.separate:
            apart = run_closed(loaded.model, work, args.slots, chunk, packed=False)
            print(f"{dtype}: {args.slots} slots, a separate forward per prompt chunk: {apart}, ratio "
                  f"{apart.ratio(serial)}", flush=True)
        if args.closed_requests:
            loop = workload(loaded.tokenizer, args.closed_requests, args.prompt_range, args.answer_range, seed=2)
            loop_serial = run_closed(loaded.model, loop, 1)
            loop_batched, in_flight = run_clients(loaded.model, loop, args.requests, args.slots, chunk)
            print(f"{dtype}: throughput, {args.requests} clients in a closed loop, {len(loop)} requests: "
                  f"one-at-a-time {loop_serial}, {args.slots} slots {loop_batched}, ratio "
                  f"{loop_batched.ratio(loop_serial)}; while {args.requests} were in flight (up to the last "
                  f"submission) {in_flight}, ratio {in_flight.ratio(loop_serial)}", flush=True)
            if args.separate:
                apart, _ = run_clients(loaded.model, loop, args.requests, args.slots, chunk, packed=False)
                print(f"{dtype}: closed loop, a separate forward per prompt chunk: {apart}, ratio "
                      f"{apart.ratio(loop_serial)}", flush=True)
        mean_answer = statistics.mean(n for _, n in work)
        rate = 0.5 * batched.wall / mean_answer  # half the batched engine's capacity, in requests/s
        if "ttft" in args.phases:
            arrivals = workload(loaded.tokenizer, args.poisson_requests, args.prompt_range, args.answer_range, seed=3)
            before = lone_ttft(loaded.model, arrivals)
            ttft = run_poisson(loaded.model, arrivals, args.slots, rate, prefill_chunk=chunk)
            after = lone_ttft(loaded.model, arrivals)  # before and after: a machine's load that changes between phases
            alone = [(b + a) / 2 for b, a in zip(before, after)]  # each request's own, alone (biases ratios less)
            lone = statistics.mean(alone)
            p50, p95 = percentile(ttft, 0.5), percentile(ttft, 0.95)
            slowdown = [t / a for t, a in zip(ttft, alone)]  # each request against itself alone
            print(f"{dtype}: Poisson {rate:.2f} req/s, {len(arrivals)} requests; TTFT lone mean {lone * 1e3:.0f} ms (before "
                  f"{statistics.mean(before) * 1e3:.0f}, after {statistics.mean(after) * 1e3:.0f}), lone p95 "
                  f"{percentile(alone, 0.95) * 1e3:.0f} ms; {args.slots} slots p50 {p50 * 1e3:.0f} ms p95 "
                  f"{p95 * 1e3:.0f} ms; p95/lone mean {p95 / lone:.2f}, p95/lone p95 "
                  f"{p95 / percentile(alone, 0.95):.2f}; each request / itself alone: p50 "
                  f"{percentile(slowdown, 0.5):.2f} p95 {percentile(slowdown, 0.95):.2f}", flush=True)
            if "serial-ttft" in args.phases:
                serial_ttft = run_poisson(loaded.model, arrivals, 1, rate)
                s50, s95 = percentile(serial_ttft, 0.5), percentile(serial_ttft, 0.95)
                print(f"{dtype}: the same arrivals one at a time: p50 {s50 * 1e3:.0f} ms p95 {s95 * 1e3:.0f} ms; "
                      f"p95 {args.slots} slots/one-at-a-time {p95 / s95:.2f}", flush=True)
        if "chat" in args.phases:
            warm, cold, length, cached = conversation_ttft(loaded, answer=args.turn_tokens)
            print(f"{dtype}: 10-turn conversation, last prompt {length} tokens ({cached} cached): TTFT with reuse "
                  f"{warm * 1e3:.0f} ms, cold {cold * 1e3:.0f} ms, ratio {cold / warm:.1f}x", flush=True)

if __name__ == "__main__":
    main()
