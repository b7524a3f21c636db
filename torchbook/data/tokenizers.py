"""Subword tokenizers (chapter 14): byte-pair encoding trained with Hugging Face `tokenizers`.

`train_bpe` learns a BPE vocabulary (Sennrich et al. 2016) on the training text, Llama-style: words keep their
leading space as "▁", and the 256 byte tokens <0x00>..<0xFF> are part of the vocabulary with `byte_fallback`, so a
character never seen in training (an emoji, a rare accent) is spelled out as its UTF-8 bytes instead of becoming
<unk>: every input is representable and decodes back to itself. The tokenizer is saved as `tokenizer.json` in the
run's model folder, where `torchbook.load` finds it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from torchbook.errors import UserInputError
from torchbook.io import atomic_write_text

TOKENIZER = "tokenizer.json"  # a tokenizer saved beside a model

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def _pipeline(tokenizer: Tokenizer, prepend_space: bool = True) -> Tokenizer:
    tokenizer.normalizer = normalizers.NFC()
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prepend_space:  # sentences: "▁" before the first word too, stripped again when decoding
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        steps.append(decoders.Strip(" ", 1, 0))
    else:  # running text: no space added, so any text (even one starting with spaces) decodes back to itself
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def train_bpe(
    texts: Iterable[str], vocab_size: int = 10_000, min_frequency: int = 2, prepend_space: bool = True
) -> Tokenizer:
    """A BPE tokenizer with byte fallback; ids 0-3 are <pad>, <s>, </s>, <unk>, then the 256 byte tokens.

    `prepend_space=True` (sentences, translation) adds "▁" before the first word, Llama-style; a text that already
    starts with a space then loses it when decoded. Language models of running text (chapter 15's GPT on
    Shakespeare) use `prepend_space=False`: decode(encode(text)) == text for every NFC text.
    """
    learner = _pipeline(Tokenizer(models.BPE(unk_token=UNK)), prepend_space)
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - len(BYTE_TOKENS), len(SPECIAL_TOKENS) + 1),
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    learner.train_from_iterator(texts, trainer)
    # Rebuild the model with the byte tokens right after the special ones, and byte fallback on.
    learned = json.loads(learner.to_str())["model"]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}
    for token, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tokenizer = _pipeline(Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True)),
                          prepend_space)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def char_tokenizer(text: str) -> Tokenizer:
    """A character-level tokenizer (chapter 14's char-RNN): one id per distinct character of `text`, in sorted
    order, no special tokens. Written as a BPE model without merges, so it saves and loads as `tokenizer.json`
    like the subword tokenizers; `char_ids` checks that every character is known."""
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(set(text)))}, merges=[]))
    tokenizer.decoder = decoders.Fuse()  # characters join without spaces
    return tokenizer


def char_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids of `text`'s characters; a clear error naming the characters the vocabulary lacks (the tokenizer
    itself would silently drop them)."""
    vocab = tokenizer.get_vocab()
    unknown = sorted(set(text) - vocab.keys())
    if unknown:
        raise UserInputError(f"characters {''.join(unknown)!r} are not in the model's vocabulary of {len(vocab)} "
                             f"characters: {''.join(sorted(vocab))!r}")
    return [vocab[c] for c in text]


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    ids = {name: tokenizer.token_to_id(token) for name, token in (("pad", PAD), ("bos", BOS), ("eos", EOS))}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}; torchbook's translators need {SPECIAL_TOKENS}")
    return ids  # type: ignore[return-value]


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path) -> Path:
    path = Path(folder) / TOKENIZER
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, tokenizer.to_str())
    return path
