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

import copy
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchbook.errors import CheckpointError, TorchbookError, UserInputError
from torchbook.generate.constraints import Constraint, constraint_processor
from torchbook.generate.sampling import LogitsProcessor, SamplingConfig
from torchbook.generate.serving import Engine, Handle, Request
from torchbook.generate.tool_calls import render_tools, template_has_tools, tool_style
from torchbook.hub.gguf import default_chat_model
from torchbook.hub.loading import load
from torchbook.hub.prompts import TemplateError, chat_prompt

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


def tool_turns(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with each tool result as a `tool` turn named by its tool, and the assistant turns that only
    called tools left out (what they called is in the results' names)."""
    out = []
    for message in messages:
        if message.get("role") == "assistant" and message.get("tool_calls") and not message.get("content"):
            continue
        if message.get("role") == "tool":
            name = message.get("name")
            out.append({"role": "tool", "content": f"{name}: {message.get('content') or ''}" if name else
                        str(message.get("content") or "")})
        elif message.get("role") == "assistant" and message.get("tool_calls"):
            out.append({"role": "assistant", "content": str(message.get("content") or "")})
        else:
            out.append({"role": message["role"], "content": str(message.get("content") or "")})
    return out


def neutralize(text: str, markers: Sequence[str]) -> str:
    """`text` with every marker broken by a zero-width space after its first character."""
    for marker in markers:
        if marker and marker in text:
            text = text.replace(marker, marker[0] + ZERO_WIDTH + marker[1:])
    return text


class Cancelled(TorchbookError):
    """The turn was cancelled (its client left, or the user pressed Stop): it stops, and nothing of it is kept."""


class Turn:
    """The engine as one turn of a conversation sees it (`ChatModel.for_turn`): it remembers the turn's requests,
    so that `cancel()`, from any thread, stops the generation running (the engine frees its slot at the next step)
    and refuses the next. A turn may make several model calls (tool calls, a summary): all stop."""

    def __init__(self, engine: Engine):
        self.engine, self.cancelled = engine, False
        self.handles: list[Handle] = []
        self.lock = threading.Lock()

    def submit(self, request: Request) -> Handle:
        with self.lock:
            if self.cancelled:
                raise Cancelled("the turn was cancelled")
            handle = self.engine.submit(request)
            self.handles.append(handle)
            return handle

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            for handle in self.handles:
                handle.cancel()

    def __getattr__(self, name: str) -> Any:  # the rest of the engine (vocab, max_len, ...) as it is
        return getattr(self.engine, name)


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
        self._constraints: dict[str, LogitsProcessor] = {}

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

    def for_turn(self, turn: Turn | None = None, sampling: SamplingConfig | None = None) -> ChatModel:
        """This model for one turn that another thread may cancel (`model.engine.cancel()`): the same weights,
        engine and tokenizer, its requests through `turn` (a new `Turn` by default), `sampling` if given."""
        view = copy.copy(self)
        view.engine = turn or Turn(self.engine)  # type: ignore[assignment]  # a Turn passes for its engine
        view.sampling = sampling or self.sampling
        return view

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
        """The prompt text. Without tools to offer, a template without a tools section that renders any role
        (ChatML, SmolLM2's) shows each tool result as a `tool` turn of its own ("calculator: 2^10 = 1024"), which
        small models read far better than the fallback's `<tool_response>` user turns (they tend to echo those);
        a template that rejects or drops the role gets the fallback (`render_tools`)."""
        messages = self.safe(messages)
        template = self.meta.get("chat_template")
        if not tools and not template_has_tools(template) and any(m.get("role") == "tool" for m in messages):
            native = tool_turns(messages)
            try:
                text = chat_prompt(native, self.meta)
            except TemplateError:
                text = ""
            if all(m["content"] in text for m in native if m["role"] == "tool"):
                return text
        return render_tools(messages, list(tools), self.meta)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def count(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] = ()) -> int:
        return len(self.encode(self.render(messages, tools)))

    # -- generation ------------------------------------------------------------------------------------------
    def generate(self, prompt: str, max_tokens: int = 256, on_text: Callable[[str], Any] | None = None,
                 processors: Sequence[LogitsProcessor] = (), stop: Sequence[str] = (),
                 sampling: SamplingConfig | None = None) -> Generation:
        """The reply to a rendered prompt, its text streamed to `on_text` as it comes; `Cancelled` when its turn
        was cancelled (`for_turn`)."""
        ids = self.encode(prompt)
        max_tokens = max(1, min(max_tokens, self.context - len(ids)))
        handle = self.engine.submit(Request(ids, max_tokens, sampling or self.sampling, stop,
                                            processors=list(processors)))
        for delta in handle:
            if delta.text and on_text is not None:
                on_text(delta.text)
        result = handle.result()
        choice = result.choices[0]
        if choice.finish_reason == "cancelled":
            raise Cancelled("the turn was cancelled")
        return Generation(choice.text, choice.finish_reason, result.usage.prompt_tokens,
                          result.usage.completion_tokens, result.usage.cached_tokens)

    def tool_processors(self, tools: Sequence[dict[str, Any]]) -> list[LogitsProcessor]:
        """Logits processors that let the model write free text, or calls of `tools` in its family's format
        with arguments valid under each tool's schema (`generate.constraints`, OpenAI's `tool_choice: "auto"`)."""
        if not tools:
            return []
        key = json.dumps(list(tools), sort_keys=True)
        with self._lock:
            processor = self._constraints.get(key)
            if processor is None:
                processor = constraint_processor(Constraint.tool_calls(list(tools), self.style, required=False),
                                                 self.tokenizer, self.meta.get("end_token_ids") or (),
                                                 self.engine.vocab)
                self._constraints = {key: processor}  # the tool set rarely changes: keep the last one
        return [processor]

    def close(self) -> None:
        self.engine.shutdown(drain=False)
