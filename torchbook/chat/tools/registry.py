"""Tools a chatbot may call (book chapter 15): each with a name, a description, JSON-Schema parameters and a function.

    registry = ToolRegistry()
    registry.add(Tool("calculator", "Compute an arithmetic expression exactly", {"type": "object", ...}, run))
    registry.specs()                                   # OpenAI-style [{"type": "function", "function": {...}}]
    output = registry.call("calculator", {"expression": "525.6 * 315 / 3942"})   # ToolOutput(text="42", ...)

`call` never raises for what a model may get wrong: an unknown tool, arguments that are not JSON or do not match the
tool's schema, a tool that raises or passes its time limit, a side-effect tool the user declines, all come back as
a `ToolOutput` with `error=True` and a one-line `text` that tells the model what went wrong (so the conversation
goes on). Tools from elsewhere (an MCP server) join with `add(tool, namespace="server")`: a name already taken gets
the namespace as a prefix (`server__name`), and `remove_source("mcp:server")` withdraws them all at once.

Side effects (`Tool.side_effects`): such a tool runs only after `confirm(tool, arguments)` returns True (the
book's human in the loop); without a `confirm` callback it is declined.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torchbook.errors import TorchbookError, UserInputError

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names; MCP names are looser
NAMESPACE_SEPARATOR = "__"
DEFAULT_TIMEOUT = 30.0
MAX_OUTPUT_CHARS = 8000  # a tool's text as the model sees it (the rest is cut, and the cut is said)


class ToolError(TorchbookError):
    """A tool could not do what was asked; its message is shown to the model and the user as the tool's result."""


@dataclass
class ToolOutput:
    """What a tool gives back: `text` (what the model reads), `sources` (citations of what it read: files, URLs),
    `data` (structured output for programs), `error` (True: the call failed; `text` says why)."""

    text: str
    sources: list[str] = field(default_factory=list)
    data: Any = None
    error: bool = False


@dataclass
class Tool:
    """A tool: `run(**arguments)` returns a `ToolOutput`, a string or JSON-able data, or raises (`ToolError` for
    a failure worth explaining). `parameters` is the JSON Schema of the arguments object. `side_effects`: asks for
    confirmation before it runs. `source`: where it comes from ("torchbook", "mcp:NAME")."""

    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[..., Any]
    side_effects: bool = False
    timeout: float = DEFAULT_TIMEOUT
    source: str = "torchbook"

    def spec(self) -> dict[str, Any]:
        """The OpenAI function-tool description (what chat templates and the HTTP API use)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


Confirm = Callable[[Tool, dict[str, Any]], bool]


def _as_output(value: Any) -> ToolOutput:
    if isinstance(value, ToolOutput):
        return value
    if isinstance(value, str):
        return ToolOutput(value)
    try:
        return ToolOutput(json.dumps(value, ensure_ascii=False, default=str), data=value)
    except (TypeError, ValueError):
        return ToolOutput(str(value), data=value)


def validate_arguments(schema: dict[str, Any], arguments: Any) -> str | None:
    """Why `arguments` do not match `schema` (one line), or None when they do."""
    import jsonschema  # optional (the chat extra); imported on first use

    try:
        jsonschema.validate(arguments, schema)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        return f"{where + ': ' if where else ''}{e.message}"
    except jsonschema.SchemaError as e:
        return f"the tool's own schema is invalid: {e.message}"
    return None


class ToolRegistry:
    """The tools a conversation may use, by name (thread-safe; see the module docstring)."""

    def __init__(self, tools: list[Tool] | None = None, confirm: Confirm | None = None):
        self._tools: dict[str, Tool] = {}
        self._lock = threading.Lock()
        self.confirm = confirm
        for tool in tools or []:
            self.add(tool)

    def add(self, tool: Tool, namespace: str | None = None) -> str:
        """Register `tool`; the name it is registered under (prefixed `namespace__` when the name is taken, or
        when the name is not a valid function name). A clash without a namespace is an error."""
        if not isinstance(tool.parameters, dict) or tool.parameters.get("type", "object") != "object":
            raise UserInputError(f"tool {tool.name!r}: parameters must be a JSON Schema of type 'object'",
                                 param="parameters")
        with self._lock:
            name = tool.name
            if name in self._tools or not NAME.match(name):
                if namespace is None:
                    why = "is taken" if name in self._tools else "is not a valid tool name (letters, digits, _ and -)"
                    raise UserInputError(f"tool name {name!r} {why}; add it with a namespace", param="name")
                name = re.sub(r"[^A-Za-z0-9_-]", "_", f"{namespace}{NAMESPACE_SEPARATOR}{tool.name}")[:64]
                stem, n = name, 2
                while name in self._tools:
                    name = f"{stem[:60]}_{n}"
                    n += 1
            if name != tool.name:
                log.info("tool %r from %s registered as %r", tool.name, tool.source, name)
                tool = Tool(name, tool.description, tool.parameters, tool.run, tool.side_effects, tool.timeout,
                            tool.source)
            self._tools[name] = tool
            return name

    def remove(self, name: str) -> None:
        with self._lock:
            self._tools.pop(name, None)

    def remove_source(self, source: str) -> list[str]:
        """Withdraw every tool from `source` (an MCP server that died); their names."""
        with self._lock:
            gone = [n for n, t in self._tools.items() if t.source == source]
            for n in gone:
                del self._tools[n]
            return gone

    def get(self, name: str) -> Tool | None:
        with self._lock:
            return self._tools.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        with self._lock:
            return iter(list(self._tools.values()))

    def __len__(self) -> int:
        return len(self._tools)

    def specs(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        return [t.spec() for t in self if names is None or t.name in names]

    def subset(self, names: list[str]) -> ToolRegistry:
        """A registry with only these tools (same objects, same confirmation)."""
        return ToolRegistry([t for t in self if t.name in names], self.confirm)

    def call(self, name: str, arguments: dict[str, Any] | str | None, confirm: Confirm | None = None,
             timeout: float | None = None) -> ToolOutput:
        """Run a tool by name with checked arguments (a dict, or its JSON text); every failure is a `ToolOutput`
        with `error=True` (see the module docstring)."""
        tool = self.get(name)
        if tool is None:
            accepted = ", ".join(self.names()) or "none"
            return ToolOutput(f"error: there is no tool named {name!r}; the tools are: {accepted}", error=True)
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                return ToolOutput(f"error: the arguments for {name} are not valid JSON ({e.msg} at character "
                                  f"{e.pos})", error=True)
        arguments = {} if arguments is None else arguments
        if not isinstance(arguments, dict):
            return ToolOutput(f"error: the arguments for {name} must be a JSON object", error=True)
        why = validate_arguments(tool.parameters, arguments)
        if why is not None:
            return ToolOutput(f"error: invalid arguments for {name}: {why}", error=True)
        if tool.side_effects:
            confirm = confirm or self.confirm
            if confirm is None or not confirm(tool, arguments):
                return ToolOutput(f"error: the user declined to run {name} (it has side effects)", error=True)
        return run_with_timeout(tool, arguments, tool.timeout if timeout is None else timeout)


def run_with_timeout(tool: Tool, arguments: dict[str, Any], timeout: float) -> ToolOutput:
    """`tool.run(**arguments)` on a worker thread, given up after `timeout` seconds (the thread cannot be killed:
    a tool that can hang must also bound its own work, as web fetch does with its socket timeouts)."""
    started = time.perf_counter()
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"tool-{tool.name}")
    future = pool.submit(tool.run, **arguments)
    try:
        output = _as_output(future.result(timeout=timeout))
    except concurrent.futures.TimeoutError:
        return ToolOutput(f"error: {tool.name} did not finish within {timeout:g} s", error=True)
    except ToolError as e:
        return ToolOutput(f"error: {tool.name}: {e}", error=True)
    except Exception as e:  # a tool's bug is the conversation's news, never its end
        log.warning("tool %s raised", tool.name, exc_info=True)
        return ToolOutput(f"error: {tool.name} failed: {type(e).__name__}: {e}", error=True)
    finally:
        pool.shutdown(wait=False)
    log.debug("tool %s took %.3f s", tool.name, time.perf_counter() - started)
    if len(output.text) > MAX_OUTPUT_CHARS:
        output.text = output.text[:MAX_OUTPUT_CHARS] + f"\n[cut: {len(output.text) - MAX_OUTPUT_CHARS} more characters]"
    return output
