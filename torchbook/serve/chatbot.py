"""The chatbot system as the model `torchbook-chat` (chapter 15): the orchestrator (`torchbook.chat`), its
server-side tools (calculator, unit conversion, the knowledge base's search when the server has one, and memory),
on the served model's own engine (one engine thread, one set of slots, prefix reuse shared with plain requests).

A request is a stateless turn: its messages are the conversation, the answer is the orchestrator's (sources
listed); a client that leaves cancels its turn (`chat.model.Turn`); tools run on the server, so a client's `tools` are refused for this model. Memory is per API key: the
facts of the key's id (`default` for requests without keys on loopback, the same as `torchbook chat`'s), read
through `recall` and `list_memories`; tools with side effects (`remember`, `forget`) ask for a confirmation that
an HTTP request cannot give, so they are declined.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torchbook.chat.memory import Memory
from torchbook.chat.model import ChatModel, Turn
from torchbook.chat.orchestrator import Event, Orchestrator, Reply
from torchbook.chat.tools import ToolRegistry, calculator_tool, knowledge_tool, memory_tools, unit_tool
from torchbook.serve.models import LanguageModel

CHAT_MODEL = "torchbook-chat"
LOCAL_USER = "default"  # the user of requests without API keys (loopback): the terminal chat's own


class Chatbot:
    """`respond(messages, on_event, user)`: one turn of the orchestrator (blocking: the app runs it in a worker
    thread), with `user`'s memory."""

    def __init__(self, lm: LanguageModel, kb: Any = None, mode: str = "orchestrator", max_tokens: int = 256,
                 time_limit: float = 120.0, memory: Memory | None = None):
        # A ChatModel around the served model, then pointed at the served engine (its own tiny one is closed).
        self.model = ChatModel(lm.engine.model, lm.tokenizer, lm.meta, lm.name, context=8, slots=1)
        self.model.close()
        self.model.engine = lm.engine
        self.model.context = lm.engine.max_len
        self.tools = [calculator_tool(), unit_tool(), *([knowledge_tool(kb)] if kb is not None else [])]
        self.memory = memory
        self.options: dict[str, Any] = {"mode": mode, "max_tokens": max_tokens, "time_limit": time_limit}

    def respond(self, messages: Sequence[dict[str, Any]], on_event: Callable[[Event], Any] | None = None,
                user: str = LOCAL_USER, turn: Turn | None = None) -> Reply:
        """`turn`: give one (`Turn(chatbot.model.engine)`) to be able to cancel the turn from another thread."""
        tools = list(self.tools)
        if self.memory is not None:
            tools += memory_tools(self.memory, lambda: user)
        orchestrator = Orchestrator(self.model.for_turn(turn), ToolRegistry(tools), **self.options)
        return orchestrator.respond(messages, on_event)
