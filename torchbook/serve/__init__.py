"""`torchbook serve` (chapter 15): an OpenAI-compatible HTTP API on the serving engine, secure by default.

- `ServeSettings`: the model, the engine's sizes, the limits (body size, time, rate), the key rule.
- `prepare(settings)`: checks the key rule, loads and warms the model (and the embedder), builds the app
  (`torchbook.serve.app.build_app`); `listen(host, port)` then `run(app, sock, settings)` serve it.
- `KeyStore`: API keys, stored as SHA-256 hashes under `paths.home()/serve/`.

The routes, the error bodies and the limits are described in `torchbook.serve.app` and docs/serve.md.
"""

from torchbook.serve.app import build_app
from torchbook.serve.keys import KeyStore
from torchbook.serve.metrics import Metrics
from torchbook.serve.models import LanguageModel, ServeSettings
from torchbook.serve.server import check_security, is_loopback, listen, prepare, run

__all__ = ["KeyStore", "LanguageModel", "Metrics", "ServeSettings", "build_app", "check_security", "is_loopback",
           "listen", "prepare", "run"]
