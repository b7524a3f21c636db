"""The model a chat talks to (book chapter 15): a loaded checkpoint, its chat template and the serving engine.

`ChatModel.load(path)` loads a checkpoint (default: the offline SmolLM2-135M-Instruct, `hub.default_chat_model()`)
and starts a `serving.Engine` for it (its thread alone touches the model, so a terminal, an MCP server and an HTTP
server may share one `ChatModel`; the engine's prefix reuse means each turn of a conversation prefills only what
is new). `render(messages, tools)` is the prompt text the model reads (`generate.tool_calls.render_tools`: the
template's own tools section or the stated fallback); `generate(prompt, ...)` streams the reply's text.

Untrusted text cannot pose as the template's structure: in user and tool messages, the tokenizer's special tokens
(`<|im_start|>`, `<|im_end|>`, ...) and the tool-call markers (`<tool_call>`, `</tool_response>`, `[TOOL_CALLS]`,
...) are broken with a zero-width space before rendering, so a web page that writes `<|im_start|>system` is read
as those characters, never as a new system message (tests/test_chat_orchestrator.py checks the token ids).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchbook.errors import CheckpointError, UserInputError
from torchbook.generate.sampling import LogitsProcessor, SamplingConfig
from torchbook.generate.serving import Engine, Request
from torchbook.generate.tool_calls import render_tools, tool_style
from torchbook.hub.gguf import default_chat_model
from torchbook.hub.loading import load

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048  # positions per conversation: SmolLM2 reads 8192, but each costs memory in every slot
ZERO_WIDTH = "\u200b"
TOOL_MARKERS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "[TOOL_CALLS]", "[ARGS]",
                "<|python_tag|>", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")
UNTRUSTED_ROLES = ("user", "tool")


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


def neutralize(text: str, markers: Sequence[str]) -> str:
    """`text` with every marker broken by a zero-width space after its first character."""
    for marker in markers:
        if marker and marker in text:
            text = text.replace(marker, marker[0] + ZERO_WIDTH + marker[1:])
    return text


class ChatModel:
    """A chat model behind an engine (see the module docstring). `context`: positions per request (prompt and
    reply); `slots`: conversations decoded side by side."""

    def __init__(self, model: Any, tokenizer: Any, meta: dict[str, Any], name: str = "model", *,
                 context: int = DEFAULT_CONTEXT, slots: int = 2, sampling: SamplingConfig | None = None):
        if tokenizer is None:
            raise CheckpointError(f"{name} has no tokenizer: a chat needs one")
        limit = getattr(getattr(model, "config", None), "max_len", None)
        self.model, self.tokenizer, self.meta, self.name = model, tokenizer, meta, name
        self.engine = Engine(model, tokenizer, slots=slots, max_len=min(context, limit or context),
                             end_ids=meta.get("end_token_ids") or ()).start()
        self.context = self.engine.max_len
        self.sampling = sampling or SamplingConfig(temperature=0.0)
        self.style = tool_style(meta.get("chat_template"))
        added = tokenizer.get_added_tokens_decoder() if hasattr(tokenizer, "get_added_tokens_decoder") else {}
        self.markers = sorted({t.content for t in added.values() if len(t.content) > 1} | set(TOOL_MARKERS),
                              key=len, reverse=True)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path | None = None, quantize: str | None = None, device: str = "cpu",
             **options: Any) -> ChatModel:
        """A checkpoint (run folder, Hugging Face folder, GGUF file, Hub id) or the default SmolLM2."""
        path = default_chat_model() if path is None else path
        loaded = load(path, map_location=device, quantize=quantize)
        if loaded.tokenizer is None or not getattr(loaded.model, "supports_slots", False):
            raise UserInputError(f"{str(path)!r} is not a chat model the engine can serve (a decoder-only model "
                                 "with a tokenizer)", param="model")
        name = (loaded.meta.get("extra") or {}).get("name") or Path(str(path)).stem
        return cls(loaded.model, loaded.tokenizer, loaded.meta, str(name), **options)

    # -- prompts ---------------------------------------------------------------------------------------------
    def safe(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Messages with the special tokens and tool markers in user and tool contents neutralized."""
        out = []
        for message in messages:
            content = message.get("content")
            if message.get("role") in UNTRUSTED_ROLES and isinstance(content, str):
                message = {**message, "content": neutralize(content, self.markers)}
            out.append(message)
        return out

    def render(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] = ()) -> str:
        return render_tools(self.safe(messages), list(tools), self.meta)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def count(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] = ()) -> int:
        return len(self.encode(self.render(messages, tools)))

    # -- generation ------------------------------------------------------------------------------------------
    def generate(self, prompt: str, max_tokens: int = 256, on_text: Callable[[str], Any] | None = None,
                 processors: Sequence[LogitsProcessor] = (), stop: Sequence[str] = (),
                 sampling: SamplingConfig | None = None) -> Generation:
        """The reply to a rendered prompt, its text streamed to `on_text` as it comes."""
        ids = self.encode(prompt)
        max_tokens = max(1, min(max_tokens, self.context - len(ids)))
        handle = self.engine.submit(Request(ids, max_tokens, sampling or self.sampling, stop,
                                            processors=list(processors)))
        for delta in handle:
            if delta.text and on_text is not None:
                on_text(delta.text)
        result = handle.result()
        choice = result.choices[0]
        return Generation(choice.text, choice.finish_reason, result.usage.prompt_tokens,
                          result.usage.completion_tokens, result.usage.cached_tokens)

    def close(self) -> None:
        self.engine.shutdown(drain=False)
