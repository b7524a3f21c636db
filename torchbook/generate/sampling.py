"""Sampling the next token (book chapters 14 and 17): temperature, top-k, top-p, min-p, repetition penalty, seeds.

`process_logits` turns a step's logits into the ones sampled from, in the order Hugging Face's `generate` applies
them (repetition penalty, temperature, top-k, top-p, min-p; a test checks each against transformers' logits
processors); `Sampler` is a `choose(logits, sequence)` function for `engine.decode`, with its own seeded random
generator so that the same seed gives the same text. Temperature 0 is greedy decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from torchbook.errors import UserInputError


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0: greedy (always the most probable token); < 1 sharper, > 1 flatter
    top_k: int = 0  # keep the k most probable tokens (0: all)
    top_p: float = 1.0  # keep the smallest set of most probable tokens whose probability reaches p (1: all)
    min_p: float = 0.0  # drop tokens less probable than min_p x the most probable token's probability (0: none)
    repetition_penalty: float = 1.0  # > 1 makes tokens already in the sequence less likely (CTRL, Keskar et al.)
    seed: int | None = None  # the same seed gives the same tokens (None: a fresh random seed)
    presence_penalty: float = 0.0  # subtracted once from every token already generated (OpenAI's), in [-2, 2]
    frequency_penalty: float = 0.0  # subtracted per occurrence of a generated token (OpenAI's), in [-2, 2]
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit

    def validate(self) -> None:
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0 (0 is greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 keeps every token), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (1 is none), got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
        ]
        names = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"]
        for (ok, message), name in zip(checks, names):
            if not ok:
                raise UserInputError(message, param=name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: Tensor, sequence: Tensor, penalty: float, real: Tensor | None = None) -> Tensor:
    """Divide the positive logits of tokens already in `sequence` (B, T) by `penalty`, multiply the negative ones.
    `real` (B, T), True for real tokens: the padding of a left-padded row is not a token the row has seen."""
    if penalty == 1.0 or sequence.size(1) == 0:
        return logits
    if real is not None:  # padding positions point at the row's last token (always real), counted once anyway
        sequence = torch.where(real, sequence, sequence[:, -1:])
    seen = logits.gather(1, sequence)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, sequence, seen)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus sampling (Holtzman et al., 2019): keep the most probable tokens until their probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1)  # ascending: drop from the front
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative <= 1 - p
    drop[:, -1] = False  # the most probable token always stays
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Min-p sampling (Nguyen et al., 2024): drop tokens below min_p times the top token's probability."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: Tensor, sequence: Tensor, config: SamplingConfig, real: Tensor | None = None) -> Tensor:
    """The logits (B, V) to sample from, given the sequence so far (B, T) (`real`: its non-padding positions);
    filtered tokens get -inf."""
    logits = apply_repetition_penalty(logits.float(), sequence, config.repetition_penalty, real)
    if config.greedy:
        return logits
    if config.temperature != 1.0:
        logits = logits / config.temperature
    logits = top_k_filter(logits, config.top_k)
    logits = top_p_filter(logits, config.top_p)
    return min_p_filter(logits, config.min_p)


class Sampler:
    """`choose(logits, sequence) -> next tokens (B,)` for `engine.decode`: greedy or sampled, seeded.
    `prompt_mask` (B, T_prompt), 1 for real tokens, marks a left-padded prompt's padding, which the repetition
    penalty must not count."""

    def __init__(self, config: SamplingConfig | None = None, device: str | torch.device = "cpu",
                 prompt_mask: Tensor | None = None):
        self.prompt_mask = None if prompt_mask is None else prompt_mask.to(device).bool()
        self.config = config or SamplingConfig()
        self.config.validate()
        self.generator = self._generator(torch.device(device))

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        if self.config.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.config.seed)
        return generator

    def real_tokens(self, sequence: Tensor) -> Tensor | None:
        """Which positions of `sequence` are real tokens (None: all)."""
        if self.prompt_mask is None:
            return None
        generated = sequence.size(1) - self.prompt_mask.size(1)
        return torch.cat([self.prompt_mask, self.prompt_mask.new_ones(sequence.size(0), generated)], dim=1)

    def __call__(self, logits: Tensor, sequence: Tensor) -> Tensor:
        logits = process_logits(logits, sequence, self.config, self.real_tokens(sequence))
        if self.config.greedy:
            return logits.argmax(dim=-1)
        probs = logits.softmax(-1)
        if self.generator.device != probs.device:  # the logits' device decides: a generator must be on it
            self.generator = self._generator(probs.device)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)


LogitsProcessor = Callable[[Tensor, Tensor, int], Tensor]
"""processor(logits (1, V), tokens so far (1, T) (prompt then generated), prompt length) -> logits (1, V).
One request's sampling is an ordered list of these (`request_processors`); a request may add its own (a
constraint on the output) after them."""


def logit_bias_processor(bias: dict[int, float], vocab: int) -> LogitsProcessor:
    ids = torch.tensor(list(bias), dtype=torch.long)
    values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def apply(logits: Tensor, tokens: Tensor, prompt_len: int) -> Tensor:
        return logits.index_add(1, ids.to(logits.device), values.to(logits.device)[None])

    return apply


def penalty_processor(presence: float, frequency: float) -> LogitsProcessor:
    """OpenAI's presence and frequency penalties over the generated tokens (not the prompt):
    logit - presence * [count > 0] - frequency * count."""

    def apply(logits: Tensor, tokens: Tensor, prompt_len: int) -> Tensor:
        generated = tokens[0, prompt_len:]
        if generated.numel() == 0:
            return logits
        counts = torch.bincount(generated, minlength=logits.size(-1))[None].to(logits.dtype)
        return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts

    return apply


def request_processors(config: SamplingConfig, vocab: int) -> list[LogitsProcessor]:
    """The ordered pipeline of one request: logit bias, repetition penalty (prompt and generated tokens, as
    Hugging Face's), presence and frequency penalties (generated tokens, as OpenAI's), then, when sampling,
    temperature, top-k, top-p, min-p (Hugging Face's order; `process_logits` is the same for a whole batch)."""
    steps: list[LogitsProcessor] = []
    if config.logit_bias:
        steps.append(logit_bias_processor(config.logit_bias, vocab))
    if config.repetition_penalty != 1.0:
        steps.append(lambda logits, tokens, n: apply_repetition_penalty(logits, tokens, config.repetition_penalty))
    if config.presence_penalty or config.frequency_penalty:
        steps.append(penalty_processor(config.presence_penalty, config.frequency_penalty))
    if config.greedy:
        return steps
    if config.temperature != 1.0:
        steps.append(lambda logits, tokens, n: logits / config.temperature)
    if config.top_k:
        steps.append(lambda logits, tokens, n: top_k_filter(logits, config.top_k))
    if config.top_p < 1.0:
        steps.append(lambda logits, tokens, n: top_p_filter(logits, config.top_p))
    if config.min_p > 0:
        steps.append(lambda logits, tokens, n: min_p_filter(logits, config.min_p))
    return steps
