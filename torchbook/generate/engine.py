"""The one decoding engine (book chapters 14-15, 17): every model that generates tokens decodes through here.

The protocol a model implements (encoder-decoder RNN and Transformer, decoder-only GPT/Llama):

- `state = model.start_decoding(batch_size, **inputs)` encodes the source once (encoder-decoder) and makes an empty
  incremental state (a `KVCache`, an RNN hidden state). The state is an object with
  `reorder(index)`: keep batch rows `index` (beam search follows each surviving beam's parent), and
  `fresh()`: a copy holding the same fixed context (encoder output, source mask, already reordered) but an *empty*
  incremental state; the engine uses it for `use_cache=False`, recomputing from the full sequence every step.
- `logits = model.decode_step(tokens, state)`: tokens (B, T_new), T_new > 1 for a prompt prefill (or the whole
  sequence when the cache is off), 1 per step after; returns the (B, vocab) logits of the last position and
  appends the new tokens to the state in place.

`decode` is the one token loop (greedy by default; sampling, stop strings and streaming plug in through `choose`
and `on_step`); `beam_search` is batched beam search (width, length penalty, max length, early stop at
end-of-sequence). With and without the cache both produce the same tokens: a test checks it for every model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


class DecodingState(Protocol):
    def reorder(self, index: Tensor) -> None: ...

    def fresh(self) -> DecodingState: ...


class Decoder(Protocol):
    """What the engine calls (the model's `start_decoding(batch_size, **inputs)` is called by its user)."""

    def decode_step(self, tokens: Tensor, state: Any) -> Tensor: ...


ChooseFn = Callable[[Tensor, Tensor], Tensor]
"""choose(logits (B, V), sequence so far (B, T)) -> next tokens (B,)."""


def greedy_choice(logits: Tensor, sequence: Tensor) -> Tensor:
    """The most probable next token (greedy decoding, chapter 14)."""
    return logits.argmax(dim=-1)


@dataclass
class Generated:
    """Decoder output. `tokens` (B, T) are the new tokens only, `eos_id` repeated after a row's end-of-sequence;
    `lengths` (B,) count each row's tokens including its end-of-sequence token; `log_prob` (B,) is the model's
    log-probability of the row's tokens (up to and including end-of-sequence); `score` is what beam search ranks
    by (`log_prob / length ** length_penalty`; equal to `log_prob` for `decode`)."""

    tokens: Tensor
    lengths: Tensor
    log_prob: Tensor
    score: Tensor
    eos_id: int | None = None

    def token_lists(self) -> list[list[int]]:
        """Each row's tokens without the end-of-sequence token and what follows it."""
        rows = [row[: int(n)].tolist() for row, n in zip(self.tokens, self.lengths)]
        return [row[:-1] if row and row[-1] == self.eos_id else row for row in rows]


def step_logits(model: Decoder, state: Any, sequence: Tensor, new_tokens: Tensor, use_cache: bool) -> Tensor:
    """Logits of the next token: from the incremental state (only `new_tokens` are fed) or, with the cache off, by
    recomputing from the whole `sequence` on a fresh state."""
    if use_cache:
        return model.decode_step(new_tokens, state)
    return model.decode_step(sequence, state.fresh())


def _ended_lengths(ended_at: Tensor, steps: int) -> Tensor:
    """Lengths from the step at which each row produced end-of-sequence (-1: never, so the full `steps`)."""
    return torch.where(ended_at >= 0, ended_at + 1, torch.full_like(ended_at, steps))


@torch.no_grad()
def decode(
    model: Decoder,
    state: Any,
    first_tokens: Tensor,
    max_new_tokens: int,
    eos_id: int | None = None,
    choose: ChooseFn = greedy_choice,
    *,
    use_cache: bool = True,
    on_step: Callable[[Tensor, Tensor], Any] | None = None,
) -> Generated:
    """The token loop: feed `first_tokens` (B, T0) (a start-of-sequence token, or a prompt to prefill), then
    repeatedly `choose` the next token from the last position's logits and feed it back.

    Rows that produced `eos_id` keep producing it (their log-probability no longer changes); the loop stops when
    every row has ended or after `max_new_tokens`. `on_step(next_tokens, finished)` is called after every step
    (streaming); if it returns a (B,) boolean tensor, those rows are finished too (stop strings).
    """
    batch = first_tokens.size(0)
    device = first_tokens.device
    sequence = first_tokens
    new_tokens = first_tokens
    log_prob = torch.zeros(batch, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    ended_at = torch.full((batch,), -1, dtype=torch.long, device=device)
    out: list[Tensor] = []
    for step in range(max_new_tokens):
        logits = step_logits(model, state, sequence, new_tokens, use_cache).float()
        next_tokens = choose(logits, sequence)
        if eos_id is not None:
            next_tokens = next_tokens.masked_fill(finished, eos_id)
        token_log_prob = logits.log_softmax(-1).gather(1, next_tokens[:, None]).squeeze(1)
        log_prob = log_prob + token_log_prob.masked_fill(finished, 0.0)
        out.append(next_tokens)
        new_tokens = next_tokens[:, None]
        sequence = torch.cat([sequence, new_tokens], dim=1)
        newly_done = torch.zeros_like(finished)
        if eos_id is not None:
            newly_done = (next_tokens == eos_id) & ~finished
        if on_step is not None:
            stopped = on_step(next_tokens, finished | newly_done)
            if isinstance(stopped, Tensor):
                newly_done |= stopped.to(torch.bool) & ~finished
        ended_at = torch.where(newly_done, torch.full_like(ended_at, step), ended_at)
        finished |= newly_done
        if bool(finished.all()):
            break
    tokens = torch.stack(out, dim=1) if out else first_tokens.new_zeros(batch, 0)
    lengths = _ended_lengths(ended_at, tokens.size(1))
    return Generated(tokens=tokens, lengths=lengths, log_prob=log_prob, score=log_prob.clone(), eos_id=eos_id)


@torch.no_grad()
def beam_search(
    model: Decoder,
    state: Any,
    first_tokens: Tensor,
    beam_width: int = 3,
    length_penalty: float = 1.0,
    max_len: int = 64,
    eos_id: int = 2,
    *,
    use_cache: bool = True,
) -> Generated:
    """Batched beam search (chapter 14): keep the `beam_width` most probable partial translations of every input.

    All B x W beams advance together as one batch of B*W rows. Each step scores every (beam, next token) pair by
    the beam's log-probability plus the token's, keeps the W best per input, and reorders the state to follow
    their parents. A beam that produced `eos_id` is finished: it stays among the candidates with its score frozen
    (it can only extend with `eos_id` at no cost), so live beams must beat it to keep going. An input stops when
    all its beams have finished; the search stops when every input has, or after `max_len` new tokens. The
    winner is the beam with the best `log_prob / length ** length_penalty` (0: plain log-probability; larger
    values favour longer translations). The first step runs once per input (the prompt or start token is
    prefilled for B rows only) and the state is expanded to B*W rows after it.
    """
    batch = first_tokens.size(0)
    width = beam_width
    device = first_tokens.device
    logits = step_logits(model, state, first_tokens, first_tokens, use_cache).float()  # (B, V)
    vocab = logits.size(-1)
    expand = torch.arange(batch, device=device).repeat_interleave(width)  # (B*W,) parent row of every beam
    state.reorder(expand)
    sequence = first_tokens.index_select(0, expand)  # (B*W, T0)
    log_probs = logits.log_softmax(-1).index_select(0, expand)  # (B*W, V)
    # Only the first beam of each input is live at the start, so the W beams do not all pick the same token.
    beam_scores = torch.full((batch, width), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0
    beam_scores = beam_scores.view(-1)
    finished = torch.zeros(batch * width, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * width, dtype=torch.long, device=device)
    generated = first_tokens.new_zeros(batch * width, 0)
    eos_row = torch.full((vocab,), float("-inf"), device=device)
    eos_row[eos_id] = 0.0
    offsets = (torch.arange(batch, device=device) * width)[:, None]  # (B, 1) first row of each input
    for step in range(max_len):
        # A finished beam may only be extended by end-of-sequence, at no cost: its score stays as it was.
        log_probs = torch.where(finished[:, None], eos_row, log_probs)
        candidates = (beam_scores[:, None] + log_probs).view(batch, width * vocab)
        top_scores, top_index = candidates.topk(width, dim=1)  # (B, W), best first
        parent = (top_index // vocab + offsets).view(-1)  # (B*W,) row of each new beam's parent
        next_tokens = (top_index % vocab).view(-1)
        beam_scores = top_scores.view(-1)
        was_finished = finished.index_select(0, parent)
        lengths = lengths.index_select(0, parent) + (~was_finished).long()
        finished = was_finished | (next_tokens == eos_id)
        generated = torch.cat([generated.index_select(0, parent), next_tokens[:, None]], dim=1)
        sequence = torch.cat([sequence.index_select(0, parent), next_tokens[:, None]], dim=1)
        if bool(finished.all()) or step == max_len - 1:
            break
        state.reorder(parent)
        logits = step_logits(model, state, sequence, next_tokens[:, None], use_cache).float()
        log_probs = logits.log_softmax(-1)
    normalized = beam_scores / lengths.clamp(min=1).float() ** length_penalty
    best = normalized.view(batch, width).argmax(dim=1) + offsets.squeeze(1)  # (B,)
    return Generated(
        tokens=generated.index_select(0, best),
        lengths=lengths.index_select(0, best),
        log_prob=beam_scores.index_select(0, best),
        score=normalized.index_select(0, best),
        eos_id=eos_id,
    )
