"""The orchestrator (book chapter 15): one turn of a conversation around a model, its tools, memory and knowledge.

    orchestrator = Orchestrator(ChatModel.load(), builtin_tools(kb=kb, memory=memory), mode="orchestrator")
    reply = orchestrator.respond([{"role": "user", "content": "What is 525.6 * 315 / 3942?"}], on_event=print)
    reply.text, reply.sources, reply.messages, reply.prompts

The book's two modes:

- **the orchestrator decides** (`mode="orchestrator"`, for small models that cannot call tools reliably): before
  the model answers, code chooses the tools by rule: "remember (that) ..." is remembered (after the user
  confirms), an arithmetic expression in the message goes to the calculator, each URL is fetched (its passages ranked against the message), the knowledge base is searched
  (`search_knowledge`) and relevant memories are recalled (`recall`). Each result enters the prompt as an
  assistant tool call and its `tool` message, as if the model had called it; the answer then lists the sources
  it was given ("Sources: [1] notes.md:12, ...").
- **the model decides** (`mode="model"`): the tools' schemas are in the prompt (the template's tools section or
  the fallback), the reply is decoded under them (`constrain`: text, or calls whose arguments follow their
  tool's schema) and parsed for tool calls (`generate.tool_calls.parse_tool_calls`), each call is
  run and its result fed back as a `tool` message, and the model goes again, until it answers in text or the turn
  passes `max_steps` model calls or `time_limit` seconds (then it answers without tools).

Failures are part of the conversation: a call that does not parse, a tool that does not exist, arguments that do
not match its schema, a tool that raises or times out, a declined confirmation: each becomes a `tool` message
saying what went wrong (and an event for the user), and the turn goes on. Tool output enters the prompt only as a
`tool` message, with the template's special tokens and the call markers neutralized (`ChatModel.safe`): a result
that holds a tool call, a chat command such as `/new` or text posing as a system message runs nothing.

`respond` is stateless (the HTTP server calls it with the request's messages); `chat.session.ChatSession` keeps a
conversation in SQLite around it. Every prompt sent is in `Reply.prompts` (the session records them).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torchbook.chat.context import fit
from torchbook.chat.tools.calculator import find_expression
from torchbook.chat.tools.registry import Confirm, ToolOutput, ToolRegistry
from torchbook.chat.tools.web import find_urls
from torchbook.errors import UserInputError
from torchbook.generate.tool_calls import (
    CALL_STARTS,
    HeldText,
    ToolCall,
    assistant_message,
    new_call_id,
    parse_tool_calls,
    tool_message,
)

log = logging.getLogger(__name__)

MODES = ("orchestrator", "model")
DEFAULT_SYSTEM = ("You are a helpful assistant. Answer the user's question in a few sentences. When tool results "
                  "are given, use them: they are correct.")
SUMMARY_PROMPT = ("Summarise the conversation above in at most three sentences, keeping names, numbers and "
                  "decisions.")
SUMMARY_TOKENS = 96
SEARCH_THE_WEB = re.compile(r"^\s*(?:please\s+)?(?:search\s+the\s+web|web\s+search|search\s+online|look\s+up\s+online)"
                            r"\s*(?:for|:)?\s+(.+?)\s*$", re.IGNORECASE | re.DOTALL)
REMEMBER = re.compile(r"^\s*(?:please\s+)?remember\s+(?:that\s+)?(.+?)\s*$", re.IGNORECASE | re.DOTALL)


class Model(Protocol):
    """What the orchestrator needs of a model (`chat.model.ChatModel` is one)."""

    name: str
    context: int

    def render(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] = ()) -> str: ...

    def count(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] = ()) -> int: ...

    def generate(self, prompt: str, max_tokens: int = 256, on_text: Callable[[str], Any] | None = None,
                 processors: Sequence[Any] = ()) -> Any: ...


@dataclass
class Event:
    """What the user sees happen during a turn: `kind` is "text" (a piece of the answer, `text`), "tool_call"
    (`name`, `arguments`), "tool_result" (`name`, `output`), "error" (`text`: a failed or unparsable call),
    "sources" (`sources`), "context" (`text`: turns dropped or summarised to fit)."""

    kind: str
    text: str = ""
    name: str | None = None
    arguments: dict[str, Any] | None = None
    output: ToolOutput | None = None
    sources: list[str] = field(default_factory=list)


OnEvent = Callable[[Event], Any]


@dataclass
class Reply:
    text: str  # the answer as shown (with its sources listed)
    messages: list[dict[str, Any]]  # the turn's new messages after the user's: tool calls, tool results, the answer
    sources: list[str]
    prompts: list[tuple[str, int]]  # each prompt sent to the model this turn, with its token count
    finish_reason: str  # "stop", "length", "steps" (max_steps passed), "time" (time_limit passed)
    dropped: int = 0  # history messages left out to fit the context
    summary: str | None = None
    steps: int = 0  # model calls this turn
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values the engine reused (an earlier turn's prefix)


class _Hold:
    """Streams the answer's text but holds back anything that may be a tool call (which the user should see as a
    "tool_call" event, not as text): `generate.tool_calls.HeldText` decides what may go out."""

    def __init__(self, emit: Callable[[str], Any]):
        self.emit, self.held = emit, HeldText()

    def __call__(self, piece: str) -> None:
        out = self.held.push(piece)
        if out:
            self.emit(out)

    def release(self, final: str) -> None:
        """The reply turned out to be text: send what was held."""
        rest = self.held.rest(final)
        if rest:
            self.emit(rest)


class Orchestrator:
    """One conversation turn at a time (see the module docstring).

    `max_tokens`: the longest answer per model call; `max_steps`, `time_limit`: bounds of a turn in the model's
    mode; `kb_k`: passages injected from the knowledge base; `summarize`: summarise dropped turns (else they are
    only dropped); `confirm`: asked before a tool with side effects runs; `constrain`: in the model's mode, decode
    under the tools' schemas (free text, or calls whose arguments are valid: `ChatModel.tool_processors`), so a
    call that does not parse or match its schema cannot be written (off: such calls are reported to the model).
    """

    def __init__(self, model: Model, tools: ToolRegistry | None = None, *, mode: str = "orchestrator",
                 system_prompt: str = DEFAULT_SYSTEM, max_tokens: int = 256, max_steps: int = 4,
                 time_limit: float = 120.0, kb_k: int = 3, summarize: bool = True, confirm: Confirm | None = None,
                 constrain: bool = True):
        if mode not in MODES:
            raise UserInputError(f"unknown chat mode {mode!r}; accepted: {', '.join(MODES)}", param="mode")
        if max_steps < 1:
            raise UserInputError(f"max_steps must be at least 1, got {max_steps}", param="max_steps")
        self.model = model
        self.tools = tools if tools is not None else ToolRegistry()
        self.mode, self.system_prompt = mode, system_prompt
        self.max_tokens, self.max_steps, self.time_limit = max_tokens, max_steps, time_limit
        self.kb_k, self.summarize, self.confirm = kb_k, summarize, confirm
        self.constrain = constrain and hasattr(model, "tool_processors")

    # -- the turn --------------------------------------------------------------------------------------------
    def respond(self, messages: Sequence[dict[str, Any]], on_event: OnEvent | None = None,
                known_summary: tuple[int, str | None] = (0, None)) -> Reply:
        """The next turn: `messages` is the conversation so far, ending with the user's message (a first system
        message replaces `system_prompt`). Returns the answer and the turn's new messages."""
        messages = [dict(m) for m in messages]
        if not messages or messages[-1].get("role") != "user":
            raise UserInputError("the conversation must end with a user message", param="messages")
        if messages[0].get("role") != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        emit = on_event or (lambda event: None)
        turn = _Turn(self, messages, emit, known_summary)
        if self.mode == "orchestrator":
            return turn.orchestrator_decides()
        return turn.model_decides()

    def summarise(self, messages: list[dict[str, Any]], earlier: str | None = None) -> str:
        """The model's own summary of `messages`, following `earlier` (the summary of what came before them), for
        the context budget. Messages that do not fit in the model's context with the request are left out,
        oldest first."""
        head = [{"role": "system", "content": f"Summary of the conversation before: {earlier}"}] if earlier else []
        request = {"role": "user", "content": SUMMARY_PROMPT}
        messages = list(messages)
        while len(messages) > 1 and self.model.count([*head, *messages, request]) > self.model.context - SUMMARY_TOKENS:
            messages = messages[1:]
        prompt = self.model.render([*head, *messages, request])
        return str(self.model.generate(prompt, SUMMARY_TOKENS).text).strip()


class _Turn:
    def __init__(self, orchestrator: Orchestrator, messages: list[dict[str, Any]], emit: OnEvent,
                 known_summary: tuple[int, str | None]):
        self.o = orchestrator
        self.history = messages  # system, earlier turns, the user's message
        self.new: list[dict[str, Any]] = []  # this turn's messages after the user's
        self.emit = emit
        self.sources: list[str] = []
        self.prompts: list[tuple[str, int]] = []
        self.started = time.monotonic()
        self.known_summary = known_summary
        self.dropped: int = 0
        self.summary: str | None = None
        self.completion_tokens = self.prompt_tokens = self.cached_tokens = 0
        self.hold: _Hold | None = None
        self.user_text = str(messages[-1].get("content") or "")

    @property
    def out_of_time(self) -> bool:
        return time.monotonic() - self.started > self.o.time_limit

    def run_tool(self, name: str, arguments: dict[str, Any], call_id: str | None = None) -> ToolOutput:
        """Run one call and add its assistant call message and `tool` message to the turn."""
        call = ToolCall(call_id or new_call_id(), name, arguments)
        self.new.append(assistant_message("", [call]))
        return self.answer_call(call)

    def inject(self, name: str, arguments: dict[str, Any], found: Callable[[ToolOutput], bool]) -> None:
        """Run a lookup the orchestrator chose and add it to the turn only when it found something (or failed):
        an empty search would only be noise in the prompt."""
        output = self.o.tools.call(name, arguments, confirm=self.o.confirm)
        if not output.error and not found(output):
            return
        call = ToolCall(new_call_id(), name, arguments)
        self.new.append(assistant_message("", [call]))
        self.emit(Event("tool_call", name=name, arguments=arguments))
        self.emit(Event("error" if output.error else "tool_result", text=output.text, name=name, output=output))
        self.new.append(tool_message(call.id, output.text, name=name))
        for source in output.sources:
            if source not in self.sources:
                self.sources.append(source)

    def answer_call(self, call: ToolCall) -> ToolOutput:
        self.emit(Event("tool_call", name=call.name, arguments=call.arguments))
        if self.out_of_time:
            output = ToolOutput(f"error: the turn's time limit ({self.o.time_limit:g} s) passed before "
                                f"{call.name} could run", error=True)
        else:
            output = self.o.tools.call(call.name, call.arguments, confirm=self.o.confirm)
        self.emit(Event("error" if output.error else "tool_result", text=output.text, name=call.name,
                        output=output))
        self.new.append(tool_message(call.id, output.text, name=call.name))
        for source in output.sources:
            if source not in self.sources:
                self.sources.append(source)
        return output

    def generate(self, tools: list[dict[str, Any]], stream: bool = True) -> tuple[str, str]:
        """One model call on the fitted conversation: (its text, its finish reason)."""
        model = self.o.model
        budget = model.context - self.o.max_tokens
        summarize = self.o.summarise if self.o.summarize else None
        try:
            fitted = fit(self.history + self.new, lambda ms: model.count(ms, tools), budget, summarize,
                         self.known_summary)
        except UserInputError as error:
            if not tools:
                raise
            alone = model.count(self.history[:1], tools) - model.count(self.history[:1])
            raise UserInputError(f"{error}; the descriptions of the {len(tools)} tools take {alone} of those tokens: "
                                 "offer fewer tools or give the model a longer context", param="context") from None
        if fitted.dropped and (fitted.dropped, fitted.summary) != (self.dropped, self.summary):
            self.emit(Event("context", text=f"{fitted.dropped} earlier messages "
                            f"{'summarised' if fitted.summary else 'left out'} to fit the model's context"))
        self.dropped, self.summary = fitted.dropped, fitted.summary
        prompt = model.render(fitted.messages, tools)
        hold = _Hold(lambda text: self.emit(Event("text", text=text))) if stream else None
        processors = model.tool_processors(tools) if tools and self.o.constrain else []  # type: ignore[attr-defined]
        generation = model.generate(prompt, self.o.max_tokens, on_text=hold, processors=processors)
        self.prompts.append((prompt, int(generation.prompt_tokens)))
        self.prompt_tokens += int(generation.prompt_tokens)
        self.completion_tokens += int(generation.completion_tokens)
        self.cached_tokens += int(getattr(generation, "cached_tokens", 0))
        self.hold = hold
        return str(generation.text), str(generation.finish_reason)

    def finish(self, text: str, finish_reason: str, steps: int) -> Reply:
        text = text.strip()
        shown = text
        if self.sources:
            listed = "; ".join(f"[{i}] {s}" for i, s in enumerate(self.sources, 1))
            shown = f"{text}\n\nSources: {listed}"
            self.emit(Event("sources", sources=list(self.sources)))
        answer: dict[str, Any] = {"role": "assistant", "content": text}
        if self.sources:
            answer["sources"] = list(self.sources)
        self.new.append(answer)
        return Reply(shown, self.new, list(self.sources), self.prompts, finish_reason, self.dropped, self.summary,
                     len(self.prompts), self.completion_tokens, self.prompt_tokens, self.cached_tokens)

    # -- the orchestrator decides ------------------------------------------------------------------------------
    def orchestrator_decides(self) -> Reply:
        tools = self.o.tools
        remember = REMEMBER.match(self.user_text)
        if remember and "remember" in tools:
            self.run_tool("remember", {"fact": remember.group(1)})
        expression = find_expression(self.user_text)
        if expression is not None and "calculator" in tools:
            self.run_tool("calculator", {"expression": expression})
        if "fetch_url" in tools:
            for url in find_urls(self.user_text)[:2]:
                self.run_tool("fetch_url", {"url": url, "question": self.user_text})
        search = SEARCH_THE_WEB.match(self.user_text)
        if search and "web_search" in tools:
            self.run_tool("web_search", {"query": search.group(1)})
        if "search_knowledge" in tools and self.user_text.strip() and not self.new:
            self.inject("search_knowledge", {"query": self.user_text, "k": self.o.kb_k},
                        lambda output: bool(output.sources))
        if "recall" in tools and self.user_text.strip():
            self.inject("recall", {"query": self.user_text}, lambda output: not output.text.startswith("nothing"))
        text, reason = self.generate([])
        if self.hold is not None:
            self.hold.release(text)
        return self.finish(text, reason, 1)

    # -- the model decides -------------------------------------------------------------------------------------
    def model_decides(self) -> Reply:
        specs = self.o.tools.specs()
        for step in range(self.o.max_steps):
            if self.out_of_time:
                return self.final_without_tools("time")
            text, reason = self.generate(specs)
            content, calls = parse_tool_calls(text)
            malformed = any(marker in content for marker in CALL_STARTS)
            if not calls and not malformed:
                if self.hold is not None:
                    self.hold.release(text)
                return self.finish(text, reason, step + 1)
            if calls:
                self.new.append(assistant_message(content, calls))
                for call in calls:
                    self.answer_call(call)
            if malformed:
                if not calls:
                    self.new.append({"role": "assistant", "content": content})
                why = "error: a tool call could not be read (its JSON does not parse, or it names no tool); " \
                      "write <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>"
                self.emit(Event("error", text=why))
                self.new.append(tool_message("invalid", why, name="error"))
        return self.final_without_tools("steps")

    def final_without_tools(self, why: str) -> Reply:
        """The turn passed its step or time limit: the model answers from what it has, without tools."""
        note = (f"the turn's limit of {self.o.max_steps} model calls" if why == "steps" else
                f"the turn's time limit of {self.o.time_limit:g} s")
        self.emit(Event("error", text=f"stopped calling tools: {note} was reached"))
        text, _ = self.generate([])
        text, _ = parse_tool_calls(text)  # a call written anyway is not run, and not shown as the answer
        if self.hold is not None:
            self.hold.release(text)
        return self.finish(text, why, len(self.prompts))
