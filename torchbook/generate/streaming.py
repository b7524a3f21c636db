"""Streaming text out of a token loop (chapter 17): whole characters only, stop strings held back until certain.

Byte-level tokenizers (GPT-2, Llama 3, SmolLM2) and byte fallback (Llama 2) split a multi-byte UTF-8 character
over several tokens; decoding the tokens one at a time would print replacement characters (U+FFFD). `TextStream`
decodes a growing window of tokens and releases text only when it ends in a whole character. The window starts a
few tokens back so that tokenizers which drop a word's leading space at the start of a decode (SentencePiece's
"▁") keep it in the middle of a stream. Text that could be the beginning of a stop string is held back until the
next tokens show whether the stop string follows; a stop string ends the stream and is not part of the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class TextStream:
    """One sequence's tokens in, its text out: `push(token_id)` returns the newly released text (maybe "")."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), context: Sequence[int] = (),
                 skip_special_tokens: bool = True):
        """`context`: the last few prompt tokens, decoded only to get the first new word's spacing right."""
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(context)
        self.prefix_offset = 0  # decoding starts here (a little before the new text, for spacing)
        self.read_offset = len(self.ids)  # tokens before this are already in `text`
        self.text = ""  # the decoded text so far (whole characters), up to a stop string
        self.released = 0  # characters of `text` handed out
        self.stopped = False  # a stop string was found

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):  # whole characters only
            self.text += after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text when the sequence ends (an unfinished character shows as U+FFFD)."""
        if not self.stopped and self.read_offset < len(self.ids):
            before = self._decode(self.ids[self.prefix_offset : self.read_offset])
            self.text += self._decode(self.ids[self.prefix_offset :])[len(before) :]
            self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self.released - longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            end = len(self.text)
        elif final:
            end = len(self.text)
        else:  # hold back a tail that may grow into a stop string
            end = len(self.text) - max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])),
                                       default=0)
        out = self.text[self.released : max(end, self.released)]
        self.released = max(end, self.released)
        return out
