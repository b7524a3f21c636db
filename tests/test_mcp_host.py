"""The MCP host (torchbook/chat/mcp.py) against a real third-party server: `@modelcontextprotocol/server-everything`
from npm (installed by `make system-deps` from third_party/mcp-servers/package-lock.json), over stdio and over
streamable HTTP. One host (two node processes) is shared by the module's tests; the failure tests start their own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import mcp_types as types
import pytest

from torchbook.chat.mcp import (
    MCPHost,
    ServerSpec,
    _name_tools,
    add_to_registry,
    connect,
    content_text,
    load_config,
    parse_config,
)
from torchbook.chat.tools import Tool, builtin_tools
from torchbook.errors import UserInputError

ROOT = Path(__file__).resolve().parents[1]
EVERYTHING = ROOT / "third_party/mcp-servers/node_modules/@modelcontextprotocol/server-everything/dist"
needs_everything = pytest.mark.skipif(
    not (EVERYTHING / "index.js").is_file() or shutil.which("node") is None,
    reason="@modelcontextprotocol/server-everything is not installed (make system-deps)")


def everything_stdio(name: str = "everything") -> ServerSpec:
    return ServerSpec(name, command="node", args=(str(EVERYTHING / "index.js"), "stdio"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_everything_http() -> tuple[subprocess.Popen[str], str]:
    """server-everything's streamable HTTP transport on a free loopback port: the process and its URL."""
    port = free_port()
    process = subprocess.Popen(["node", str(EVERYTHING / "index.js"), "streamableHttp"],
                               env={**os.environ, "PORT": str(port)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    for line in process.stderr:  # it says so on stderr once it listens
        if "listening" in line:
            break
    else:
        pytest.fail(f"server-everything's HTTP transport did not start (exit {process.wait()})")
    return process, f"http://127.0.0.1:{port}/mcp"


@pytest.fixture(scope="module")
def everything_http() -> Iterator[str]:
    process, url = start_everything_http()
    yield url
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def host(everything_http: str) -> Iterator[MCPHost]:
    specs = [everything_stdio(), ServerSpec("remote", url=everything_http),
             ServerSpec("broken", command="torchbook-no-such-mcp-server")]
    with MCPHost(specs, reserved={"calculator"}, call_timeout=20) as started:
        yield started


# ---- configuration ------------------------------------------------------------------------------------------------
def test_config_in_the_format_other_hosts_use(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {
        "everything": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-everything"],
                       "env": {"LOG": "1"}},
        "remote": {"url": "http://127.0.0.1:3001/mcp", "headers": {"Authorization": "Bearer x"}},
        "off": {"command": "never-run", "disabled": True}}}))
    everything, remote = load_config(path)
    assert (everything.transport, everything.command, everything.args, dict(everything.env)) == \
        ("stdio", "npx", ("-y", "@modelcontextprotocol/server-everything"), {"LOG": "1"})
    assert (remote.transport, remote.url, dict(remote.headers)) == \
        ("http", "http://127.0.0.1:3001/mcp", {"Authorization": "Bearer x"})
    # VS Code's spelling, with an explicit type
    (vscode,) = parse_config({"servers": {"s": {"type": "http", "url": "https://example.org/mcp"}}})
    assert vscode.transport == "http"


@pytest.mark.parametrize("entry, message", [
    ({"command": "x", "url": "http://a/mcp"}, "exactly one of"),
    ({}, "exactly one of"),
    ({"command": "x", "args": "--flag"}, "\"args\" must be a list"),
    ({"command": "x", "env": {"A": 1}}, "\"env\" must map"),
    ({"type": "sse", "url": "http://a/sse"}, "SSE transport is deprecated"),
    ({"url": "ftp://a/mcp"}, "http:// or https://"),
])
def test_bad_config_is_one_clear_error(entry: dict, message: str) -> None:
    with pytest.raises(UserInputError, match=message) as error:
        parse_config({"mcpServers": {"srv": entry}})
    assert "'srv'" in str(error.value)


def test_bad_config_files(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="does not exist"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserInputError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
    with pytest.raises(UserInputError, match="mcpServers"):
        parse_config({"tools": []})


def test_names_are_namespaced_only_when_they_clash() -> None:
    def tool(name: str) -> types.Tool:
        return types.Tool(name=name, input_schema={"type": "object"})

    named = _name_tools({"a": [tool("search"), tool("add"), tool("calculator")], "b.x": [tool("search")]},
                        reserved={"calculator"})
    assert sorted(named) == ["a__calculator", "a__search", "add", "b_x__search"]
    assert (named["b_x__search"].server, named["b_x__search"].remote_name) == ("b.x", "search")


def test_content_blocks_become_text() -> None:
    blocks = [types.TextContent(text="hello"), types.ImageContent(data="AAEC", mime_type="image/png"),
              types.EmbeddedResource(resource=types.TextResourceContents(uri="demo://x", text="inside")),
              types.ResourceLink(uri="demo://y", name="y")]
    assert content_text(blocks) == "hello\n[image image/png, 3 bytes]\ninside\n[resource link demo://y]"


# ---- a real server over stdio and streamable HTTP -----------------------------------------------------------------
@needs_everything
def test_lists_tools_of_both_transports_and_reports_a_server_that_cannot_start(host: MCPHost) -> None:
    assert host.servers == ["everything", "remote"]
    names = {tool.name for tool in host.tools()}
    # both servers offer the same tools, so every name is namespaced by its server
    assert {"everything__get-sum", "remote__get-sum", "everything__echo", "remote__echo"} <= names
    assert not any(name == "get-sum" for name in names)
    get_sum = host.tool("everything__get-sum")
    assert get_sum is not None and get_sum.remote_name == "get-sum"
    assert set(get_sum.input_schema["properties"]) == {"a", "b"}
    (event,) = host.events
    assert event.server == "broken" and "could not start" in event.message
    assert "torchbook-no-such-mcp-server" in event.message


@needs_everything
@pytest.mark.parametrize("server", ["everything", "remote"])
def test_calls_a_tool(host: MCPHost, server: str) -> None:
    outcome = host.call_tool(f"{server}__get-sum", {"a": 40.5, "b": 1.5})
    assert not outcome.is_error and outcome.text == "The sum of 40.5 and 1.5 is 42."
    echoed = host.call_tool(f"{server}__echo", {"message": "ünïcode ✓"})
    assert echoed.text == "Echo: ünïcode ✓"


@needs_everything
def test_bad_calls_come_back_as_errors_and_the_server_stays(host: MCPHost) -> None:
    bad = host.call_tool("everything__get-sum", {"a": "two"})
    assert bad.is_error and "expected number" in bad.text
    assert host.call_tool("no-such-tool", {}).is_error
    assert "everything" in host.servers
    assert host.call_tool("everything__get-sum", {"a": 1, "b": 2}).text == "The sum of 1 and 2 is 3."


@needs_everything
def test_structured_and_image_results(host: MCPHost) -> None:
    weather = host.call_tool("remote__get-structured-content", {"location": "New York"})
    assert not weather.is_error and set(weather.structured) >= {"temperature", "conditions", "humidity"}
    image = host.call_tool("everything__get-tiny-image", {})
    assert "[image image/png," in image.text


@needs_everything
def test_lists_and_reads_resources(host: MCPHost) -> None:
    listed = {r.uri: r for r in host.resources("everything")}
    uri = "demo://resource/static/document/features.md"
    assert uri in listed and listed[uri].mime_type == "text/markdown"
    (content,) = host.read_resource("everything", uri)
    # the server serves the file shipped in its package: the text read is that file's
    assert content.text == (EVERYTHING / "docs/features.md").read_text(encoding="utf-8")
    templates = {t.uri_template for t in host.resource_templates("remote")}
    assert {"demo://resource/dynamic/text/{resourceId}", "demo://resource/dynamic/blob/{resourceId}"} <= templates
    (dynamic,) = host.read_resource("remote", "demo://resource/dynamic/text/3")
    assert dynamic.text is not None and dynamic.text.startswith("Resource 3:")
    (blob,) = host.read_resource("remote", "demo://resource/dynamic/blob/3")
    assert blob.data is not None and blob.data.decode().startswith("Resource 3:")
    with pytest.raises(UserInputError, match="could not read"):
        host.read_resource("everything", "demo://resource/static/document/no-such.md")


@needs_everything
def test_lists_and_gets_prompts(host: MCPHost) -> None:
    prompts = {(p.server, p.name): p for p in host.prompts()}
    assert prompts["remote", "args-prompt"].arguments == ("city", "state")
    messages = host.get_prompt("everything", "args-prompt", {"city": "Lisbon"})
    assert messages[0][0] == "user" and "Lisbon" in messages[0][1]
    with pytest.raises(UserInputError, match="unknown MCP server"):
        host.get_prompt("broken", "args-prompt")


# ---- servers that die or hang ---------------------------------------------------------------------------------------
@needs_everything
def test_a_server_that_dies_or_hangs_is_reported_and_withdrawn(tmp_path: Path) -> None:
    """...from the host and from the chat's tool registry it offers them through; the rest goes on."""
    pidfile = tmp_path / "victim.pid"
    victim = ServerSpec("victim", command="sh",
                        args=("-c", f'echo $$ > "{pidfile}"; exec node "{EVERYTHING / "index.js"}" stdio'))
    registry = builtin_tools(web_tools=False)
    registry.add(Tool("echo", "repeat a message", {"type": "object", "properties": {"message": {"type": "string"}}},
                      lambda message: f"local echo: {message}"))
    heard = []
    web, url = start_everything_http()
    try:
        with MCPHost([victim, everything_stdio("sleeper"), ServerSpec("web", url=url)], reserved=registry.names(),
                     call_timeout=1.5, on_event=heard.append) as host:
            assert host.servers == ["victim", "sleeper", "web"]
            added = add_to_registry(host, registry)
            assert {"victim__get-sum", "sleeper__get-sum", "victim__echo", "sleeper__echo"} <= set(added)
            # the registry's own echo keeps its name; the servers' tools sit beside it and beside the calculator
            assert registry.call("echo", {"message": "hi"}).text == "local echo: hi"
            assert registry.call("sleeper__echo", {"message": "hi"}).text == "Echo: hi"
            assert registry.call("calculator", {"expression": "6*7"}).text == "6*7 = 42"
            bad = registry.call("victim__get-sum", {"a": "one", "b": 2})  # the registry checks the server's schema
            assert bad.error and "is not of type 'number'" in bad.text
            # a tool its server does not mark read-only asks the user first; declined without an answer
            assert registry.get("victim__get-sum").side_effects is False
            assert registry.get("victim__toggle-simulated-logging").side_effects is True
            assert "declined" in registry.call("victim__toggle-simulated-logging", {}).text
            asked: list[str] = []
            toggled = registry.call("victim__toggle-simulated-logging", {},
                                    confirm=lambda tool, arguments: asked.append(tool.name) is None)
            assert asked == ["victim__toggle-simulated-logging"] and not toggled.error, toggled.text

            os.kill(int(pidfile.read_text()), signal.SIGKILL)
            # the host sees the death on its own, before any call: reported, withdrawn from host and registry
            deadline = time.monotonic() + 10
            while "victim" in host.servers and time.monotonic() < deadline:
                time.sleep(0.05)
            assert host.servers == ["sleeper", "web"] and {t.server for t in host.tools()} == {"sleeper", "web"}
            assert heard and heard[0].server == "victim" and "closed the connection" in heard[0].message
            assert not any(name.startswith("victim__") for name in registry.names())
            assert "no longer available" in host.call_tool("victim__echo", {"message": "x"}).text
            # an HTTP server's death shows at the next call
            assert registry.call("web__get-sum", {"a": 1, "b": 2}).text == "The sum of 1 and 2 is 3."
            web.kill()
            web.wait(timeout=10)
            gone = registry.call("web__get-sum", {"a": 1, "b": 2})
            assert gone.error and "MCP server web" in gone.text and "withdrawn" in gone.text
            assert host.servers == ["sleeper"]
            # the other server goes on
            assert registry.call("sleeper__get-sum", {"a": 1, "b": 2}).text == "The sum of 1 and 2 is 3."
            started = time.monotonic()
            hung = registry.call("sleeper__trigger-long-running-operation", {"duration": 30, "steps": 2})
            assert time.monotonic() - started < 5
            assert hung.error and "did not answer within 1.5 s" in hung.text
            assert host.servers == [] and host.tools() == []
            assert [e.server for e in heard] == ["victim", "web", "sleeper"] == [e.server for e in host.events]
            assert set(registry.names()) == {"calculator", "convert_units", "echo"}
            assert registry.call("calculator", {"expression": "6*7"}).text == "6*7 = 42"
    finally:
        web.kill()
        web.wait(timeout=10)


@needs_everything
def test_connect_reads_the_file_and_fills_the_registry(tmp_path: Path) -> None:
    """`torchbook chat --mcp FILE`'s path: a config file in, the servers' tools in the chat's registry."""
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {"everything": {"command": "node",
                                                              "args": [str(EVERYTHING / "index.js")]}}}))
    registry = builtin_tools(web_tools=False)
    with connect(path, registry, call_timeout=20) as host:
        assert host.servers == ["everything"]
        assert {"get-sum", "echo", "calculator"} <= set(registry.names())
        assert registry.get("get-sum").source == "mcp:everything"
        assert registry.call("get-sum", '{"a": 40, "b": 2}').text == "The sum of 40 and 2 is 42."
        # the servers' resources reach the model through one tool
        reader = registry.get("read_resource")
        assert reader is not None and "everything demo://resource/static/document/features.md" in reader.description
        assert "everything demo://resource/dynamic/text/{resourceId} (fill in the {...})" in reader.description
        uri = "demo://resource/static/document/architecture.md"
        read = registry.call("read_resource", {"server": "everything", "uri": uri})
        assert not read.error and read.text == (EVERYTHING / "docs/architecture.md").read_text(encoding="utf-8")
        assert registry.call("read_resource", {"server": "everything", "uri": "demo://nothing"}).error
        assert registry.call("read_resource", {"server": "elsewhere", "uri": uri}).error  # not in the enum


@needs_everything
def test_cli_inspects_and_calls_a_configured_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torchbook.cli import main

    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {"everything": {"command": "node",
                                                              "args": [str(EVERYTHING / "index.js")]}}}))
    assert main(["mcp", "--inspect", str(path)]) == 0
    listed = capsys.readouterr().out
    assert "  tool     get-sum: Returns the sum of two numbers" in listed
    assert "  resource demo://resource/static/document/features.md (text/markdown)" in listed
    assert "  prompt   args-prompt(city, state)" in listed
    assert main(["mcp", "--inspect", str(path), "--call", "get-sum", "--arguments", '{"a": 40, "b": 2}']) == 0
    assert capsys.readouterr().out == "The sum of 40 and 2 is 42.\n"
    (tmp_path / "bad.json").write_text('{"mcpServers": {"s": {"url": "ftp://x"}}}')
    assert main(["mcp", "--inspect", str(tmp_path / "bad.json")]) == 2
    assert "torchbook: error:" in capsys.readouterr().err


def test_a_server_that_never_answers_the_handshake_is_reported() -> None:
    """A command that runs but never speaks MCP: reported after `connect_timeout`, its process stopped."""
    started = time.monotonic()
    with MCPHost([ServerSpec("mute", command="sh", args=("-c", "cat > /dev/null"))], connect_timeout=1) as host:
        assert host.servers == [] and host.tools() == []
        (event,) = host.events
        assert "mute (sh -c cat > /dev/null) could not start: no answer to the MCP handshake within 1 s" in \
            event.message
    assert time.monotonic() - started < 15
