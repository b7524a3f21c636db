"""Text in, text out (chapter 17): prompts through a tokenizer, the decoding engine, sampling and streaming.

`generate_text` encodes the prompts and runs them on the serving engine (`serving.Engine`, one slot per prompt,
no padding: each row has its own positions), which ends each row at an end token or a stop string and streams its
text through a `TextStream` (`on_text(row, text)` is called as whole characters become known). Models the engine
cannot serve (the RNNs) are left-padded into one batch and decoded with `engine.decode` (greedy or a `Sampler`);
their `start_decoding(batch, attention_mask=...)` receives the padding mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from torchbook.errors import UserInputError
from torchbook.generate.engine import decode
from torchbook.generate.sampling import LogitsProcessor, Sampler, SamplingConfig
from torchbook.generate.serving import Engine, Request
from torchbook.generate.streaming import TextStream

CONTEXT_TOKENS = 5  # prompt tokens a stream decodes before the new ones, to get the first word's spacing right


@dataclass
class Completion:
    """One prompt's result. `finish_reason`: "stop" (an end token or stop string) or "length" (max_new_tokens)."""

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int


def encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """The prompt's ids; an error naming the characters the tokenizer would silently drop (a character-level
    vocabulary without an unknown token, like char-rnn's, has no id for a character it never saw)."""
    ids = list(tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
    normalizer = getattr(tokenizer, "normalizer", None)
    normalized = normalizer.normalize_str(text) if normalizer is not None else text
    lost = sorted(set(normalized) - set(tokenizer.decode(ids, skip_special_tokens=False)) - set(" \n\t"))
    if lost:
        raise UserInputError(f"the model's vocabulary has no token for {''.join(lost)!r} in the prompt; "
                             "leave those characters out (a character-level model knows only its training text's)")
    return ids


def model_max_len(model: Any) -> int | None:
    return getattr(getattr(model, "config", None), "max_len", None)


@torch.no_grad()
def generate_text(
    model: Any,
    tokenizer: Any,
    prompts: str | Sequence[str],
    max_new_tokens: int = 128,
    sampling: SamplingConfig | None = None,
    *,
    stop: Sequence[str] = (),
    end_ids: Sequence[int] = (),
    on_text: Callable[[int, str], Any] | None = None,
    add_special_tokens: bool = True,
    use_cache: bool = True,
    processors: Sequence[LogitsProcessor] = (),
) -> list[Completion]:
    """Continue each prompt. `end_ids`: tokens that end a row (not part of its text; a loaded checkpoint's are
    `Loaded.meta["end_token_ids"]`); `stop`: strings that end a row (cut from its text); `on_text(row, text)` streams; `add_special_tokens`: let the tokenizer add its
    beginning-of-sequence token (False for a prompt rendered from a chat template, which has its own);
    `processors`: logits processors of every row (a constraint: `constraints.constraint_processor`), on the engine."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if max_new_tokens < 1:
        raise UserInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not prompts:
        return []
    encoded = [encode(tokenizer, p, add_special_tokens) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise UserInputError(f"prompt {i} is empty after tokenization; give at least one character of text")
    longest = max(len(ids) for ids in encoded)
    limit = model_max_len(model)
    if limit is not None and longest >= limit:
        raise UserInputError(f"a prompt is {longest} tokens; this model reads at most {limit} tokens in all")
    if limit is not None:
        max_new_tokens = min(max_new_tokens, limit - longest)

    if getattr(model, "supports_slots", False):
        return _on_engine(model, tokenizer, encoded, max_new_tokens, sampling, stop, end_ids, on_text, processors)
    if processors:
        raise UserInputError(f"{type(model).__name__} runs outside the serving engine, which logits processors "
                             "(constrained decoding) need: use a decoder-only transformer", param="model")
    device = next(model.parameters()).device
    batch = len(encoded)
    tokens = torch.zeros(batch, longest, dtype=torch.long, device=device)
    mask = torch.zeros(batch, longest, dtype=torch.long, device=device)
    for i, ids in enumerate(encoded):  # left padding: every row's last token is its prompt's last
        tokens[i, longest - len(ids) :] = torch.tensor(ids, device=device)
        mask[i, longest - len(ids) :] = 1
    padded = bool((mask == 0).any())
    state = model.start_decoding(batch, attention_mask=mask) if padded else model.start_decoding(batch)

    end_ids = list(end_ids)
    ends = set(end_ids)
    streams = [TextStream(tokenizer, stop, context=ids[-CONTEXT_TOKENS:]) for ids in encoded]
    ended = [False] * batch

    def on_step(next_tokens: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        stopped = torch.zeros(batch, dtype=torch.bool, device=next_tokens.device)
        for row, token in enumerate(next_tokens.tolist()):
            if ended[row]:
                continue
            if token in ends:
                ended[row] = stopped[row] = True
                continue
            piece = streams[row].push(token)
            if piece and on_text is not None:
                on_text(row, piece)
            if streams[row].stopped:
                ended[row] = True
                stopped[row] = True
        return stopped.to(next_tokens.device)

    sampler = Sampler(sampling or SamplingConfig(temperature=0.0), device=device, prompt_mask=mask if padded else None)
    out = decode(model, state, tokens, max_new_tokens, eos_id=end_ids[0] if end_ids else None, choose=sampler,
                 use_cache=use_cache, on_step=on_step)
    completions = []
    for row, (stream, ids) in enumerate(zip(streams, out.token_lists())):
        rest = stream.finish()
        if rest and on_text is not None:
            on_text(row, rest)
        ids = [t for t in ids if t not in ends]
        completions.append(Completion(stream.text, ids, "stop" if ended[row] else "length", len(encoded[row])))
    return completions


def _on_engine(model: Any, tokenizer: Any, encoded: list[list[int]], max_new_tokens: int,
               sampling: SamplingConfig | None, stop: Sequence[str], end_ids: Sequence[int],
               on_text: Callable[[int, str], Any] | None, processors: Sequence[LogitsProcessor] = ()
               ) -> list[Completion]:
    """The prompts side by side on a `serving.Engine` stepped in this thread (one slot each)."""
    longest = max(len(ids) for ids in encoded)
    engine = Engine(model, tokenizer, slots=len(encoded), max_len=longest + max_new_tokens,
                    max_queue=len(encoded), prefill_chunk=max(longest, 1), end_ids=end_ids)
    sampling = sampling or SamplingConfig(temperature=0.0)
    handles = [engine.submit(Request(ids, max_new_tokens, sampling, stop, processors=processors)) for ids in encoded]
    while True:
        more = engine.step()
        if on_text is not None:
            for row, handle in enumerate(handles):
                while not handle.events.empty():
                    delta = handle.events.get()
                    if delta is not None and delta.text:
                        on_text(row, delta.text)
        if not more:
            break
    completions = []
    for ids, handle in zip(encoded, handles):
        choice = handle.result().choices[0]
        completions.append(Completion(choice.text, choice.tokens, choice.finish_reason, len(ids)))
    return completions
