"""Supervised fine-tuning data (book chapter 15): conversations as token ids with the assistant's tokens marked,
padded or packed batches, and what the `chat-sft` recipe and preference tuning share to build them.

Two formats: the checkpoint's own chat template (`torchbook.hub.prompts.chat_prompt`) or the book's role tags for
a base model (`torchbook.data.instructions.book_text`). The loss counts the assistant's tokens only. A template
such as SmolLM2's has no generation markers ({% generation %}), so the assistant's spans are found by rendering
the conversation prefix by prefix: the text the template adds between "the conversation up to this assistant turn,
with the generation prompt" and "the conversation including it" is that turn (with its end-of-turn token, which
the model must learn to emit). Tokens are labelled by their character offsets in the full text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from torchbook.data.instructions import Conversation, book_text
from torchbook.errors import UserInputError
from torchbook.hub.prompts import chat_prompt

IGNORE = -100  # label of a token the loss does not count (cross_entropy's ignore_index)
FORMATS = ("template", "book")


def render(messages: Conversation, meta: dict[str, Any], fmt: str, add_generation_prompt: bool = False) -> str:
    if fmt == "book":
        return book_text(messages, add_generation_prompt)
    if fmt == "template":
        return chat_prompt(messages, meta, add_generation_prompt)
    raise UserInputError(f"format={fmt!r}; accepted: {', '.join(FORMATS)}", param="format")


def assistant_spans(messages: Conversation, meta: dict[str, Any], fmt: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character spans of its assistant turns, found by rendering prefix by prefix."""
    full = render(messages, meta, fmt)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], meta, fmt, add_generation_prompt=True) if i else ""
        through = render(messages[: i + 1], meta, fmt)
        if fmt == "book" and not i:  # "Assistant:" then " answer": the answer's first token holds the space
            before = "Assistant:"
        if not full.startswith(through) or not through.startswith(before):
            raise UserInputError("the chat template does not render conversations prefix by prefix (a turn "
                                 "changes what comes before it); the assistant's tokens cannot be located",
                                 param="format")
        spans.append((len(before), len(through)))
    return full, spans


def encode_conversation(tokenizer: Any, messages: Conversation, meta: dict[str, Any], fmt: str = "template",
                        max_length: int = 0) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation (truncated to `max_length` if > 0) and, for each, whether it is the assistant's.
    The book format starts with the checkpoint's <bos> token when it has one and ends with its <eos>."""
    text, spans = assistant_spans(messages, meta, fmt)
    prefix: list[int] = []
    if fmt == "book":
        # a torchbook tokenizer (gpt-pretrain) names no special tokens in meta: its own <s> and </s>
        bos, eos = meta.get("bos_token") or "<s>", meta.get("eos_token") or "</s>"
        eos = eos if tokenizer.token_to_id(eos) is not None else None
        prefix = [tokenizer.token_to_id(bos)] if bos and tokenizer.token_to_id(bos) is not None else []
        if eos:
            text += eos
            spans[-1] = (spans[-1][0], len(text))
    encoding = tokenizer.encode(text, add_special_tokens=False)
    ids = prefix + list(encoding.ids)
    mine = [False] * len(prefix) + [any(a <= start < b for a, b in spans) for start, _ in encoding.offsets]
    if max_length:
        ids, mine = ids[:max_length], mine[:max_length]
    return ids, mine


def labels_for(ids: list[int], mine: list[bool]) -> list[int]:
    """Next-token targets: target t is token t+1 when it is the assistant's, else IGNORE (the last has none)."""
    return [ids[t + 1] if mine[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


@dataclass
class Example:
    ids: list[int]
    labels: list[int]


class SFTData(Dataset[Example]):
    """Encoded conversations, each (ids, labels); those without a labelled token (cut off by `max_length`) dropped."""

    def __init__(self, conversations: list[Conversation], tokenizer: Any, meta: dict[str, Any], fmt: str = "template",
                 max_length: int = 512):
        self.examples = []
        for messages in conversations:
            ids, mine = encode_conversation(tokenizer, messages, meta, fmt, max_length)
            labels = labels_for(ids, mine)
            if any(label != IGNORE for label in labels):
                self.examples.append(Example(ids, labels))
        self.dropped = len(conversations) - len(self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    def lengths(self) -> list[int]:
        return [len(e.ids) for e in self.examples]


def pad_collate(pad_id: int) -> Any:
    """Examples -> (inputs, labels), right-padded to the longest (causal attention never reads what comes after)."""

    def collate(batch: list[Example]) -> tuple[Tensor, Tensor]:
        length = max(len(e.ids) for e in batch)
        inputs = torch.full((len(batch), length), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE, dtype=torch.long)
        for row, e in enumerate(batch):
            inputs[row, : len(e.ids)] = torch.tensor(e.ids)
            labels[row, : len(e.labels)] = torch.tensor(e.labels)
        return inputs, labels

    return collate


def pack_collate(pad_id: int, length: int) -> Any:
    """Examples -> (inputs, labels, documents), several examples per row of `length` tokens (first fit, in order):
    `documents` numbers each row's examples 1, 2, ... (0: padding), so that the model attends within an example
    only and restarts positions at each (`GPT.forward(documents=...)`)."""

    def collate(batch: list[Example]) -> tuple[Tensor, Tensor, Tensor]:
        rows: list[list[Example]] = []
        used: list[int] = []
        for e in batch:
            size = min(len(e.ids), length)
            fit = next((r for r, n in enumerate(used) if n + size <= length), None)
            if fit is None:
                rows.append([]), used.append(0)  # type: ignore[func-returns-value]
                fit = len(rows) - 1
            rows[fit].append(e)
            used[fit] += size
        inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        documents = torch.zeros((len(rows), length), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for d, e in enumerate(row, start=1):
                n = min(len(e.ids), length)
                inputs[r, at : at + n] = torch.tensor(e.ids[:n])
                labels[r, at : at + n] = torch.tensor(e.labels[:n])
                documents[r, at : at + n] = d
                at += n
        return inputs, labels, documents

    return collate
