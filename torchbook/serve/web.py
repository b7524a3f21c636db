"""The web chat page of `torchbook serve` (chapter 15): the page at `/` and the small JSON routes it uses.

The page itself is plain HTML, CSS and JavaScript in `torchbook/serve/static/` (no build step, nothing fetched from
elsewhere; docs/web.md). It streams a plain model's replies from `/v1/chat/completions`; this module adds:

- `GET /`: the page; `GET /api/web/config`: the models it may choose, whether the chatbot system and the knowledge
  base are there, whether API keys are required;
- `GET /api/documents`, `POST /api/documents?name=FILE` (the file's bytes as the body): the knowledge base's
  documents, and adding one (saved under `$TORCHBOOK_HOME/web/uploads/`, then indexed);
- the chatbot system (`torchbook.chat`, the server's `torchbook-chat`, `torchbook.serve.chatbot`) on its engine:
  `GET/POST /api/conversations`, `GET/DELETE /api/conversations/{id}` (the conversations of `torchbook chat`, in
  `$TORCHBOOK_HOME/chat/`), and `POST /api/chat` (`{conversation_id, message, max_tokens, temperature, mode,
  system}`): the turn streamed as server-sent events in the chunks of `/v1/chat/completions`, with a `torchbook`
  field for what the orchestrator did (`conversation`, `tool_call`, `tool_result`, `error`, `sources`, `context`).
  The page closing the stream (its stop button) cancels the turn's generation: its slot is free at the engine's
  next step.

The `/api/` routes ask for the same API key as `/v1/` when the server requires keys, and bound what they read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from torchbook.chat.conversations import Conversations
from torchbook.chat.model import Cancelled, ChatModel, Turn
from torchbook.chat.orchestrator import MODES, Event, Orchestrator
from torchbook.chat.session import ChatSession
from torchbook.chat.tools import builtin_tools
from torchbook.errors import UserInputError
from torchbook.generate.sampling import SamplingConfig
from torchbook.knowledge import KnowledgeBase
from torchbook.paths import home
from torchbook.serve.chatbot import CHAT_MODEL

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 20 << 20
UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")


class WebError(Exception):
    """An error the page shows (OpenAI's error body, as the rest of the server answers)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {401: "invalid_request_error", 413: "invalid_request_error", 503: "server_error"}.get(
        status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


def upload_name(name: str) -> str:
    """A file name safe to write under the uploads folder: no folders, no odd characters, not hidden."""
    base = UNSAFE_NAME.sub("_", Path(name.replace("\\", "/")).name).strip(" .")
    if not base:
        raise WebError(400, "the document needs a file name (such as notes.md)", "name")
    return base[:120]


class Documents:
    """The knowledge base the page adds documents to (opened on first use; the server's embedder if it has one)."""

    def __init__(self, embedder: Any, location: str | Path | None = None, uploads: Path | None = None):
        self.embedder, self.location = embedder, location
        self.uploads = uploads or home() / "web" / "uploads"
        self._kb: Any = None
        self._lock = threading.RLock()  # one indexing at a time; opening the base happens under it too

    def kb(self) -> Any:
        with self._lock:
            if self._kb is None:
                self._kb = KnowledgeBase.open(self.location, embedder=self.embedder)
            return self._kb

    def list(self) -> list[dict[str, Any]]:
        kb = self.kb()
        return [{"name": Path(source).name, "source": source} for source in sorted(kb.store.sources())]

    def add(self, name: str, data: bytes) -> dict[str, Any]:
        self.uploads.mkdir(parents=True, exist_ok=True)
        path = self.uploads / upload_name(name)
        path.write_bytes(data)
        with self._lock:
            kb = self.kb()
            report = kb.index([path])
        if report.unreadable:
            path.unlink(missing_ok=True)
            raise WebError(400, f"{path.name} could not be read: {report.unreadable[0][1]}", "file")
        return {"name": path.name, "source": str(path), "chunks": report.chunks,
                "unchanged": bool(report.skipped)}


USER = "default"  # the user of `torchbook chat`: the page and the terminal share their conversations


class ChatTurn(BaseModel):
    conversation_id: str | None = None
    message: str = Field(min_length=1, max_length=32_000)
    max_tokens: int = Field(256, ge=1, le=32_768)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    mode: str = "orchestrator"
    system: str | None = Field(None, max_length=8_000)


def event_body(event: Event) -> dict[str, Any]:
    """An orchestrator's event as the page reads it."""
    body: dict[str, Any] = {"kind": event.kind}
    if event.kind in ("text", "context") or (event.kind == "error" and event.name is None):
        body["text"] = event.text
    if event.name is not None:
        body["name"] = event.name
    if event.arguments is not None:
        body["arguments"] = event.arguments
    if event.output is not None:
        body["output"] = {"text": event.output.text, "error": event.output.error, "sources": event.output.sources}
    if event.sources:
        body["sources"] = event.sources
    return body


class ChatSystem:
    """`torchbook.chat` for the page: conversations in SQLite, the orchestrator with calculator, unit conversion and
    (with a knowledge base) search over the page's documents, on the server's engine."""

    def __init__(self, chat: ChatModel, documents: Documents | None):
        self.chat = chat  # the served chatbot's ChatModel (`torchbook.serve.chatbot`): on the server's engine
        self.documents = documents
        self.conversations = Conversations.open()
        self.lock = threading.Lock()  # one writer at a time on the conversations' database

    def tools(self) -> Any:
        return builtin_tools(kb=self.documents.kb() if self.documents is not None else None, web_tools=False)

    def turn(self, body: ChatTurn, model: ChatModel, on_event: Callable[[Event], None]) -> Any:
        if body.mode not in MODES:
            raise UserInputError(f"unknown chat mode {body.mode!r}; accepted: {', '.join(MODES)}", param="mode")
        options: dict[str, Any] = {"mode": body.mode, "max_tokens": body.max_tokens}
        if body.system:
            options["system_prompt"] = body.system
        orchestrator = Orchestrator(model, self.tools(), **options)
        session = ChatSession(orchestrator, self.conversations, USER, conversation=body.conversation_id)
        if body.conversation_id is None:
            session.new()
            on_event(Event("conversation", text=str(session.conversation)))
        try:
            return session.send(body.message, on_event)
        except Cancelled:  # a stopped turn is not kept (ChatSession stores whole turns): nor is a new, empty chat
            if body.conversation_id is None and session.conversation is not None:
                self.conversations.delete(session.conversation)
            raise


def sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def router(server: Any, documents: Documents | None = None) -> APIRouter:
    """The page's routes over the app's `Server` (`torchbook.serve.app`)."""
    routes = APIRouter()
    if documents is None and server.embedder is not None:
        documents = Documents(server.embedder, server.settings.kb)
    system = ChatSystem(server.chatbot.model, documents) if server.chatbot is not None else None

    def need_chat() -> ChatSystem:
        if system is None:
            raise WebError(404, "this server has no language model for the chatbot system")
        return system

    def check_key(http: HTTPRequest) -> None:
        if not server.require_keys:
            return
        auth = http.headers.get("authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not key or server.keys.check(key) is None:
            raise WebError(401, "this server needs an API key: enter it in Settings")

    keyed = APIRouter(dependencies=[Depends(check_key)])  # every /api/ route but the configuration

    @routes.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    @routes.get("/api/web/config")
    async def config() -> dict[str, Any]:
        return {"models": [server.lm.name] if server.lm is not None else [],
                "chat_model": CHAT_MODEL if system is not None else None, "modes": list(MODES),
                "mode": server.settings.chat_mode,
                "knowledge": documents is not None, "keys_required": server.require_keys}

    @keyed.get("/api/documents")
    async def list_documents() -> dict[str, Any]:
        if documents is None:
            raise WebError(404, "this server has no knowledge base (it was started without an embedder)")
        return {"data": await asyncio.to_thread(documents.list)}

    @keyed.post("/api/documents")
    async def add_document(http: HTTPRequest, name: str) -> dict[str, Any]:
        if documents is None:
            raise WebError(404, "this server has no knowledge base (it was started without an embedder)")
        declared = http.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
            raise WebError(413, f"the document is over the limit of {MAX_UPLOAD_BYTES >> 20} MiB", "file")
        data = bytearray()
        async for piece in http.stream():
            data += piece
            if len(data) > MAX_UPLOAD_BYTES:
                raise WebError(413, f"the document is over the limit of {MAX_UPLOAD_BYTES >> 20} MiB", "file")
        if not data:
            raise WebError(400, "the document is empty", "file")
        return await asyncio.to_thread(documents.add, name, bytes(data))

    # -- the chatbot system --------------------------------------------------------------------------------------
    @keyed.get("/api/conversations")
    async def list_conversations() -> dict[str, Any]:
        rows = await asyncio.to_thread(need_chat().conversations.all, USER)
        return {"data": [{"id": c.id, "title": c.title, "messages": c.messages, "updated": c.updated} for c in rows]}

    @keyed.post("/api/conversations")
    async def new_conversation() -> dict[str, Any]:
        return {"id": await asyncio.to_thread(need_chat().conversations.create, USER, CHAT_MODEL)}

    def known(conversation_id: str) -> Any:
        try:
            return need_chat().conversations.info(conversation_id, USER)
        except UserInputError:
            raise WebError(404, f"there is no conversation {conversation_id!r}", "conversation_id") from None

    @keyed.get("/api/conversations/{conversation_id}")
    async def get_conversation(conversation_id: str) -> dict[str, Any]:
        info = await asyncio.to_thread(known, conversation_id)
        messages = await asyncio.to_thread(need_chat().conversations.messages, conversation_id)
        return {"id": info.id, "title": info.title, "messages": messages}

    @keyed.delete("/api/conversations/{conversation_id}")
    async def delete_conversation(conversation_id: str) -> dict[str, Any]:
        await asyncio.to_thread(known, conversation_id)
        return {"id": conversation_id, "deleted": await asyncio.to_thread(need_chat().conversations.delete,
                                                                           conversation_id)}

    @keyed.post("/api/chat")
    async def chat(body: ChatTurn) -> StreamingResponse:
        chat_system = need_chat()
        if body.conversation_id is not None:
            await asyncio.to_thread(known, body.conversation_id)
        if body.mode not in MODES:
            raise WebError(400, f"unknown chat mode {body.mode!r}; accepted: {', '.join(MODES)}", "mode")
        turn = Turn(chat_system.chat.engine)  # the page's Stop (closing the stream) cancels it
        model = chat_system.chat.for_turn(turn, SamplingConfig(temperature=body.temperature))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def put(kind: str, item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, item))

        def work() -> None:  # in a worker thread: the orchestrator blocks on the engine
            try:
                put("done", chat_system.turn(body, model, lambda event: put("event", event)))
            except Cancelled:
                put("cancelled", None)
            except Exception as e:  # shown to the page as the stream's error
                if not isinstance(e, UserInputError):
                    log.exception("a chat turn failed")
                put("failed", e)

        completion_id, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                        "model": CHAT_MODEL, "choices": choices, **extra})

        async def events() -> AsyncIterator[bytes]:
            worker = loop.run_in_executor(None, work)
            try:
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                while True:
                    kind, item = await queue.get()
                    if kind == "event" and item.kind == "text":
                        yield chunk([{"index": 0, "delta": {"content": item.text}, "finish_reason": None}])
                    elif kind == "event" and item.kind == "conversation":
                        yield chunk([], torchbook={"kind": "conversation", "id": item.text})
                    elif kind == "event":
                        yield chunk([], torchbook=event_body(item))
                    elif kind == "done":
                        reason = item.finish_reason if item.finish_reason in ("stop", "length") else "stop"
                        usage = {"prompt_tokens": item.prompt_tokens, "completion_tokens": item.completion_tokens,
                                 "total_tokens": item.prompt_tokens + item.completion_tokens}
                        yield chunk([{"index": 0, "delta": {}, "finish_reason": reason}], usage=usage)
                        break
                    else:
                        message = str(item) if kind == "failed" else "the turn was cancelled"
                        yield sse({"error": {"message": message, "type": "server_error", "param": None,
                                             "code": None}})
                        break
                yield sse("[DONE]")
            finally:  # the page closed the stream (its stop button) or the turn ended: nothing goes on
                turn.cancel()
                worker.add_done_callback(lambda f: f.exception())

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    routes.include_router(keyed)
    return routes


def install(app: FastAPI, server: Any) -> None:
    """Mount the page's routes on the app (one call in `build_app`)."""

    @app.exception_handler(WebError)
    async def web_error(request: HTTPRequest, e: WebError) -> JSONResponse:
        return error(e.status, e.message, e.param)

    app.include_router(router(server))
