"""`torchbook serve` (chapter 15): an OpenAI-compatible HTTP API on the serving engine, secure by default.

- `torchbook.serve.models`: `ServeSettings` (the model, the engine's sizes, the limits, the key rule), loading and
  warming the language model (`LanguageModel`, on the continuous-batching engine) and the embedder.
- `torchbook.serve.app`: `build_app(...)`, the FastAPI app (routes, OpenAI's error bodies, the `Guard` middleware
  for body size, API keys and rate limits, server-sent events).
- `torchbook.serve.server`: `check_security`, `prepare` (load, warm, build), `listen`, `run` (uvicorn; SIGTERM
  drains).
- `torchbook.serve.keys`: `KeyStore` (API keys stored as SHA-256 hashes under `paths.home()/serve/`) and the
  per-key `RateLimiter`; `torchbook.serve.metrics`: the Prometheus text of `/metrics`.

This package's `__init__` imports nothing, so that key management (`torchbook serve --add-key`) starts without
loading torch or FastAPI. docs/serve.md describes the API.
"""
