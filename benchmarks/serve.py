"""`torchbook serve` under load: 16 concurrent conversations against a one-request-at-a-time server running
transformers' `generate()` on the same weights (SmolLM2-135M-Instruct, float32 both; ours in int4 beside).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/serve.py --conversations 16 --turns 2

One asyncio client process (the official `openai` client, streaming) runs `--conversations` conversations at once;
each has `--turns` turns (the next turn carries the earlier answers), a prompt of mixed length (1 to 6 sentences of
real text) and a `max_tokens` in [16, 64], greedy. Per server: requests/s and completion tokens/s over the wall
time of the whole run, time to first token (the first content chunk) p50/p95, errors. Every server runs in its own
process on the same machine, one after the other; ratios are from the same run. `--duration S` instead repeats the
conversations until S seconds have passed (the 10-minute soak: `--duration 600 --systems ours-float32`).

The peer (`--peer`): FastAPI + uvicorn like ours, the same chat template and token ids (torchbook's tokenizer of
the GGUF file), `AutoModelForCausalLM.from_pretrained(gguf_file=...)` dequantized to float32, `generate()` with a
streamer, one request at a time (a lock): what serving a model with plain `generate()` gives.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

sys.path.insert(0, str(Path(__file__).parent))
from generate import TEXT  # noqa: E402  (benchmarks/generate.py: a paragraph of real text)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "SmolLM2-135M-Instruct"


# -- the peer server -------------------------------------------------------------------------------------------
def peer_app() -> Any:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from torchbook.hub import default_chat_model
    from torchbook.hub.loading import load_gguf_tokenizer
    from torchbook.hub.prompts import chat_token_ids

    path = default_chat_model()
    loaded = load_gguf_tokenizer(path)
    tokenizer, meta = loaded.tokenizer, loaded.meta
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ends = meta["end_token_ids"]
    with torch.no_grad():  # warm, as ours is before its port opens (transformers' first generate() is slow)
        model.generate(torch.tensor([chat_token_ids(tokenizer, [{"role": "user", "content": "Hi"}], meta)]),
                       max_new_tokens=4, do_sample=False, pad_token_id=ends[0])
    lock = threading.Lock()
    app = FastAPI()

    class Streamer(BaseStreamer):
        def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]):
            self.loop, self.queue, self.prompt_seen = loop, queue, False

        def put(self, value: Any) -> None:
            if not self.prompt_seen:  # generate() first passes the prompt
                self.prompt_seen = True
                return
            for token in value.reshape(-1).tolist():
                self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

        def end(self) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        ids = chat_token_ids(tokenizer, body["messages"], meta)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def run() -> None:
            with lock, torch.no_grad():  # one request at a time
                model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=body.get("max_tokens") or 64, do_sample=False, eos_token_id=ends,
                               pad_token_id=ends[0], streamer=Streamer(loop, queue))

        async def events() -> Any:
            loop.run_in_executor(None, run)
            tokens: list[int] = []
            while (token := await queue.get()) is not None:
                if token in ends:
                    continue
                tokens.append(token)
                text = tokenizer.decode([token])
                yield "data: " + json.dumps({"object": "chat.completion.chunk", "model": MODEL, "id": "x",
                                             "created": 0, "choices": [{"index": 0, "delta": {"content": text},
                                                                        "finish_reason": None}]}) + "\n\n"
            usage = {"prompt_tokens": len(ids), "completion_tokens": len(tokens),
                     "total_tokens": len(ids) + len(tokens)}
            yield "data: " + json.dumps({"object": "chat.completion.chunk", "model": MODEL, "id": "x", "created": 0,
                                         "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def run_peer(port: int) -> None:
    import socket

    import uvicorn

    app = peer_app()
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen(256)
    print(f"peer at http://127.0.0.1:{sock.getsockname()[1]}/v1", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


# -- the client ------------------------------------------------------------------------------------------------
def conversations(n: int, seed: int = 0) -> list[list[tuple[str, int]]]:
    """Per conversation, its turns: (user message, max_tokens)."""
    rng = random.Random(seed)
    sentences = [s.strip() + "." for s in TEXT.split(".") if s.strip()]
    out = []
    for _ in range(n):
        turns = []
        for _ in range(8):
            k = rng.randint(1, 6)
            start = rng.randrange(0, max(1, len(sentences) - k))
            turns.append(("Summarise this: " + " ".join(sentences[start : start + k]), rng.randint(16, 64)))
        out.append(turns)
    return out


async def converse(client: Any, turns: list[tuple[str, int]], n_turns: int, stats: dict[str, list[Any]],
                   deadline: float | None) -> None:
    messages: list[dict[str, str]] = []
    for text, max_tokens in turns[:n_turns]:
        if deadline is not None and time.perf_counter() > deadline:
            return
        messages.append({"role": "user", "content": text})
        start = time.perf_counter()
        first, answer, tokens = None, "", 0
        try:
            stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                                          temperature=0, stream=True,
                                                          stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    if first is None:
                        first = time.perf_counter() - start
                    answer += chunk.choices[0].delta.content
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
        except Exception as e:  # counted, never raised: the run goes on
            stats["errors"].append(repr(e))
            return
        stats["ttft"].append(first if first is not None else time.perf_counter() - start)
        stats["tokens"].append(tokens)
        messages.append({"role": "assistant", "content": answer})


async def load_test(url: str, n: int, n_turns: int, duration: float | None) -> dict[str, Any]:
    import openai

    stats: dict[str, list[Any]] = {"ttft": [], "tokens": [], "errors": []}
    start = time.perf_counter()
    deadline = None if duration is None else start + duration
    rounds = 0
    async with openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0, timeout=3600) as client:
        while True:
            await asyncio.gather(*(converse(client, turns, n_turns, stats, deadline)
                                   for turns in conversations(n, seed=rounds)))
            rounds += 1
            if deadline is None or time.perf_counter() > deadline:
                break
    wall = time.perf_counter() - start
    ttft = sorted(stats["ttft"])

    def pct(q: float) -> float:
        return ttft[min(len(ttft) - 1, round(q * (len(ttft) - 1)))] if ttft else float("nan")

    return {"requests": len(ttft), "errors": len(stats["errors"]), "wall_s": wall,
            "requests_per_s": len(ttft) / wall, "tokens_per_s": sum(stats["tokens"]) / wall,
            "ttft_p50_s": pct(0.5), "ttft_p95_s": pct(0.95), "ttft_mean_s": statistics.fmean(ttft) if ttft else 0,
            "first_errors": stats["errors"][:3]}


def start(command: list[str]) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "TORCHBOOK_HOME": os.environ.get("TORCHBOOK_HOME", "/tmp/torchbook-bench-home")}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
    if not match:
        process.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return process, match.group(1) + "/v1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--duration", type=float, help="repeat the conversations for this many seconds")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--systems", nargs="+", default=["ours-float32", "ours-int4", "transformers-float32"])
    parser.add_argument("--peer", action="store_true", help="run the one-at-a-time transformers server (internal)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.peer:
        run_peer(args.port)
        return
    ours = [sys.executable, "-m", "torchbook", "serve", "--port", "0", "--embedder", "none", "--no-chat",
            "--slots", str(args.slots), "--max-queue", "256", "--max-len", "1024"]
    commands = {"ours-float32": ours, "ours-int4": [*ours, "--quantize", "int4"],
                "transformers-float32": [sys.executable, str(Path(__file__).resolve()), "--peer"]}
    print(f"{args.conversations} conversations x {args.turns} turns, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '(unset)')}, {os.cpu_count()} CPUs", flush=True)
    results = {}
    for name in args.systems:
        process, url = start(commands[name])
        try:
            results[name] = asyncio.run(load_test(url, args.conversations, args.turns, args.duration))
        finally:
            process.terminate()
            process.wait(120)
        r = results[name]
        print(f"{name:22s} {r['requests']:4d} requests, {r['errors']} errors, {r['wall_s']:7.1f} s: "
              f"{r['requests_per_s']:.3f} req/s, {r['tokens_per_s']:7.1f} tok/s, TTFT p50 {r['ttft_p50_s']:.2f} s "
              f"p95 {r['ttft_p95_s']:.2f} s {' '.join(r['first_errors'])}", flush=True)
    peer = results.get("transformers-float32")
    if peer and peer["requests"]:
        for name in ("ours-float32", "ours-int4"):
            if name in results:
                r = results[name]
                print(f"{name} / transformers-float32: requests/s x{r['requests_per_s'] / peer['requests_per_s']:.2f}, "
                      f"tokens/s x{r['tokens_per_s'] / peer['tokens_per_s']:.2f}, TTFT p50 "
                      f"x{peer['ttft_p50_s'] / r['ttft_p50_s']:.2f} shorter")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
