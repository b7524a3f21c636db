"""What the server serves: a language model on the continuous-batching engine, and the knowledge base's encoder.

`LanguageModel` holds a loaded checkpoint (`torchbook.hub.load`), its chat template and end tokens, and an
`Engine` (`torchbook.generate.serving`) that counts each decoding step's rows in the server's `Metrics`.
`load_language_model` / `load_embedder` load and warm them: the server opens its port only after both answered once.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchbook.errors import CheckpointError, DataUnavailable
from torchbook.generate.serving import Engine, Request
from torchbook.hub import default_chat_model, load
from torchbook.hub.prompts import chat_token_ids
from torchbook.knowledge.embedder import Embedder
from torchbook.serve.metrics import Metrics

log = logging.getLogger(__name__)

WARM_PROMPT = [{"role": "user", "content": "Hello"}]


@dataclass
class ServeSettings:
    """How `torchbook serve` runs. `model`: a run folder, model folder, Hugging Face folder, GGUF file or Hub id
    (None: the offline default chat model, SmolLM2-135M-Instruct); `name`: the model's id in the API (default: the
    file or folder name). `slots`, `max_len`, `max_queue`, `prefill_chunk`, `dense_copy`: the engine's (the last:
    a quantized model keeps a bfloat16 copy of its weights for batched steps). `embedder`: "default"
    (all-MiniLM-L6-v2), a BERT-family folder, or None (no /v1/embeddings). Limits: `max_body_bytes` per request,
    `request_timeout_s` per generation, `rate_limit` requests per minute per API key (a key's own limit first;
    None: no limit). `require_keys`: None means required unless the host is a loopback address. `chat`: also serve
    the chatbot system as the model `torchbook-chat` (`chat_mode`, its knowledge base `kb`)."""

    model: str | None = None
    name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    slots: int = 8
    max_len: int = 2048
    max_queue: int = 64
    prefill_chunk: int = 128
    device: str = "cpu"
    quantize: str | None = None
    dense_copy: bool = True
    embedder: str | None = "default"
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 600.0
    rate_limit: int | None = None
    require_keys: bool | None = None
    keys_path: Path | None = None
    chat: bool = True  # serve the chatbot system as `torchbook-chat`
    chat_mode: str = "orchestrator"  # or "model": the model decides which tools to call
    kb: str | None = None  # a knowledge base (its location) for torchbook-chat's retrieval
    chat_memory: bool = True  # torchbook-chat reads each API key's remembered facts (paths.home()/chat/)


class MeteredEngine(Engine):
    """The serving engine, counting how many requests' rows each decoding step batched."""

    def __init__(self, *args: Any, metrics: Metrics, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.metrics = metrics

    def _forward(self, decoding: list[Any], chunks: list[Any]) -> None:
        if decoding:
            self.metrics.decode_step(len(decoding))
        super()._forward(decoding, chunks)


class LanguageModel:
    """A chat or completion model behind the engine."""

    def __init__(self, model: Any, tokenizer: Any, meta: dict[str, Any], name: str, metrics: Metrics,
                 settings: ServeSettings):
        if tokenizer is None:
            raise CheckpointError(f"{name!r} has no tokenizer: the server needs one to read and write text")
        self.name, self.tokenizer, self.meta = name, tokenizer, meta
        self.engine = MeteredEngine(model, tokenizer, slots=settings.slots, max_len=settings.max_len,
                                    max_queue=settings.max_queue, prefill_chunk=settings.prefill_chunk,
                                    end_ids=meta.get("end_token_ids") or (), dense_copy=settings.dense_copy,
                                    metrics=metrics)

    def chat_ids(self, messages: list[dict[str, Any]], **variables: Any) -> list[int]:
        """The prompt's token ids under the checkpoint's own chat template."""
        return chat_token_ids(self.tokenizer, messages, self.meta, **variables)

    def token_text(self, token: int) -> str:
        return str(self.tokenizer.decode([token], skip_special_tokens=False))

    def warm(self) -> None:
        """One short request through the engine thread (the first call's allocations happen before any client's)."""
        handle = self.engine.submit(Request(self.chat_ids(WARM_PROMPT), max_tokens=2))
        handle.result(timeout=600)


def model_name(path: str) -> str:
    """A model's id in the API: the folder's name, or a GGUF file's name without its quantization suffix
    (SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct)."""
    p = Path(path)
    if p.suffix == ".gguf":
        return re.sub(r"\.(Q\d\w*|IQ\d\w*|F16|F32|BF16)$", "", p.stem, flags=re.IGNORECASE)
    return p.name or str(path)


def load_language_model(settings: ServeSettings, metrics: Metrics) -> LanguageModel:
    path = settings.model or str(default_chat_model())
    loaded = load(path, map_location=settings.device, quantize=settings.quantize)
    if not getattr(loaded.model, "supports_slots", False):
        raise CheckpointError(f"{path!r} holds a {type(loaded.model).__name__}; the server needs a decoder-only "
                              "language model (GPT-2, Llama, SmolLM2, ...)")
    lm = LanguageModel(loaded.model, loaded.tokenizer, loaded.meta, settings.name or model_name(path),
                       metrics, settings)
    lm.engine.start()
    lm.warm()
    log.info("loaded %s (%s slots of %s tokens)", lm.name, settings.slots, lm.engine.max_len)
    return lm


def load_embedder(settings: ServeSettings) -> Embedder | None:
    if settings.embedder in (None, "", "none"):
        return None
    try:
        embedder = Embedder.load(None if settings.embedder == "default" else settings.embedder)
    except DataUnavailable as e:
        if settings.embedder != "default":
            raise
        log.warning("no /v1/embeddings: %s", e)
        return None
    embedder.encode(["warm"])
    return embedder
