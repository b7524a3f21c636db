"""The chatbot's tools (book chapter 15): the registry (`Tool`, `ToolRegistry`, `ToolOutput`) and torchbook's own
tools (calculator, unit conversion, knowledge-base search, memory, web fetch and search)."""

from torchbook.chat.tools.builtin import (
    WebSettings,
    builtin_tools,
    calculator_tool,
    fetch_tool,
    knowledge_tool,
    memory_tools,
    search_tool,
    unit_tool,
)
from torchbook.chat.tools.registry import Confirm, Tool, ToolError, ToolOutput, ToolRegistry

__all__ = ["Confirm", "Tool", "ToolError", "ToolOutput", "ToolRegistry", "WebSettings", "builtin_tools",
           "calculator_tool", "fetch_tool", "knowledge_tool", "memory_tools", "search_tool", "unit_tool"]
