"""schemathesis fuzzes the server's OpenAPI description (every route, bounded examples, valid and invalid
requests) in this process, against a tiny random GPT with a character tokenizer: no answer is a 500, and the
engine still answers afterwards (no crash, no stuck slot)."""

from __future__ import annotations

import string

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from torchbook.data.tokenizers import char_tokenizer
from torchbook.generate.serving import Request
from torchbook.models.gpt import GPT, GPTConfig
from torchbook.serve.app import build_app
from torchbook.serve.metrics import Metrics
from torchbook.serve.models import LanguageModel, ServeSettings

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_app():  # type: ignore[no-untyped-def]
    tokenizer = char_tokenizer(string.printable)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2, d_model=16, d_ff=32,
                          max_len=256)).eval()
    settings_ = ServeSettings(slots=4, max_len=256, max_queue=8, max_body_bytes=50_000, request_timeout_s=30,
                              embedder=None)
    metrics = Metrics()
    lm = LanguageModel(model, tokenizer, {"chat_template": None, "end_token_ids": []}, "tiny", metrics, settings_)
    lm.engine.start()
    return build_app(settings_, lm, None, metrics), lm


APP, LM = tiny_app()
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)
SCHEMA.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
                                deterministic=True)


@SCHEMA.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error(case: schemathesis.Case) -> None:
    if isinstance(case.body, dict):  # mostly the served model (a random name is a 404 and goes no further)
        if "model" in case.body and hash(repr(case.body)) % 4:
            case.body["model"] = "tiny"
        if isinstance(case.body.get("max_tokens"), int):
            case.body["max_tokens"] = min(case.body["max_tokens"], 8)  # bounded work per example
    case.call_and_validate(checks=[not_a_server_error])


def test_engine_still_serves_after_fuzzing() -> None:
    handle = LM.engine.submit(Request("abc", max_tokens=3))
    assert len(handle.result(timeout=30).choices[0].tokens) == 3
    with LM.engine.lock:
        assert not LM.engine.waiting and all(owner is None for owner in LM.engine.owner)
