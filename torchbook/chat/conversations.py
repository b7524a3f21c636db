"""Conversations kept in SQLite (book chapter 15): listed and resumed by id, each turn's prompt recorded.

    store = Conversations.open()                     # $TORCHBOOK_HOME/chat/chat.sqlite (WAL)
    cid = store.create(user="alice", model="SmolLM2-135M-Instruct")
    store.append(cid, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    store.messages(cid)                              # the messages in order (OpenAI's dicts)
    store.all("alice")                               # [ConversationInfo], most recently updated first
    store.record_prompt(cid, turn=1, step=0, prompt="<|im_start|>...", tokens=42, dropped=0)
    store.prompts(cid)                               # [PromptRecord]: exactly what the model read, for inspection

A turn's messages (the user's, the assistant's tool calls, the tool results, the answer) are written in one
transaction: a conversation never holds half a turn. The title is the first user message, cut to `TITLE_CHARS`.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchbook.chat.store import Database
from torchbook.errors import UserInputError, unknown

TITLE_CHARS = 60

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    title TEXT NOT NULL DEFAULT '',
    model TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    summary TEXT,
    summary_covers INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS conversations_user ON conversations(user, updated);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    turn INTEGER NOT NULL,
    role TEXT NOT NULL,
    body TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_conversation ON messages(conversation, id);
CREATE TABLE IF NOT EXISTS prompts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    turn INTEGER NOT NULL,
    step INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    dropped INTEGER NOT NULL,
    created REAL NOT NULL
);
"""


@dataclass(frozen=True)
class ConversationInfo:
    id: str
    user: str
    title: str
    model: str | None
    created: float
    updated: float
    messages: int


@dataclass(frozen=True)
class PromptRecord:
    turn: int
    step: int  # the model's call within the turn (0: first; more when it called tools)
    prompt: str
    tokens: int
    dropped: int  # earlier messages left out to fit the context
    created: float


class Conversations:
    def __init__(self, db: Database):
        self.db = db
        self.db.script(SCHEMA)

    @classmethod
    def open(cls, path: str | Path | None = None) -> Conversations:
        return cls(Database.open(path))

    def create(self, user: str = "default", model: str | None = None, title: str = "") -> str:
        cid = secrets.token_hex(4)
        now = time.time()
        with self.db.transaction() as conn:
            while conn.execute("SELECT 1 FROM conversations WHERE id = ?", (cid,)).fetchone():
                cid = secrets.token_hex(4)
            conn.execute("INSERT INTO conversations(id, user, title, model, created, updated) VALUES (?, ?, ?, ?, ?, ?)",
                         (cid, user, title[:TITLE_CHARS], model, now, now))
        return cid

    def info(self, cid: str, user: str | None = None) -> ConversationInfo:
        """The conversation `cid` (of `user`, when given); an error naming the user's conversations if none."""
        rows = self.db.query(
            "SELECT c.id, c.user, c.title, c.model, c.created, c.updated, "
            "(SELECT count(*) FROM messages m WHERE m.conversation = c.id) FROM conversations c WHERE c.id = ?",
            (cid,))
        if not rows or (user is not None and rows[0][1] != user):
            raise unknown("conversation", cid, [c.id for c in self.all(user)], limit=10)
        return ConversationInfo(*rows[0])

    def all(self, user: str | None = None, limit: int = 50) -> list[ConversationInfo]:
        """The conversations (of `user`), most recently updated first."""
        where, params = ("WHERE c.user = ?", (user,)) if user is not None else ("", ())
        rows = self.db.query(
            "SELECT c.id, c.user, c.title, c.model, c.created, c.updated, "
            "(SELECT count(*) FROM messages m WHERE m.conversation = c.id) "
            f"FROM conversations c {where} ORDER BY c.updated DESC, c.rowid DESC LIMIT ?", (*params, limit))
        return [ConversationInfo(*row) for row in rows]

    def messages(self, cid: str) -> list[dict[str, Any]]:
        return [json.loads(body) for (body,) in
                self.db.query("SELECT body FROM messages WHERE conversation = ? ORDER BY id", (cid,))]

    def turns(self, cid: str) -> int:
        return int(self.db.query("SELECT coalesce(max(turn), 0) FROM messages WHERE conversation = ?", (cid,))[0][0])

    def append(self, cid: str, messages: list[dict[str, Any]], turn: int | None = None) -> int:
        """Add one turn's messages together (one transaction); the turn's number."""
        for message in messages:
            if not isinstance(message, dict) or "role" not in message:
                raise UserInputError(f"a message must be a dict with a 'role', got {message!r}", param="messages")
        now = time.time()
        with self.db.transaction() as conn:
            row = conn.execute("SELECT title FROM conversations WHERE id = ?", (cid,)).fetchone()
            if row is None:
                raise UserInputError(f"there is no conversation {cid!r}", param="conversation")
            if turn is None:
                turn = int(conn.execute("SELECT coalesce(max(turn), 0) FROM messages WHERE conversation = ?",
                                        (cid,)).fetchone()[0]) + 1
            conn.executemany("INSERT INTO messages(conversation, turn, role, body, created) VALUES (?, ?, ?, ?, ?)",
                             [(cid, turn, m["role"], json.dumps(m, ensure_ascii=False), now) for m in messages])
            title = row[0]
            if not title:
                first = next((m.get("content") for m in messages if m["role"] == "user"), None)
                title = " ".join(str(first or "").split())[:TITLE_CHARS]
            conn.execute("UPDATE conversations SET updated = ?, title = ? WHERE id = ?", (now, title, cid))
        return turn

    def record_prompt(self, cid: str, turn: int, step: int, prompt: str, tokens: int, dropped: int) -> None:
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO prompts(conversation, turn, step, prompt, tokens, dropped, created) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", (cid, turn, step, prompt, tokens, dropped, time.time()))

    def prompts(self, cid: str, turn: int | None = None) -> list[PromptRecord]:
        where, params = ("AND turn = ?", (cid, turn)) if turn is not None else ("", (cid,))
        rows = self.db.query(f"SELECT turn, step, prompt, tokens, dropped, created FROM prompts WHERE conversation = ? "
                             f"{where} ORDER BY id", params)
        return [PromptRecord(*row) for row in rows]

    def summary(self, cid: str) -> tuple[int, str | None]:
        """(how many of the first messages the stored summary covers, the summary)."""
        rows = self.db.query("SELECT summary_covers, summary FROM conversations WHERE id = ?", (cid,))
        return (int(rows[0][0]), rows[0][1]) if rows else (0, None)

    def set_summary(self, cid: str, covers: int, summary: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("UPDATE conversations SET summary = ?, summary_covers = ? WHERE id = ?",
                         (summary, covers, cid))

    def delete(self, cid: str) -> bool:
        with self.db.transaction() as conn:
            return conn.execute("DELETE FROM conversations WHERE id = ?", (cid,)).rowcount > 0
