"""The OpenAI-compatible HTTP API (chapter 15's deployment) on the serving engine: a FastAPI app.

Routes: `POST /v1/chat/completions` (server-sent events when `stream`), `POST /v1/completions`,
`POST /v1/embeddings`, `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, `GET /metrics` (Prometheus text),
and `/static/` (files of `torchbook/serve/static/`, for a web page). Errors have OpenAI's body,
`{"error": {"message", "type", "param", "code"}}`: 400 a bad request, 401 a missing or wrong API key, 404 an
unknown model or path, 413 a body over the limit, 429 over the key's rate limit, 503 the engine's queue is full
(backpressure: try again), 504 a generation over the time limit.

`Guard` (an ASGI middleware) checks every `/v1/` and `/metrics` request before the app reads it: the body's size,
the API key (when keys are required), the key's rate limit. A streaming client that disconnects cancels its request
at once (its slots are free from the engine's next step); a non-streaming one is noticed within 0.1 s.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from torchbook.chat.model import Turn
from torchbook.chat.orchestrator import Event, Reply
from torchbook.errors import TorchbookError, UserInputError
from torchbook.generate.constraints import Constraint, constraint_processor
from torchbook.generate.sampling import SamplingConfig
from torchbook.generate.serving import Busy, Delta, Handle, Request, Result
from torchbook.generate.tool_calls import HeldText, Tool, parse_tool_calls, render_tools, tool_style, tools_from_openai
from torchbook.hub.prompts import TemplateError
from torchbook.knowledge.embedder import Embedder
from torchbook.serve.chatbot import CHAT_MODEL, LOCAL_USER, Chatbot
from torchbook.serve.keys import KeyStore, RateLimiter
from torchbook.serve.metrics import Metrics
from torchbook.serve.models import LanguageModel, ServeSettings
from torchbook.serve.schemas import MAX_STOPS, ChatCompletionRequest, CompletionRequest, EmbeddingRequest, Sampling
from torchbook.serve.web import install as install_web

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
GUARDED = ("/v1/", "/metrics")
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics")
MAX_EMBEDDING_INPUTS = 2048
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error", 504: "timeout_error"}
# The engine's names for settings, as the API names them.
PARAMS = {"prompt": "messages", "json_schema": "response_format", "regex": "response_format",
          "grammar": "response_format", "tool_calls": "messages"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


class Guard:
    """ASGI middleware: body size, API key and rate limit for `/v1/` and `/metrics`; metrics of every answer."""

    def __init__(self, app: Any, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        label = path if path in ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        metrics = self.server.metrics

        async def counted_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                metrics.request(label, message["status"])
            await send(message)

        async def refuse(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
            await error_response(status, message, code=code, headers=headers)(scope, receive, counted_send)

        if not path.startswith(GUARDED):
            await self.app(scope, receive, counted_send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        settings = self.server.settings
        who, limit = LOCAL_USER, settings.rate_limit
        if self.server.require_keys:
            auth = headers.get("authorization", "")
            key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            record = self.server.keys.check(key) if key else None
            if record is None:
                await refuse(401, "Incorrect API key provided" if key else "You didn't provide an API key: send "
                             "'Authorization: Bearer KEY' (keys are made with `torchbook serve --add-key`)",
                             "invalid_api_key")
                return
            who, limit = record.id, record.rate_limit or settings.rate_limit
        scope.setdefault("state", {})["user"] = who  # whose request: the chatbot's memory is per key
        if limit:
            wait = self.server.limiter.allow(who, limit)
            if wait > 0:
                metrics.reject("rate_limit")
                await refuse(429, f"Rate limit reached: {limit} requests per minute; try again in {wait:.1f} s",
                             "rate_limit_exceeded", {"retry-after": str(max(1, round(wait)))})
                return
        too_large = f"The request body is over the server's limit of {settings.max_body_bytes} bytes"
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > settings.max_body_bytes:
            await refuse(413, too_large, "request_too_large")
            return
        # Read the whole body first (bounded), then hand it to the app; later receives (disconnects) pass through.
        body: list[dict[str, Any]] = []
        size = 0
        if scope["method"] in ("POST", "PUT", "PATCH"):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client left before sending its body
                size += len(message.get("body", b""))
                if size > settings.max_body_bytes:
                    await refuse(413, too_large, "request_too_large")
                    return
                body.append(message)
                if not message.get("more_body", False):
                    break

        async def replay() -> dict[str, Any]:
            return body.pop(0) if body else await receive()

        await self.app(scope, replay, counted_send)


class EventStream(Response):
    """Server-sent events from an async iterator of strings; `on_close` runs as soon as the client disconnects
    (a watcher task reads the connection while the events go out) and once more at the end."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.events, self.on_close = events, on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.on_close()

        watcher = asyncio.ensure_future(watch())
        try:
            async for event in self.events:
                if watcher.done():
                    break
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client is gone
            pass
        finally:
            watcher.cancel()
            self.on_close()
            with contextlib.suppress(Exception):
                await self.events.aclose()  # type: ignore[attr-defined]


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def stream_chunk(kind: str, completion_id: str, created: int, model: str, include_usage: bool,
                 choices: list[dict[str, Any]], usage_: dict[str, Any] | None = None) -> str:
    """One event of a stream; `usage` is present when given, and (as null until the last) with include_usage."""
    data: dict[str, Any] = {"id": completion_id, "object": kind, "created": created, "model": model,
                            "system_fingerprint": None, "choices": choices}
    if usage_ is not None or include_usage:
        data["usage"] = usage_
    return sse(data)


class Server:
    """The state behind the routes: the models, the metrics, the keys."""

    def __init__(self, settings: ServeSettings, lm: LanguageModel | None, embedder: Embedder | None,
                 metrics: Metrics, chatbot: Chatbot | None = None):
        self.settings, self.lm, self.embedder, self.metrics = settings, lm, embedder, metrics
        self.chatbot = chatbot
        self.keys = KeyStore(settings.keys_path)
        self.limiter = RateLimiter()
        self.require_keys = bool(settings.require_keys)
        self.draining = False

    def model_ids(self) -> list[str]:
        chat = CHAT_MODEL if self.chatbot is not None else None
        return [m for m in (self.lm.name if self.lm else None, chat, self.embedder_name) if m]

    @property
    def embedder_name(self) -> str | None:
        return self.embedder.base_name if self.embedder else None

    def language_model(self, name: str) -> LanguageModel:
        if self.lm is not None and name == self.lm.name:
            return self.lm
        raise APIError(404, f"The model '{name}' does not exist; this server has: {', '.join(self.model_ids())}",
                       "model", "model_not_found")

    # -- generation -----------------------------------------------------------------------------------------
    def submit(self, lm: LanguageModel, requests: list[Request]) -> list[Handle]:
        handles: list[Handle] = []
        try:
            for request in requests:
                handles.append(lm.engine.submit(request))
        except Busy as e:
            for handle in handles:
                handle.cancel()
            self.metrics.reject("busy")
            raise APIError(503, str(e), code="engine_overloaded", headers={"retry-after": "1"}) from None
        except UserInputError:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    async def results(self, handles: list[Handle], http: HTTPRequest) -> list[Result]:
        """Wait for the handles; cancel them if the client leaves or the time limit passes."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        try:
            for handle in handles:
                while not await asyncio.to_thread(handle.done.wait, 0.1):
                    if await http.is_disconnected():
                        raise APIError(400, "The client disconnected", code="client_disconnected")
                    if time.monotonic() > deadline:
                        raise APIError(504, f"The request took longer than the server's limit of "
                                       f"{self.settings.request_timeout_s:g} s", code="timeout")
        finally:
            for handle in handles:
                if not handle.done.is_set():
                    handle.cancel()
        results = [handle.result() for handle in handles]
        for result in results:
            self.record(result)
        return results

    def record(self, result: Result) -> None:
        self.metrics.generation(result.usage.prompt_tokens, result.usage.completion_tokens, result.first_token_s,
                                result.total_s)

    async def deltas(self, handles: list[Handle]) -> AsyncIterator[tuple[int, Delta]]:
        """The handles' deltas as they come, tagged with the handle's index; ends when every handle is done."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        queue: asyncio.Queue[tuple[int, Delta | None]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def pump(i: int, handle: Handle) -> None:  # in a worker thread: blocking reads of the engine's events
            while True:
                event = handle.events.get()
                loop.call_soon_threadsafe(queue.put_nowait, (i, event))
                if event is None:
                    return

        for i, handle in enumerate(handles):
            loop.run_in_executor(None, pump, i, handle)
        left = len(handles)
        while left:
            remaining = deadline - time.monotonic()
            try:
                i, event = await asyncio.wait_for(queue.get(), max(remaining, 0.001))
            except TimeoutError:
                raise APIError(504, f"The request took longer than the server's limit of "
                               f"{self.settings.request_timeout_s:g} s", code="timeout") from None
            if event is None:
                left -= 1
                error = handles[i].error
                if error is not None:
                    raise error
            else:
                yield i, event


def engine_requests(body: Sampling, prompts: list[list[int]], max_tokens: int | None, max_len: int,
                    logprobs: bool, top_logprobs: int, processors: list[Any] | None = None) -> list[Request]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop takes at most {MAX_STOPS} sequences, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise APIError(400, "stop sequences must not be empty", "stop")
    try:
        bias = {int(k): float(v) for k, v in (body.logit_bias or {}).items()}
    except ValueError:
        raise APIError(400, "logit_bias keys must be token ids (integers as strings)", "logit_bias") from None
    if any(not -100 <= v <= 100 for v in bias.values()):
        raise APIError(400, "logit_bias values must be in [-100, 100]", "logit_bias")
    sampling = SamplingConfig(temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
                              presence_penalty=body.presence_penalty or 0.0,
                              frequency_penalty=body.frequency_penalty or 0.0, logit_bias=bias)
    return [Request(prompt, max_tokens or max_len, sampling, stops, n=body.n, logprobs=logprobs,
                    top_logprobs=top_logprobs, processors=processors or ()) for prompt in prompts]


def message_content(message: Any, i: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.type != "text":
            raise APIError(400, f"messages[{i}] holds a {part.type!r} part; this server reads text only",
                           f"messages[{i}].content")
        parts.append(part.text)
    return "".join(parts)


def chat_messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    messages = []
    for i, message in enumerate(body.messages):
        role = "system" if message.role == "developer" else message.role
        entry: dict[str, Any] = {"role": role, "content": message_content(message, i)}
        if message.tool_calls:
            entry["tool_calls"] = [c.model_dump() for c in message.tool_calls]
        if message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        if message.name:
            entry["name"] = message.name
        messages.append(entry)
    return messages


def usage(results: list[Result]) -> dict[str, Any]:
    prompt = sum(r.usage.prompt_tokens for r in results)
    completion = sum(r.usage.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(r.usage.cached_tokens for r in results)}}


def finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


class ChatPlan:
    """What a chat request asks beyond plain text: its prompt (with the tools, in the checkpoint's own tools
    section or the Hermes fallback: `torchbook.generate.tool_calls.render_tools`), the constraint on its output
    (`tool_choice` "required" or a named function: calls of the declared tools, arguments following their
    schemas; `response_format` json_object or json_schema), and how a reply becomes OpenAI's message."""

    def __init__(self, lm: LanguageModel, body: ChatCompletionRequest):
        self.tools: list[Tool] = tools_from_openai(body.tools or [])
        choice = body.tool_choice
        if choice is not None and not self.tools and choice != "none":
            raise APIError(400, "tool_choice is only allowed when tools are given", "tool_choice")
        if choice == "none":
            self.tools = []
        self.style = tool_style(lm.meta.get("chat_template"))
        messages = chat_messages(body)
        if self.tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            text = render_tools(messages, self.tools, lm.meta)
            self.prompt = list(lm.tokenizer.encode(text, add_special_tokens=False).ids)
        else:
            self.prompt = lm.chat_ids(messages)
        self.constraint: Constraint | None = None
        if self.tools and choice not in (None, "auto"):
            names = [t.name for t in self.tools]
            if choice == "required":
                self.constraint = Constraint.tool_calls(self.tools, self.style)
            elif isinstance(choice, dict) and choice.get("type") == "function" and \
                    isinstance(choice.get("function"), dict) and choice["function"].get("name") in names:
                self.constraint = Constraint.tool_calls(self.tools, self.style, choice["function"]["name"])
            else:
                raise APIError(400, f"tool_choice must be none, auto, required or {{'type': 'function', "
                               f"'function': {{'name': ...}}}} naming one of the tools ({', '.join(names)})",
                               "tool_choice")
        fmt = body.response_format or {}
        kind = fmt.get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise APIError(400, f"response_format type {kind!r} is not supported; accepted: text, json_object, "
                           "json_schema", "response_format")
        if kind != "text" and self.constraint is not None:
            raise APIError(400, "response_format and a required tool call cannot constrain one reply together",
                           "response_format")
        if kind == "json_object":
            self.constraint = Constraint.any_json(object_only=True)
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise APIError(400, "response_format json_schema needs {'json_schema': {'name': ..., 'schema': "
                               "{...}}}", "response_format")
            self.constraint = Constraint.json_schema(spec.get("schema") or {"type": "object"})

    def message(self, text: str, reason: str) -> tuple[dict[str, Any], str]:
        """OpenAI's assistant message for a reply, and its finish_reason ("tool_calls" when it holds calls)."""
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if self.tools:
            content, calls = parse_tool_calls(text, self.style, tools=self.tools)
            if calls:
                message["content"] = content or None
                message["tool_calls"] = [call.to_openai() for call in calls]
                return message, "tool_calls"
        return message, finish_reason(reason)


def build_app(settings: ServeSettings, lm: LanguageModel | None, embedder: Embedder | None = None,
              metrics: Metrics | None = None, chatbot: Chatbot | None = None) -> FastAPI:
    """The app around loaded, started models (`torchbook.serve.models`) and, optionally, the chatbot system."""
    server = Server(settings, lm, embedder, metrics or Metrics(), chatbot)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Blocking reads of the engine's events run in worker threads: enough for every slot and queued request.
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(settings.slots + settings.max_queue + 16,
                                                     thread_name_prefix="torchbook-serve"))
        server.draining = False
        yield
        server.draining = True  # the engine is drained by `torchbook.serve.server.run` once the responses ended

    app = FastAPI(title="torchbook", version="1", lifespan=lifespan,
                  description="An OpenAI-compatible API on torchbook's serving engine (continuous batching).")
    app.state.server = server

    # -- errors as OpenAI sends them --------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return error_response(400, "We could not parse the JSON body of your request", None, "invalid_json")
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}" if param else \
            f"Invalid request: {first.get('msg', 'invalid')}"
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(HTTPException)
    async def http_error(request: HTTPRequest, e: HTTPException) -> JSONResponse:
        message = {404: f"Invalid URL ({request.method} {request.url.path})",
                   405: f"Method {request.method} is not allowed on {request.url.path}"}.get(e.status_code,
                                                                                          str(e.detail))
        return error_response(e.status_code, message, None, None, getattr(e, "headers", None))

    @app.exception_handler(TorchbookError)
    async def user_error(request: HTTPRequest, e: TorchbookError) -> JSONResponse:
        if isinstance(e, Busy):
            return error_response(503, str(e), None, "engine_overloaded", {"retry-after": "1"})
        code = "context_length_exceeded" if "tokens per request" in str(e) else "invalid_value"
        chat = request.url.path.endswith("/chat/completions")
        return error_response(400, str(e), PARAMS.get(e.param or "", e.param) if chat else e.param, code)

    @app.exception_handler(TemplateError)
    async def template_error(request: HTTPRequest, e: TemplateError) -> JSONResponse:
        return error_response(400, f"The model's chat template rejected the messages: {e}", "messages",
                              "invalid_value")

    @app.exception_handler(Exception)
    async def server_error(request: HTTPRequest, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return error_response(500, f"The server failed on this request ({type(e).__name__})", None, "server_error")

    # -- routes -------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        if server.draining:
            return error_response(503, "The server is shutting down", None, "shutting_down")
        return JSONResponse({"status": "ok", "models": server.model_ids()})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_text() -> PlainTextResponse:
        text = server.metrics.text(lm.engine if lm is not None else None)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": int(server.metrics.started), "owned_by": "torchbook"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(m) for m in server.model_ids()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id not in server.model_ids():
            raise APIError(404, f"The model '{model_id}' does not exist", "model", "model_not_found")
        return model_card(model_id)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest) -> Any:
        if body.model == CHAT_MODEL and server.chatbot is not None:
            return await chatbot_completion(server.chatbot, body, getattr(http.state, "user", LOCAL_USER))
        lm = server.language_model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        plan = ChatPlan(lm, body)
        processors = []
        if plan.constraint is not None:  # compiling a grammar for a vocabulary takes a while the first time
            processors = [await asyncio.to_thread(constraint_processor, plan.constraint, lm.tokenizer,
                                                  lm.meta.get("end_token_ids") or (), lm.engine.vocab)]
        requests = engine_requests(body, [plan.prompt], body.max_completion_tokens or body.max_tokens,
                                   lm.engine.max_len, body.logprobs, body.top_logprobs or 0, processors)
        handles = server.submit(lm, requests)
        completion_id = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(chat_stream(lm, handles[0], body, plan, completion_id, created, include_usage),
                               lambda: cancel_unfinished(handles))
        result = (await server.results(handles, http))[0]
        choices = []
        for c in result.choices:
            message, reason = plan.message(c.text, c.finish_reason)
            choices.append({"index": c.index, "message": message, "finish_reason": reason,
                            "logprobs": {"content": chat_logprobs(lm, c.tokens, c.logprobs, c.top_logprobs)}
                            if body.logprobs else None})
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": lm.name,
                "choices": choices, "usage": usage([result]), "system_fingerprint": None}

    async def chat_stream(lm: LanguageModel, handle: Handle, body: ChatCompletionRequest, plan: ChatPlan,
                          completion_id: str, created: int, include_usage: bool) -> AsyncIterator[str]:
        chunk = functools.partial(stream_chunk, "chat.completion.chunk", completion_id, created, lm.name,
                                  include_usage)

        try:
            for i in range(body.n):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            held = [HeldText() for _ in range(body.n)]
            async for _, delta in server.deltas([handle]):
                if plan.tools:  # text streams until a tool call may start; calls are sent whole at the end
                    piece = held[delta.choice].push(delta.text) if plan.constraint is None else ""
                    if piece:
                        yield chunk([{"index": delta.choice, "delta": {"content": piece}, "logprobs": None,
                                      "finish_reason": None}])
                    continue
                logprobs = None
                if body.logprobs and delta.token >= 0:
                    top = [delta.top_logprobs] if delta.top_logprobs is not None else None
                    logprobs = {"content": chat_logprobs(lm, [delta.token], [delta.logprob or 0.0], top)}
                if delta.text or logprobs:
                    yield chunk([{"index": delta.choice, "delta": {"content": delta.text}, "logprobs": logprobs,
                                  "finish_reason": None}])
            result = handle.result()
            server.record(result)
            last = len(result.choices) - 1
            for c in result.choices:
                message, reason = plan.message(c.text, c.finish_reason)
                if plan.tools:
                    rest = held[c.index].rest(message["content"] or "")
                    if rest:
                        yield chunk([{"index": c.index, "delta": {"content": rest}, "logprobs": None,
                                      "finish_reason": None}])
                    if message.get("tool_calls"):
                        calls = [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
                        yield chunk([{"index": c.index, "delta": {"tool_calls": calls}, "logprobs": None,
                                      "finish_reason": None}])
                final = usage([result]) if c.index == last and not include_usage else None
                yield chunk([{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": reason}], final)
            if include_usage:
                yield chunk([], usage([result]))
        except APIError as e:
            yield sse(error_body(e.status, e.message, e.param, e.code))
        yield sse("[DONE]")

    async def chatbot_completion(chatbot: Chatbot, body: ChatCompletionRequest, user: str) -> Any:
        """A turn of the chatbot system: its own tools run on the server; the answer streams as it is written."""
        for name, value in (("tools", body.tools), ("response_format", body.response_format),
                            ("logprobs", body.logprobs or None), ("n", None if body.n == 1 else body.n)):
            if value:
                raise APIError(400, f"{CHAT_MODEL} runs its own tools and writes one plain answer: {name} is not "
                               "accepted for it", name)
        messages = chat_messages(body)
        completion_id = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())

        def answer(reply: Reply) -> tuple[dict[str, Any], str]:
            tokens = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                      "total_tokens": reply.prompt_tokens + reply.completion_tokens}
            return tokens, "length" if reply.finish_reason == "length" else "stop"

        turn = Turn(chatbot.model.engine)
        if not body.stream:
            try:
                reply = await asyncio.to_thread(chatbot.respond, messages, None, user, turn)
            finally:  # a cancelled request (the client left) cancels its turn
                turn.cancel()
            tokens, reason = answer(reply)
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": CHAT_MODEL,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text, "refusal": None},
                                 "logprobs": None, "finish_reason": reason}],
                    "usage": tokens, "system_fingerprint": None, "sources": reply.sources}

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def run() -> None:  # in a worker thread: the turn, its answer's pieces passed to the event loop
            try:
                reply: Any = chatbot.respond(messages, lambda event: loop.call_soon_threadsafe(
                    queue.put_nowait, event) if event.kind == "text" else None, user, turn)
            except Exception as e:  # reported in the stream
                reply = e
            loop.call_soon_threadsafe(queue.put_nowait, reply)

        async def events() -> AsyncIterator[str]:
            def chunk(delta: dict[str, Any], reason: str | None = None, tokens: dict[str, Any] | None = None) -> str:
                return stream_chunk("chat.completion.chunk", completion_id, created, CHAT_MODEL, False,
                                    [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}], tokens)

            yield chunk({"role": "assistant", "content": ""})
            sent = ""
            while True:
                item = await queue.get()
                if isinstance(item, Event):
                    sent += item.text
                    yield chunk({"content": item.text})
                    continue
                if isinstance(item, Exception):
                    status = 503 if isinstance(item, Busy) else 400 if isinstance(item, TorchbookError) else 500
                    yield sse(error_body(status, str(item)))
                else:
                    tokens, reason = answer(item)
                    if item.text.startswith(sent) and len(item.text) > len(sent):  # the sources list, at the end
                        yield chunk({"content": item.text[len(sent):]})
                    yield chunk({}, reason, tokens)
                break
            yield sse("[DONE]")

        loop.run_in_executor(None, run)
        return EventStream(events(), turn.cancel)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, http: HTTPRequest) -> Any:
        lm = server.language_model(body.model)
        if body.echo:
            raise APIError(400, "echo is not supported by this server", "echo")
        if body.suffix:
            raise APIError(400, "suffix (fill in the middle) is not supported by this server", "suffix")
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of must equal n on this server (each choice is returned)", "best_of")
        prompt: list[Any] = [body.prompt] if isinstance(body.prompt, str) or (
            body.prompt and isinstance(body.prompt[0], int)) else list(body.prompt)
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        prompts = []
        for p in prompt:
            ids = lm.tokenizer.encode(p, add_special_tokens=False).ids if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "prompt must not be empty", "prompt")
            prompts.append(ids)
        top = body.logprobs or 0
        requests = engine_requests(body, prompts, body.max_tokens or 16, lm.engine.max_len,
                                   body.logprobs is not None, top)
        handles = server.submit(lm, requests)
        completion_id = "cmpl-" + secrets.token_hex(12)
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(completion_stream(lm, handles, body, completion_id, created, include_usage),
                               lambda: cancel_unfinished(handles))
        results = await server.results(handles, http)
        choices = []
        for r, result in enumerate(results):
            for c in result.choices:
                choices.append({"index": r * body.n + c.index, "text": c.text, "finish_reason":
                                finish_reason(c.finish_reason), "logprobs": completion_logprobs(
                                    lm, c.tokens, c.logprobs, c.top_logprobs) if body.logprobs is not None else None})
        return {"id": completion_id, "object": "text_completion", "created": created, "model": lm.name,
                "choices": choices, "usage": usage(results), "system_fingerprint": None}

    async def completion_stream(lm: LanguageModel, handles: list[Handle], body: CompletionRequest,
                                completion_id: str, created: int, include_usage: bool) -> AsyncIterator[str]:
        chunk = functools.partial(stream_chunk, "text_completion", completion_id, created, lm.name, include_usage)

        try:
            async for r, delta in server.deltas(handles):
                logprobs = None
                if body.logprobs is not None and delta.token >= 0:
                    top = [delta.top_logprobs] if delta.top_logprobs is not None else None
                    logprobs = completion_logprobs(lm, [delta.token], [delta.logprob or 0.0], top)
                if delta.text or logprobs:
                    yield chunk([{"index": r * body.n + delta.choice, "text": delta.text, "logprobs": logprobs,
                                  "finish_reason": None}])
            results = [handle.result() for handle in handles]
            for result in results:
                server.record(result)
            finals = [(r * body.n + c.index, c.finish_reason) for r, result in enumerate(results)
                      for c in result.choices]
            for k, (index, reason) in enumerate(finals):
                final = usage(results) if k == len(finals) - 1 and not include_usage else None
                yield chunk([{"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason(reason)}],
                            final)
            if include_usage:
                yield chunk([], usage(results))
        except APIError as e:
            yield sse(error_body(e.status, e.message, e.param, e.code))
        yield sse("[DONE]")

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        if embedder is None or body.model != server.embedder_name:
            raise APIError(404, f"The model '{body.model}' does not exist or is not an embedding model; this server "
                           f"embeds with: {server.embedder_name or '(none)'}", "model", "model_not_found")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or any(not isinstance(t, str) for t in texts):
            raise APIError(400, "input must be a string or a list of strings (token ids are not accepted)", "input")
        if len(texts) > MAX_EMBEDDING_INPUTS or any(not t for t in texts):
            raise APIError(400, f"input must hold 1 to {MAX_EMBEDDING_INPUTS} non-empty strings", "input")
        if body.dimensions not in (None, embedder.dim):
            raise APIError(400, f"{server.embedder_name} gives {embedder.dim} dimensions; dimensions must be that",
                           "dimensions")
        vectors, tokens = await asyncio.to_thread(embed, embedder, texts)  # type: ignore[arg-type]
        data = []
        for i, vector in enumerate(vectors):
            value: Any = (base64.b64encode(vector.astype("<f4").tobytes()).decode()
                          if body.encoding_format == "base64" else vector.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": server.embedder_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    if STATIC.is_dir():  # #25's web page lives here
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    install_web(app, server)  # the web page (#25): / and its /api/ routes
    app.add_middleware(Guard, server=server)
    return app


def cancel_unfinished(handles: list[Handle]) -> None:
    for handle in handles:
        if not handle.done.is_set():
            handle.cancel()


def embed(embedder: Embedder, texts: list[str]) -> tuple[np.ndarray, int]:
    return embedder.encode(texts), sum(len(ids) for ids in embedder.token_ids(texts))


def chat_logprobs(lm: LanguageModel, tokens: list[int], logprobs: list[float] | None,
                  top: list[dict[int, float]] | None) -> list[dict[str, Any]]:
    out = []
    for k, (token, logprob) in enumerate(zip(tokens, logprobs or [])):
        text = lm.token_text(token)
        alternatives = [{"token": lm.token_text(t), "logprob": v, "bytes": list(lm.token_text(t).encode())}
                        for t, v in (top[k] if top and k < len(top) else {}).items()]
        out.append({"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": alternatives})
    return out


def completion_logprobs(lm: LanguageModel, tokens: list[int], logprobs: list[float] | None,
                        top: list[dict[int, float]] | None) -> dict[str, Any]:
    texts = [lm.token_text(t) for t in tokens]
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {"tokens": texts, "token_logprobs": list(logprobs or [])[: len(texts)],
            "top_logprobs": [{lm.token_text(t): v for t, v in row.items()} for row in (top or [])][: len(texts)]
            if top else None, "text_offset": offsets}
