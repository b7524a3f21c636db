"""Starting the server: the security rule, loading and warming, binding, uvicorn.

`prepare(settings)` checks the rule first (a host other than a loopback address needs API keys, and at least one
key must exist), then loads and warms the models and builds the app; `listen` binds the socket only then, so the
port opens on a ready model; `run` serves until SIGINT or SIGTERM, after which uvicorn stops accepting
connections, lets running responses finish (the engine drains), and returns.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from torchbook.chat.memory import Memory
from torchbook.errors import UserInputError
from torchbook.knowledge.base import KnowledgeBase
from torchbook.serve.app import build_app
from torchbook.serve.chatbot import Chatbot
from torchbook.serve.keys import KeyStore
from torchbook.serve.metrics import Metrics
from torchbook.serve.models import ServeSettings, load_embedder, load_language_model


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_security(settings: ServeSettings) -> ServeSettings:
    """Keys are required on any address but a loopback one (and may be asked for on loopback too); when required,
    at least one must exist."""
    loopback = is_loopback(settings.host)
    if settings.require_keys is False and not loopback:
        raise UserInputError(f"serving on {settings.host} (not a loopback address) requires API keys", param="host")
    settings.require_keys = bool(settings.require_keys) or not loopback
    if settings.require_keys and not KeyStore(settings.keys_path).records():
        where = "" if loopback else f" on {settings.host} (not a loopback address)"
        raise UserInputError(f"serving{where} needs API keys and none exists yet: make one first", param="add_key")
    for name in ("slots", "max_queue", "max_len", "prefill_chunk", "max_body_bytes"):
        if getattr(settings, name) < 1:
            raise UserInputError(f"{name} must be at least 1, got {getattr(settings, name)}", param=name)
    if settings.request_timeout_s <= 0:
        raise UserInputError(f"the request time limit must be positive, got {settings.request_timeout_s}",
                             param="request_timeout_s")
    if settings.rate_limit is not None and settings.rate_limit < 1:
        raise UserInputError(f"the rate limit must be at least 1 request per minute, got {settings.rate_limit}",
                             param="rate_limit")
    return settings


def prepare(settings: ServeSettings) -> Any:
    """The app, its models loaded and warmed (raises before anything loads when the settings are unsafe)."""
    check_security(settings)
    metrics = Metrics()
    lm = load_language_model(settings, metrics)
    embedder = load_embedder(settings)
    chatbot = None
    if settings.chat:
        kb = None
        if settings.kb:
            kb = KnowledgeBase.open(settings.kb, embedder=embedder)
        memory = None
        if settings.chat_memory:
            memory = Memory.open(embed=embedder.encode if embedder is not None else None,
                                 embedder_name=embedder.name if embedder is not None else None)
        chatbot = Chatbot(lm, kb, settings.chat_mode, time_limit=min(settings.request_timeout_s, 120.0),
                          memory=memory)
    return build_app(settings, lm, embedder, metrics, chatbot)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port; `sock.getsockname()[1]` says which)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserInputError(f"cannot listen on {host}:{port}: {e.strerror}", param="port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run(app: Any, sock: socket.socket, settings: ServeSettings) -> None:
    """Serve on `sock` until SIGINT/SIGTERM; then drain (running responses finish) and return."""
    import uvicorn  # the web server: only `torchbook serve` needs it

    config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=5, access_log=False,
                            limit_concurrency=settings.slots + settings.max_queue + 64,
                            timeout_graceful_shutdown=int(settings.request_timeout_s) + 5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:  # uvicorn waited for the running responses; whatever the engine still holds finishes now
        lm = app.state.server.lm
        if lm is not None:
            lm.engine.shutdown(drain=True, timeout=settings.request_timeout_s)
