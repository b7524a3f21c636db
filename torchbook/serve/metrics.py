"""The server's measurements as Prometheus text (`GET /metrics`): the engine's queue depth and busy slots, tokens
per second, time to first token and request latency histograms, and how many rows each decoding step batched
(two streams in one batch show as a step of 2 rows: continuous batching at work)."""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKENS_WINDOW_S = 10.0


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, running = [], 0
        sep = "," if labels else ""
        for bound, count in zip([*self.buckets, float("inf")], self.counts):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {running}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.sum:.6f}", f"{name}_count{braces} {self.count}"]
        return out


class Metrics:
    """Counters the app and the engine thread update (thread-safe), rendered by `text(engine)`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.time()
        self.requests: dict[tuple[str, int], int] = {}  # (path, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.recent: deque[tuple[float, int]] = deque()  # (time, completion tokens) over the last window
        self.first_token = Histogram(LATENCY_BUCKETS)
        self.duration = Histogram(LATENCY_BUCKETS)
        self.batch_rows: dict[int, int] = {}  # decoding steps by rows decoded together
        self.rejected: dict[str, int] = {}

    def request(self, path: str, status: int) -> None:
        with self.lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1

    def reject(self, reason: str) -> None:
        with self.lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def decode_step(self, rows: int) -> None:
        with self.lock:
            self.batch_rows[rows] = self.batch_rows.get(rows, 0) + 1

    def generation(self, prompt_tokens: int, completion_tokens: int, first_token_s: float, total_s: float) -> None:
        now = time.monotonic()
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.recent.append((now, completion_tokens))
            self.first_token.observe(first_token_s)
            self.duration.observe(total_s)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            while self.recent and self.recent[0][0] < now - TOKENS_WINDOW_S:
                self.recent.popleft()
            return sum(n for _, n in self.recent) / TOKENS_WINDOW_S

    def text(self, engine: Any = None) -> str:
        tps = self.tokens_per_second()
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

        if engine is not None:
            with engine.lock:
                waiting = len(engine.waiting)
                active = sum(owner is not None for owner in engine.owner)
                slots = len(engine.owner)
            metric("torchbook_queue_depth", "gauge", "choices waiting for a slot", [f"torchbook_queue_depth {waiting}"])
            metric("torchbook_active_slots", "gauge", "slots decoding or prefilling a request",
                   [f"torchbook_active_slots {active}"])
            metric("torchbook_slots", "gauge", "the engine's slots", [f"torchbook_slots {slots}"])
        with self.lock:
            metric("torchbook_requests_total", "counter", "HTTP requests answered, by path and status",
                   [f'torchbook_requests_total{{path="{p}",status="{s}"}} {n}'
                    for (p, s), n in sorted(self.requests.items())])
            metric("torchbook_rejected_total", "counter", "requests refused (busy: the queue was full; rate_limit)",
                   [f'torchbook_rejected_total{{reason="{r}"}} {n}' for r, n in sorted(self.rejected.items())])
            metric("torchbook_prompt_tokens_total", "counter", "prompt tokens of finished requests",
                   [f"torchbook_prompt_tokens_total {self.prompt_tokens}"])
            metric("torchbook_completion_tokens_total", "counter", "generated tokens of finished requests",
                   [f"torchbook_completion_tokens_total {self.completion_tokens}"])
            metric("torchbook_tokens_per_second", "gauge", f"generated tokens per second over the last "
                   f"{TOKENS_WINDOW_S:g} s", [f"torchbook_tokens_per_second {tps:.3f}"])
            metric("torchbook_time_to_first_token_seconds", "histogram", "seconds from submission to the first token",
                   self.first_token.lines("torchbook_time_to_first_token_seconds"))
            metric("torchbook_request_duration_seconds", "histogram", "seconds from submission to the last token",
                   self.duration.lines("torchbook_request_duration_seconds"))
            metric("torchbook_decode_steps_total", "counter", "decoding steps, by how many requests' rows they batched",
                   [f'torchbook_decode_steps_total{{rows="{r}"}} {n}' for r, n in sorted(self.batch_rows.items())])
        return "\n".join(lines) + "\n"
