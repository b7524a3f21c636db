"""The fixed-batch decoding loop (book chapters 14-15, 17): the RNNs, the encoder-decoder translators and beam
search decode through here. Generation with a decoder-only GPT (`generate_text`, `torchbook generate`, the
server, the recipes' samples) runs on `serving.Engine` instead: requests join and leave a batch of slots at every
step; `generate_tokens` keeps the fixed-batch path as the reference the cache parity tests compare against.

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
def generate_tokens(model: Any, tokens: Tensor, max_new_tokens: int, eos_id: int | None = None,
                    attention_mask: Tensor | None = None, use_cache: bool = True) -> Tensor:
    """Greedy continuation of a decoder-only model's prompts (B, T) (left-padded: give their `attention_mask`):
    the (B, max_new_tokens) new tokens, `eos_id` repeated after a row ends."""
    state = model.start_decoding(tokens.size(0), attention_mask=attention_mask)
    return decode(model, state, tokens, max_new_tokens, eos_id=-1 if eos_id is None else eos_id,
                  use_cache=use_cache).tokens


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

    All B x W live beams advance together as one batch of B*W rows. Each step scores every (beam, next token)
    pair by the beam's log-probability plus the token's. Every beam's end-of-sequence extension is a finished
    hypothesis (scored `log_prob / length ** length_penalty`, length counting the end-of-sequence token; the W
    best per input are kept), and the W best pairs that do not end stay live, so a finished hypothesis never takes
    a live beam's place. The state is reordered to follow each live beam's parent.
    An input is done when it has W finished hypotheses and its best live beam, scored at its current length,
    cannot beat the worst of them (exact for length penalty 0: log-probabilities only fall); the search stops when
    every input is done or after `max_len` new tokens, when unfinished beams compete as they are. The first step
    runs once per input (the prompt or start token is prefilled for B rows only); the state then grows to B*W rows.
    """
    batch, width = first_tokens.size(0), beam_width
    device = first_tokens.device
    neg_inf = float("-inf")
    logits = step_logits(model, state, first_tokens, first_tokens, use_cache).float()  # (B, V)
    vocab = logits.size(-1)
    expand = torch.arange(batch, device=device).repeat_interleave(width)  # (B*W,) parent row of every beam
    state.reorder(expand)
    sequence = first_tokens.index_select(0, expand)  # (B*W, T0): what the model has read
    log_probs = logits.log_softmax(-1).index_select(0, expand)  # (B*W, V)
    # Only the first beam of each input is live at the start, so the W beams do not all pick the same token.
    live_scores = torch.full((batch, width), neg_inf, device=device)
    live_scores[:, 0] = 0.0
    generated = first_tokens.new_zeros(batch * width, 0)  # (B*W, t) new tokens of the live beams
    # Finished hypotheses per input: normalized score (ranking), log-probability, length, tokens (eos-padded).
    done_score = torch.full((batch, width), neg_inf, device=device)
    done_log_prob = torch.full((batch, width), neg_inf, device=device)
    done_length = torch.zeros(batch, width, dtype=torch.long, device=device)
    done_tokens = torch.full((batch, width, max_len), eos_id, dtype=torch.long, device=device)
    input_done = torch.zeros(batch, dtype=torch.bool, device=device)
    offsets = (torch.arange(batch, device=device) * width)[:, None]  # (B, 1) first row of each input

    def keep_best(score: Tensor, log_prob: Tensor, length: Tensor, tokens: Tensor) -> None:
        """Merge candidate hypotheses (B, K) into the finished ones, keeping the W best per input."""
        nonlocal done_score, done_log_prob, done_length, done_tokens
        all_score = torch.cat([done_score, score], dim=1)
        best_score, pick = all_score.topk(width, dim=1)
        done_score = best_score
        done_log_prob = torch.cat([done_log_prob, log_prob], dim=1).gather(1, pick)
        done_length = torch.cat([done_length, length], dim=1).gather(1, pick)
        all_tokens = torch.cat([done_tokens, tokens], dim=1)
        done_tokens = all_tokens.gather(1, pick[:, :, None].expand(-1, -1, max_len))

    for step in range(max_len):
        length = step + 1  # tokens of a hypothesis ending at this step, end-of-sequence included
        scores = live_scores.view(-1, 1) + log_probs  # (B*W, V): every live beam extended by every token
        # Every live beam may end here: its end-of-sequence extension competes with the finished hypotheses
        # (not only when it ranks among the step's best candidates), so a good short ending is never lost.
        end_log_prob = scores[:, eos_id].view(batch, width)
        end_score = end_log_prob / length**length_penalty
        ends = ~input_done[:, None] & (end_log_prob > neg_inf) & (end_score > done_score[:, -1:])
        if bool(ends.any()):
            ended_tokens = torch.full((batch, width, max_len), eos_id, dtype=torch.long, device=device)
            ended_tokens[:, :, :step] = generated.view(batch, width, step)
            keep_best(torch.where(ends, end_score, neg_inf), torch.where(ends, end_log_prob, neg_inf),
                      torch.full_like(done_length, length), ended_tokens)
        # The W best continuations that do not end stay live.
        scores[:, eos_id] = neg_inf
        live_scores, top_index = scores.view(batch, width * vocab).topk(width, dim=1)  # (B, W), best first
        chosen_parent = (top_index // vocab + offsets).view(-1)
        next_tokens = (top_index % vocab).view(-1)
        generated = torch.cat([generated.index_select(0, chosen_parent), next_tokens[:, None]], dim=1)
        sequence = torch.cat([sequence.index_select(0, chosen_parent), next_tokens[:, None]], dim=1)
        # Done: W finished hypotheses, none of which the best live beam can beat any more.
        best_live = live_scores[:, 0] / length**length_penalty
        input_done |= (done_score[:, -1] > neg_inf) & (done_score[:, -1] >= best_live)
        if bool(input_done.all()) or step == max_len - 1:
            break
        state.reorder(chosen_parent)
        logits = step_logits(model, state, sequence, next_tokens[:, None], use_cache).float()
        log_probs = logits.log_softmax(-1)
    # Inputs still searching at max_len: their live beams compete as they are (no end-of-sequence).
    steps = generated.size(1)
    still = ~input_done[:, None] & (live_scores > neg_inf)
    live_tokens = torch.full((batch, width, max_len), eos_id, dtype=torch.long, device=device)
    live_tokens[:, :, :steps] = generated.view(batch, width, steps)
    keep_best(
        torch.where(still, live_scores / max(steps, 1) ** length_penalty, neg_inf),
        torch.where(still, live_scores, neg_inf),
        torch.full_like(done_length, steps),
        live_tokens,
    )
    best = done_score.argmax(dim=1, keepdim=True)  # (B, 1); the lists are sorted, so this is column 0
    lengths = done_length.gather(1, best).squeeze(1)
    tokens = done_tokens.gather(1, best[:, :, None].expand(-1, -1, max_len)).squeeze(1)
    tokens = tokens[:, : max(int(lengths.max()), 1) if batch else 0]
    return Generated(
        tokens=tokens,
        lengths=lengths,
        log_prob=done_log_prob.gather(1, best).squeeze(1),
        score=done_score.gather(1, best).squeeze(1),
        eos_id=eos_id,
    )
