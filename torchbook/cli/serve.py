"""`torchbook serve [MODEL]`: the OpenAI-compatible API (chapter 15) on the serving engine; `torchbook.serve` does
the work. Without MODEL, the offline default chat model (SmolLM2-135M-Instruct). Binds 127.0.0.1 unless --host
says otherwise; any other address needs API keys (`--add-key` makes one and prints it once). docs/serve.md.
"""

from __future__ import annotations

import argparse
import sys

NAME = "serve"
HELP = "serve a language model through the OpenAI API (chat, completions, embeddings), loopback only by default"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="run folder, Hugging Face folder, GGUF file or Hub id (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--name", help="the model's id in the API (default: the file or folder name)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; any other needs API keys)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    parser.add_argument("--slots", type=int, default=8, help="requests decoded together (default 8)")
    parser.add_argument("--max-len", type=int, default=2048,
                        help="tokens per request, prompt and answer (default 2048, at most the model's context)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests that may wait for a slot; more are answered 503 (default 64)")
    parser.add_argument("--prefill-chunk", type=int, default=128, metavar="TOKENS",
                        help="prompt tokens prefilled per engine step, beside the decoding rows: larger gives a "
                             "newcomer its first token sooner, smaller keeps the others' time between tokens short "
                             "(default 128)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantized layers (CPU decoding)")
    parser.add_argument("--dense-copy", action=argparse.BooleanOptionalAction, default=True,
                        help="a quantized model also keeps a bfloat16 copy of its weights for steps of 12 rows or more "
                             "(batched decoding, prompt prefills): 1.4-1.5x the tokens/s of 16 requests, for 2 bytes a "
                             "weight more (default: on; --no-dense-copy: the codes only)")
    parser.add_argument("--embedder", default="default",
                        help="the /v1/embeddings model: default (all-MiniLM-L6-v2), a BERT folder, or none")
    parser.add_argument("--max-body", type=int, default=1 << 20, metavar="BYTES",
                        help="largest request body; larger ones get 413 (default 1 MiB)")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                        help="longest generation; longer ones are cancelled with 504 (default 600)")
    parser.add_argument("--rate-limit", type=int, metavar="PER_MINUTE",
                        help="requests per minute per API key (a key's own limit first; default: none)")
    parser.add_argument("--require-keys", action="store_true", help="require API keys on a loopback address too")
    parser.add_argument("--no-chat", action="store_true",
                        help="do not serve the chatbot system as the model torchbook-chat")
    parser.add_argument("--chat-mode", choices=["orchestrator", "model"], default="orchestrator",
                        help="torchbook-chat: code picks the tools (orchestrator, default) or the model calls them")
    parser.add_argument("--kb", metavar="LOCATION", help="a knowledge base torchbook-chat searches (its location)")
    keys = parser.add_argument_group("API keys (stored hashed under $TORCHBOOK_HOME/serve/)")
    keys.add_argument("--add-key", nargs="?", const="", metavar="NAME",
                      help="make a new API key, print it once, and exit")
    keys.add_argument("--key-rate-limit", type=int, metavar="PER_MINUTE", help="with --add-key: the key's own limit")
    keys.add_argument("--list-keys", action="store_true", help="list the keys (ids and names) and exit")
    keys.add_argument("--revoke-key", metavar="ID", help="delete a key by its id and exit")


def main(args: argparse.Namespace) -> int:
    # The library is imported here, not at the top, so that `torchbook --help` stays fast; key management needs
    # only the key store (no torch, no FastAPI).
    from torchbook.serve.keys import KeyStore

    store = KeyStore()
    if args.add_key is not None:
        record, key = store.add(args.add_key, args.key_rate_limit)
        print(f"new API key {record.id}{f' ({record.name})' if record.name else ''}; it is shown only now:")
        print(key)
        return 0
    if args.list_keys:
        for record in store.records():
            limit = f"{record.rate_limit}/min" if record.rate_limit else "server default"
            print(f"{record.id}  {record.name or '-'}  rate limit {limit}")
        return 0
    if args.revoke_key:
        store.revoke(args.revoke_key)
        print(f"revoked {args.revoke_key}")
        return 0
    from torchbook.serve.models import ServeSettings
    from torchbook.serve.server import check_security, listen, prepare, run

    settings = ServeSettings(model=args.model, name=args.name, host=args.host, port=args.port, slots=args.slots,
                             max_len=args.max_len, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                             device=args.device, quantize=args.quantize, dense_copy=args.dense_copy,
                             embedder=args.embedder, max_body_bytes=args.max_body, request_timeout_s=args.timeout,
                             rate_limit=args.rate_limit,
                             require_keys=True if args.require_keys else None, chat=not args.no_chat,
                             chat_mode=args.chat_mode, kb=args.kb)
    check_security(settings)  # before the model loads: an unsafe setting answers at once
    print(f"loading {args.model or 'the default chat model'}...", file=sys.stderr)
    app = prepare(settings)
    sock = listen(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    keys = "API keys required" if settings.require_keys else "no API key needed on loopback"
    print(f"serving {', '.join(app.state.server.model_ids())} at http://{shown}:{port}/v1 ({keys}; Ctrl-C or "
          "SIGTERM stops after running requests finish)", flush=True)
    print(f"chat page: http://{shown}:{port}/", flush=True)
    run(app, sock, settings)
    return 0
