"""torchbook's own tools as `Tool`s (book chapter 15): calculator, unit conversion, knowledge-base search, memory,
web fetch and web search. `builtin_tools(...)` gives the set a chat uses; each also stands alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchbook.chat.memory import Memory
from torchbook.chat.tools import web
from torchbook.chat.tools.calculator import CalculatorError, calculate
from torchbook.chat.tools.registry import Tool, ToolError, ToolOutput, ToolRegistry
from torchbook.chat.tools.units import convert_text


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def calculator_tool() -> Tool:
    def run(expression: str) -> ToolOutput:
        try:
            answer = calculate(expression)
        except CalculatorError as e:
            raise ToolError(str(e)) from None
        text = f"{expression.strip()} = {answer.text}" if answer.exact else f"{expression.strip()} ≈ {answer.text}"
        return ToolOutput(text, data={"value": answer.text, "exact": answer.exact})

    return Tool("calculator", "Compute an arithmetic expression exactly (+ - * / // % ^, parentheses, sqrt, log, "
                "sin, pi ...). Use it for any arithmetic.",
                _object({"expression": {"type": "string", "description": "the expression, e.g. 525.6 * 315 / 3942"}},
                        ["expression"]), run, timeout=5.0)


def unit_tool() -> Tool:
    def run(value: float, from_unit: str, to_unit: str) -> str:
        return convert_text(value, from_unit, to_unit)

    return Tool("convert_units", "Convert a quantity from one unit to another (length, mass, time, speed, "
                "temperature, energy, ...).",
                _object({"value": {"type": "number"}, "from_unit": {"type": "string", "description": "e.g. mile"},
                         "to_unit": {"type": "string", "description": "e.g. km"}}, ["value", "from_unit", "to_unit"]),
                run, timeout=10.0)


def knowledge_tool(kb: Any, k: int = 4) -> Tool:
    """Search a `torchbook.knowledge.KnowledgeBase`."""

    def run(query: str, k: int = k) -> ToolOutput:
        hits = kb.search(query, k=k)
        if not hits:
            return ToolOutput(f"nothing in the knowledge base matches {query!r}")
        text = "\n\n".join(f"[{i}] ({h.citation})\n{h.text}" for i, h in enumerate(hits, 1))
        return ToolOutput(text, sources=[h.citation for h in hits])

    return Tool("search_knowledge", "Search the user's documents (the knowledge base) for passages about a question.",
                _object({"query": {"type": "string"}, "k": {"type": "integer", "minimum": 1, "maximum": 10}},
                        ["query"]), run, timeout=60.0)


def memory_tools(memory: Memory, user: Callable[[], str]) -> list[Tool]:
    """remember (asks for confirmation), recall, list_memories, forget (asks for confirmation): `user()` names the
    user whose facts they touch (the conversation's, never an argument the model could change)."""

    def remember(fact: str) -> str:
        saved = memory.add(user(), fact)
        return f"remembered (#{saved.id}): {saved.text}"

    def recall(query: str) -> str:
        found = memory.relevant(user(), query, k=5, min_similarity=0.0)
        return "\n".join(f"#{f.id}: {f.text}" for f, _ in found) or "nothing remembered about that"

    def list_memories() -> str:
        return "\n".join(f"#{f.id}: {f.text}" for f in memory.facts(user())) or "nothing remembered yet"

    def forget(id: int) -> str:
        if not memory.delete(user(), id):
            raise ToolError(f"there is no remembered fact #{id}")
        return f"forgot #{id}"

    return [
        Tool("remember", "Remember a fact about the user for later conversations.",
             _object({"fact": {"type": "string"}}, ["fact"]), remember, side_effects=True),
        Tool("recall", "Recall remembered facts about the user related to a question.",
             _object({"query": {"type": "string"}}, ["query"]), recall),
        Tool("list_memories", "List every remembered fact about the user.", _object({}, []), list_memories),
        Tool("forget", "Forget a remembered fact by its number.", _object({"id": {"type": "integer"}}, ["id"]),
             forget, side_effects=True),
    ]


@dataclass
class WebSettings:
    """`allow_private`: fetch from loopback, private and link-local addresses too (off: refused); `search_url`:
    the search provider (default `$TORCHBOOK_SEARCH_URL`)."""

    allow_private: bool = False
    max_bytes: int = web.MAX_BYTES
    timeout: float = web.TIMEOUT_S
    search_url: str | None = None


def fetch_tool(settings: WebSettings | None = None) -> Tool:
    settings = settings or WebSettings()

    def run(url: str, question: str = "") -> ToolOutput:
        text, sources = web.fetch_text(url, question, allow_private=settings.allow_private,
                                       max_bytes=settings.max_bytes, timeout=settings.timeout)
        return ToolOutput(text, sources=sources)

    return Tool("fetch_url", "Read a web page: its passages most relevant to a question.",
                _object({"url": {"type": "string", "description": "an http or https URL"},
                         "question": {"type": "string", "description": "what to look for on the page"}}, ["url"]),
                run, timeout=settings.timeout + 5)


def search_tool(settings: WebSettings | None = None) -> Tool:
    settings = settings or WebSettings()

    def run(query: str) -> ToolOutput:
        text, sources = web.search_text(query, settings.search_url)
        return ToolOutput(text, sources=sources)

    return Tool("web_search", "Search the web; gives titles, links and snippets.",
                _object({"query": {"type": "string"}}, ["query"]), run, timeout=settings.timeout + 5)


def builtin_tools(kb: Any = None, memory: Memory | None = None, user: Callable[[], str] = lambda: "default",
                  web_settings: WebSettings | None = None, web_tools: bool = True) -> ToolRegistry:
    """The tools a chat offers: calculator and unit conversion always; knowledge-base search with `kb`; memory
    with `memory`; web fetch and search when `web_tools`."""
    registry = ToolRegistry([calculator_tool(), unit_tool()])
    if kb is not None:
        registry.add(knowledge_tool(kb))
    if memory is not None:
        for tool in memory_tools(memory, user):
            registry.add(tool)
    if web_tools:
        registry.add(fetch_tool(web_settings))
        registry.add(search_tool(web_settings))
    return registry
