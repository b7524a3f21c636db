"""English-to-Spanish sentence pairs for the translators of chapters 14-15, and padding-aware batching.

Sources:
- `tatoeba`: the book's pairs (Tatoeba sentences as packaged by manythings.org/Anki in TensorFlow's `spa-eng.zip`,
  `English<TAB>Spanish` per line), downloaded through `torchbook.data.download.fetch`. No checksum is published
  for that archive; `TATOEBA.sha256` is the one recorded when torchbook first downloaded it (see docs/translation.md).
- `gettext` (offline default): the English messages and Spanish translations of the software installed on this
  machine (`/usr/share/locale/es/LC_MESSAGES/*.mo`), cleaned: printf/brace placeholders, accelerator marks
  (`_File`, `&File`), markup and entities removed, multi-line usage texts and untranslated or duplicate pairs
  dropped. Whole catalogs go to test or validation by a hash of their file name, so the split stays the same when
  packages are installed or removed; a catalog holding more than 10% of all pairs always stays in training. The
  manifest (file, sha256, pairs, split) is written to the run folder.
"""

from __future__ import annotations

import gettext
import hashlib
import html
import random
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from torchbook.data.download import RemoteFile, fetch, sha256_of
from torchbook.errors import DataUnavailable, unknown

Pair = tuple[str, str]

GETTEXT_DIR = Path("/usr/share/locale/es/LC_MESSAGES")
GETTEXT_SOURCE = "English-Spanish message catalogs (gettext .mo) of the software installed on this machine"
TATOEBA = RemoteFile(
    "https://storage.googleapis.com/download.tensorflow.org/data/spa-eng.zip",
    "",  # no published checksum: recorded on first download (see docs/translation.md)
    offline="data=gettext (English-Spanish pairs from this machine's gettext catalogs)",
)
TATOEBA_SOURCE = "Tatoeba English-Spanish pairs (manythings.org/Anki, TensorFlow's spa-eng.zip), the book's data"
BIG_CATALOG_SHARE = 0.10  # a catalog with more than this share of all pairs stays in training

# printf (%s, %1$d, %-10.3lf, %%), Python (%(name)s), brace ({0}, {name}), shell (${VAR}, $1) placeholders.
PLACEHOLDER = re.compile(
    r"%(?:\d+\$)?[-+ #0']*(?:\d+|\*)?(?:\.(?:\d+|\*))?(?:hh|h|ll|l|L|q|j|z|t|I64|I32|p)?[diouxXeEfFgGaAcspnmBTRSVW%]"
    r"|%\([A-Za-z_]\w*\)[-+ #0]*\d*(?:\.\d+)?[sdifrx]|\{[A-Za-z_0-9.]*(?::[^{}]*)?\}|\$\{?[A-Za-z_0-9]+\}?"
)
MARKUP = re.compile(r"</?[A-Za-z][^<>]*>")
EMPTY_QUOTES = re.compile(r"(«\s*»|“\s*”|‘\s*’|\"\s*\"|'\s*'|`\s*'|\(\s*\)|\[\s*\])")
ACCELERATOR = re.compile(r"(?<![\w&_])[_&](?=\w)|(?<=\w)[_&](?=\w)")


def strip_accelerators(en: str, es: str) -> tuple[str, str]:
    """Remove a keyboard accelerator mark when both sides have exactly one (`_Open` / `_Abrir`, `&Save`)."""
    marks_en, marks_es = ACCELERATOR.findall(en), ACCELERATOR.findall(es)
    if len(marks_en) == 1 and len(marks_es) == 1 and marks_en == marks_es:
        return ACCELERATOR.sub("", en, count=1), ACCELERATOR.sub("", es, count=1)
    return en, es


def clean_text(text: str) -> str:
    text = html.unescape(MARKUP.sub("", text))
    text = PLACEHOLDER.sub("", text)
    text = EMPTY_QUOTES.sub("", text)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,.;:!?])(?=\s|$)", r"\1", text)
    return text.lstrip(":;,. ").strip()


def clean_pair(en: str, es: str, max_chars: int = 200) -> Pair | None:
    """The cleaned pair, or None if it is not a usable sentence pair."""
    if "\n" in en.strip() or "\n" in es.strip():  # usage texts and option tables: line breaks do not align
        return None
    en, es = strip_accelerators(en, es)
    en, es = clean_text(en), clean_text(es)
    if not en or not es or en == es or len(en) > max_chars or len(es) > max_chars:
        return None
    if not re.search(r"[A-Za-z]{2}", en):  # symbols, numbers, key names
        return None
    return en, es


def read_catalog(path: Path) -> list[Pair]:
    """The singular (msgid, msgstr) pairs of a .mo file, message contexts removed, header skipped."""
    with open(path, "rb") as f:
        catalog: dict[Any, str] = gettext.GNUTranslations(f)._catalog  # type: ignore[attr-defined]
    pairs = []
    for key, translation in catalog.items():
        if isinstance(key, tuple):  # plural forms: (msgid, n); keep the singular
            if key[1] != 0:
                continue
            key = key[0]
        key = key.split("\x04", 1)[-1]  # "context\x04message"
        if key and translation:
            pairs.append((key, translation))
    return pairs


def catalog_bucket(name: str) -> int:
    """0..99 from the sha256 of the catalog's file name: stable whatever else is installed."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 100


@dataclass
class TranslationData:
    train: list[Pair]
    val: list[Pair]
    test: list[Pair]
    source: str
    manifest: list[dict[str, Any]] = field(default_factory=list)


def _dedupe(splits: dict[str, list[Pair]]) -> dict[str, list[Pair]]:
    """Drop repeated pairs, and test/validation pairs whose English sentence appears in an earlier split."""
    seen: set[str] = set()
    out = {}
    for name in ("train", "val", "test"):
        kept = []
        for en, es in splits[name]:
            if en not in seen:
                seen.add(en)
                kept.append((en, es))
        out[name] = kept
    return out


def load_gettext(folder: Path = GETTEXT_DIR, test_percent: int = 10, val_percent: int = 5) -> TranslationData:
    files = sorted(folder.glob("*.mo"))
    if not files:
        raise DataUnavailable(f"no gettext catalogs in {folder}: install Spanish translations or use data=tatoeba")
    per_file = []
    for path in files:
        try:
            raw = read_catalog(path)
        except (OSError, UnicodeDecodeError, ValueError):  # a damaged catalog is skipped, not fatal
            continue
        pairs = [p for p in (clean_pair(en, es) for en, es in raw) if p is not None]
        per_file.append((path, pairs))
    total = sum(len(pairs) for _, pairs in per_file)
    splits: dict[str, list[Pair]] = {"train": [], "val": [], "test": []}
    manifest = []
    for path, pairs in per_file:
        bucket = catalog_bucket(path.name)
        if len(pairs) > BIG_CATALOG_SHARE * total:
            split = "train"
        elif bucket < test_percent:
            split = "test"
        elif bucket < test_percent + val_percent:
            split = "val"
        else:
            split = "train"
        splits[split].extend(pairs)
        manifest.append({"file": path.name, "sha256": sha256_of(path), "pairs": len(pairs), "split": split})
    splits = _dedupe(splits)
    return TranslationData(splits["train"], splits["val"], splits["test"], GETTEXT_SOURCE, manifest)


def load_tatoeba(seed: int = 42, test_fraction: float = 0.1, val_fraction: float = 0.05) -> TranslationData:
    """The book's pairs, shuffled with `seed` and split test/validation/train."""
    archive = fetch_tatoeba()
    with zipfile.ZipFile(archive) as z:
        text = z.read("spa-eng/spa.txt").decode("utf-8")
    pairs = [(line.split("\t")[0].strip(), line.split("\t")[1].strip()) for line in text.splitlines() if "\t" in line]
    random.Random(seed).shuffle(pairs)
    n_test, n_val = int(len(pairs) * test_fraction), int(len(pairs) * val_fraction)
    splits = _dedupe({"test": pairs[:n_test], "val": pairs[n_test : n_test + n_val], "train": pairs[n_test + n_val :]})
    manifest = [{"file": "spa-eng.zip", "sha256": sha256_of(archive), "pairs": len(pairs), "split": "shuffled"}]
    return TranslationData(splits["train"], splits["val"], splits["test"], TATOEBA_SOURCE, manifest)


def fetch_tatoeba() -> Path:
    """spa-eng.zip via `fetch` (no published checksum: the first download prints its sha256 to record)."""
    return fetch(TATOEBA)


DATASETS = {"gettext": load_gettext, "tatoeba": load_tatoeba}


def load_pairs(name: str, seed: int = 42) -> TranslationData:
    if name == "tatoeba":
        return load_tatoeba(seed)
    if name == "gettext":
        return load_gettext()

    raise unknown("translation data", name, DATASETS)


# -- tensors and batches ---------------------------------------------------------------------------------------
class PairDataset(torch.utils.data.Dataset[tuple[Tensor, Tensor]]):
    """Token ids of each pair: source ends with </s>; target is <s> ... </s> (decoder input and shifted labels)."""

    def __init__(
        self, pairs: Sequence[Pair], tokenizer: Any, bos: int, eos: int, max_tokens: int = 128, drop_long: bool = False
    ):
        """`drop_long`: leave out pairs longer than `max_tokens` (training) instead of cutting them."""
        self.sources: list[Tensor] = []
        self.targets: list[Tensor] = []
        en = tokenizer.encode_batch([p[0] for p in pairs], add_special_tokens=False)
        es = tokenizer.encode_batch([p[1] for p in pairs], add_special_tokens=False)
        for src, tgt in zip(en, es):
            if drop_long and (len(src.ids) >= max_tokens or len(tgt.ids) >= max_tokens - 1):
                continue
            self.sources.append(torch.tensor(src.ids[: max_tokens - 1] + [eos]))
            self.targets.append(torch.tensor([bos] + tgt.ids[: max_tokens - 2] + [eos]))

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.sources[i], self.targets[i]

    def lengths(self) -> list[int]:
        return [max(len(s), len(t)) for s, t in zip(self.sources, self.targets)]


def pad_collate(pad_id: int) -> Any:
    """List of (source, target) -> (source (B, S), target (B, T)) right-padded with `pad_id`."""

    def collate(items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        src = torch.nn.utils.rnn.pad_sequence([s for s, _ in items], batch_first=True, padding_value=pad_id)
        tgt = torch.nn.utils.rnn.pad_sequence([t for _, t in items], batch_first=True, padding_value=pad_id)
        return src, tgt

    return collate


def bucket_batches(lengths: Sequence[int], max_tokens: int, max_sentences: int, seed: int, epoch: int) -> list[list[int]]:
    """Length bucketing: shuffle, sort pools of examples by length, cut them into batches of at most `max_tokens`
    padded tokens (sentences x longest) and `max_sentences` sentences, then shuffle the batches. Little padding,
    a different order every epoch, and the same batches for the same (seed, epoch) (exact resume)."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = max_sentences * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batch: list[int] = []
        longest = 0
        for i in chunk:
            longest_if_added = max(longest, lengths[i])
            if batch and (longest_if_added * (len(batch) + 1) > max_tokens or len(batch) >= max_sentences):
                batches.append(batch)
                batch, longest_if_added = [], lengths[i]
            batch.append(i)
            longest = longest_if_added
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


def eval_batches(lengths: Sequence[int], max_tokens: int, max_sentences: int) -> list[list[int]]:
    """Length-sorted batches for evaluation and decoding (no shuffling)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    batch: list[int] = []
    for i in order:
        if batch and (lengths[i] * (len(batch) + 1) > max_tokens or len(batch) >= max_sentences):
            batches.append(batch)
            batch = []
        batch.append(i)
    return batches + ([batch] if batch else [])
