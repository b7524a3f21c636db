"""`torchbook serve` as a real server process on a loopback port, driven by the official `openai` client
(unmodified): a tiny random Llama-style GPT with a small BPE tokenizer, and all-MiniLM-L6-v2 for embeddings.

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

from torchbook.chat.memory import Memory
from torchbook.data.tokenizers import save_tokenizer, train_bpe
from torchbook.hub import load, save_model
from torchbook.hub.prompts import chat_token_ids
from torchbook.models.gpt import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 1024


def tiny_model_folder(folder: Path) -> Path:
    """A random 2-layer Llama-style GPT over a 2,000-token BPE vocabulary learned from the GPL-3's text (Debian's
    common-licenses: a text that does not change with this repository; no end-of-turn token: it writes until
    max_tokens), saved with its tokenizer."""
    text = Path("/usr/share/common-licenses/GPL-3").read_text().splitlines()
    tokenizer = train_bpe(text, vocab_size=2000, prepend_space=False)
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
        self.other_key = ""

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
    key, key_id = made.stdout.split()[-1], made.stdout.split()[3]
    limited = cli(env, "serve", "--add-key", "limited", "--key-rate-limit", "3").stdout.split()[-1]
    other = cli(env, "serve", "--add-key", "other").stdout.split()[-1]
    # torchbook-chat's memory is per key: a fact for the first key only (the server opens the same store).
    Memory.open(root / "home" / "chat" / "chat.sqlite").add(key_id, "The user's cat is called Zorblax.")
    stored = (root / "home" / "serve" / "api_keys.json").read_text()
    assert key.startswith("tb-") and key not in stored and limited not in stored  # hashes only
    assert oct((root / "home" / "serve" / "api_keys.json").stat().st_mode)[-3:] == "600"
    process = subprocess.Popen(
        [sys.executable, "-m", "torchbook", "serve", str(folder), "--name", "tiny", "--port", "0", "--require-keys",
         "--slots", "4", "--max-len", str(MAX_LEN), "--max-queue", "3", "--max-body", "100000"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert process.stdout is not None
    line = process.stdout.readline()  # printed once the model is loaded and warmed and the port is listening
    match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
    assert match, f"no address printed: {line!r} {process.stderr.read() if process.poll() is not None else ''}"
    server = Server(process, match.group(1), key, limited, folder)
    server.other_key = other
    yield server
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
    assert ids == ["tiny", "torchbook-chat", "all-MiniLM-L6-v2"]
    assert server.client().models.retrieve("tiny").id == "tiny"
    assert "web chat page" in httpx.get(server.url + "/static/README.md").text  # the static files' place


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
    two = client.completions.create(model="tiny", prompt=["a b", "c d"], max_tokens=3, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 6
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


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}


def test_tools_required_give_valid_calls_and_json_schema(server: Server) -> None:
    import jsonschema

    client = server.client()
    ask = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
    answer = client.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER], tool_choice="required",
                                            max_tokens=120, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # The client runs its tool and sends the result back: the conversation goes on.
    follow = ask + [choice.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    again = client.chat.completions.create(model="tiny", messages=follow, tools=[WEATHER], max_tokens=5,
                                           temperature=0)
    assert again.usage.prompt_tokens > answer.usage.prompt_tokens
    streamed = list(client.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER], max_tokens=120,
                                                   tool_choice={"type": "function",
                                                                "function": {"name": "get_weather"}},
                                                   temperature=0, stream=True))
    calls = [t for c in streamed if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and streamed[-1].choices[0].finish_reason == "tool_calls"
    # tool_choice "auto": this random model answers in text, which streams as it comes (not held to the end).
    auto = client.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER], max_tokens=30,
                                          temperature=0)
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        model="tiny", messages=ask, tools=[WEATHER], max_tokens=30, temperature=0, stream=True)
        if c.choices and c.choices[0].delta.content]
    assert auto.choices[0].finish_reason == "length" and not auto.choices[0].message.tool_calls
    assert len(pieces) > 5 and "".join(pieces) == auto.choices[0].message.content
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "sure": {"type": "boolean"}},
              "required": ["answer", "sure"], "additionalProperties": False}
    shaped = client.chat.completions.create(model="tiny", messages=ask, max_tokens=60, temperature=0,
                                            response_format={"type": "json_schema",
                                                             "json_schema": {"name": "a", "schema": schema}})
    assert shaped.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(shaped.choices[0].message.content), schema)
    e = error_of(lambda: client.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER],
                                                         tool_choice={"type": "function", "function": {"name": "x"}}))
    assert e.status_code == 400 and e.body["param"] == "tool_choice"


def test_the_chatbot_system_as_a_model(server: Server) -> None:
    client = server.client()
    ask = [{"role": "user", "content": "What is 12 * 7?"}]  # the orchestrator sends it to the calculator first
    whole = client.chat.completions.create(model="torchbook-chat", messages=ask)
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.completion_tokens > 0
    # The calculator's call and result are in the prompt (as if the model had called it): more than the question.
    plain = client.chat.completions.create(model="tiny", messages=ask, max_tokens=1)
    assert whole.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    chunks = list(client.chat.completions.create(model="torchbook-chat", messages=ask, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.strip() == whole.choices[0].message.content  # the whole answer is stripped, pieces are not
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    e = error_of(lambda: client.chat.completions.create(model="torchbook-chat", messages=ask, tools=[WEATHER]))
    assert e.status_code == 400 and e.body["param"] == "tools"
    # Memory per API key: the first key's fact is recalled into its prompt; another key's prompt has none.
    cat = [{"role": "user", "content": "What is my cat called?"}]
    mine = client.chat.completions.create(model="torchbook-chat", messages=cat)
    theirs = server.client(server.other_key).chat.completions.create(model="torchbook-chat", messages=cat)
    assert mine.usage.prompt_tokens > theirs.usage.prompt_tokens + 10
    # A client that leaves cancels its turn: the slot is free at once, long before the turn's 256 tokens.
    steps = lambda m: sum(v for k, v in m.items() if k.startswith("torchbook_decode_steps_total{"))  # noqa: E731
    before = steps(server.metrics())
    body = {"model": "torchbook-chat", "messages": ask, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {server.key}"}) as response:
        assert next(line for line in response.iter_lines() if line).startswith("data: ")
    deadline = time.monotonic() + 2
    while server.metrics()["torchbook_active_slots"] > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.metrics()["torchbook_active_slots"] == 0 and steps(server.metrics()) - before < 200


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
    e = error_of(lambda: client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x " * 1500}]))
    assert e.status_code == 400 and e.body["code"] == "context_length_exceeded"
    big = httpx.post(server.url + "/v1/completions", headers={"authorization": f"Bearer {server.key}"},
                     json={"model": "tiny", "prompt": "x" * 200_000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(server.url + "/v1/completions", headers={"authorization": f"Bearer {server.key}"},
                         content=(b"x" * 10_000 for _ in range(20)))  # no Content-Length: counted as it comes
    assert chunked.status_code == 413
    # 4 choices are more than the queue's 3 places: 503, the engine says busy (not a crash).
    e = error_of(lambda: client.chat.completions.create(model="tiny", messages=MESSAGES, n=4, max_tokens=2))
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

    def both() -> list[str]:
        barrier = threading.Barrier(2)
        texts: list[str] = []

        def stream() -> None:
            barrier.wait()
            chunks = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=480, temperature=0,
                                                    stream=True)
            texts.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))

        threads = [threading.Thread(target=stream) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return texts

    for _ in range(3):  # two requests sent together overlap unless the machine stalls one of them (then again)
        before = server.metrics().get('torchbook_decode_steps_total{rows="2"}', 0.0)
        texts = both()
        assert len(texts) == 2 and texts[0] == texts[1]  # the same greedy answer beside another request
        if server.metrics().get('torchbook_decode_steps_total{rows="2"}', 0.0) > before:
            break
    assert server.metrics()['torchbook_decode_steps_total{rows="2"}'] > before


def test_disconnect_frees_the_slot_at_once(server: Server) -> None:
    steps = lambda m: sum(v for k, v in m.items() if k.startswith("torchbook_decode_steps_total{"))  # noqa: E731
    before = steps(server.metrics())
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 480, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {server.key}"}) as response:
        events = (line for line in response.iter_lines() if line)
        assert json.loads(next(events)[6:])["choices"][0]["delta"]["role"] == "assistant"
        assert json.loads(next(events)[6:])["choices"][0]["delta"]["content"] is not None
    deadline = time.monotonic() + 2
    while server.metrics()["torchbook_active_slots"] > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    metrics = server.metrics()
    assert metrics["torchbook_active_slots"] == 0
    assert steps(metrics) - before < 400  # cancelled before its 480 tokens


def test_sigterm_lets_the_running_stream_finish(server: Server) -> None:
    chunks = server.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=200, temperature=0,
                                                     stream=True)
    first = next(iter(chunks))
    server.process.send_signal(signal.SIGTERM)
    rest = list(chunks)
    assert first.choices[0].delta.role == "assistant"
    assert rest[-1].choices[0].finish_reason == "length" and rest[-1].usage.completion_tokens == 200
    assert server.process.wait(30) in (0, -signal.SIGTERM)  # uvicorn exits by the signal it drained for
    assert server.process.stderr is not None and "Traceback" not in server.process.stderr.read()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")


def test_engine_settings_out_of_range_are_refused_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from torchbook.cli import main

    monkeypatch.setenv("TORCHBOOK_HOME", str(tmp_path))
    assert main(["serve", "--prefill-chunk", "0"]) == 2
    assert "prefill_chunk must be at least 1, got 0" in capsys.readouterr().err
    assert main(["serve", "--slots", "0"]) == 2
    assert "slots must be at least 1, got 0" in capsys.readouterr().err


def test_other_addresses_need_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from torchbook.cli import main
    from torchbook.serve.keys import KeyStore
    from torchbook.serve.models import ServeSettings
    from torchbook.serve.server import check_security

    monkeypatch.setenv("TORCHBOOK_HOME", str(tmp_path))
    assert main(["serve", "--host", "0.0.0.0"]) == 2  # refused before any model loads
    assert "needs API keys and none exists yet" in capsys.readouterr().err
    assert check_security(ServeSettings(host="127.0.0.1")).require_keys is False
    assert check_security(ServeSettings(host="::1")).require_keys is False
    with pytest.raises(Exception, match="none exists yet"):
        check_security(ServeSettings(host="0.0.0.0"))
    with pytest.raises(Exception, match="requires API keys"):
        check_security(ServeSettings(host="192.168.1.5", require_keys=False))
    record, key = KeyStore().add("ci", rate_limit=5)
    assert check_security(ServeSettings(host="0.0.0.0")).require_keys is True
    assert KeyStore().check(key) == record and KeyStore().check(key + "x") is None
    KeyStore().revoke(record.id)
    assert KeyStore().check(key) is None
