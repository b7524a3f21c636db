"""The time limit, in process: on a model that takes 0.2 s per step, a 5-token request cannot finish in 0.3 s. The
answer is a 504 with OpenAI's body (a stream ends with an error event), and the request is cancelled: the engine
stops working on it instead of finishing it."""

from __future__ import annotations

import json
import string
import time

import pytest
import torch
from starlette.testclient import TestClient

from torchbook.data.tokenizers import char_tokenizer
from torchbook.models.gpt import GPT, GPTConfig
from torchbook.serve.app import build_app
from torchbook.serve.metrics import Metrics
from torchbook.serve.models import LanguageModel, ServeSettings

pytestmark = pytest.mark.usefixtures("one_thread")


class SlowGPT(GPT):
    def slot_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.2)
        return super().slot_step(*args, **kwargs)


def test_generation_over_the_time_limit_is_a_504_and_cancelled() -> None:
    tokenizer = char_tokenizer(string.printable)
    torch.manual_seed(0)
    model = SlowGPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2, d_model=16, d_ff=32,
                          max_len=64)).eval()
    settings = ServeSettings(slots=2, max_len=64, max_queue=8, request_timeout_s=0.3, embedder=None, chat=False)
    metrics = Metrics()
    lm = LanguageModel(model, tokenizer, {"chat_template": None, "end_token_ids": []}, "tiny", metrics, settings)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    lm.engine.start()
    with TestClient(build_app(settings, lm, None, metrics)) as client:
        answer = client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 504 and answer.json()["error"]["code"] == "timeout"
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
        events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert json.loads(events[-2])["error"]["code"] == "timeout" and events[-1] == "[DONE]"
    time.sleep(0.5)
    with lm.engine.lock:
        assert not lm.engine.busy  # both cancelled: nothing waits or runs
    assert sum(metrics.batch_rows.values()) < 8  # far from the 2 x 5 decoding steps of two finished requests
    lm.engine.shutdown()
