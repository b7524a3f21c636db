"""`torchbook serve` as a real server process on a loopback port, driven by the official `openai` client
(unmodified): a tiny random Llama-style GPT with SmolLM2's tokenizer, and all-MiniLM-L6-v2 for embeddings.

Answers are checked against the same weights run in this process (greedy tokens and their log-probabilities),
embeddings against `Embedder.encode`; errors carry OpenAI's status codes and bodies; two streams share decoding
steps (/metrics); a client that leaves mid-stream frees its slot at once; SIGTERM lets a running stream finish.
One server for the module (it starts in a few seconds), its keys under a temporary $TORCHBOOK_HOME."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import torch

from torchbook.data.tokenizers import save_tokenizer
from torchbook.hub import default_chat_model, load, save_model
from torchbook.hub.loading import load_gguf_tokenizer
from torchbook.hub.prompts import chat_token_ids
from torchbook.models.gpt import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 512


def tiny_model_folder(folder: Path) -> Path:
    """A random 2-layer Llama-style GPT over SmolLM2's 49,152-token vocabulary, saved with its tokenizer."""
    tokenizer = load_gguf_tokenizer(default_chat_model()).tokenizer
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64,
                       max_len=MAX_LEN, norm="rmsnorm", mlp="swiglu", positions="rope", qkv_bias=False,
                       out_bias=False, mlp_bias=False, tie_embeddings=False)
    model = GPT(config).eval()
    with torch.no_grad():  # a wider spread of logits than the init's, as a trained model has
        for name, p in model.named_parameters():
            if "embed" not in name:
                p.mul_(2.0)
    save_model(model, folder)
    save_tokenizer(tokenizer, folder)
    return folder


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "torchbook", *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


class Server:
    def __init__(self, process: subprocess.Popen[str], url: str, key: str, limited_key: str, folder: Path):
        self.process, self.url, self.key, self.limited_key, self.folder = process, url, key, limited_key, folder

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or self.key, max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", headers={"authorization": f"Bearer {self.key}"}).text
        return {m[1]: float(m[2]) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M) if "#" not in m[1]} | \
            {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+\{[^}]*\}) (\S+)$", text, re.M)}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("serve")
    folder = tiny_model_folder(root / "tiny")
    env = {**os.environ, "TORCHBOOK_HOME": str(root / "home"), "OMP_NUM_THREADS": "1"}
    made = cli(env, "serve", "--add-key", "tests")
    assert made.returncode == 0, made.stderr
    key = made.stdout.split()[-1]
    limited = cli(env, "serve", "--add-key", "limited", "--key-rate-limit", "3").stdout.split()[-1]
    stored = (root / "home" / "serve" / "api_keys.json").read_text()
    assert key.startswith("tb-") and key not in stored and limited not in stored  # hashes only
    assert oct((root / "home" / "serve" / "api_keys.json").stat().st_mode)[-3:] == "600"
    process = subprocess.Popen(
        [sys.executable, "-m", "torchbook", "serve", str(folder), "--name", "tiny", "--port", "0", "--require-keys",
         "--slots", "4", "--max-len", str(MAX_LEN), "--max-queue", "2", "--max-body", "100000"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert process.stdout is not None
    line = process.stdout.readline()  # printed once the model is loaded and warmed and the port is listening
    match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
    assert match, f"no address printed: {line!r} {process.stderr.read() if process.poll() is not None else ''}"
    yield Server(process, match.group(1), key, limited, folder)
    if process.poll() is None:
        process.kill()
    process.wait(30)


@pytest.fixture(scope="module")
def reference(server: Server):  # type: ignore[no-untyped-def]
    """The same weights in this process."""
    return load(server.folder)


def greedy(reference, prompt: list[int], n: int) -> tuple[list[int], list[float]]:  # type: ignore[no-untyped-def]
    tokens, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logp = reference.model(torch.tensor([tokens]))[0, -1].log_softmax(-1)
            tokens.append(int(logp.argmax()))
            logprobs.append(float(logp.max()))
    return tokens[len(prompt):], logprobs


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def test_health_models_and_ready_at_once(server: Server) -> None:
    # The port opened only after the model was warmed: the first request answers at once, no waiting loop.
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    ids = [m.id for m in server.client().models.list()]
    assert ids == ["tiny", "all-MiniLM-L6-v2"]
    assert server.client().models.retrieve("tiny").id == "tiny"


def test_chat_equals_the_weights_greedy_logprobs_n_usage(server: Server, reference) -> None:  # type: ignore[no-untyped-def]
    answer = server.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0,
                                                     n=2, logprobs=True, top_logprobs=3)
    prompt = chat_token_ids(reference.tokenizer, MESSAGES, reference.meta)
    tokens, logprobs = greedy(reference, prompt, 8)
    assert [c.message.content for c in answer.choices] == [reference.tokenizer.decode(tokens)] * 2
    assert [c.finish_reason for c in answer.choices] == ["length", "length"]
    assert answer.usage.prompt_tokens == len(prompt) and answer.usage.completion_tokens == 16
    assert answer.usage.total_tokens == len(prompt) + 16
    content = answer.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(logprobs, abs=1e-4)
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5)
               for c in content)


def test_stream_matches_and_ends_with_usage(server: Server) -> None:
    client = server.client()
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    with_usage = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 5  # OpenAI's own shape


def test_stop_and_seed(server: Server) -> None:
    client = server.client()
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30, temperature=0)
    text = full.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]
    sampled = [client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, temperature=1.0,
                                              seed=seed).choices[0].message.content for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_completions(server: Server, reference) -> None:  # type: ignore[no-untyped-def]
    client = server.client()
    answer = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0,
                                       logprobs=2)
    prompt = reference.tokenizer.encode("Once upon a time", add_special_tokens=False).ids
    tokens, logprobs = greedy(reference, prompt, 6)
    assert answer.choices[0].text == reference.tokenizer.decode(tokens)
    assert answer.choices[0].logprobs.token_logprobs == pytest.approx(logprobs, abs=1e-4)
    assert answer.usage.completion_tokens == 6
    two = client.completions.create(model="tiny", prompt=["a b", "c d"], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in two.choices] == [0, 1, 2, 3] and two.usage.completion_tokens == 12
    streamed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == answer.choices[0].text


def test_embeddings_equal_the_encoder(server: Server) -> None:
    from torchbook.knowledge.embedder import Embedder

    texts = ["A cat sits on the mat.", "Gradient descent minimises a loss."]
    answer = server.client().embeddings.create(model="all-MiniLM-L6-v2", input=texts)  # base64, as the client asks
    expected = Embedder.load().encode(texts)
    got = torch.tensor([d.embedding for d in answer.data])
    assert got.shape == (2, 384) and torch.allclose(got, torch.from_numpy(expected), atol=1e-5)
    plain = httpx.post(server.url + "/v1/embeddings", headers={"authorization": f"Bearer {server.key}"},
                       json={"model": "all-MiniLM-L6-v2", "input": texts[0], "encoding_format": "float"}).json()
    assert plain["data"][0]["embedding"] == pytest.approx(expected[0].tolist(), abs=1e-5)
    assert plain["usage"]["prompt_tokens"] > 5


def error_of(call) -> openai.APIStatusError:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value


def test_errors_as_openai_sends_them(server: Server) -> None:
    client = server.client()
    e = error_of(lambda: server.client("tb-wrong").models.list())
    assert isinstance(e, openai.AuthenticationError) and e.body["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401  # no key at all
    e = error_of(lambda: client.chat.completions.create(model="gpt-4o", messages=MESSAGES))
    assert isinstance(e, openai.NotFoundError) and e.body["code"] == "model_not_found" and e.body["param"] == "model"
    e = error_of(lambda: client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=5))
    assert isinstance(e, openai.BadRequestError) and e.body["param"] == "temperature"
    e = error_of(lambda: client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x " * 600}]))
    assert e.status_code == 400 and e.body["code"] == "context_length_exceeded"
    big = httpx.post(server.url + "/v1/completions", headers={"authorization": f"Bearer {server.key}"},
                     json={"model": "tiny", "prompt": "x" * 200_000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    # 3 slots of choices are more than the queue's 2 places: 503, the engine says busy (not a crash).
    e = error_of(lambda: client.chat.completions.create(model="tiny", messages=MESSAGES, n=3, max_tokens=2))
    assert e.status_code == 503 and e.body["code"] == "engine_overloaded"
    limited = server.client(server.limited_key)
    for _ in range(3):
        limited.models.list()
    e = error_of(lambda: limited.models.list())
    assert isinstance(e, openai.RateLimitError) and e.response.headers["retry-after"]
    missing = httpx.get(server.url + "/v1/nothing", headers={"authorization": f"Bearer {server.key}"})
    assert missing.status_code == 404 and "error" in missing.json()
    assert httpx.get(server.url + "/health").status_code == 200  # still serving


def test_two_streams_share_decoding_steps(server: Server) -> None:
    client = server.client()
    before = server.metrics().get('torchbook_decode_steps_total{rows="2"}', 0.0)
    barrier = threading.Barrier(2)
    texts: list[str] = []

    def stream() -> None:
        barrier.wait()
        chunks = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=300, temperature=0,
                                                stream=True)
        texts.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(texts) == 2 and texts[0] == texts[1]  # the same greedy answer beside another request
    assert server.metrics()['torchbook_decode_steps_total{rows="2"}'] > before


def test_disconnect_frees_the_slot_at_once(server: Server) -> None:
    steps = lambda m: sum(v for k, v in m.items() if k.startswith("torchbook_decode_steps_total{"))  # noqa: E731
    before = steps(server.metrics())
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 480, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {server.key}"}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ") and json.loads(next(lines)[6:]) is not None
    deadline = time.monotonic() + 2
    while server.metrics()["torchbook_active_slots"] > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    metrics = server.metrics()
    assert metrics["torchbook_active_slots"] == 0
    assert steps(metrics) - before < 240  # cancelled long before its 480 tokens


def test_sigterm_lets_the_running_stream_finish(server: Server) -> None:
    chunks = server.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=200, temperature=0,
                                                     stream=True)
    first = next(iter(chunks))
    server.process.send_signal(signal.SIGTERM)
    rest = list(chunks)
    assert first.choices[0].delta.role == "assistant"
    assert rest[-1].choices[0].finish_reason == "length" and rest[-1].usage.completion_tokens == 200
    assert server.process.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")
