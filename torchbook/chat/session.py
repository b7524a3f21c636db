"""A chat session (book chapter 15): a user's conversation kept in SQLite around the orchestrator, and the chat
commands the user types.

    session = ChatSession(orchestrator, Conversations.open(), user="alice", memory=memory)
    reply = session.send("What is 525.6 * 315 / 3942?", on_event=...)   # one turn, stored with its prompts
    session.command("/resume 1a2b3c4d")                                  # -> CommandResult(text=...)

Commands (only from what the user types: text that comes back from a tool or the model is never one):
`/help`, `/tools`, `/memory` (list), `/memory forget ID`, `/sources` (of the last answer), `/new`, `/list`
(the user's conversations), `/resume ID`, `/prompt` (the last prompt sent, as the model read it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchbook.chat.conversations import Conversations
from torchbook.chat.memory import Memory
from torchbook.chat.orchestrator import OnEvent, Orchestrator, Reply
from torchbook.errors import UserInputError

COMMANDS = {
    "/help": "this list",
    "/tools": "the tools the model may use",
    "/memory": "what is remembered about you; /memory forget ID forgets one fact",
    "/sources": "the sources of the last answer",
    "/new": "start a new conversation",
    "/list": "your conversations",
    "/resume": "/resume ID: go back to a conversation",
    "/prompt": "the last prompt sent to the model",
}


@dataclass
class CommandResult:
    text: str
    conversation: str | None = None  # the conversation in use after the command


def is_command(line: str) -> bool:
    return line.startswith("/") and line.split(maxsplit=1)[0] in COMMANDS


class ChatSession:
    def __init__(self, orchestrator: Orchestrator, conversations: Conversations, user: str = "default",
                 memory: Memory | None = None, conversation: str | None = None):
        self.orchestrator, self.conversations, self.user, self.memory = orchestrator, conversations, user, memory
        self.conversation = conversation
        if conversation is not None:
            conversations.info(conversation, user)
        self.last: Reply | None = None

    @property
    def model_name(self) -> str:
        return str(getattr(self.orchestrator.model, "name", "model"))

    def new(self) -> str:
        self.conversation = self.conversations.create(self.user, self.model_name)
        self.last = None
        return self.conversation

    def resume(self, conversation: str) -> list[dict[str, Any]]:
        """Continue `conversation` (one of this user's); its messages so far."""
        self.conversations.info(conversation, self.user)
        self.conversation = conversation
        self.last = None
        return self.conversations.messages(conversation)

    def send(self, text: str, on_event: OnEvent | None = None) -> Reply:
        """One turn: the user's message, the orchestrator's answer; both stored (one transaction) with the
        prompts the model read."""
        if not text.strip():
            raise UserInputError("the message is empty", param="message")
        if self.conversation is None:
            self.new()
        assert self.conversation is not None
        history = [m for m in self.conversations.messages(self.conversation)]
        user_message = {"role": "user", "content": text}
        known = self.conversations.summary(self.conversation)
        reply = self.orchestrator.respond([*history, user_message], on_event, known_summary=known)
        turn = self.conversations.append(self.conversation, [user_message, *reply.messages])
        for step, (prompt, tokens) in enumerate(reply.prompts):
            self.conversations.record_prompt(self.conversation, turn, step, prompt, tokens, reply.dropped)
        if reply.summary and known != (reply.dropped, reply.summary):
            self.conversations.set_summary(self.conversation, reply.dropped, reply.summary)
        self.last = reply
        return reply

    # -- commands -----------------------------------------------------------------------------------------------
    def command(self, line: str) -> CommandResult:
        """Run a chat command (see the module docstring); an unknown one is a `UserInputError`."""
        words = line.split()
        name, args = words[0], words[1:]
        handler: Callable[[list[str]], str] | None = {
            "/help": lambda a: "\n".join(f"{c:9} {h}" for c, h in COMMANDS.items()),
            "/tools": self._tools,
            "/memory": self._memory,
            "/sources": self._sources,
            "/new": lambda a: f"new conversation {self.new()}",
            "/list": self._list,
            "/resume": self._resume,
            "/prompt": self._prompt,
        }.get(name)
        if handler is None:
            raise UserInputError(f"unknown command {name!r}; accepted: {', '.join(COMMANDS)}")
        return CommandResult(handler(args), self.conversation)

    def _tools(self, args: list[str]) -> str:
        lines = []
        for tool in self.orchestrator.tools:
            mark = " (asks first)" if tool.side_effects else ""
            lines.append(f"{tool.name}{mark}: {tool.description}")
        mode = "the orchestrator chooses tools by rule" if self.orchestrator.mode == "orchestrator" else \
            "the model calls tools itself"
        return "\n".join([f"mode: {mode}", *lines]) if lines else "no tools"

    def _memory(self, args: list[str]) -> str:
        if self.memory is None:
            return "memory is off"
        if args[:1] == ["forget"]:
            if len(args) != 2 or not args[1].lstrip("#").isdigit():
                raise UserInputError("usage: /memory forget ID (the number /memory shows)")
            fact_id = int(args[1].lstrip("#"))
            if not self.memory.delete(self.user, fact_id):
                raise UserInputError(f"there is no remembered fact #{fact_id}")
            return f"forgot #{fact_id}"
        facts = self.memory.facts(self.user)
        return "\n".join(f"#{f.id}: {f.text}" for f in facts) or "nothing remembered yet"

    def _sources(self, args: list[str]) -> str:
        if self.last is None:
            return "no answer yet"
        return "\n".join(f"[{i}] {s}" for i, s in enumerate(self.last.sources, 1)) or "the last answer used no sources"

    def _list(self, args: list[str]) -> str:
        rows = self.conversations.all(self.user)
        return "\n".join(f"{c.id}  {c.messages:3} messages  {c.title}" + ("  (current)" if c.id == self.conversation
                                                                           else "") for c in rows) or "none yet"

    def _resume(self, args: list[str]) -> str:
        if len(args) != 1:
            raise UserInputError("usage: /resume ID (the ids /list shows)")
        messages = self.resume(args[0])
        said = [m for m in messages if m.get("role") in ("user", "assistant") and m.get("content")]
        tail = "\n".join(f"{m['role']}: {m['content']}" for m in said[-4:])
        return f"resumed {args[0]} ({len(messages)} messages)" + (f"\n{tail}" if tail else "")

    def _prompt(self, args: list[str]) -> str:
        if self.conversation is None:
            return "no prompt yet"
        records = self.conversations.prompts(self.conversation)
        return records[-1].prompt if records else "no prompt yet"
