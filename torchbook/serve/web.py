"""The web chat page of `torchbook serve` (chapter 15): the page at `/` and the small JSON routes it uses.

The page itself is plain HTML, CSS and JavaScript in `torchbook/serve/static/` (no build step, nothing fetched from
elsewhere; docs/web.md). It streams a plain model's replies from `/v1/chat/completions`; this module adds:

- `GET /`: the page; `GET /api/web/config`: the models it may choose, whether the chatbot system and the knowledge
  base are there, whether API keys are required;
- `GET /api/documents`, `POST /api/documents?name=FILE` (the file's bytes as the body): the knowledge base's
  documents, and adding one (saved under `$TORCHBOOK_HOME/web/uploads/`, then indexed).

The `/api/` routes ask for the same API key as `/v1/` when the server requires keys, and bound what they read.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse, JSONResponse

from torchbook.paths import home

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
        self._lock = threading.Lock()

    def kb(self) -> Any:
        from torchbook.knowledge import KnowledgeBase  # LanceDB and the encoder: only when a document comes

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


def router(server: Any, documents: Documents | None = None) -> APIRouter:
    """The page's routes over the app's `Server` (`torchbook.serve.app`)."""
    routes = APIRouter()
    if documents is None and getattr(server, "embedder", None) is not None:
        documents = Documents(server.embedder)

    def check_key(http: HTTPRequest) -> None:
        if not server.require_keys:
            return
        auth = http.headers.get("authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not key or server.keys.check(key) is None:
            raise WebError(401, "this server needs an API key: enter it in Settings")

    @routes.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    @routes.get("/api/web/config")
    async def config(http: HTTPRequest) -> dict[str, Any]:
        return {"models": [server.lm.name] if server.lm is not None else [], "chat_model": None,
                "knowledge": documents is not None, "keys_required": server.require_keys}

    @routes.get("/api/documents")
    async def list_documents(http: HTTPRequest) -> dict[str, Any]:
        check_key(http)
        if documents is None:
            raise WebError(404, "this server has no knowledge base (it was started without an embedder)")
        return {"data": await asyncio.to_thread(documents.list)}

    @routes.post("/api/documents")
    async def add_document(http: HTTPRequest, name: str) -> dict[str, Any]:
        check_key(http)
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

    return routes


def install(app: FastAPI, server: Any) -> None:
    """Mount the page's routes on the app (one call in `build_app`)."""

    @app.exception_handler(WebError)
    async def web_error(request: HTTPRequest, e: WebError) -> JSONResponse:
        return error(e.status, e.message, e.param)

    app.include_router(router(server))
