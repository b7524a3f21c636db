"""The chatbot system as the model `torchbook-chat` (chapter 15): the orchestrator (`torchbook.chat`), its
server-side tools (calculator, unit conversion, and the knowledge base's search when the server has one) and its
retrieval, on the served model's own engine (one engine thread, one set of slots, prefix reuse shared with plain
requests). A request is a stateless turn: its messages are the conversation, the answer is the orchestrator's
(sources listed); tools run on the server, so a client's `tools` are refused for this model. Memory is not served:
it would need a store per API key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torchbook.chat.model import ChatModel
from torchbook.chat.orchestrator import Event, Orchestrator, Reply
from torchbook.chat.tools import builtin_tools
from torchbook.serve.models import LanguageModel

CHAT_MODEL = "torchbook-chat"


class Chatbot:
    """`respond(messages, on_event)`: one turn of the orchestrator (blocking: the app runs it in a worker thread)."""

    def __init__(self, lm: LanguageModel, kb: Any = None, mode: str = "orchestrator", max_tokens: int = 256,
                 time_limit: float = 120.0):
        # A ChatModel around the served model, then pointed at the served engine (its own tiny one is closed).
        self.model = ChatModel(lm.engine.model, lm.tokenizer, lm.meta, lm.name, context=8, slots=1)
        self.model.close()
        self.model.engine = lm.engine
        self.model.context = lm.engine.max_len
        self.orchestrator = Orchestrator(self.model, builtin_tools(kb=kb, memory=None, web_tools=False), mode=mode,  # type: ignore[arg-type]
                                         max_tokens=max_tokens, time_limit=time_limit)

    def respond(self, messages: Sequence[dict[str, Any]], on_event: Callable[[Event], Any] | None = None) -> Reply:
        return self.orchestrator.respond(messages, on_event)
