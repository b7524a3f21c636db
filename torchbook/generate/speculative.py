"""Fast decoding (book chapter 17): speculative decoding and prompt lookup decoding on the serving engine's cache.

Decoding one token at batch 1 reads every weight of the model for very little arithmetic, so a pass over k + 1
tokens costs about as much as a pass over one. Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) lets
a cheap *draft* propose k tokens, then the *target* scores all of them in one pass (`GPT.slot_step` with
`all_positions=True` returns the logits of every new position) and keeps the longest acceptable prefix plus one
token of its own; the keys and values of rejected draft tokens are rolled back (`SlotCache.truncate`). Each round
yields between 1 and k + 1 tokens for one target pass.

Drafts:
- `ModelDraft`: a smaller or cheaper model sharing the tokenizer, e.g. the int4 copy of the same checkpoint
  (`torchbook.load(path, quantize="int4")`), decoding in its own one-row `SlotCache`;
- `PromptLookupDraft` (prompt lookup decoding, Saxena 2023): no model at all, the tokens that followed the latest
  earlier occurrence of the sequence's last n-gram (n = `max_ngram` down to `min_ngram`), which pays off when the
  answer quotes its prompt (retrieved passages, code to edit).

The acceptance rule keeps the output exactly the target's:
- greedy: a draft token is accepted when it is the target's argmax there, so the tokens equal the target's alone;
- sampling (`verify`): draft token x, drawn from the draft's distribution q, is accepted with probability
  min(1, p(x) / q(x)) under the target's distribution p; at the first rejection the token is drawn from the
  residual max(0, p - q) renormalized (`residual`), and after k acceptances from p at the next position. Then
  P(token = y) = min(p(y), q(y)) + (1 - sum_x min(p(x), q(x))) (p(y) - q(y))+ / sum (p - q)+ = p(y): every
  output token is distributed as the target's own (tests/test_speculative.py checks the joint distribution of
  two tokens with a chi-square test, and that a wrong rule fails it). A deterministic draft (prompt lookup, a
  greedy draft) has q = one-hot.
Both p and q come from the request's logits processors (temperature, top-k, top-p, penalties, ...) applied with
each position's own history, so sampling settings act as they do without speculation.

This decodes one sequence at a time (the latency case speculation is for); the engine's batched rows keep one
token per step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from torchbook.errors import UserInputError
from torchbook.generate.sampling import LogitsProcessor, SamplingConfig, request_processors
from torchbook.generate.serving import _common_prefix

log = logging.getLogger(__name__)


def residual(p: Tensor, q: Tensor) -> Tensor:
    """max(0, p - q) renormalized over the last dimension (where p <= q everywhere, p itself): what a rejected
    draft token is replaced by."""
    rest = (p - q).clamp_min(0)
    total = rest.sum(-1, keepdim=True)
    return torch.where(total > 0, rest / total.clamp_min(torch.finfo(p.dtype).tiny), p)


def verify(p: Tensor, q: Tensor, draft: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Speculative sampling's acceptance rule for a batch of rounds.

    p (B, k + 1, V): the target's probabilities at each draft position and one past the last; q (B, k, V): the
    draft's, from which `draft` (B, k) was drawn. Returns (accepted (B,): how many draft tokens are kept, next
    (B,): the token that follows them, from the residual at the first rejection or from p after k acceptances)."""
    batch, k = draft.shape
    u = torch.rand(batch, k, generator=generator, device=p.device)
    p_x = p[:, :k].gather(-1, draft[..., None])[..., 0]
    q_x = q.gather(-1, draft[..., None])[..., 0]
    ok = u * q_x < p_x  # probability min(1, p(x) / q(x))
    accepted = ok.long().cumprod(-1).sum(-1)
    rows = torch.arange(batch, device=p.device)
    q_next = torch.cat([q, q.new_zeros(batch, 1, q.size(-1))], dim=1)[rows, accepted]  # no draft after k: residual(p, 0) = p
    probs = residual(p[rows, accepted], q_next)
    return accepted, torch.multinomial(probs, 1, generator=generator)[:, 0]


@dataclass
class DecodeStats:
    """What a speculative run did: rounds (target passes after the prompt), draft tokens proposed and accepted."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    generated: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.generated / self.rounds if self.rounds else 0.0


class Scorer:
    """A request's logits processors turned into a distribution (or the greedy choice) for a position with its
    own history."""

    def __init__(self, sampling: SamplingConfig, vocab: int, prompt_len: int,
                 processors: Sequence[LogitsProcessor] = ()):
        self.greedy = sampling.greedy
        self.processors = request_processors(sampling, vocab) + list(processors)
        self.prompt_len = prompt_len

    def scores(self, logits: Tensor, history: Sequence[int]) -> Tensor:
        """(V,) logits of the position after `history` -> processed (V,) float32 scores."""
        scores = logits.float()[None].cpu()
        if self.processors:
            tokens = torch.tensor([list(history)], dtype=torch.long)
            for processor in self.processors:
                scores = processor(scores, tokens, self.prompt_len)
        return scores[0]

    def probs(self, logits: Tensor, history: Sequence[int]) -> Tensor:
        return self.scores(logits, history).softmax(-1)


class Draft(Protocol):
    def propose(self, history: list[int], k: int, scorer: Scorer, generator: torch.Generator | None
                ) -> tuple[list[int], Tensor | None]:
        """Up to k tokens to follow `history` and the (n, V) distributions they were drawn from (None: chosen
        deterministically, q = one-hot)."""
        ...


class ModelDraft:
    """A draft model decoding in its own one-row `SlotCache`; between rounds it keeps the keys and values of the
    tokens the target accepted and rolls back the rest."""

    def __init__(self, model: Any, max_len: int = 1024, prefill_chunk: int = 256):
        self.model = model.eval()
        self.cache = model.new_slot_cache(1, max_len)
        self.fed: list[int] = []  # the tokens whose keys and values the row holds
        self.prefill_chunk = prefill_chunk

    def _feed(self, tokens: list[int]) -> Tensor:
        device = self.cache.keys[0].device
        logits = None
        for start in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[start : start + self.prefill_chunk]
            logits = self.model.slot_step(torch.tensor([chunk], device=device), self.cache.view([0], len(chunk)))
            self.fed.extend(chunk)
        assert logits is not None
        return logits[0]

    def _rollback(self, history: list[int]) -> int:
        """Keep the row's longest prefix of `history` (all but its last token at most); its length."""
        keep = _common_prefix(self.fed, history, len(history) - 1)
        self.cache.truncate(0, keep)
        del self.fed[keep:]
        return keep

    def prefill(self, prompt: list[int]) -> None:
        """Feed all of the prompt but its last token (with the target's prefill, so that it counts as prompt
        processing, not as decoding)."""
        keep = self._rollback(prompt)
        if keep < len(prompt) - 1:
            self._feed(prompt[keep:-1])

    def propose(self, history: list[int], k: int, scorer: Scorer, generator: torch.Generator | None
                ) -> tuple[list[int], Tensor | None]:
        keep = self._rollback(history)
        k = min(k, self.cache.max_len - len(history))
        logits = self._feed(history[keep:])
        tokens: list[int] = []
        dists: list[Tensor] = []
        context = list(history)
        for i in range(k):
            if scorer.greedy:
                token = int(scorer.scores(logits, context).argmax())
            else:
                dist = scorer.probs(logits, context)
                token = int(torch.multinomial(dist, 1, generator=generator))
                dists.append(dist)
            tokens.append(token)
            context.append(token)
            if i + 1 < k:
                logits = self._feed([token])
        return tokens, (torch.stack(dists) if dists else None)


class PromptLookupDraft:
    """Prompt lookup decoding: the k tokens that followed the latest earlier occurrence of the sequence's last
    n-gram, trying n = `max_ngram` down to `min_ngram`; nothing when no n-gram recurs."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise UserInputError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}",
                                 param="min_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, history: list[int], k: int, scorer: Scorer, generator: torch.Generator | None
                ) -> tuple[list[int], Tensor | None]:
        return lookup(history, k, self.max_ngram, self.min_ngram), None


def lookup(history: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """The (up to) k tokens after the latest earlier occurrence of `history`'s last n-gram, longest n first."""
    length = len(history)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        tail = list(history[length - n :])
        for start in range(length - n - 1, -1, -1):  # latest first; the tail itself excluded
            if list(history[start : start + n]) == tail:
                return list(history[start + n : start + n + k])
    return []


class SpeculativeDecoder:
    """Decode one sequence with `target`, `k` tokens proposed per round by `draft` (None: the target alone, one
    token per pass, for comparison). `max_len`: positions of the target's one-row cache (prompt + answer).

    `generate(prompt, max_tokens, sampling, end_ids)` -> (tokens, `DecodeStats`); greedy output equals the
    target's alone, sampled output is distributed as the target's (module docstring)."""

    def __init__(self, target: Any, draft: Draft | None = None, *, k: int = 4, max_len: int = 1024,
                 prefill_chunk: int = 256):
        if k < 1:
            raise UserInputError(f"k (draft tokens per round) must be at least 1, got {k}", param="k")
        if not getattr(target, "supports_slots", False):
            raise UserInputError(f"{type(target).__name__} cannot decode on a slot cache (it needs a decoder-only "
                                 "model without a sliding window)", param="model")
        self.target, self.draft, self.k, self.prefill_chunk = target.eval(), draft, k, prefill_chunk
        self.cache = target.new_slot_cache(1, max_len)
        self.max_len = self.cache.max_len
        self.vocab = target.config.vocab_size

    def _step(self, tokens: list[int], all_positions: bool) -> Tensor:
        view = self.cache.view([0], len(tokens))
        device = self.cache.keys[0].device
        return self.target.slot_step(torch.tensor([tokens], device=device), view, all_positions=all_positions)[0]

    def generate(self, prompt: Sequence[int], max_tokens: int = 128, sampling: SamplingConfig | None = None,
                 end_ids: Sequence[int] = (), processors: Sequence[LogitsProcessor] = ()
                 ) -> tuple[list[int], DecodeStats]:
        sampling = sampling or SamplingConfig(temperature=0.0)
        sampling.validate()
        prompt = [int(t) for t in prompt]
        if not prompt or len(prompt) >= self.max_len:
            raise UserInputError(f"the prompt must hold 1 to {self.max_len - 1} tokens, got {len(prompt)}",
                                 param="prompt")
        generator = None
        if not sampling.greedy:
            generator = torch.Generator()
            if sampling.seed is None:
                generator.seed()
            else:
                generator.manual_seed(sampling.seed)
        scorer = Scorer(sampling, self.vocab, len(prompt), processors)
        ends = set(int(t) for t in end_ids)
        stats = DecodeStats()
        self.cache.truncate(0, 0)
        # The target's row holds every token of the history but the last, whose logits each round needs.
        for start in range(0, len(prompt) - 1, self.prefill_chunk):
            self._step(prompt[start : min(start + self.prefill_chunk, len(prompt) - 1)], all_positions=False)
        prefill = getattr(self.draft, "prefill", None)
        if callable(prefill) and max_tokens > 1:
            prefill(prompt)
        history = list(prompt)
        out: list[int] = []
        while len(out) < max_tokens and len(history) < self.max_len:
            room = min(self.k, self.max_len - len(history) - 1, max_tokens - len(out) - 1)
            draft: list[int] = []
            q = None
            if self.draft is not None and room > 0:
                draft, q = self.draft.propose(history, room, scorer, generator)
                draft, q = draft[:room], (None if q is None else q[:room])
            fed = len(history) - 1
            logits = self._step([history[-1], *draft], all_positions=True)  # (len(draft) + 1, V)
            accepted, token = self._accept(logits, history, draft, q, scorer, generator)
            self.cache.truncate(0, fed + 1 + accepted)  # the rejected drafts' keys and values go
            new = [*draft[:accepted], token]
            stats.rounds += 1
            stats.drafted += len(draft)
            stats.accepted += accepted
            for t in new:
                out.append(t)
                history.append(t)
                if t in ends or len(out) >= max_tokens:
                    stats.generated = len(out)
                    return out, stats
        stats.generated = len(out)
        return out, stats

    @staticmethod
    def _accept(logits: Tensor, history: list[int], draft: list[int], q: Tensor | None, scorer: Scorer,
                generator: torch.Generator | None) -> tuple[int, int]:
        """How many draft tokens the target keeps and the token after them."""
        contexts = [history + draft[:i] for i in range(len(draft) + 1)]
        if scorer.greedy:
            for i, context in enumerate(contexts):
                best = int(scorer.scores(logits[i], context).argmax())
                if i == len(draft) or best != draft[i]:
                    return i, best
        p = torch.stack([scorer.probs(logits[i], c) for i, c in enumerate(contexts)])  # (k + 1, V)
        if q is None:  # a deterministic draft: q is one-hot
            q = torch.zeros(len(draft), p.size(-1))
            q[torch.arange(len(draft)), torch.tensor(draft, dtype=torch.long)] = 1.0
        accepted, token = verify(p[None], q[None], torch.tensor([draft], dtype=torch.long).reshape(1, -1), generator)
        return int(accepted), int(token)

