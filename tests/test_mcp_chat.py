"""A conversation through the orchestrator (chapter 15) whose tools include a real MCP server's: the model (a
scripted decoder on SmolLM2's real tokenizer and chat template, tests/test_chat_orchestrator.py) calls
server-everything's `get-sum`; then the server is killed, the next call comes back as an error the model reads, and
the conversation goes on with the tools that are left. Slow tier: SmolLM2's tokenizer costs ~25 s to convert."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_chat_orchestrator import CALL, last_tool_response, scripted, smollm_tokenizer  # noqa: F401 (fixtures)
from test_mcp_host import EVERYTHING, needs_everything

from torchbook.chat.mcp import MCPHost, ServerSpec, add_to_registry
from torchbook.chat.model import ChatModel
from torchbook.chat.orchestrator import Orchestrator
from torchbook.chat.tools import builtin_tools

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow, pytest.mark.timeout(300)]


@needs_everything
def test_the_conversation_goes_on_when_an_mcp_server_dies(scripted: Callable[..., ChatModel],  # noqa: F811
                                                          tmp_path: Path) -> None:
    pidfile = tmp_path / "server.pid"
    kill_now: list[bool] = []

    def script(prompt: str) -> str:
        result = last_tool_response(prompt.rsplit("<|im_start|>user", 1)[1])  # this turn's tool result, if any
        if result:
            return f"The server said: {result}"
        offered = prompt.split("<|im_start|>user", 1)[0]  # the system prompt, where the tools are described
        if '"name": "get-sum"' in offered:
            if kill_now:  # the server dies while the model writes its call
                kill_now.clear()
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            return CALL.format(name="get-sum", arguments='{"a": 40, "b": 2}')
        return "I have no tool to add with; 40 + 2 is 42 by heart."

    server = ServerSpec("everything", command="sh",
                        args=("-c", f'echo $$ > "{pidfile}"; exec node "{EVERYTHING / "index.js"}" stdio'))
    tools = builtin_tools(web_tools=False)
    with MCPHost([server], reserved=tools.names(), call_timeout=20) as host:
        add_to_registry(host, tools)
        # room for the tools' descriptions: server-everything's 13 beside torchbook's own
        orchestrator = Orchestrator(scripted(script, context=4096), tools, mode="model")
        history = [{"role": "user", "content": "Add 40 and 2 with the server."}]

        first = orchestrator.respond(history)
        assert first.text == "The server said: The sum of 40 and 2 is 42."
        assert [m["role"] for m in first.messages] == ["assistant", "tool", "assistant"]
        history += [*first.messages, {"role": "user", "content": "Again, please."}]

        kill_now.append(True)
        second = orchestrator.respond(history)
        # the call reached a dead server (or a tool the host had just withdrawn): an error the model reads
        assert second.text.startswith("The server said: error") and second.finish_reason == "stop"
        assert "get-sum" in second.text or "everything" in second.text
        deadline = time.monotonic() + 10
        while host.servers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host.servers == [] and "everything" in host.events[0].message
        history += [*second.messages, {"role": "user", "content": "And once more."}]

        third = orchestrator.respond(history)  # the conversation goes on, with the tools that are left
        assert third.text == "I have no tool to add with; 40 + 2 is 42 by heart."
        offered = third.prompts[0][0].split("<|im_start|>user", 1)[0]
        assert '"name": "get-sum"' not in offered and '"name": "calculator"' in offered
