"""`torchbook chat`: talk with a model that has tools, memory and your documents (book chapter 15).

In a terminal it reads your messages (and commands: /help, /tools, /memory, /sources, /new, /list, /resume ID,
/prompt) and streams the answers; from a pipe it reads one message per line and prints each answer, so a chat can
be scripted: `printf 'What is 525.6 * 315 / 3942?\\n' | torchbook chat`. The model is the offline SmolLM2-135M-Instruct
unless `--model` names another (run folder, Hugging Face folder, GGUF file, Hub id). Conversations and memory are
kept under $TORCHBOOK_HOME/chat. Tools with side effects (remember, forget) ask first in a terminal; from a pipe
they run only with --yes.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

NAME = "chat"
HELP = "chat with a model that uses tools, memory and a knowledge base (terminal or pipe)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="the chat model (default: the offline SmolLM2-135M-Instruct)")
    parser.add_argument("--kb", help="a knowledge base to answer from (a name under $TORCHBOOK_HOME/knowledge, a "
                        "folder or postgresql://...; build it with `torchbook index`)")
    parser.add_argument("--mode", choices=["orchestrator", "model"], default="orchestrator",
                        help="who chooses the tools: rules in the orchestrator (default: for small models) or the "
                             "model itself, calling them")
    parser.add_argument("--user", default="default", help="whose conversations and memory (default: default)")
    parser.add_argument("--resume", metavar="ID", help="continue a conversation (ids: /list)")
    parser.add_argument("--system", help="the system prompt")
    parser.add_argument("--max-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    parser.add_argument("--context", type=int, default=2048, help="the model's context in tokens (default 2048)")
    parser.add_argument("--max-steps", type=int, default=4, help="model calls per turn in --mode model (default 4)")
    parser.add_argument("--no-memory", action="store_true", help="no long-term memory")
    parser.add_argument("--no-web", action="store_true", help="no web fetch or search")
    parser.add_argument("--allow-private", action="store_true",
                        help="let web fetch read loopback, private and link-local addresses (refused by default)")
    parser.add_argument("--search-url", help="the web search provider, a URL with {query} (default: "
                        "$TORCHBOOK_SEARCH_URL), e.g. a SearxNG: http://localhost:8888/search?q={query}&format=json")
    parser.add_argument("--mcp", metavar="FILE", help="MCP servers whose tools to offer (an mcpServers JSON file)")
    parser.add_argument("--yes", action="store_true", help="run tools with side effects without asking")
    parser.add_argument("--no-stream", action="store_true", help="print each answer whole")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantized layers (CPU speed)")
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, cuda:N, mps)")


def main(args: argparse.Namespace) -> int:
    # The library (torch, the model) is imported here, not at the top, so that `torchbook --help` stays fast.
    from torchbook.chat.conversations import Conversations
    from torchbook.chat.memory import Memory
    from torchbook.chat.model import ChatModel
    from torchbook.chat.orchestrator import DEFAULT_SYSTEM, Event, Orchestrator
    from torchbook.chat.session import ChatSession, is_command
    from torchbook.chat.tools import WebSettings, builtin_tools
    from torchbook.errors import TorchbookError, UserInputError

    for flag, value in (("--max-tokens", args.max_tokens), ("--context", args.context),
                        ("--max-steps", args.max_steps)):
        if value < 1:
            raise UserInputError(f"{flag} must be at least 1, got {value}")
    interactive = sys.stdin.isatty()

    embedder = None
    kb = None
    if args.kb or not args.no_memory:
        from torchbook.knowledge import Embedder, KnowledgeBase

        embedder = Embedder.load()
        kb = KnowledgeBase.open(args.kb, embedder) if args.kb else None
    memory = None if args.no_memory else Memory.open(embed=embedder.encode if embedder else None,
                                                     embedder_name=embedder.name if embedder else None)
    tools = builtin_tools(kb=kb, memory=memory, user=lambda: args.user, web_tools=not args.no_web,
                          web_settings=WebSettings(allow_private=args.allow_private, search_url=args.search_url))

    def confirm(tool: Any, arguments: dict[str, Any]) -> bool:
        if args.yes:
            return True
        if not interactive:
            print(f"[{tool.name} not run: it has side effects; --yes allows it from a pipe]", file=sys.stderr)
            return False
        answer = input(f"run {tool.name}({json.dumps(arguments, ensure_ascii=False)})? [y/N] ")
        return answer.strip().lower() in ("y", "yes")

    host = None
    if args.mcp:
        import importlib

        try:
            mcp = importlib.import_module("torchbook.chat.mcp")  # the MCP host (issue #23) and the mcp package
        except ImportError as error:
            raise UserInputError(f"--mcp needs torchbook's MCP host and the mcp package ({error})") from None
        host = mcp.connect(args.mcp, tools)
    model = ChatModel.load(args.model, quantize=args.quantize, device=args.device, context=args.context, slots=1)
    orchestrator = Orchestrator(model, tools, mode=args.mode, system_prompt=args.system or DEFAULT_SYSTEM,
                                max_tokens=args.max_tokens, max_steps=args.max_steps, confirm=confirm)
    session = ChatSession(orchestrator, Conversations.open(), user=args.user, memory=memory,
                          conversation=args.resume)
    stream = not args.no_stream

    def on_event(event: Event) -> None:
        if event.kind == "text" and stream:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif event.kind == "tool_call":
            print(f"[{event.name} {json.dumps(event.arguments, ensure_ascii=False)}]", file=sys.stderr)
        elif event.kind in ("tool_result", "error", "context"):
            first = (event.text.strip().splitlines() or [""])[0]
            print(f"[{event.name + ': ' if event.name else ''}{first[:200]}]", file=sys.stderr)

    if interactive:
        print(f"torchbook chat with {model.name} ({args.mode} chooses the tools); /help for commands, Ctrl-D to quit",
              file=sys.stderr)
    try:
        while True:
            try:
                line = input("you> ") if interactive else sys.stdin.readline()
            except EOFError:
                break
            if not interactive and not line:
                break
            line = line.strip()
            if not line:
                continue
            try:
                if is_command(line):
                    print(session.command(line).text)
                    continue
                reply = session.send(line, on_event)
            except TorchbookError as error:  # one bad message or command: say so, keep the conversation
                print(f"torchbook: error: {error}", file=sys.stderr)
                continue
            if stream:
                sources = reply.text[len(reply.messages[-1]["content"]):] if reply.sources else ""
                sys.stdout.write(sources + "\n")
            else:
                sys.stdout.write(reply.text + "\n")
            if interactive:
                sys.stdout.write("\n")
            sys.stdout.flush()
    finally:
        model.close()
        if host is not None:
            host.close()
    if session.conversation is not None:
        print(f"[conversation {session.conversation}: torchbook chat --resume {session.conversation}]",
              file=sys.stderr)
    return 0
