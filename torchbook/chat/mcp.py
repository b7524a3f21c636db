"""The MCP host (chapter 15): torchbook's chatbot uses any Model Context Protocol server's tools.

Chapter 15 gives the chatbot tools through the Model Context Protocol: a *host* (the chatbot) keeps one *client*
connection per *server*; each server offers tools (functions the model may call, with a JSON schema), resources
(documents read by URI) and prompts (message templates). This module is the host, built on the official `mcp` SDK
(version 2): it connects to servers over stdio (a command started as a child process) or streamable HTTP (a URL),
lists their tools, resources and prompts, calls tools and reads resources.

Servers are configured by the JSON file other MCP hosts read (Claude Desktop, Cursor, VS Code)::

    {"mcpServers": {"everything": {"command": "npx", "args": ["@modelcontextprotocol/server-everything"],
                                   "env": {"KEY": "value"}},
                    "remote": {"url": "http://127.0.0.1:8000/mcp"}}}

A server that cannot start, dies, or stops answering within `call_timeout` is reported (`MCPHost.events`, and
the log), its tools withdrawn, and the host goes on with the others: a tool call then comes back as an error the
model can read, never an exception into the conversation. Tool names are offered as the server gives them, and
as `server__tool` where two servers (or the host's own tools, `reserved`) share a name.

The SDK is asynchronous; the host runs its connections on one event loop in a background thread and offers a
plain blocking API, so the orchestrator, the terminal and the HTTP server call it alike.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx2
import mcp_types as types
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from torchbook.chat.tools.registry import Tool, ToolOutput, ToolRegistry
from torchbook.errors import UserInputError, unknown

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Separator between a server's name and its tool's name when names clash: tool names the models' function-call
# formats accept are [A-Za-z0-9_-], so no dot or slash.
NAMESPACE_SEPARATOR = "__"
WATCH_INTERVAL = 0.5  # seconds between two looks at whether a stdio server's output has ended
TRANSPORT_TYPES = {"stdio": "stdio", "http": "http", "streamable-http": "http", "streamable_http": "http",
                   "streamableHttp": "http"}


@dataclass(frozen=True)
class ServerSpec:
    """One entry of an `mcpServers` configuration: a command to start (stdio) or a URL (streamable HTTP)."""

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def transport(self) -> str:
        return "stdio" if self.command else "http"

    def describe(self) -> str:
        return " ".join([self.command or "", *self.args]).strip() if self.command else str(self.url)


def parse_config(data: Any, source: str = "MCP configuration") -> list[ServerSpec]:
    """The servers of an `{"mcpServers": {name: {command, args, env} | {url, headers}}}` document.

    Also reads VS Code's `{"servers": ...}` spelling and an optional `"type"` (`stdio`, `http`); entries with
    `"disabled": true` are skipped. Anything else malformed is a `UserInputError` naming the server at fault.
    """
    if not isinstance(data, Mapping):
        raise UserInputError(f"{source}: expected a JSON object with \"mcpServers\", got {type(data).__name__}")
    servers = data.get("mcpServers", data.get("servers"))
    if not isinstance(servers, Mapping):
        raise UserInputError(f"{source}: expected \"mcpServers\": {{name: {{command, args, env}} or {{url}}}}")
    specs = []
    for name, entry in servers.items():
        where = f"{source}: server {name!r}"
        if not isinstance(entry, Mapping):
            raise UserInputError(f"{where}: expected an object with \"command\" or \"url\"")
        if entry.get("disabled"):
            continue
        kind = entry.get("type")
        if kind is not None and kind not in TRANSPORT_TYPES:
            accepted = ", ".join(sorted(TRANSPORT_TYPES))
            raise UserInputError(f"{where}: transport type {kind!r} is not supported (accepted: {accepted}; "
                                 "the SSE transport is deprecated: use the server's streamable HTTP endpoint)")
        command, url = entry.get("command"), entry.get("url")
        if bool(command) == bool(url):
            raise UserInputError(f"{where}: give exactly one of \"command\" (stdio) or \"url\" (streamable HTTP)")
        args, env, headers = entry.get("args", []), entry.get("env", {}), entry.get("headers", {})
        if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
            raise UserInputError(f"{where}: \"args\" must be a list of strings")
        for key, value in (("env", env), ("headers", headers)):
            if not (isinstance(value, Mapping) and all(isinstance(v, str) for v in value.values())):
                raise UserInputError(f"{where}: \"{key}\" must map names to strings")
        if url is not None and not (isinstance(url, str) and re.match(r"https?://", url)):
            raise UserInputError(f"{where}: \"url\" must be an http:// or https:// address, got {url!r}")
        specs.append(ServerSpec(name=str(name), command=command, args=tuple(args), env=dict(env),
                                cwd=entry.get("cwd"), url=url, headers=dict(headers)))
    return specs


def load_config(path: str | Path) -> list[ServerSpec]:
    """`parse_config` of a JSON file (the `torchbook chat --mcp FILE` file)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserInputError(f"MCP configuration {path} does not exist", param="mcp") from None
    except json.JSONDecodeError as e:
        raise UserInputError(f"MCP configuration {path} is not valid JSON: {e}", param="mcp") from None
    return parse_config(data, source=str(path))


@dataclass(frozen=True)
class RemoteTool:
    """A tool one server offers, under the name the model sees (`name`) and the server's own (`remote_name`)."""

    server: str
    name: str
    remote_name: str
    description: str
    input_schema: dict[str, Any]
    read_only: bool = False  # the server's `readOnlyHint` (MCP's default: False, the tool may change things)


@dataclass(frozen=True)
class RemoteResource:
    server: str
    uri: str
    name: str
    description: str
    mime_type: str | None


@dataclass(frozen=True)
class RemoteTemplate:
    """A family of resources: read one by filling the URI template (RFC 6570), e.g. `demo://text/{index}`."""

    server: str
    uri_template: str
    name: str
    description: str
    mime_type: str | None


@dataclass(frozen=True)
class RemotePrompt:
    server: str
    name: str
    description: str
    arguments: tuple[str, ...]


@dataclass(frozen=True)
class ToolOutcome:
    """What a tool call gave: its text for the model, whether it is an error, and any structured result."""

    text: str
    is_error: bool = False
    structured: Any = None


@dataclass(frozen=True)
class ResourceContent:
    uri: str
    mime_type: str | None
    text: str | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class HostEvent:
    """Something the user should hear about: a server failed to start, died or hung, and what became of it."""

    server: str
    message: str


def content_text(blocks: Iterable[Any]) -> str:
    """The text of MCP content blocks; images, audio and blobs are named with their type and size."""
    parts = []
    for block in blocks:
        if isinstance(block, types.TextContent):
            parts.append(block.text)
        elif isinstance(block, types.ImageContent | types.AudioContent):
            parts.append(f"[{block.type} {block.mime_type}, {len(base64.b64decode(block.data))} bytes]")
        elif isinstance(block, types.EmbeddedResource):
            resource = block.resource
            if isinstance(resource, types.TextResourceContents):
                parts.append(resource.text)
            else:
                parts.append(f"[resource {resource.uri}, {len(base64.b64decode(resource.blob))} bytes]")
        elif isinstance(block, types.ResourceLink):
            parts.append(f"[resource link {block.uri}" + (f": {block.description}]" if block.description else "]"))
        else:
            parts.append(f"[{getattr(block, 'type', type(block).__name__)} content]")
    return "\n".join(parts)


def _tail(stream: IO[str] | None, lines: int = 3) -> str:
    """The last lines a stdio server wrote to its stderr (the usual explanation of its death)."""
    if stream is None:
        return ""
    try:
        stream.flush()
        stream.seek(0)
        text = stream.read()[-4000:]
    except (OSError, ValueError):
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


class ServerGone(Exception):
    """The server's connection is closed (it died, or the host withdrew it)."""


class HandshakeTimeout(Exception):
    """A server started but did not complete the MCP handshake in time."""


class ServerExited(Exception):
    """A stdio server's output ended between calls (it exited or was killed)."""


class _Connection:
    """One server's MCP session, kept open by a task on the host's event loop until `stop()`."""

    def __init__(self, spec: ServerSpec, loop: asyncio.AbstractEventLoop, timeout: float):
        self.spec = spec
        self.loop = loop
        self.timeout = timeout
        self.client: Client | None = None
        self.errlog: IO[str] | None = None
        self.alive = False
        self.withdrawn = False
        self._stop: asyncio.Event | None = None
        self._read_stream: Any = None
        self.on_closed: Callable[[_Connection], object] = lambda connection: None
        self._task: asyncio.Future[None] | None = None

    def _transport(self) -> Any:
        spec = self.spec
        if spec.command:
            # The server's stderr goes to a file of ours: its last lines explain a death in the report.
            self.errlog = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
            params = StdioServerParameters(command=spec.command, args=list(spec.args), env=dict(spec.env) or None,
                                           cwd=spec.cwd)
            return self._watched(stdio_client(params, errlog=self.errlog))
        if spec.headers:  # the SDK's own client timeouts: 30 s to connect, 300 s for a response stream
            http = httpx2.AsyncClient(headers=dict(spec.headers), timeout=httpx2.Timeout(30.0, read=300.0))
            return streamable_http_client(str(spec.url), http_client=http)
        return streamable_http_client(str(spec.url))

    @asynccontextmanager
    async def _watched(self, transport: Any) -> AsyncIterator[Any]:
        """The transport, its read stream kept so that `_transport_closed` sees the server's end of it close."""
        async with transport as (read_stream, write_stream):
            self._read_stream = read_stream
            yield read_stream, write_stream

    def _transport_closed(self) -> bool:
        """A stdio server's output has ended (it exited or was killed): nobody writes to the read stream any more.
        (A streamable HTTP server has no such end: its death shows at the next request.)"""
        statistics = getattr(self._read_stream, "statistics", None)
        return statistics is not None and statistics().open_send_streams == 0

    async def _keep(self, ready: asyncio.Future[None]) -> None:
        self._stop = asyncio.Event()
        try:
            client = Client(self._transport(), read_timeout_seconds=self.timeout,
                            client_info=types.Implementation(name="torchbook", version="0.1.0"))
            async with client:
                self.client, self.alive = client, True
                ready.set_result(None)
                while not self._stop.is_set():
                    try:
                        await asyncio.wait_for(self._stop.wait(), WATCH_INTERVAL)
                    except TimeoutError:
                        pass
                    if self.alive and not self._stop.is_set() and self._transport_closed():
                        self.on_closed(self)
        except BaseException as error:  # the SDK may raise anything from a child's death; it ends this server only
            if not ready.done():
                ready.set_exception(error)
            elif not isinstance(error, asyncio.CancelledError):
                log.debug("MCP server %s closed with %r", self.spec.name, error)
        finally:
            self.alive = False
            self.client = None

    async def open(self, timeout: float) -> list[types.Tool]:
        """Start the session (the handshake within `timeout`) and list the server's tools."""
        ready: asyncio.Future[None] = self.loop.create_future()
        self._task = asyncio.ensure_future(self._keep(ready))
        try:
            await asyncio.wait_for(asyncio.shield(ready), timeout)
        except TimeoutError:
            # Closing the read stream ends the handshake as a closed connection, so the transport shuts down
            # the usual way and stops the child; cancelling the task instead could leave the child running.
            if self._read_stream is not None:
                self._read_stream.close()
            done, _ = await asyncio.wait({self._task}, timeout=10)
            if not done:
                self._task.cancel()
            if ready.done() and not ready.cancelled():
                ready.exception()  # the closed handshake's error: expected, and read so asyncio does not warn
            raise HandshakeTimeout() from None
        return await self.call(_list_all_tools, timeout)

    async def call(self, make: Callable[[Client], Coroutine[Any, Any, _T]], timeout: float) -> _T:
        client = self.client
        if client is None or not self.alive:
            raise ServerGone(self.spec.name)
        return await asyncio.wait_for(make(client), timeout)

    def stop(self, timeout: float = 10.0) -> None:
        async def end() -> None:
            if self._stop is not None:
                self._stop.set()
            if self._task is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(self._task), timeout)
                except (TimeoutError, asyncio.CancelledError):
                    self._task.cancel()
                except Exception as error:  # a dying server's transport may raise on close; it is closed either way
                    log.debug("closing MCP server %s: %r", self.spec.name, error)

        if self.loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(end(), self.loop).result(timeout + 5)
            except Exception as error:  # closing must never take the host down
                log.debug("closing MCP server %s: %r", self.spec.name, error)
        if self.errlog is not None:
            self.errlog.close()
            self.errlog = None


class MCPHost:
    """Connections to MCP servers, their tools offered under unclashing names, with failures reported.

    `with MCPHost(specs) as host:` connects to every server (a server that cannot start is reported in
    `host.events` and skipped); `host.tools()` lists the live servers' tools; `host.call_tool(name, arguments)`
    returns a `ToolOutcome`; `host.resources()`, `host.read_resource(server, uri)`, `host.prompts()`,
    `host.get_prompt(server, name, arguments)` reach the rest of the protocol.
    """

    def __init__(self, specs: Sequence[ServerSpec], *, reserved: Iterable[str] = (), connect_timeout: float = 30.0,
                 call_timeout: float = 60.0, on_event: Callable[[HostEvent], None] | None = None):
        """`reserved`: names already taken (the host's own tools), so a server's tool of that name is namespaced;
        `call_timeout`: a server that takes longer to answer is taken as hung and withdrawn."""
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise UserInputError(f"MCP server names must be unique, got {names}")
        self.specs = list(specs)
        self.reserved = set(reserved)
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self.on_event = on_event
        self.events: list[HostEvent] = []
        self._connections: dict[str, _Connection] = {}
        self._tools: dict[str, RemoteTool] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="torchbook-mcp-host", daemon=True)
        self._started = False

    # ---- life cycle
    def start(self) -> MCPHost:
        if self._started:
            return self
        self._started = True
        self._thread.start()
        connections = [_Connection(spec, self._loop, self.call_timeout) for spec in self.specs]

        async def open_all() -> list[list[types.Tool] | BaseException]:  # every server at once
            return await asyncio.gather(*(c.open(self.connect_timeout) for c in connections), return_exceptions=True)

        opened = asyncio.run_coroutine_threadsafe(open_all(), self._loop).result(self.connect_timeout + 30)
        listed: dict[str, list[types.Tool]] = {}
        for connection, result in zip(connections, opened):
            spec = connection.spec
            if isinstance(result, BaseException):
                reason = (f"no answer to the MCP handshake within {self.connect_timeout:g} s"
                          if isinstance(result, HandshakeTimeout) else _describe(result, connection))
                connection.stop(timeout=5)
                self._report(spec.name, f"MCP server {spec.name} ({spec.describe()}) could not start: {reason}")
                continue
            connection.on_closed = lambda c: self._withdraw(c, ServerExited())
            self._connections[spec.name] = connection
            listed[spec.name] = result
            log.info("MCP server %s: %d tools", spec.name, len(result))
        self._tools = _name_tools(listed, self.reserved)
        return self

    def close(self) -> None:
        for connection in list(self._connections.values()):
            connection.stop()
        self._connections.clear()
        self._tools.clear()
        if self._started and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> MCPHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- what the servers offer
    @property
    def servers(self) -> list[str]:
        """The servers connected and answering."""
        return [name for name, connection in self._connections.items() if connection.alive]

    def tools(self) -> list[RemoteTool]:
        live = set(self.servers)
        return [tool for tool in self._tools.values() if tool.server in live]

    def tool(self, name: str) -> RemoteTool | None:
        tool = self._tools.get(name)
        return tool if tool is not None and tool.server in self.servers else None

    def call_tool(self, name: str, arguments: Mapping[str, Any] | None = None,
                  timeout: float | None = None) -> ToolOutcome:
        """Call a tool by the name `tools()` gave it. Every failure comes back as an error outcome, never raised."""
        tool = self._tools.get(name)
        if tool is None:
            return ToolOutcome(f"unknown MCP tool {name!r}", is_error=True)
        connection = self._connections.get(tool.server)
        if connection is None or not connection.alive:
            return ToolOutcome(f"MCP server {tool.server} is no longer available; tool {name} was withdrawn",
                               is_error=True)
        try:
            result = self._run(connection, lambda c: c.call_tool(tool.remote_name, dict(arguments or {})),
                               timeout or self.call_timeout)
        except MCPError as error:  # a JSON-RPC error: the call was wrong, unless the connection itself closed
            if _closed(error) or not connection.alive:
                return self._withdraw(connection, error)
            return ToolOutcome(f"MCP error {error.code} from {tool.server}: {error.message}", is_error=True)
        except Exception as error:
            return self._withdraw(connection, error)
        return ToolOutcome(content_text(result.content) or _json(result.structured_content),
                           is_error=bool(result.is_error), structured=result.structured_content)

    def resources(self, server: str | None = None) -> list[RemoteResource]:
        found = []
        for connection in self._live(server):
            listed = self._safe(connection, _list_all_resources) or []
            found += [RemoteResource(connection.spec.name, r.uri, r.name, r.description or "", r.mime_type)
                      for r in listed]
        return found

    def resource_templates(self, server: str | None = None) -> list[RemoteTemplate]:
        found = []
        for connection in self._live(server):
            listed = self._safe(connection, _list_all_templates) or []
            found += [RemoteTemplate(connection.spec.name, t.uri_template, t.name, t.description or "", t.mime_type)
                      for t in listed]
        return found

    def read_resource(self, server: str, uri: str) -> list[ResourceContent]:
        result = self._request(server, lambda c: c.read_resource(uri), f"read {uri}")
        return [ResourceContent(c.uri, c.mime_type, text=c.text) if isinstance(c, types.TextResourceContents)
                else ResourceContent(c.uri, c.mime_type, data=base64.b64decode(c.blob)) for c in result.contents]

    def prompts(self, server: str | None = None) -> list[RemotePrompt]:
        found = []
        for connection in self._live(server):
            listed = self._safe(connection, _list_all_prompts) or []
            found += [RemotePrompt(connection.spec.name, p.name, p.description or "",
                                   tuple(a.name for a in p.arguments or ())) for p in listed]
        return found

    def get_prompt(self, server: str, name: str, arguments: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
        """A prompt's messages as (role, text) pairs."""
        result = self._request(server, lambda c: c.get_prompt(name, dict(arguments or {})), f"give prompt {name!r}")
        return [(m.role, content_text([m.content])) for m in result.messages]

    # ---- plumbing
    def _request(self, server: str, make: Callable[[Client], Coroutine[Any, Any, _T]], what: str) -> _T:
        """One request to `server`; a refusal is a `UserInputError`, a dead or hung server is withdrawn first."""
        connection = self._connection(server)
        try:
            return self._run(connection, make, self.call_timeout)
        except MCPError as error:
            if _closed(error) or not connection.alive:
                raise UserInputError(self._withdraw(connection, error).text) from None
            raise UserInputError(f"MCP server {server} could not {what}: {error.message}") from None
        except Exception as error:
            raise UserInputError(self._withdraw(connection, error).text) from None

    def _run(self, connection: _Connection, make: Callable[[Client], Coroutine[Any, Any, _T]], timeout: float) -> _T:
        future = asyncio.run_coroutine_threadsafe(connection.call(make, timeout), self._loop)
        try:
            return future.result(timeout + 5)
        except TimeoutError:
            future.cancel()
            raise

    def _live(self, server: str | None) -> list[_Connection]:
        if server is not None:
            return [self._connection(server)]
        return [c for c in self._connections.values() if c.alive]

    def _connection(self, server: str) -> _Connection:
        connection = self._connections.get(server)
        if connection is None or not connection.alive:
            raise unknown("MCP server", server, self.servers)
        return connection

    def _safe(self, connection: _Connection, make: Callable[[Client], Coroutine[Any, Any, _T]]) -> _T | None:
        try:
            return self._run(connection, make, self.call_timeout)
        except MCPError as error:
            if connection.alive and not _closed(error):  # the server lacks the capability (no resources, no prompts): nothing to list
                log.debug("MCP server %s: %s", connection.spec.name, error.message)
                return None
            self._withdraw(connection, error)
        except Exception as error:
            self._withdraw(connection, error)
        return None

    def _withdraw(self, connection: _Connection, error: BaseException) -> ToolOutcome:
        name = connection.spec.name
        with self._lock:
            if connection.withdrawn:  # already reported (the watcher and a call may both find the death)
                return ToolOutcome(f"MCP server {name} is no longer available", is_error=True)
            withdrawn = [t.name for t in self._tools.values() if t.server == name]
            reason = _describe(error, connection)
            connection.alive, connection.withdrawn = False, True
        shown = ", ".join(withdrawn[:5]) + (f" and {len(withdrawn) - 5} more" if len(withdrawn) > 5 else "")
        message = f"MCP server {name} {reason}; its tools are withdrawn ({shown or 'none'})"
        self._report(name, message)
        threading.Thread(target=connection.stop, kwargs={"timeout": 5}, daemon=True).start()
        return ToolOutcome(message, is_error=True)

    def _report(self, server: str, message: str) -> None:
        event = HostEvent(server, message)
        self.events.append(event)
        log.warning(message)
        if self.on_event is not None:
            self.on_event(event)


def _closed(error: MCPError) -> bool:
    """The SDK's own report that the connection closed under a request (the server died or closed its pipes)."""
    return error.code == types.CONNECTION_CLOSED and error.message == "Connection closed"


def _describe(error: BaseException, connection: _Connection) -> str:
    if isinstance(error, TimeoutError):
        return f"did not answer within {connection.timeout:g} s (hung)"
    if isinstance(error, ServerGone):
        return "is closed"
    if isinstance(error, ServerExited) or isinstance(error, MCPError) and _closed(error):
        stderr = _tail(connection.errlog)
        return "closed the connection (it died?)" + (f"; its stderr ends: {stderr}" if stderr else "")
    stderr = _tail(connection.errlog)
    detail = str(error) or type(error).__name__
    if isinstance(error, ExceptionGroup):
        detail = "; ".join(str(e) or type(e).__name__ for e in error.exceptions)
    return f"failed ({detail})" + (f"; its stderr ends: {stderr}" if stderr else "")


def _json(value: Any) -> str:
    return "" if value is None else json.dumps(value, ensure_ascii=False)


async def _all_pages(list_page: Callable[..., Awaitable[Any]], field: str) -> list[Any]:
    """Every item of a paginated MCP list (`tools`, `resources`, `prompts`), following `next_cursor`."""
    found, cursor = [], None
    while True:
        page = await list_page(cursor=cursor)
        found += getattr(page, field)
        cursor = page.next_cursor
        if not cursor:
            return found


async def _list_all_tools(client: Client) -> list[types.Tool]:
    return await _all_pages(client.list_tools, "tools")


async def _list_all_resources(client: Client) -> list[types.Resource]:
    return await _all_pages(client.list_resources, "resources")


async def _list_all_templates(client: Client) -> list[types.ResourceTemplate]:
    return await _all_pages(client.list_resource_templates, "resource_templates")


async def _list_all_prompts(client: Client) -> list[types.Prompt]:
    return await _all_pages(client.list_prompts, "prompts")


def _name_tools(listed: Mapping[str, Sequence[types.Tool]], reserved: set[str]) -> dict[str, RemoteTool]:
    """Each tool under its own name, or `server__name` when another server or the host's own tools share it."""
    counts: dict[str, int] = {}
    for tools in listed.values():
        for tool in tools:
            counts[tool.name] = counts.get(tool.name, 0) + 1
    named: dict[str, RemoteTool] = {}
    for server, tools in listed.items():
        prefix = re.sub(r"[^A-Za-z0-9_-]", "_", server)
        for tool in tools:
            clash = counts[tool.name] > 1 or tool.name in reserved
            name = f"{prefix}{NAMESPACE_SEPARATOR}{tool.name}" if clash else tool.name
            read_only = bool(tool.annotations and tool.annotations.read_only_hint)
            named[name] = RemoteTool(server, name, tool.name, tool.description or "", dict(tool.input_schema),
                                     read_only)
    return named


# ---- the chat's tool registry ----------------------------------------------------------------------------------------
def source_name(server: str) -> str:
    """The `Tool.source` of a server's tools in a `ToolRegistry` (what `remove_source` withdraws)."""
    return f"mcp:{server}"


def add_to_registry(host: MCPHost, registry: ToolRegistry) -> list[str]:
    """Offer the host's live tools through the chat's `registry` beside its own, and the servers' resources through
    one `read_resource` tool; the names they got.

    Each tool becomes a `Tool` whose run calls the server (`source` "mcp:SERVER"; `side_effects` unless the server
    marks it `readOnlyHint`, so the registry asks before it runs); a name the registry already has is
    namespaced `server__name` (start the host with `reserved=registry.names()` to have the host pick the same
    names). When a server fails later, the host withdraws its tools from the registry too."""
    added = []
    for remote in host.tools():
        def run(_remote: RemoteTool = remote, **arguments: Any) -> ToolOutput:
            outcome = host.call_tool(_remote.name, arguments)
            if outcome.is_error:  # worded as the registry words its own failures
                return ToolOutput(f"error: {outcome.text}", data=outcome.structured, error=True)
            return ToolOutput(outcome.text, data=outcome.structured)

        description = remote.description or f"{remote.remote_name} (from the MCP server {remote.server})"
        # The registry's own time limit is a backstop: the host's call_timeout fires first and withdraws the server.
        # A tool its server does not declare read-only asks the user first (MCP's rule for hosts, the book's
        # human in the loop): the registry's `confirm`.
        tool = Tool(remote.name, description, remote.input_schema, run, side_effects=not remote.read_only,
                    timeout=host.call_timeout + 10, source=source_name(remote.server))
        try:
            added.append(registry.add(tool, namespace=remote.server))
        except UserInputError as error:  # a schema the registry cannot offer (not an object): that tool alone
            log.warning("MCP tool %s of %s not offered: %s", remote.remote_name, remote.server, error)
    resources, templates = host.resources(), host.resource_templates()
    reader = registry.add(resource_tool(host, resources, templates), namespace="mcp") \
        if resources or templates else None
    added += [reader] if reader else []
    readable = {r.server for r in resources} | {t.server for t in templates}
    previous = host.on_event

    def withdraw(event: HostEvent) -> None:
        registry.remove_source(source_name(event.server))
        if reader and not readable & set(host.servers):
            registry.remove(reader)  # no server left to read from
        if previous is not None:
            previous(event)

    host.on_event = withdraw
    return added


RESOURCES_LISTED = 20  # resources named in the read tool's description (the model sees the first ones)


def resource_tool(host: MCPHost, resources: Sequence[RemoteResource],
                  templates: Sequence[RemoteTemplate] = ()) -> Tool:
    """A tool for the model to read the servers' resources (`read_resource(server, uri)`); its description lists
    the first `RESOURCES_LISTED` of them and the URI templates."""

    def run(server: str, uri: str) -> ToolOutput:
        parts = [c.text if c.text is not None else f"[{c.mime_type or 'binary'} content, {len(c.data or b'')} bytes]"
                 for c in host.read_resource(server, uri)]
        return ToolOutput("\n".join(parts), sources=[uri])

    listed = "; ".join(f"{r.server} {r.uri}" + (f" ({r.name})" if r.name and r.name not in r.uri else "")
                       for r in resources[:RESOURCES_LISTED])
    more = f" and {len(resources) - RESOURCES_LISTED} more" if len(resources) > RESOURCES_LISTED else ""
    if templates:
        listed += ("; " if listed else "") + "; ".join(f"{t.server} {t.uri_template} (fill in the {{...}})"
                                                       for t in templates[:RESOURCES_LISTED])
    servers = sorted({r.server for r in resources} | {t.server for t in templates})
    return Tool("read_resource", f"Read a document (resource) from an MCP server by its URI. Available: {listed}{more}.",
                {"type": "object", "properties": {"server": {"type": "string", "enum": servers},
                                                  "uri": {"type": "string"}},
                 "required": ["server", "uri"], "additionalProperties": False},
                run, timeout=host.call_timeout + 10, source="mcp")


def connect(path: str | Path, registry: ToolRegistry, **host_options: Any) -> MCPHost:
    """The servers of an `mcpServers` file, started, their tools added to `registry` (`torchbook chat --mcp`).
    Close the host (`host.close()`, or `with`) when the conversation ends."""
    host = MCPHost(load_config(path), reserved=registry.names(), **host_options).start()
    add_to_registry(host, registry)
    return host
