"""The real check: `torchbook serve` with no MODEL serves the offline default chat model (SmolLM2-135M-Instruct)
through its own chat template, and the unmodified `openai` client gets a right, complete answer (it ends with the
model's end-of-turn token: finish_reason "stop"), streamed the same as whole; `torchbook-chat` answers an
arithmetic question right with its server-side calculator."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    env = {**os.environ, "TORCHBOOK_HOME": str(tmp_path_factory.mktemp("home")), "OMP_NUM_THREADS": "2"}
    process = subprocess.Popen([sys.executable, "-m", "torchbook", "serve", "--port", "0", "--embedder", "none"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", line)
    assert match, f"no address printed: {line!r}"
    yield openai.OpenAI(base_url=match.group(1), api_key="unused-on-loopback", max_retries=0, timeout=120)
    process.terminate()
    process.wait(60)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smollm2_answers_through_the_openai_client(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["SmolLM2-135M-Instruct", "torchbook-chat"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answer = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=40,
                                            temperature=0)
    text = answer.choices[0].message.content
    assert "Paris" in text and answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens < 40
    chunks = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=40,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchbook_chat_uses_its_calculator(client: openai.OpenAI) -> None:
    # 525.6 * 315 / 3942 = 42: the orchestrator computes it with the calculator and the model reads the result.
    messages = [{"role": "user", "content": "What is 525.6 * 315 / 3942?"}]
    answer = client.chat.completions.create(model="torchbook-chat", messages=messages)
    assert "42" in answer.choices[0].message.content
