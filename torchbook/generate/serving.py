"""The serving engine (book chapter 17): continuous batching of many requests on one decoder-only model.

`Engine` owns a model and a preallocated `SlotCache` (`slots` rows of `max_len` positions). Each `step()`:

1. evicts cancelled requests (their slot is free for the next step);
2. admits waiting requests into free slots, oldest first; a request whose prompt starts with tokens some slot
   already holds (an earlier turn of the conversation, a shared system prompt, another of its `n` choices) starts
   from those cached keys and values and prefills only the rest (prefix reuse, as llama.cpp's prompt cache and
   vLLM's prefix caching; the output is the same as a cold run's);
3. runs one forward (a *mixed step*, the chunked prefill of vLLM and SGLang) that carries the next token of
   every running request and at most `prefill_chunk` prompt tokens in all of the requests still prefilling,
   oldest first (several short prompts share a step; a prompt longer than `prefill_chunk` is cut into chunks, so
   it never stalls the running requests for more than one chunk's time; a shorter one is never cut: it waits for
   the first step with room for all of it, and a younger one that fits in what is left may go first); the weights
   are read once for all of them, and a newcomer gets its first token out of the step that takes the rest of its
   prompt;
4. chooses each row's token with the request's own logits processors and random generator; requests that end
   (an end token, a stop string, `max_tokens`, the cache's `max_len`) leave their slot at once.

`prefill_chunk` trades a newcomer's time to first token (a larger budget takes longer prompts, or more of them,
in one step) against the running requests' time between tokens (a step with many prompt tokens takes longer:
about a millisecond per prompt token for SmolLM2-135M on 2 CPU threads, against 30-70 ms for a decoding step).

So a request's tokens are the same alone or beside others (tests/test_serving.py checks logits to 1e-4, and
greedy and seeded tokens exactly, with joins and cancellations in the middle).

Threads: `start()` runs the steps on one engine thread, which alone touches the model; `submit()` may be called
from any thread (it validates the request, then queues it, or raises `Busy` when `max_queue` requests already
wait) and returns a `Handle`: iterate it (blocking) or `async for` over `handle.stream()` for the `Delta`s as they
come, `result()` for the `Result` with usage counts and each choice's finish reason ("stop", "length",
"cancelled"), `cancel()`. `shutdown(drain=True)` finishes what was submitted (False: cancels it). Without
`start()`, `run()` steps in the calling thread until every request is done (`generate_text` does so).

Which models: decoder-only `GPT` (GPT-2, the Llama family, SmolLM2) without a sliding window. The RNNs
(char-rnn) keep a hidden state, not a cache of positions, and the encoder-decoder translators are batch jobs
scored with beam search; they keep `engine.decode` and `engine.beam_search`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from torchbook.errors import TorchbookError, UserInputError
from torchbook.generate.sampling import LogitsProcessor, SamplingConfig, request_processors
from torchbook.generate.streaming import TextStream
from torchbook.nn.quantized import DENSE_COPY_ROWS, keep_dense_copies

log = logging.getLogger(__name__)

CONTEXT_TOKENS = 5  # prompt tokens a text stream decodes before the new ones, to get the first word's spacing right
MAX_TOP_LOGPROBS = 20


class Busy(TorchbookError):
    """The engine's queue is full: try again later (an HTTP server answers 503)."""


@dataclass
class Request:
    """One generation request. `prompt`: token ids (or text, with an engine that has a tokenizer);
    `end_ids`: tokens that end a choice (not part of its text; default: the engine's); `stop`: strings that end
    it (cut from its text); `n`: independent choices (seeded requests: choice i uses seed + i);
    `logprobs`: return each chosen token's log-probability under the model, and the `top_logprobs` most probable
    tokens'; `processors`: extra logits processors, run after the sampling settings' own, except those with a
    `fork()` method (`constraints.ConstraintProcessor`), which are copied for each choice and run first; one with
    `finished(generated tokens)` ends a choice, "stop", when it says so."""

    prompt: Sequence[int] | str
    max_tokens: int = 128
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    stop: Sequence[str] = ()
    end_ids: Sequence[int] | None = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    processors: Sequence[LogitsProcessor] = ()


@dataclass
class Delta:
    """New output of one choice: a token, the text it released (maybe ""), its log-probabilities if asked.
    A choice's last delta may carry token -1: text held back (a possible stop string's start) released at its end."""

    choice: int
    token: int
    text: str
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


@dataclass
class Choice:
    index: int
    text: str
    tokens: list[int]
    finish_reason: str  # "stop", "length" or "cancelled"
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    end_token: int | None = None  # the end token that stopped the choice (not in `tokens`), if one did


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose keys and values came from the cache (prefix reuse)


@dataclass
class Result:
    choices: list[Choice]
    usage: Usage
    first_token_s: float  # seconds from submit to the first token
    total_s: float


class _Sequence:
    """One choice of one request while the engine works on it."""

    def __init__(self, handle: Handle, index: int, prompt: list[int], request: Request, vocab: int,
                 stream: TextStream | None, ends: set[int]):
        self.handle, self.index, self.prompt, self.request, self.ends = handle, index, prompt, request, ends
        sampling = request.sampling
        # a processor with state (a constraint) gives each choice its own copy and runs first: top-k or top-p
        # before its mask could leave no allowed token at all
        constraints = [p.fork() for p in request.processors if hasattr(p, "fork")]
        others = [p for p in request.processors if not hasattr(p, "fork")]
        self.processors = constraints + request_processors(sampling, vocab) + others
        self.greedy = sampling.greedy
        self.generator: torch.Generator | None = None
        if not self.greedy:
            self.generator = torch.Generator()
            if sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(sampling.seed + index)
        self.stream = stream
        self.tokens: list[int] = []  # generated (end token included)
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
        self.slot: int | None = None
        self.fed = 0  # tokens of prompt + generated whose keys and values are in the slot
        self.cached = 0
        self.finish_reason: str | None = None

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)

    def history(self) -> Tensor:
        return torch.tensor(self.prompt + self.tokens, dtype=torch.long)[None]


class Handle:
    """A submitted request: iterate it for `Delta`s (blocking), `await`/`async for` through `stream()`,
    `result()` for the whole `Result`, `cancel()` to stop it."""

    def __init__(self, engine: Engine, request: Request, prompt: list[int]):
        self.engine, self.request, self.prompt = engine, request, prompt
        self.sequences: list[_Sequence] = []
        self.events: queue.Queue[Delta | None] = queue.Queue()
        self.done = threading.Event()
        self.cancelled = False
        self.error: BaseException | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    def cancel(self) -> None:
        """Stop every choice; the slots are free from the engine's next step."""
        self.engine.cancel(self)

    def __iter__(self) -> Iterator[Delta]:
        while True:
            event = self.events.get()
            if event is None:
                if self.error is not None:
                    raise self.error
                return
            yield event

    async def stream(self) -> AsyncIterator[Delta]:
        """The deltas for asyncio code (the blocking waits run in a worker thread, never on the event loop)."""
        while True:
            event = await asyncio.to_thread(self.events.get)
            if event is None:
                if self.error is not None:
                    raise self.error
                return
            yield event

    def result(self, timeout: float | None = None) -> Result:
        if not self.done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        if self.error is not None:
            raise self.error
        choices = [Choice(s.index, s.stream.text if s.stream else "", self.engine._visible(s), s.finish_reason or "",
                          s.logprobs if self.request.logprobs else None,
                          s.top_logprobs if self.request.top_logprobs else None,
                          s.tokens[-1] if s.tokens and s.tokens[-1] in s.ends else None) for s in self.sequences]
        usage = Usage(len(self.prompt), sum(len(s.tokens) for s in self.sequences),
                      max((s.cached for s in self.sequences), default=0))
        first = (self.first_token_at or self.submitted_at) - self.submitted_at
        return Result(choices, usage, first, (self.finished_at or self.submitted_at) - self.submitted_at)


class Engine:
    """Continuous batching for a decoder-only model with `new_slot_cache` / `slot_step` (`torchbook.models.gpt`).

    `slots`: requests decoded side by side; `max_len`: positions per slot (prompt + answer; at most the model's
    context); memory `slots * max_len * SlotCache.bytes_per_token(...)`. `max_queue`: requests that may wait.
    `prefill_chunk`: prompt tokens prefilled per step, in all, beside the decoding rows (the step's prompt-token
    budget). `prefix_cache`: reuse cached prefixes. `prefill_first`: a step that has prompt tokens to prefill
    carries only those (the decoding rows wait one step), so a newcomer's first token costs its prefill alone, at
    the price of the running requests' time between tokens and of one more pass over the weights per prompt.
    `dense_copy`: a weight-only quantized model (`torchbook.load(..., quantize="int4")`) keeps a bfloat16 copy of
    its weights for steps of `DENSE_COPY_ROWS` rows or more (`torchbook.nn.quantized.keep_dense_copies`): the
    4-bit kernel's time grows with the rows, the copy's dense product hardly does, so batched steps and prompt
    prefills run faster (SmolLM2-135M on 2 threads: 1.4-1.5x the tokens/s with 16 requests in flight, prefills in
    about half the time; docs/benchmarks.md), for 2 more bytes a weight (SmolLM2-135M: 0.27 GB).
    The copy's products round the weights to bfloat16, so with it a request's logits depend on how many rows
    its steps carry (by about 1e-2 for SmolLM2); without it they do too once a step passes the kernel's 64 rows
    (`prefill_chunk` + `slots` at most 64 keeps every step on the kernel, where a row's output is exact alone or
    in a batch). The copy stays with the model (`drop_dense_copies` frees it).
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, slots: int = 8, max_len: int = 1024,
                 max_queue: int = 64, prefill_chunk: int = 128, prefix_cache: bool = True,
                 end_ids: Sequence[int] = (), prefill_first: bool = False, dense_copy: bool = False):
        if not getattr(model, "supports_slots", False):
            raise UserInputError(f"{type(model).__name__} cannot be served by the engine (it needs a decoder-only "
                                 "model without a sliding window)", param="model")
        for name, value in (("slots", slots), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk)):
            if value < 1:
                raise UserInputError(f"{name} must be at least 1, got {value}", param=name)
        self.model, self.tokenizer = model.eval(), tokenizer
        if dense_copy:
            size = keep_dense_copies(model)
            if size:
                log.info("a bfloat16 copy of the quantized weights for steps of %d rows or more: %.2f GB",
                         DENSE_COPY_ROWS, size / 1e9)
        self.cache = model.new_slot_cache(slots, max_len)
        self.max_len = self.cache.max_len
        self.vocab = model.config.vocab_size
        self.max_queue, self.prefill_chunk, self.prefix_cache = max_queue, prefill_chunk, prefix_cache
        self.prefill_first = prefill_first
        self.packed = getattr(model, "supports_packed_steps", False)  # prefill and decoding in one forward
        self.end_ids = list(end_ids)
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []  # admitted, in slot order of admission
        self.owner: list[_Sequence | None] = [None] * slots
        self.slot_tokens: list[list[int]] = [[] for _ in range(slots)]  # what each slot's cache holds
        self.freed_at = [0.0] * slots
        self.lock = threading.Condition()
        self.thread: threading.Thread | None = None
        self.closing = False
        self.steps = 0

    # -- the thread-safe API --------------------------------------------------------------------------------
    def submit(self, request: Request) -> Handle:
        """Validate and queue a request (any thread); raises `UserInputError` for a bad request and `Busy` when
        the queue is full, before anything of it reaches a slot."""
        prompt = self._validate(request)
        handle = Handle(self, request, prompt)
        ends = set(self.end_ids if request.end_ids is None else request.end_ids)
        for i in range(request.n):
            stream = None
            if self.tokenizer is not None:
                stream = TextStream(self.tokenizer, request.stop, context=prompt[-CONTEXT_TOKENS:])
            seq = _Sequence(handle, i, prompt, request, self.vocab, stream, ends)
            handle.sequences.append(seq)
        with self.lock:
            if self.closing:
                raise Busy("the engine is shutting down")
            if len(self.waiting) + request.n > self.max_queue:
                raise Busy(f"the engine is busy: {len(self.waiting)} requests wait already (max_queue "
                           f"{self.max_queue}); try again later")
            self.waiting.extend(handle.sequences)
            self.lock.notify_all()
        return handle

    def cancel(self, handle: Handle) -> None:
        with self.lock:
            handle.cancelled = True
            self.lock.notify_all()

    def start(self) -> Engine:
        """Run the steps on an engine thread (the only one that touches the model)."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="torchbook-engine", daemon=True)
            self.thread.start()
        return self

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; finish the submitted ones (`drain`) or cancel them; stop the engine thread."""
        with self.lock:
            self.closing = True
            if not drain:
                for seq in [*self.waiting, *self.running]:
                    seq.handle.cancelled = True
            self.lock.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)
            self.thread = None
        else:
            self.run()

    def run(self) -> None:
        """Step in the calling thread until nothing is left (no engine thread)."""
        if self.thread is not None:
            raise RuntimeError("the engine thread is running: it does the steps")
        while self.step():
            pass

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.busy and not self.closing:
                    self.lock.wait()
                if not self.busy and self.closing:
                    return
            try:
                self.step()
            except Exception as error:  # a failing step fails every request in it, never hangs them
                log.exception("engine step failed")
                with self.lock:
                    for seq in [*self.waiting, *self.running]:
                        seq.handle.error = error
                        self._finish(seq, "error")
                    self.waiting.clear()

    # -- validation -----------------------------------------------------------------------------------------
    def _validate(self, request: Request) -> list[int]:
        prompt = request.prompt
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserInputError("this engine has no tokenizer: give the prompt as token ids", param="prompt")
            prompt = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise UserInputError("the prompt is empty; give at least one token", param="prompt")
        if any(t < 0 or t >= self.vocab for t in prompt):
            raise UserInputError(f"the prompt holds token ids outside the vocabulary (0 to {self.vocab - 1})",
                                 param="prompt")
        if len(prompt) >= self.max_len:
            raise UserInputError(f"the prompt is {len(prompt)} tokens; this engine holds at most {self.max_len} "
                                 "tokens per request, prompt and answer together", param="prompt")
        request.sampling.validate()
        if request.n < 1:
            raise UserInputError(f"n must be at least 1, got {request.n}", param="n")
        if request.n > self.cache.slots:
            raise UserInputError(f"n must be at most the engine's {self.cache.slots} slots, got {request.n}",
                                 param="n")
        if request.max_tokens < 1:
            raise UserInputError(f"max_tokens must be at least 1, got {request.max_tokens}", param="max_tokens")
        if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            raise UserInputError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {request.top_logprobs}",
                                 param="top_logprobs")
        if any(not 0 <= int(t) < self.vocab for t in request.sampling.logit_bias):
            raise UserInputError("logit_bias names token ids outside the vocabulary", param="logit_bias")
        return prompt

    # -- the step -------------------------------------------------------------------------------------------
    def step(self) -> bool:
        """One scheduling step (evict, admit, one forward with every running request's next token and up to
        `prefill_chunk` prompt tokens); whether work remains."""
        with self.lock:
            for seq in [*self.waiting, *self.running]:
                if seq.handle.cancelled:
                    self._finish(seq, "cancelled")
            self.waiting = deque(s for s in self.waiting if s.finish_reason is None)
            while self.waiting and None in self.owner:
                self._admit(self.waiting.popleft())
        decoding = sorted((s for s in self.running if not s.prefilling), key=lambda s: s.slot or 0)
        chunks = []  # (sequence, prompt tokens fed this step), oldest first
        budget = self.prefill_chunk  # prompt tokens per step in all: short prompts share a step, a long one is cut
        for seq in (s for s in self.running if s.prefilling):
            rest = len(seq.prompt) - seq.fed
            if rest > budget and rest <= self.prefill_chunk:
                continue  # it fits whole in the next step: not cut, so its first token comes from that step
            chunks.append((seq, seq.prompt[seq.fed : seq.fed + budget]))
            budget -= len(chunks[-1][1])
            if budget <= 0:
                break
        if chunks and self.prefill_first:
            decoding = []
        if decoding or chunks:
            self._forward(decoding, chunks)
        self.steps += 1
        with self.lock:
            return self.busy

    def _admit(self, seq: _Sequence) -> None:
        """Give `seq` a free slot, starting from the longest cached prefix of its prompt (at most all but its last
        token, whose logits the first token needs)."""
        limit = len(seq.prompt) - 1
        best, best_len = -1, 0
        if self.prefix_cache:
            for slot, held in enumerate(self.slot_tokens):
                n = _common_prefix(held[: self.cache.lengths[slot]], seq.prompt, limit)
                if n > best_len:
                    best, best_len = slot, n
        free = [s for s, owner in enumerate(self.owner) if owner is None]
        if best >= 0 and self.owner[best] is None:
            slot = best
        else:  # the free slot whose cache was least recently used (its prefix is the least likely to come back)
            slot = min(free, key=lambda s: self.freed_at[s])
            if best >= 0:
                self.cache.copy_row(best, slot, best_len)
        self.cache.lengths[slot] = best_len
        self.slot_tokens[slot] = seq.prompt[:best_len]
        self.owner[slot] = seq
        seq.slot, seq.fed, seq.cached = slot, best_len, best_len
        self.running.append(seq)

    def _forward(self, decoding: list[_Sequence], chunks: list[tuple[_Sequence, list[int]]]) -> None:
        """One forward for the step: each decoding row's last token and each prefilling request's prompt chunk,
        packed into one sequence (a mixed step: the weights are read once for all of them), then each row that
        has fed its whole prompt chooses its next token. A model without packed steps (`supports_packed_steps`)
        gets one forward per prompt chunk and one for the decoding rows."""
        seqs = decoding + [seq for seq, _ in chunks]
        news = [[seq.tokens[-1]] for seq in decoding] + [chunk for _, chunk in chunks]
        rows: list[int] = [seq.slot for seq in seqs]  # type: ignore[misc]
        device = self._device()
        if self.packed:
            tokens = torch.tensor([[t for new in news for t in new]], device=device)
            logits = self.model.slot_step(tokens, self.cache.view(rows, [len(new) for new in news]))
        else:
            parts = []
            if decoding:
                parts.append(self.model.slot_step(torch.tensor(news[: len(decoding)], device=device),
                                                  self.cache.view(rows[: len(decoding)], 1)))
            for seq, chunk in chunks:
                parts.append(self.model.slot_step(torch.tensor([chunk], device=device),
                                                  self.cache.view([seq.slot], len(chunk))))  # type: ignore[list-item]
            logits = torch.cat(parts)
        # Greedy rows without processors take their most probable token from one call for the whole step, and
        # `max` (the first index of the largest value, as `argmax`) reads 16 rows of SmolLM2's 49,152 logits in a
        # third of the time of 16 `argmax` calls (0.6 against 1.6 ms on one thread).
        plain = [seq.greedy and not seq.processors for seq in seqs]
        best = logits.max(-1).indices.tolist() if any(plain) else [None] * len(seqs)
        for seq, new, row, is_plain, token in zip(seqs, news, logits, plain, best):
            assert seq.slot is not None
            seq.fed += len(new)
            self.slot_tokens[seq.slot].extend(new)
            if not seq.prefilling:
                self._choose(seq, row, token if is_plain else None)

    def _choose(self, seq: _Sequence, logits: Tensor, argmax: int | None = None) -> None:
        """The request's next token from its logits (V,): its processors, then argmax (`argmax`: already taken, for
        a greedy request without processors) or its generator."""
        scores = logits.float()[None].cpu()
        if seq.processors:
            history = seq.history()
            for processor in seq.processors:
                scores = processor(scores, history, len(seq.prompt))
        if seq.greedy:
            token = int(scores.argmax(-1)) if argmax is None else argmax
        else:
            token = int(torch.multinomial(scores.softmax(-1), 1, generator=seq.generator))
        handle = seq.handle
        if handle.first_token_at is None:
            handle.first_token_at = time.perf_counter()
        seq.tokens.append(token)
        logprob, top = None, None
        if handle.request.logprobs or handle.request.top_logprobs:
            log_probs = logits.float().log_softmax(-1).cpu()
            logprob = float(log_probs[token])
            seq.logprobs.append(logprob)
            if handle.request.top_logprobs:
                values, ids = log_probs.topk(handle.request.top_logprobs)
                top = dict(zip(ids.tolist(), values.tolist()))
                seq.top_logprobs.append(top)
        if token in seq.ends:
            self._finish(seq, "stop")
            return
        text = seq.stream.push(token) if seq.stream is not None else ""
        handle.events.put(Delta(seq.index, token, text, logprob, top))
        if seq.stream is not None and seq.stream.stopped:
            self._finish(seq, "stop")
        elif any(p.finished(seq.tokens) for p in seq.processors if hasattr(p, "finished")):
            self._finish(seq, "stop")  # a constraint that nothing more can follow (a closed JSON object)
        elif len(seq.tokens) >= handle.request.max_tokens or len(seq.prompt) + len(seq.tokens) >= self.max_len:
            self._finish(seq, "length")

    def _finish(self, seq: _Sequence, reason: str) -> None:
        """End a choice and free its slot at once (its cache stays as a prefix for later requests)."""
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        if seq.slot is not None:
            self.owner[seq.slot] = None
            self.freed_at[seq.slot] = time.perf_counter()
            self.cache.lengths[seq.slot] = len(self.slot_tokens[seq.slot])
            seq.slot = None
        if seq in self.running:
            self.running.remove(seq)
        if seq.stream is not None and reason != "error":
            rest = seq.stream.finish()
            if rest:
                seq.handle.events.put(Delta(seq.index, -1, rest))
        handle = seq.handle
        if all(s.finish_reason is not None for s in handle.sequences):
            handle.finished_at = time.perf_counter()
            handle.done.set()
            handle.events.put(None)

    def _visible(self, seq: _Sequence) -> list[int]:
        return [t for t in seq.tokens if t not in seq.ends]

    def _device(self) -> torch.device:
        return self.cache.keys[0].device


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y or n >= limit:
            break
        n += 1
    return n
