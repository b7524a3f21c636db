"""`torchbook mcp` (torchbook/serve/mcp_server.py): torchbook's tools and a knowledge base's documents over MCP,
checked with the official SDK's own client (over streamable HTTP, served in-process by uvicorn) and with torchbook's
host (over stdio, `python -m torchbook mcp` as a child process, as another host would start it). The documents are
excerpts of Debian's licence texts, indexed once for the module."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client, MCPError

from torchbook.chat.mcp import MCPHost, ServerSpec
from torchbook.knowledge import Embedder, KnowledgeBase
from torchbook.serve.mcp_server import KnowledgeDocuments, bound_url, build_server, http_server, torchbook_tools

pytestmark = pytest.mark.usefixtures("one_thread")
LICENSES = Path("/usr/share/common-licenses")


@pytest.fixture(scope="module")
def kb(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A knowledge base of two documents; their paths by name and the base's folder."""
    folder = tmp_path_factory.mktemp("mcp-docs")
    gpl, apache = folder / "gpl.txt", folder / "apache.md"
    gpl.write_text((LICENSES / "GPL-3").read_text()[:1500])
    apache.write_text((LICENSES / "Apache-2.0").read_text()[:6000])
    base = folder / "kb"
    report = KnowledgeBase.open(base, Embedder.load()).index([gpl, apache])
    assert len(report.added) == 2
    return {"gpl": gpl, "apache": apache, "base": base, "home": tmp_path_factory.mktemp("mcp-home")}


@pytest.fixture(scope="module")
def http_url(kb: dict[str, Path]) -> Iterator[str]:
    """`torchbook mcp --http` in a thread of this process, on a free loopback port."""
    tools = torchbook_tools(str(kb["base"]), memory_path=kb["home"] / "memory.sqlite")
    web = http_server(build_server(tools, KnowledgeDocuments(kb["base"])), port=0)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not web.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the MCP HTTP server did not start"
        time.sleep(0.02)
    yield bound_url(web)
    web.should_exit = True
    thread.join(timeout=10)


def with_client(url: str, work: Any) -> Any:
    async def run() -> Any:
        async with Client(url) as client:
            return await work(client)

    return anyio.run(run)


async def refused(request: Any) -> str:
    """The error message of a request the server must refuse."""
    try:
        await request
    except MCPError as error:
        return error.message
    raise AssertionError("the request was answered")


def text(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


def test_sdk_client_lists_tools_and_calls_them_over_http(http_url: str) -> None:
    async def work(client: Client) -> dict[str, Any]:
        tools = (await client.list_tools()).tools
        return {
            "tools": {t.name: t for t in tools},
            "book": await client.call_tool("calculator", {"expression": "525.6 * 315 / 3942"}),
            "miles": await client.call_tool("convert_units", {"value": 26.2, "from_unit": "mile", "to_unit": "km"}),
            "remember": await client.call_tool("remember", {"fact": "My favourite optimizer is AdamW"}),
            "recall": await client.call_tool("recall", {"query": "which optimizer do I like?"}),
        }

    got = with_client(http_url, work)
    assert set(got["tools"]) == {"calculator", "convert_units", "search_knowledge", "remember", "recall",
                                 "list_memories", "forget"}
    calculator = got["tools"]["calculator"]
    assert calculator.input_schema["required"] == ["expression"] and calculator.annotations.read_only_hint
    # tools with side effects are marked for the host to confirm (MCP puts the human in the loop there)
    assert got["tools"]["remember"].annotations.read_only_hint is False
    assert not got["book"].is_error and text(got["book"]) == "525.6 * 315 / 3942 = 42"
    assert got["book"].structured_content == {"value": "42", "exact": True}
    assert text(got["miles"]).startswith("26.2 mile = 42.16")
    assert "AdamW" in text(got["recall"])


def test_bad_calls_are_tool_errors_never_a_crash(http_url: str) -> None:
    bad_calls = [
        ("calculator", {"expression": 42}),                      # wrong type
        ("calculator", {}),                                      # missing argument
        ("calculator", {"expression": "1+1", "mode": "fast"}),   # unknown argument
        ("calculator", {"expression": "1/0"}),                   # the tool refuses
        ("calculator", {"expression": "9^9^9^9"}),               # beyond the calculator's limits
        ("convert_units", {"value": 1, "from_unit": "mile", "to_unit": "kilogram"}),
        ("forget", {"id": 999}),
        ("no_such_tool", {"x": 1}),
    ]

    async def work(client: Client) -> list[types.CallToolResult]:
        results = [await client.call_tool(name, arguments) for name, arguments in bad_calls]
        return [*results, await client.call_tool("calculator", {"expression": "6 * 7"})]

    *errors, after = with_client(http_url, work)
    for (name, arguments), result in zip(bad_calls, errors):
        assert result.is_error, (name, arguments, text(result))
        assert text(result).startswith("error:"), text(result)
    assert "is not of type 'string'" in text(errors[0]) and "'expression' is a required property" in text(errors[1])
    assert "no tool named 'no_such_tool'" in text(errors[-1])
    assert not after.is_error and text(after) == "6 * 7 = 42"  # the server is still there


def test_sdk_client_lists_searches_and_reads_the_documents(http_url: str, kb: dict[str, Path]) -> None:
    async def work(client: Client) -> dict[str, Any]:
        resources = (await client.list_resources()).resources
        return {
            "resources": {r.name: r for r in resources},
            "read": await client.read_resource(kb["apache"].as_uri()),
            "search": await client.call_tool("search_knowledge", {"query": "grant of patent license", "k": 1}),
            "outside": await refused(client.read_resource("file:///etc/passwd")),
        }

    got = with_client(http_url, work)
    assert set(got["resources"]) == {"gpl.txt", "apache.md"}
    assert str(got["resources"]["apache.md"].uri) == kb["apache"].as_uri()
    assert got["resources"]["apache.md"].mime_type == "text/markdown"
    (content,) = got["read"].contents
    assert content.text == kb["apache"].read_text()
    assert f"({kb['apache']}:" in text(got["search"]) and "Patent" in text(got["search"])
    # only the base's documents are resources: another file of the machine is refused, not read
    assert "is not a document of the knowledge base" in got["outside"]


def test_http_refuses_requests_from_other_origins(http_url: str) -> None:
    """The loopback server refuses a request whose Host is not a loopback name (DNS rebinding)."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    headers = {"Host": "attacker.example", "Accept": "application/json, text/event-stream",
               "Content-Type": "application/json"}
    response = httpx2.post(http_url, content=json.dumps(body), headers=headers, timeout=10)
    assert response.status_code in (400, 403, 421)


def test_an_empty_knowledge_base_offers_no_search(tmp_path: Path) -> None:
    names = [tool.name for tool in torchbook_tools(str(tmp_path / "empty"), memory_path=tmp_path / "m.sqlite")]
    assert "search_knowledge" not in names and "calculator" in names


def test_host_uses_torchbook_mcp_over_stdio(kb: dict[str, Path]) -> None:
    """The host of torchbook/chat/mcp.py starts `torchbook mcp` as another host would, and uses it."""
    spec = ServerSpec("torchbook", command=sys.executable, args=("-m", "torchbook", "mcp", "--db", str(kb["base"])),
                      env={"TORCHBOOK_HOME": str(kb["home"]), "OMP_NUM_THREADS": "1"})
    with MCPHost([spec], call_timeout=60) as host:
        assert host.events == []
        assert {t.name for t in host.tools()} >= {"calculator", "convert_units", "search_knowledge", "remember"}
        assert host.call_tool("calculator", {"expression": "2 ^ 10"}).text == "2 ^ 10 = 1024"
        bad = host.call_tool("convert_units", {"value": "one", "from_unit": "mile", "to_unit": "km"})
        assert bad.is_error and "is not of type 'number'" in bad.text
        assert host.servers == ["torchbook"]  # a bad call is an error result, not a dead server
        listed = {r.name: r.uri for r in host.resources("torchbook")}
        assert set(listed) == {"gpl.txt", "apache.md"}
        (gpl,) = host.read_resource("torchbook", listed["gpl.txt"])
        assert gpl.text == kb["gpl"].read_text()
        # (search_knowledge is checked over HTTP above: here it would only add the child's embedder load)


def test_host_uses_torchbook_mcp_over_http(http_url: str) -> None:
    """The host over streamable HTTP, with the `headers` a config may give (e.g. a bearer token)."""
    spec = ServerSpec("torchbook", url=http_url, headers={"Authorization": "Bearer not-checked-here"})
    with MCPHost([spec], reserved={"calculator"}) as host:
        assert "torchbook__calculator" in {t.name for t in host.tools()}  # the host's own calculator keeps its name
        outcome = host.call_tool("torchbook__calculator", {"expression": "525.6 * 315 / 3942"})
        assert outcome.text == "525.6 * 315 / 3942 = 42" and outcome.structured == {"value": "42", "exact": True}
