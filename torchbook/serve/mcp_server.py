"""`torchbook mcp`: torchbook's tools and knowledge base served over the Model Context Protocol (chapter 15).

The other side of `torchbook.chat.mcp` (the host): any MCP host (Claude Desktop, an IDE, `torchbook chat --mcp`)
can use torchbook's tools and read the knowledge base's documents. Built on the official `mcp` SDK's low-level
`Server`, whose handlers this module fills:

- tools: those of a `ToolSource` (the chat's `ToolRegistry`: calculator, unit conversion, knowledge-base search,
  memory); arguments are checked against each tool's schema, and a bad argument, an unknown tool or a tool that
  raises comes back as an MCP tool error (`isError: true` with the reason as text), never a crash of the server;
  tools with side effects are marked (`readOnlyHint: false`) for the host to confirm;
- resources: each document of a knowledge base (`KnowledgeDocuments`), listed by its `file://` URI and read as
  its extracted text.

Transports: stdio (`serve_stdio`, what a host starts as a child process) and streamable HTTP (`http_app`, an ASGI
app; `serve_http` runs it with uvicorn, on the loopback address unless told otherwise; the SDK then also refuses
requests whose Host or Origin header is not a loopback one, the DNS-rebinding guard).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import mcp_types as types
import uvicorn
from mcp import MCPError
from mcp.server import Server
from mcp.server.stdio import stdio_server
from starlette.applications import Starlette

from torchbook.chat.memory import Memory
from torchbook.chat.tools import ToolRegistry, WebSettings, builtin_tools
from torchbook.errors import DataUnavailable, UserInputError
from torchbook.knowledge.base import Hit, KnowledgeBase, open_store
from torchbook.knowledge.documents import UnreadableFile, extract_text
from torchbook.knowledge.embedder import Embedder

log = logging.getLogger(__name__)

SERVER_NAME = "torchbook"
LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 8765


class ToolLike(Protocol):
    name: str
    description: str
    parameters: dict[str, Any]
    side_effects: bool


class OutputLike(Protocol):
    text: str
    error: bool
    data: Any


class ToolSource(Protocol):
    """What `torchbook.chat.tools.ToolRegistry` is: its tools, and `call(name, arguments)` that checks the
    arguments against the tool's schema and never raises for a bad call (it returns an output with `error`)."""

    def __iter__(self) -> Iterator[ToolLike]: ...

    def call(self, name: str, arguments: dict[str, Any]) -> OutputLike: ...


@dataclass(frozen=True)
class Document:
    uri: str
    name: str
    mime_type: str


class DocumentSource(Protocol):
    def documents(self) -> Sequence[Document]: ...

    def read(self, uri: str) -> str: ...


class KnowledgeDocuments:
    """The documents of a knowledge base (`torchbook index`) as MCP resources, read as their extracted text.

    Listing reads the store alone (no embedder is loaded); a document is read from its file, as `torchbook index`
    read it, so the text is whole (the stored chunks overlap)."""

    MIME = {".md": "text/markdown", ".html": "text/html", ".htm": "text/html"}

    def __init__(self, location: str | Path | None = None):
        self.store = open_store(location)

    def _sources(self) -> list[str]:
        return sorted(self.store.sources())

    def documents(self) -> list[Document]:
        return [Document(uri=Path(source).as_uri(), name=Path(source).name,
                         mime_type=self.MIME.get(Path(source).suffix.lower(), "text/plain"))
                for source in self._sources()]

    def read(self, uri: str) -> str:
        by_uri = {Path(source).as_uri(): source for source in self._sources()}
        source = by_uri.get(uri)
        if source is None:
            raise UserInputError(f"{uri} is not a document of the knowledge base {self.store.location}")
        try:
            return extract_text(Path(source))
        except (OSError, UnreadableFile) as error:
            raise DataUnavailable(f"{source} is indexed but cannot be read now: {error}") from None


class LazyKnowledgeBase:
    """A knowledge base opened (its embedder loaded) on the first search, so that the server answers a host's
    `initialize` at once instead of after the embedder's load."""

    def __init__(self, location: str | Path | None = None, embedder: str | None = None):
        self.location, self.embedder = location, embedder
        self._kb: KnowledgeBase | None = None
        self._lock = threading.Lock()

    def search(self, query: str, k: int = 5, **options: Any) -> list[Hit]:
        with self._lock:
            if self._kb is None:
                self._kb = KnowledgeBase.open(self.location, Embedder.load(self.embedder))
        return self._kb.search(query, k=k, **options)


def torchbook_tools(kb: str | None = None, embedder: str | None = None, user: str = "default",
                    memory_path: str | Path | None = None, web: WebSettings | None = None) -> ToolRegistry:
    """The tools `torchbook mcp` serves: calculator, unit conversion, memory (the facts of `user`), knowledge-base
    search when the base `kb` has documents, and web fetch and search only when `web` is given.

    Tools with side effects (remember, forget) run without a second question here: under MCP the host asks the
    user before it calls a tool, and the tool list marks them (`readOnlyHint: false`)."""
    has_documents = bool(open_store(kb).sources())
    if not has_documents:
        log.info("the knowledge base %s has no documents: search_knowledge is not offered (torchbook index)",
                 kb or "default")
    registry = builtin_tools(kb=LazyKnowledgeBase(kb, embedder) if has_documents else None,
                             memory=Memory.open(memory_path), user=lambda: user, web_settings=web,
                             web_tools=web is not None)
    registry.confirm = lambda tool, arguments: True
    return registry


def tool_error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=message)], is_error=True)


def call_tool(tools: ToolSource, name: str, arguments: Mapping[str, Any] | None) -> types.CallToolResult:
    """One tool call as an MCP result; a bad call (unknown tool, arguments against the schema, a tool that fails)
    is an error result whose text says what was wrong, never an exception out of the server."""
    try:
        output = tools.call(name, dict(arguments or {}))
    except Exception as error:  # the registry answers bad calls itself; anything else is still the caller's news
        log.exception("tool %s failed", name)
        return tool_error(f"{name} failed: {type(error).__name__}: {error}")
    structured = output.data if isinstance(output.data, dict) and not output.error else None
    return types.CallToolResult(content=[types.TextContent(text=output.text)], is_error=bool(output.error),
                                structured_content=structured)


def build_server(tools: ToolSource, documents: DocumentSource | None = None, name: str = SERVER_NAME) -> Server:
    """The MCP server: `tools` as tools, `documents` (when given) as resources."""

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        # Side effects are the host's to confirm (MCP puts the human in the loop in the host): the hints say which.
        return types.ListToolsResult(tools=[
            types.Tool(name=t.name, description=t.description, input_schema=dict(t.parameters),
                       annotations=types.ToolAnnotations(read_only_hint=not t.side_effects))
            for t in tools])

    async def on_call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        # In a worker thread: a tool may compute or read files for a while; the server keeps answering meanwhile.
        return await anyio.to_thread.run_sync(call_tool, tools, params.name, params.arguments)

    async def list_resources(ctx: Any, params: Any) -> types.ListResourcesResult:
        listed = await anyio.to_thread.run_sync(documents.documents) if documents is not None else []
        return types.ListResourcesResult(resources=[
            types.Resource(uri=d.uri, name=d.name, mime_type=d.mime_type) for d in listed])

    async def read_resource(ctx: Any, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        uri = str(params.uri)
        try:
            if documents is None:
                raise UserInputError("this server has no resources")
            text = await anyio.to_thread.run_sync(documents.read, uri)
        except (UserInputError, DataUnavailable) as error:  # the caller hears why (the SDK hides other errors)
            raise MCPError(types.INVALID_PARAMS, str(error)) from None
        mime = next((d.mime_type for d in documents.documents() if d.uri == uri), "text/plain")
        return types.ReadResourceResult(contents=[types.TextResourceContents(uri=uri, mime_type=mime, text=text)])

    extra: dict[str, Any] = {}
    if documents is not None:
        extra = {"on_list_resources": list_resources, "on_read_resource": read_resource}
    return Server(name, version="0.1.0", instructions="torchbook's tools (chapter 15 of Hands-On Machine Learning "
                  "with Scikit-Learn and PyTorch) and its knowledge base's documents.",
                  on_list_tools=list_tools, on_call_tool=on_call_tool, **extra)


async def serve_stdio(server: Server) -> None:
    """Serve one host over this process's stdin/stdout until it closes them."""
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


def http_app(server: Server, host: str = LOOPBACK, path: str = "/mcp") -> Starlette:
    """The streamable HTTP endpoint as an ASGI app (`path` on `host`)."""
    return server.streamable_http_app(streamable_http_path=path, host=host)


def http_server(server: Server, host: str = LOOPBACK, port: int = DEFAULT_PORT, path: str = "/mcp") -> uvicorn.Server:
    """A uvicorn server for the streamable HTTP endpoint: `.run()` serves until `.should_exit` is set (port 0: a
    free port, see `bound_url`)."""
    return uvicorn.Server(uvicorn.Config(http_app(server, host, path), host=host, port=port, log_level="warning"))


def bound_url(web: uvicorn.Server, path: str = "/mcp") -> str:
    """The URL a started `http_server` answers at."""
    host, port = next(s for srv in web.servers for s in srv.sockets).getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"


def serve_http(server: Server, host: str = LOOPBACK, port: int = DEFAULT_PORT, path: str = "/mcp",
               ready: Callable[[str], None] | None = None) -> None:
    """Serve streamable HTTP at http://host:port/path until interrupted; `ready(url)` once it listens."""
    web = http_server(server, host, port, path)

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(web.serve)
            while not web.started:
                if web.should_exit:
                    return
                await anyio.sleep(0.05)
            if ready is not None:
                ready(bound_url(web, path))

    anyio.run(run)
