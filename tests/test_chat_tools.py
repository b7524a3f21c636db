"""The chatbot's tools (chapter 15): the calculator (exact, bounded, fuzzed), the registry's failure handling,
unit conversion with pint, memory in SQLite, and web fetch/search against loopback servers of the test's own."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchbook.chat.memory import Memory
from torchbook.chat.store import Database
from torchbook.chat.tools import Tool, ToolError, ToolRegistry, WebSettings, builtin_tools, fetch_tool, search_tool, web
from torchbook.chat.tools.calculator import MAX_INPUT, CalculatorError, calculate, find_expression

# -- calculator -------------------------------------------------------------------------------------------------


def test_the_books_example_is_exactly_42() -> None:
    answer = calculate("525.6 * 315 / 3942")
    assert answer.value == 42 and answer.exact and answer.text == "42"


@pytest.mark.parametrize("expression, value", [
    ("0.1 + 0.2", "0.3"), ("2 + 3 * 4", "14"), ("(2 + 3) * 4", "20"), ("-2^2", "-4"), ("2^3^2", "512"),
    ("2 ** 10", "1024"), ("7 // 2", "3"), ("-7 // 2", "-4"), ("7 % 3", "1"), ("5!", "120"), ("sqrt(16)", "4"),
    ("sqrt(9/4)", "1.5"), ("1e3 + 1_000", "2000"), ("2^-2", "0.25"), ("10 ÷ 4 × 2", "5"), ("abs(-3.5)", "3.5"),
    ("1.1 * 1.1", "1.21"), ("3 - -2", "5"),
])
def test_exact_results(expression: str, value: str) -> None:
    answer = calculate(expression)
    assert answer.text == value and answer.exact


def test_inexact_results_are_marked_and_correct_to_many_digits() -> None:
    third = calculate("1/3")
    assert not third.exact and third.value == Fraction(1, 3) and third.text.startswith("0.33333333333")
    root = calculate("sqrt(2)")
    assert not root.exact and root.text.startswith("1.41421356237309504880168872")
    assert abs(float(calculate("sin(pi/6)").value) - 0.5) < 1e-12
    assert calculate("ln(e)").text.startswith("1") and abs(calculate("ln(e)").value - 1) < Fraction(1, 10**25)
    assert abs(calculate("2^0.5").value - calculate("sqrt(2)").value) < Fraction(1, 10**25)


@pytest.mark.parametrize("expression, message", [
    ("1/0", "division by zero"), ("0^-1", "zero"), ("9^9^9", "bits"), ("2^100000", "bits"),
    ("1e5000", "limit"), ("1001!", "too large"), ("(-8)^(1/3)", "not a real"), ("sqrt(-1)", "not real"),
    ("ln(0)", "positive"), ("2 +", "ends too early"), ("2 3", "unexpected"), ("foo(2)", "unknown name"),
    ("import os", "unknown name"), ("__import__('os')", "unexpected character"), ("", "empty"),
    ("(" * 100 + "1" + ")" * 100, "nests deeper"), ("1+" * 300 + "1", "characters long"),
    ("2.5!", "whole numbers"), ("(1", "ends too early"), ("(1 2", "expected '\\)'"),
])
def test_errors_are_one_line_calculator_errors(expression: str, message: str) -> None:
    with pytest.raises(CalculatorError, match=message):
        calculate(expression)


def test_huge_powers_are_refused_at_once() -> None:
    started = time.perf_counter()
    for expression in ("9^9^9^9", "99999999^99999999", "(10^1000)^(10^1000)", "1000!^1000", "2^(2^64)"):
        with pytest.raises(CalculatorError):
            calculate(expression)
    assert time.perf_counter() - started < 1.0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.sampled_from(list("0123456789.+-*/^%!() e_pisqrt,xyz")), max_size=60))
def test_fuzzed_text_gives_an_answer_or_a_calculator_error_quickly(text: str) -> None:
    started = time.perf_counter()
    try:
        answer = calculate(text)
        assert isinstance(answer.value, Fraction)
    except CalculatorError:
        pass
    assert time.perf_counter() - started < 0.5


def expressions() -> st.SearchStrategy[tuple[str, Fraction]]:
    """Random expression trees of small decimals with + - * /, as text and as their exact value (computed
    independently with fractions)."""
    leaves = st.decimals(min_value=-1000, max_value=1000, places=2, allow_nan=False, allow_infinity=False).map(
        lambda d: (f"({d})" if d < 0 else str(d), Fraction(d)))

    def combine(children: st.SearchStrategy[tuple[str, Fraction]]) -> st.SearchStrategy[tuple[str, Fraction]]:
        def node(a: tuple[str, Fraction], op: str, b: tuple[str, Fraction]) -> tuple[str, Fraction]:
            if op == "/" and b[1] == 0:
                return a
            value = {"+": a[1] + b[1], "-": a[1] - b[1], "*": a[1] * b[1], "/": a[1] / b[1] if b[1] else 0}[op]
            return f"({a[0]} {op} {b[0]})", value
        return st.builds(node, children, st.sampled_from("+-*/"), children)

    return st.recursive(leaves, combine, max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(expressions())
def test_fuzzed_expressions_match_exact_fractions(case: tuple[str, Fraction]) -> None:
    text, value = case
    assert calculate(text).value == value


def test_input_length_is_limited() -> None:
    with pytest.raises(CalculatorError, match=str(MAX_INPUT)):
        calculate("1" * (MAX_INPUT + 1))


def test_finds_the_expression_in_a_question() -> None:
    assert find_expression("What is 525.6 * 315 / 3942?") == "525.6 * 315 / 3942"
    assert find_expression("compute (2 + 3) ^ 2 please") == "(2 + 3) ^ 2"
    assert find_expression("I was born in 1990 and have 2 cats") is None
    assert find_expression("the 3-4 split") is not None  # a hyphenated range reads as arithmetic: 3 - 4
    assert find_expression("what's sqrt(2)?") == "sqrt(2)"


# -- registry ---------------------------------------------------------------------------------------------------


def echo_tool(name: str = "echo", **kw) -> Tool:  # type: ignore[no-untyped-def]
    return Tool(name, "echo the text", {"type": "object", "properties": {"text": {"type": "string"}},
                                        "required": ["text"]}, lambda text: text, **kw)


def test_registry_failures_come_back_as_error_outputs() -> None:
    def boom(text: str) -> str:
        raise RuntimeError("kaput")

    def slow(text: str) -> str:
        time.sleep(2)
        return text

    registry = ToolRegistry([echo_tool(), Tool("boom", "fails", echo_tool().parameters, boom),
                             Tool("slow", "hangs", echo_tool().parameters, slow, timeout=0.2)])
    assert registry.call("echo", {"text": "hi"}).text == "hi"
    assert registry.call("echo", '{"text": "json"}').text == "json"
    cases = [
        ("nope", '{"text": "x"}', "no tool named 'nope'; the tools are: echo, boom, slow"),
        ("echo", '{"text": ', "not valid JSON"),
        ("echo", {"text": 3}, "invalid arguments for echo: text: 3 is not of type 'string'"),
        ("echo", {}, "'text' is a required property"),
        ("echo", "[1]", "must be a JSON object"),
        ("boom", {"text": "x"}, "boom failed: RuntimeError: kaput"),
        ("slow", {"text": "x"}, "did not finish within 0.2 s"),
    ]
    for name, arguments, message in cases:
        started = time.perf_counter()
        out = registry.call(name, arguments)
        assert out.error and message in out.text, (name, out.text)
        assert time.perf_counter() - started < 1.5


def test_tool_errors_read_as_the_tools_message() -> None:
    def fail(text: str) -> str:
        raise ToolError("the file is gone")

    out = ToolRegistry([Tool("f", "x", echo_tool().parameters, fail)]).call("f", {"text": "a"})
    assert out.error and out.text == "error: f: the file is gone"


def test_side_effect_tools_ask_for_confirmation() -> None:
    ran: list[str] = []
    tool = Tool("write", "writes", echo_tool().parameters, lambda text: ran.append(text) or "written",
                side_effects=True)
    asked: list[tuple[str, dict]] = []
    registry = ToolRegistry([tool])
    assert registry.call("write", {"text": "a"}).error and not ran  # no one to ask: declined
    out = registry.call("write", {"text": "b"}, confirm=lambda t, a: asked.append((t.name, a)) or False)
    assert out.error and "declined" in out.text and not ran and asked == [("write", {"text": "b"})]
    assert registry.call("write", {"text": "c"}, confirm=lambda t, a: True).text == "written" and ran == ["c"]


def test_tools_from_other_sources_are_namespaced_on_a_clash() -> None:
    registry = ToolRegistry([echo_tool()])
    with pytest.raises(Exception, match="taken"):
        registry.add(echo_tool())
    assert registry.add(echo_tool(source="mcp:everything"), namespace="everything") == "everything__echo"
    assert registry.add(echo_tool("get-sum", source="mcp:everything"), namespace="everything") == "get-sum"
    assert registry.add(echo_tool("has.dot", source="mcp:x"), namespace="x") == "x__has_dot"
    assert registry.call("everything__echo", {"text": "via mcp"}).text == "via mcp"
    assert sorted(registry.remove_source("mcp:everything")) == ["everything__echo", "get-sum"]
    assert registry.names() == ["echo", "x__has_dot"]
    spec = registry.specs(["echo"])[0]
    assert spec["type"] == "function" and spec["function"]["name"] == "echo"


# -- unit conversion --------------------------------------------------------------------------------------------


def test_unit_conversion() -> None:
    registry = builtin_tools(web_tools=False)
    assert "1.609344 km" in registry.call("convert_units", {"value": 1, "from_unit": "mile", "to_unit": "km"}).text
    assert "212 degree_Fahrenheit" in registry.call(
        "convert_units", {"value": 100, "from_unit": "degC", "to_unit": "degF"}).text.replace("°F", "degree_Fahrenheit")
    assert "27.7777" in registry.call("convert_units", {"value": 100, "from_unit": "km/h", "to_unit": "m/s"}).text
    bad = registry.call("convert_units", {"value": 1, "from_unit": "parsnips", "to_unit": "km"})
    assert bad.error and "unknown unit" in bad.text and "parsnips" in bad.text
    mismatch = registry.call("convert_units", {"value": 1, "from_unit": "kg", "to_unit": "m"})
    assert mismatch.error and "cannot convert kg" in mismatch.text


# -- memory -----------------------------------------------------------------------------------------------------


def test_memory_is_per_user_in_wal_sqlite(isolated_home: Path) -> None:
    memory = Memory.open()
    assert memory.db.path == isolated_home / "chat" / "chat.sqlite" and memory.db.journal_mode() == "wal"
    rex = memory.add("alice", "My dog is called Rex")
    memory.add("alice", "I live in Lisbon")
    memory.add("alice", "my dog is called   Rex")  # the same fact is kept once
    memory.add("bob", "My dog is called Fido")
    assert [f.text for f in memory.facts("alice")] == ["My dog is called Rex", "I live in Lisbon"]
    best = memory.relevant("alice", "what is my dog called?", k=1)
    assert best[0][0] == rex
    assert not memory.delete("bob", rex.id)  # not bob's to delete
    assert memory.delete("alice", rex.id) and [f.text for f in memory.facts("alice")] == ["I live in Lisbon"]
    assert [f.text for f in Memory.open().facts("bob")] == ["My dog is called Fido"]  # persisted


def test_memory_by_embedding_finds_facts_without_shared_words(isolated_home: Path) -> None:
    from torchbook.knowledge import Embedder

    embedder = Embedder.load()
    memory = Memory.open(embed=embedder.encode, embedder_name=embedder.name)
    for fact in ("My dog is called Rex", "I work as a nurse in Porto", "I am allergic to peanuts"):
        memory.add("alice", fact)
    assert memory.relevant("alice", "what's the name of my pet?", k=1)[0][0].text == "My dog is called Rex"
    assert memory.relevant("alice", "which foods should I avoid?", k=1)[0][0].text == "I am allergic to peanuts"
    assert memory.relevant("alice", "where is my job?", k=1)[0][0].text == "I work as a nurse in Porto"
    # lexical similarity alone finds nothing for the pet question (no shared word)
    assert Memory(memory.db).relevant("alice", "what's the name of pet?", k=1) == []


def test_memory_tools_confirm_and_stay_with_their_user(isolated_home: Path) -> None:
    memory = Memory.open()
    user = {"name": "alice"}
    registry = builtin_tools(memory=memory, user=lambda: user["name"], web_tools=False)
    registry.confirm = lambda tool, arguments: True
    assert "remembered (#1)" in registry.call("remember", {"fact": "I like green tea"}).text
    user["name"] = "bob"
    assert registry.call("list_memories", {}).text == "nothing remembered yet"
    assert registry.call("forget", {"id": 1}).error
    user["name"] = "alice"
    assert "green tea" in registry.call("recall", {"query": "tea"}).text
    assert registry.call("forget", {"id": 1}).text == "forgot #1" and memory.facts("alice") == []


def test_database_transactions_commit_all_or_nothing(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "t.sqlite")
    db.script("CREATE TABLE t (x INTEGER)")
    with pytest.raises(RuntimeError):
        with db.transaction() as conn:
            conn.execute("INSERT INTO t VALUES (1)")
            raise RuntimeError("crash in the middle")
    assert db.query("SELECT count(*) FROM t") == [(0,)]


# -- web fetch and search ---------------------------------------------------------------------------------------

PAGE = ("<html><head><title>Otters</title><style>.x{color:red}</style><script>alert('x')</script></head><body>"
        + "".join(f"<p>Paragraph {i} is about rivers and fish, nothing else of note.</p>" for i in range(60))
        + "<p>Sea otters hold hands while sleeping so that they do not drift apart.</p>"
        + "".join(f"<p>Filler {i} talks about mountains and snow.</p>" for i in range(60)) + "</body></html>")


class Handler(http.server.BaseHTTPRequestHandler):
    hosts: list[str] = []

    def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
        pass

    def send(self, body: bytes, kind: str = "text/html; charset=utf-8", status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        Handler.hosts.append(self.headers.get("Host", ""))
        if self.path == "/otters":
            self.send(PAGE.encode())
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/otters")
            self.end_headers()
        elif self.path == "/loop":
            self.send_response(301)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif self.path.startswith("/away"):
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/otters")
            self.end_headers()
        elif self.path == "/big":
            self.send(b"word " * 400_000, "text/plain")
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"start ")
            self.wfile.flush()
            time.sleep(3)
            self.wfile.write(b"end")
        elif self.path == "/binary":
            self.send(b"\x89PNG...", "image/png")
        elif self.path.startswith("/search"):
            query = self.path.split("q=", 1)[1].split("&")[0]
            self.send(json.dumps({"query": query, "results": [
                {"title": "Sea otter - facts", "url": "https://example.org/otter", "content": "Otters hold hands."},
                {"title": "Rivers", "url": "https://example.org/rivers", "content": "Fish."}]}).encode(),
                "application/json")
        else:
            self.send(b"not found", "text/plain", 404)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_fetch_gives_the_passages_that_answer_the_question(server: str) -> None:
    page, passages = web.fetch(f"{server}/redirect", "why do otters hold hands?", k=1, allow_private=True)
    assert page.url == f"{server}/otters" and page.redirects == [f"{server}/redirect"]
    assert "alert" not in page.text and "color:red" not in page.text and "<p>" not in page.text
    assert "Sea otters hold hands while sleeping" in passages[0].text
    tool = fetch_tool(WebSettings(allow_private=True))
    out = ToolRegistry([tool]).call("fetch_url", {"url": f"{server}/otters", "question": "otters sleeping"})
    assert not out.error and "Sea otters hold hands" in out.text and out.sources == [f"{server}/otters"]


def test_loopback_private_and_link_local_are_refused(server: str) -> None:
    out = ToolRegistry([fetch_tool()]).call("fetch_url", {"url": f"{server}/otters"})
    assert out.error and "refused: 127.0.0.1 resolves to 127.0.0.1, a loopback address" in out.text
    port = server.rsplit(":", 1)[1]
    with pytest.raises(ToolError, match="localhost resolves to .*loopback"):
        web.fetch_page(f"http://localhost:{port}/otters")
    assert "link-local" in (web.refusal("h", "169.254.169.254") or "")  # the cloud metadata address
    assert "private" in (web.refusal("h", "10.1.2.3") or "") and "private" in (web.refusal("h", "192.168.0.1") or "")
    assert "loopback" in (web.refusal("h", "::ffff:127.0.0.1") or "") and web.refusal("h", "::1")
    assert web.refusal("h", "100.64.0.1") and web.refusal("h", "0.0.0.0") and web.refusal("h", "224.0.0.1")
    assert web.refusal("h", "93.184.216.34") is None and web.refusal("h", "2606:4700::1111") is None
    with pytest.raises(ToolError, match="only http and https"):
        web.fetch_page("file:///etc/passwd", allow_private=True)


def test_every_redirect_is_checked_and_the_checked_address_is_used(server: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    port = int(server.rsplit(":", 1)[1])
    real_getaddrinfo = socket.getaddrinfo

    def fake_getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host in ("public.test", "pinned.test"):  # names our test resolves to the loopback server
            return real_getaddrinfo("127.0.0.1", *args, **kwargs)
        return real_getaddrinfo(host, *args, **kwargs)

    real_refusal = web.refusal
    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(web, "refusal", lambda host, address: None if host == "public.test" else
                        real_refusal(host, address))
    # The first hop passes the check (a "public" name); its redirect to 127.0.0.1 is checked again and refused.
    with pytest.raises(ToolError, match="refused: 127.0.0.1 resolves to 127.0.0.1, a loopback"):
        web.fetch_page(f"http://public.test:{port}/away")
    assert web.fetch_page(f"http://public.test:{port}/otters").status == 200
    # The connection goes to the address that was resolved and checked, with the name in the Host header.
    Handler.hosts.clear()
    web.fetch_page(f"http://pinned.test:{port}/otters", allow_private=True)
    assert Handler.hosts == [f"pinned.test:{port}"]


def test_size_time_redirect_and_type_limits(server: str) -> None:
    page = web.fetch_page(f"{server}/big", allow_private=True, max_bytes=10_000)
    assert page.truncated and len(page.text) == 10_000
    started = time.perf_counter()
    with pytest.raises(ToolError, match="longer than 0.5 s"):
        web.fetch_page(f"{server}/slow", allow_private=True, timeout=0.5)
    assert time.perf_counter() - started < 2.0
    with pytest.raises(ToolError, match="redirects more than 5 times"):
        web.fetch_page(f"{server}/loop", allow_private=True)
    with pytest.raises(ToolError, match="image/png, not text"):
        web.fetch_page(f"{server}/binary", allow_private=True)
    with pytest.raises(ToolError, match="HTTP 404"):
        web.fetch_page(f"{server}/missing", allow_private=True)


def test_web_search_through_a_configured_provider(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = search_tool(WebSettings(search_url=f"{server}/search?q={{query}}&format=json"))
    out = ToolRegistry([tool]).call("web_search", {"query": "sea otters"})
    assert not out.error and out.sources == ["https://example.org/otter", "https://example.org/rivers"]
    assert "1. Sea otter - facts <https://example.org/otter>" in out.text
    unset = ToolRegistry([search_tool()]).call("web_search", {"query": "x"})
    assert unset.error and "TORCHBOOK_SEARCH_URL" in unset.text
    monkeypatch.setenv("TORCHBOOK_SEARCH_URL", f"{server}/search?q={{query}}")
    assert web.search("otters")[0].title == "Sea otter - facts"


def test_decimal_display_of_big_results() -> None:
    assert calculate("2^64").text == "18446744073709551616"
    assert Decimal(calculate("1/7").text).quantize(Decimal("1e-6")) == Decimal("0.142857")
