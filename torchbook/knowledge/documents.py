"""Documents into text and text into chunks (chapter 15's retrieval-augmented generation, the ingestion side).

`extract_text(path)` reads .txt/.md (UTF-8), .html/.htm (the standard library's HTML parser, without scripts and
styles) and .pdf (pypdf, pages separated by form feeds); a binary or undecodable file raises `UnreadableFile`.

`chunk_text(text, tokenizer, max_tokens, overlap)`: the rule. The text is tokenized with the embedder's own
tokenizer; a chunk is at most `max_tokens - 2` tokens (the embedder's limit less [CLS] and [SEP]), so the embedder
sees every token of it; a chunk ends at a word boundary when the window allows (never mid-word unless one word is
longer than the window); the next chunk starts `overlap` tokens before the end of the previous one, moved back to
the start of its word, so a sentence cut at a boundary is whole in one of the two chunks.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
HTML_SUFFIXES = (".html", ".htm")
PDF_SUFFIXES = (".pdf",)
SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES + PDF_SUFFIXES


class UnreadableFile(Exception):
    """A file that holds no text we can read (binary, undecodable, a broken PDF)."""


@dataclass(frozen=True)
class Chunk:
    text: str
    start: int  # character offsets into the document's text
    end: int
    line: int  # 1-based line of `start`
    page: int  # 1-based page of `start` for a PDF, 0 otherwise


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _TextOfHTML(HTMLParser):
    SKIP = {"script", "style", "head", "noscript", "template"}
    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "section", "article",
              "table", "ul", "ol", "dt", "dd", "blockquote", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def _decode(data: bytes, path: Path) -> str:
    if b"\x00" in data[:8192]:
        raise UnreadableFile("binary (NUL bytes)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UnreadableFile(f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def extract_text(path: Path, data: bytes | None = None) -> str:
    """The text of a document (see the module docstring for the formats)."""
    data = path.read_bytes() if data is None else data
    suffix = path.suffix.lower()
    if suffix in PDF_SUFFIXES:
        return _pdf_text(path, data)
    text = _decode(data, path)
    if suffix in HTML_SUFFIXES:
        parser = _TextOfHTML()
        parser.feed(text)
        parser.close()
        lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
        text = "\n".join(line for line in lines if line)
    return text


def _pdf_text(path: Path, data: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        return "\f".join(page.extract_text() or "" for page in reader.pages)
    except (PdfReadError, ValueError, KeyError, OSError) as e:
        raise UnreadableFile(f"not a readable PDF ({e})") from None


def chunk_text(text: str, tokenizer: Any, max_tokens: int = 256, overlap: int = 32) -> list[Chunk]:
    """Chunks of `text` by the rule of the module docstring; `tokenizer` is a `tokenizers.Tokenizer`."""
    window = max_tokens - 2
    if not 0 <= overlap < window // 2:
        raise ValueError(f"overlap must be in [0, {window // 2}), got {overlap}")
    encoding = tokenizer.encode(text, add_special_tokens=False)
    offsets, words = encoding.offsets, encoding.word_ids
    n = len(offsets)

    def word_start(i: int) -> bool:  # token i begins a word (or ends the text)
        return i >= n or i == 0 or words[i] is None or words[i] != words[i - 1]

    chunks: list[Chunk] = []
    start = 0
    while start < n:
        end = min(start + window, n)
        if end < n:
            cut = end
            while cut > start + 1 and not word_start(cut):
                cut -= 1
            end = cut if cut > start + 1 or word_start(cut) else end
        begin, finish = offsets[start][0], offsets[end - 1][1]
        chunks.append(Chunk(text[begin:finish], begin, finish, text.count("\n", 0, begin) + 1,
                            text.count("\f", 0, begin) + 1 if "\f" in text else 0))
        if end >= n:
            break
        next_start = max(end - overlap, start + 1)
        while next_start > start + 1 and not word_start(next_start):
            next_start -= 1
        start = next_start
    return chunks
