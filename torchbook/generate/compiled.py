"""A static-shape decoding step (book chapter 17): one row of the serving engine's `SlotCache`, one token per step,
attention over all `max_len` positions with the unfilled ones masked, so that every step has the same shapes.

The same shapes are what `torch.compile` needs to compile the step once (a cache that grows recompiles, or
compiles for dynamic shapes, at every new length) and what a CUDA graph needs to replay the whole step as one
launch (on a GPU the per-kernel launch overhead, not the arithmetic, bounds a small model's batch-1 decoding).
The step's inputs live in fixed tensors updated in place (the token, its position, the padding mask, where the
new keys go), so the graph reads new values from the same addresses.

- `compile=True`: `torch.compile(dynamic=False)` (Inductor; C++ on the CPU, Triton on a GPU); the first steps pay
  the compile time (`compile_s`), Inductor's cache on disk shortens later runs. Reading all `max_len` positions
  costs more attention work than reading the filled ones, so it pays off for short `max_len` and small models
  (benchmarks/fast_decode.py measures both).
- `cuda_graph=True` (CUDA only): the step, compiled or eager, captured into a `torch.cuda.CUDAGraph` and replayed.

Never used by the test suite's compile-free path: compiling takes minutes on a loaded CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from torchbook.errors import UserInputError

log = logging.getLogger(__name__)


class StaticDecoder:
    """Greedy batch-1 decoding of `model` (a `GPT`) with a static-shape step. `prefill` runs eagerly (chunks of
    the prompt), then each `step(token)` feeds one token and returns the next position's (V,) logits."""

    def __init__(self, model: Any, max_len: int, *, compile: bool = False, cuda_graph: bool = False,
                 mode: str | None = None, prefill_chunk: int = 256):
        if not getattr(model, "supports_slots", False):
            raise UserInputError(f"{type(model).__name__} cannot decode on a slot cache", param="model")
        self.model = model.eval()
        self.cache = model.new_slot_cache(1, max_len)
        self.max_len = self.cache.max_len
        self.device = self.cache.keys[0].device
        if cuda_graph and self.device.type != "cuda":
            raise UserInputError("CUDA graphs need the model on a CUDA device", param="cuda_graph")
        self.prefill_chunk = prefill_chunk
        self.view = self.cache.view([0], 1, static=True)  # one persistent window: its tensors change in place
        self.tokens = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.positions = torch.arange(self.max_len, device=self.device)[None]
        fn: Callable[[], Tensor] = self._eager
        if compile:
            fn = torch.compile(self._eager, dynamic=False, mode=mode)  # type: ignore[assignment]
        self._fn = fn
        self.cuda_graph = cuda_graph
        self._graph: Any = None
        self._out: Tensor | None = None
        self.compile_s: float | None = None  # seconds of the first step (compilation, capture) when compiled

    def _eager(self) -> Tensor:
        view = self.view
        return self.model(self.tokens, positions=view.starts[:, None], cache=view, padding=view.padding,
                          last_only=True)[:, -1]

    def _point(self, length: int) -> None:
        """The window at row length `length` (in place: the addresses a compiled graph reads stay)."""
        self.view.starts.fill_(length)
        self.view.write_at.fill_(length)
        torch.ge(self.positions, length + 1, out=self.view.padding)

    def reset(self) -> None:
        self.cache.truncate(0, 0)

    def prefill(self, prompt: Sequence[int]) -> Tensor:
        """Feed the prompt (eager chunks); the (V,) logits after its last token."""
        self.reset()
        logits = None
        for start in range(0, len(prompt), self.prefill_chunk):
            chunk = list(prompt[start : start + self.prefill_chunk])
            logits = self.model.slot_step(torch.tensor([chunk], device=self.device), self.cache.view([0], len(chunk)))
        if logits is None:
            raise UserInputError("the prompt is empty", param="prompt")
        return logits[0]

    def step(self, token: int) -> Tensor:
        """Feed one token; the (V,) logits of the next position (a view of a buffer the next step overwrites)."""
        length = self.cache.lengths[0]
        if length + 1 > self.max_len:
            raise UserInputError(f"the cache's {self.max_len} positions are full", param="max_len")
        self.tokens.fill_(token)
        self._point(length)
        with torch.inference_mode():
            if self.cuda_graph:
                out = self._replay()
            elif self.compile_s is None and self._fn is not self._eager:
                start = time.perf_counter()
                out = self._fn()
                self.compile_s = time.perf_counter() - start
                log.info("compiled the decoding step in %.1f s", self.compile_s)
            else:
                out = self._fn()
        self.cache.lengths[0] = length + 1
        return out[0]

    def _replay(self) -> Tensor:
        if self._graph is None:  # warm up on a side stream (compiles), then capture one step
            start = time.perf_counter()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):  # each writes the same position's keys; the real step below rewrites them
                    self._fn()
            torch.cuda.current_stream().wait_stream(stream)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._out = self._fn()
            torch.cuda.synchronize()
            self.compile_s = time.perf_counter() - start
        self._graph.replay()
        assert self._out is not None
        return self._out

    def generate(self, prompt: Sequence[int], max_tokens: int, end_ids: Sequence[int] = ()) -> list[int]:
        """Greedy tokens after `prompt` (at most `max_tokens`, ending at an end token)."""
        logits = self.prefill(prompt)
        out: list[int] = []
        while len(out) < max_tokens and self.cache.lengths[0] < self.max_len:
            token = int(logits.argmax())
            out.append(token)
            if token in end_ids or len(out) >= max_tokens:
                break
            logits = self.step(token)
        return out
