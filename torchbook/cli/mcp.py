"""`torchbook mcp`: serve torchbook's tools and knowledge base over the Model Context Protocol (chapter 15), or, with
`--inspect FILE`, act as a host: connect to the servers of an `mcpServers` file and list or call what they offer.

    torchbook mcp                                  # stdio: what an MCP host starts (see docs/mcp.md)
    torchbook mcp --http --port 8765               # streamable HTTP at http://127.0.0.1:8765/mcp
    torchbook mcp --inspect servers.json           # each server's tools, resources and prompts
    torchbook mcp --inspect servers.json --call get-sum --arguments '{"a": 1, "b": 2}'
"""

from __future__ import annotations

import argparse
import json
import sys

from torchbook.cli.index import add_base_arguments

NAME = "mcp"
HELP = "serve torchbook's tools and knowledge base over MCP (stdio or HTTP), or inspect other MCP servers"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    parser.add_argument("--host", default="127.0.0.1",
                        help="HTTP address to listen on (default 127.0.0.1, the loopback: only this machine)")
    parser.add_argument("--port", type=int, default=8765, help="HTTP port (default 8765; 0 picks a free one)")
    add_base_arguments(parser)
    parser.add_argument("--user", default="default", help="whose memory the memory tools read and write")
    parser.add_argument("--web", action="store_true", help="also serve web fetch and web search")
    parser.add_argument("--inspect", metavar="FILE", default=None,
                        help="act as a host instead: connect to the servers of this mcpServers JSON file and list "
                             "their tools, resources and prompts")
    parser.add_argument("--call", metavar="TOOL", default=None, help="with --inspect: call this tool")
    parser.add_argument("--arguments", default="{}", help="with --call: the tool's arguments as a JSON object")
    parser.add_argument("--read", nargs=2, metavar=("SERVER", "URI"), default=None,
                        help="with --inspect: read this resource of this server")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="with --inspect: seconds a server may take to answer before it is taken as hung")


def inspect(args: argparse.Namespace) -> int:
    from torchbook.chat.mcp import MCPHost, load_config
    from torchbook.errors import UserInputError

    try:
        arguments = json.loads(args.arguments)
    except json.JSONDecodeError as e:
        raise UserInputError(f"--arguments is not valid JSON: {e}") from None
    with MCPHost(load_config(args.inspect), call_timeout=args.timeout) as host:
        if args.call:
            outcome = host.call_tool(args.call, arguments)
            print(outcome.text)
            return 1 if outcome.is_error else 0
        if args.read:
            for content in host.read_resource(*args.read):
                print(content.text if content.text is not None else f"[{len(content.data or b'')} bytes]")
            return 0
        for server in host.servers:
            print(f"{server}:")
            for tool in (t for t in host.tools() if t.server == server):
                print(f"  tool     {tool.name}: {tool.description.splitlines()[0] if tool.description else ''}")
            for resource in host.resources(server):
                print(f"  resource {resource.uri} ({resource.mime_type or 'unknown type'})")
            for template in host.resource_templates(server):
                print(f"  template {template.uri_template} ({template.mime_type or 'unknown type'})")
            for prompt in host.prompts(server):
                print(f"  prompt   {prompt.name}({', '.join(prompt.arguments)})")
        for event in host.events:
            print(f"torchbook: warning: {event.message}", file=sys.stderr)
    return 0 if not host.events else 1


def main(args: argparse.Namespace) -> int:
    import anyio

    from torchbook.chat.tools import WebSettings
    from torchbook.serve.mcp_server import KnowledgeDocuments, build_server, serve_http, serve_stdio, torchbook_tools

    if args.inspect:
        return inspect(args)
    tools = torchbook_tools(args.db, args.embedder, user=args.user, web=WebSettings() if args.web else None)
    server = build_server(tools, KnowledgeDocuments(args.db))
    if not args.http:
        anyio.run(serve_stdio, server)
        return 0
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"torchbook: warning: serving on {args.host}: other machines can call these tools", file=sys.stderr)
    try:
        serve_http(server, args.host, args.port,
                   ready=lambda url: print(f"torchbook: MCP server at {url}", file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        pass
    return 0
