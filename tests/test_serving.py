"""The serving engine on tiny random GPTs: a request's logits and tokens are the same alone or beside others (mixed
lengths, joins mid-batch, cancellations, chunked prefill), equal the plain forward pass, prefix reuse equals a cold
run, bad requests fail before taking a slot, the queue says busy, and the threaded and asyncio API."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from torch import Tensor

from torchbook.data.tokenizers import char_tokenizer
from torchbook.errors import UserInputError
from torchbook.generate.sampling import SamplingConfig
from torchbook.generate.serving import Busy, Engine, Request
from torchbook.models.gpt import GPT, GPTConfig
from torchbook.nn.kv_cache import SlotView

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 61


def tiny_gpt(llama: bool = True, vocab: int = VOCAB) -> GPT:
    torch.manual_seed(0)
    if llama:  # RoPE, RMSNorm, SwiGLU, grouped-query attention
        config = GPTConfig(vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_len=96,
                           norm="rmsnorm", mlp="swiglu", positions="rope", qkv_bias=False, out_bias=False,
                           mlp_bias=False, tie_embeddings=False)
    else:  # GPT-2: learned positions, LayerNorm, GELU, biases
        config = GPTConfig(vocab_size=vocab, n_layer=2, n_head=4, d_model=32, d_ff=64, max_len=96,
                           tie_embeddings=False)
    model = GPT(config).eval()
    with torch.no_grad():  # twice the init's weights: logits with a spread like a trained model's (std about 2)
        for name, p in model.named_parameters():
            if "embed" not in name:
                p.mul_(2.0)
    return model


class Recorder:
    """A logits processor that keeps the (raw, for greedy) logits it sees."""

    def __init__(self) -> None:
        self.seen: list[Tensor] = []

    def __call__(self, logits: Tensor, tokens: Tensor, prompt_len: int) -> Tensor:
        self.seen.append(logits[0].clone())
        return logits


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 17, 2, 30, 9, 11)]


def settings(i: int) -> SamplingConfig:
    return SamplingConfig(temperature=0.0) if i % 2 == 0 else SamplingConfig(temperature=0.9, top_k=20, seed=i)


def alone(model: GPT, prompt: list[int], i: int, max_tokens: int) -> tuple[list[int], list[Tensor]]:
    engine = Engine(model, slots=1, max_len=96)
    recorder = Recorder()
    handle = engine.submit(Request(prompt, max_tokens, settings(i), processors=[recorder]))
    engine.run()
    return handle.result().choices[0].tokens, recorder.seen


@pytest.mark.parametrize("llama", [True, False])
def test_alone_or_beside_others_joins_and_cancellations(llama: bool) -> None:
    model = tiny_gpt(llama)
    ps = prompts()
    lengths = [12, 7, 20, 5, 15, 9]
    reference = [alone(model, p, i, n) for i, (p, n) in enumerate(zip(ps, lengths))]
    # The plain forward pass (no cache) gives the same logits as the engine's first and last steps (greedy
    # requests: their recorder sees the model's logits, not temperature-scaled, filtered ones).
    for p, (tokens, seen) in list(zip(ps, reference))[::2]:
        with torch.no_grad():
            full = model(torch.tensor([p + tokens[:-1]]))[0]
        torch.testing.assert_close(seen[0], full[len(p) - 1], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(seen[-1], full[-1], atol=1e-4, rtol=1e-5)

    engine = Engine(model, slots=3, max_len=96, prefill_chunk=4)  # fewer slots than requests: some wait
    recorders = [Recorder() for _ in ps]
    handles = {}
    handles[0] = engine.submit(Request(ps[0], lengths[0], settings(0), processors=[recorders[0]]))
    extra = engine.submit(Request(ps[1], 30, SamplingConfig(temperature=0.0)))
    for i in (1, 2, 3):
        handles[i] = engine.submit(Request(ps[i], lengths[i], settings(i), processors=[recorders[i]]))
    for _ in range(12):
        engine.step()
    extra.cancel()  # cancelled mid-way: frees its slot for the others
    for i in (4, 5):  # join in the middle of the batch
        handles[i] = engine.submit(Request(ps[i], lengths[i], settings(i), processors=[recorders[i]]))
    engine.run()
    assert extra.result().choices[0].finish_reason == "cancelled"
    assert 0 < len(extra.result().choices[0].tokens) < 30
    for i, (tokens, seen) in enumerate(reference):
        result = handles[i].result()
        assert result.choices[0].tokens == tokens, i
        assert result.choices[0].finish_reason == "length"
        assert result.usage.prompt_tokens == len(ps[i]) and result.usage.completion_tokens == lengths[i]
        assert len(recorders[i].seen) == len(seen)
        for a, b in zip(recorders[i].seen, seen):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_short_prompts_share_a_steps_prefill_budget() -> None:
    """`prefill_chunk` is the prompt tokens of one step in all: three prompts of 5, 2 and 9 tokens (16) are all
    prefilled by the first step of a 16-token budget; with 8, a step prefills 8 and the rest waits."""
    model = tiny_gpt()
    ps = prompts()
    for budget, first_step in ((16, [1, 1, 1]), (8, [1, 1, 0])):
        engine = Engine(model, slots=3, max_len=96, prefill_chunk=budget)
        handles = [engine.submit(Request(ps[i], 4, settings(0))) for i in (0, 2, 4)]
        engine.step()
        assert [len(h.sequences[0].tokens) for h in handles] == first_step, budget
        engine.run()
        assert all(h.result().choices[0].finish_reason == "length" for h in handles)


def test_a_packed_step_equals_the_plain_forward() -> None:
    """One packed forward (`SlotCache.view(rows, counts)`) of three one-token decoding rows of different cached
    lengths (two in consecutive slots, one apart) and a fresh prompt gives each row the logits of the plain forward
    pass over its whole sequence; `all_positions` every new token's (two tokens of one row, a prompt's next one)."""
    for llama in (True, False):
        model = tiny_gpt(llama)
        g = torch.Generator().manual_seed(0)
        seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (20, 7, 33, 12)]
        with torch.no_grad():
            full = [model(torch.tensor([s]))[0] for s in seqs]
        cache = model.new_slot_cache(5, 96)
        for row, seq, n in ((0, seqs[0], 15), (1, seqs[1], 6), (4, seqs[3], 3)):
            model.slot_step(torch.tensor([seq[:n]]), cache.view([row], n))
        view = cache.view([0, 1, 4, 3], [1, 1, 1, 10])  # groups: rows of one count in consecutive slots
        assert [(group.rows, group.count) for group in view.groups] == [([0, 1], 1), ([4], 1), ([3], 10)]
        tokens = [seqs[0][15], seqs[1][6], seqs[3][3], *seqs[2][:10]]
        logits = model.slot_step(torch.tensor([tokens]), view)
        expected = torch.stack([full[0][15], full[1][6], full[3][3], full[2][9]])
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5)
        every = model.slot_step(torch.tensor([seqs[0][16:18] + seqs[2][10:11]]), cache.view([0, 3], [2, 1]),
                                all_positions=True)
        torch.testing.assert_close(every, torch.cat([full[0][16:18], full[2][10:11]]), atol=1e-4, rtol=1e-5)
        assert cache.lengths[:5] == [18, 7, 0, 11, 4]


class CountingGPT(GPT):
    """Keeps each forward's new tokens per row."""

    def __init__(self, model: GPT) -> None:
        super().__init__(model.config)
        self.load_state_dict(model.state_dict())
        self.eval()
        self.steps: list[list[int]] = []

    def slot_step(self, tokens: Tensor, view: SlotView, all_positions: bool = False) -> Tensor:
        self.steps.append(list(view.counts))
        return super().slot_step(tokens, view, all_positions)


def test_mixed_steps_join_while_others_decode() -> None:
    """Newcomers join while two requests decode: each step is one forward carrying the decoding rows and the
    newcomers' prompt tokens (at most `prefill_chunk`); a prompt longer than that is cut into chunks and gets its
    first token from the step of its last one, a shorter one is never cut: it waits for the step with room for it
    all and gets its first token from that step; every request's logits and tokens (greedy and seeded) are its lone
    run's, and the same as with a separate forward per prompt chunk (`packed=False`)."""
    model = CountingGPT(tiny_gpt())
    ps = prompts()
    order, lengths = (0, 2, 3, 1), (12, 7, 9, 6)  # prompts of 5 and 2 tokens decode; 30 and 17 tokens join
    reference = {i: alone(model, ps[i], i, n) for i, n in zip(order, lengths)}
    outputs = []
    for packed in (True, False):
        engine = Engine(model, slots=4, max_len=96, prefill_chunk=20)
        engine.packed = packed
        recorders = {i: Recorder() for i in order}
        handles = {}
        for k, (i, n) in enumerate(zip(order, lengths)):
            if k == 2:  # two steps later
                engine.step()
                engine.step()
            handles[i] = engine.submit(Request(ps[i], n, settings(i), processors=[recorders[i]]))
        model.steps.clear()
        engine.step()  # the 30-token prompt's first 20 tokens beside the two decoding rows
        assert [len(handles[i].sequences[0].tokens) for i in order] == [3, 3, 0, 0]
        engine.step()  # its last 10 tokens: its first token; the 17-token prompt fits in no 10 tokens: it waits
        assert [len(handles[i].sequences[0].tokens) for i in order] == [4, 4, 1, 0]
        engine.step()  # the 17-token prompt whole: its first token
        assert [len(handles[i].sequences[0].tokens) for i in order] == [5, 5, 2, 1]
        if packed:
            assert model.steps == [[1, 1, 20], [1, 1, 10], [1, 1, 1, 17]]
        else:
            assert model.steps == [[1, 1], [20], [1, 1], [10], [1, 1, 1], [17]]
        engine.run()
        outputs.append({i: handles[i].result().choices[0].tokens for i in order})
        for i in order:
            assert outputs[-1][i] == reference[i][0], (packed, i)
            assert len(recorders[i].seen) == len(reference[i][1])
            for a, b in zip(recorders[i].seen, reference[i][1]):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert outputs[0] == outputs[1]


def test_prefill_first_steps_carry_prompts_alone() -> None:
    """`prefill_first=True`: a step with prompt tokens to prefill carries no decoding row (the newcomer's first token
    costs its prefill alone); the decoding rows go on once no prompt waits; every request's tokens are its lone run's."""
    model = CountingGPT(tiny_gpt())
    ps = prompts()
    order, lengths = (0, 2, 3, 1), (12, 7, 9, 6)
    reference = {i: alone(model, ps[i], i, n)[0] for i, n in zip(order, lengths)}
    engine = Engine(model, slots=4, max_len=96, prefill_chunk=20, prefill_first=True)
    handles = {i: engine.submit(Request(ps[i], n, settings(i))) for i, n in zip(order[:2], lengths[:2])}
    engine.step()  # both short prompts together, alone
    engine.step()  # the two decoding rows
    for i, n in zip(order[2:], lengths[2:]):
        handles[i] = engine.submit(Request(ps[i], n, settings(i)))
    model.steps.clear()
    for _ in range(4):
        engine.step()
    # 20 of the 30-token prompt, its last 10, the 17-token prompt whole: no decoding row beside them; then decoding
    assert model.steps == [[20], [10], [17], [1, 1, 1, 1]]
    engine.run()
    assert {i: handles[i].result().choices[0].tokens for i in order} == reference


def test_prefix_reuse_equals_a_cold_run() -> None:
    model = tiny_gpt()
    system = prompts()[3]  # a shared "system prompt" of 30 tokens
    warm = Engine(model, slots=2, max_len=96)
    cold = Engine(model, slots=2, max_len=96, prefix_cache=False)
    turn = system + [1, 2, 3]
    for t in range(3):  # a conversation: each prompt is the last prompt, its answer and a new message
        results = []
        for engine in (warm, cold):
            handle = engine.submit(Request(turn, 6, SamplingConfig(temperature=0.8, seed=t)))
            engine.run()
            results.append(handle.result())
        assert results[0].choices[0].tokens == results[1].choices[0].tokens
        assert results[1].usage.cached_tokens == 0
        if t:
            assert results[0].usage.cached_tokens >= len(turn) - 4  # all but the new message (and the last token)
        turn = turn + results[0].choices[0].tokens + [4, 5, 6]
    # n choices and another request on the same system prompt while it is being decoded: copied from the slot.
    engine = Engine(model, slots=4, max_len=96)
    first = engine.submit(Request(system + [7], 8, SamplingConfig(temperature=0.0)))
    engine.step()
    many = engine.submit(Request(system + [8, 9], 8, SamplingConfig(temperature=1.0, seed=5), n=2))
    engine.run()
    assert many.result().usage.cached_tokens == len(system)
    ref = Engine(model, slots=2, max_len=96, prefix_cache=False)
    cold_many = ref.submit(Request(system + [8, 9], 8, SamplingConfig(temperature=1.0, seed=5), n=2))
    ref.run()
    assert [c.tokens for c in many.result().choices] == [c.tokens for c in cold_many.result().choices]
    assert many.result().choices[0].tokens != many.result().choices[1].tokens  # seeds 5 and 6
    assert first.result().choices[0].tokens == alone(model, system + [7], 0, 8)[0]


@pytest.mark.parametrize("bad, param", [
    (dict(prompt=list(range(50)) * 2), "prompt"), (dict(prompt=[]), "prompt"), (dict(prompt=[VOCAB]), "prompt"),
    (dict(sampling=SamplingConfig(temperature=-1)), "temperature"), (dict(sampling=SamplingConfig(top_p=0)), "top_p"),
    (dict(n=0), "n"), (dict(max_tokens=0), "max_tokens"), (dict(top_logprobs=50), "top_logprobs"),
    (dict(sampling=SamplingConfig(presence_penalty=3)), "presence_penalty"),
    (dict(sampling=SamplingConfig(logit_bias={VOCAB + 1: 1.0})), "logit_bias"),
])
def test_bad_requests_fail_before_taking_a_slot(bad: dict, param: str) -> None:
    engine = Engine(tiny_gpt(), slots=2, max_len=96, max_queue=2)
    running = engine.submit(Request([1, 2, 3], 4))
    engine.step()
    with pytest.raises(UserInputError) as error:
        engine.submit(Request(**{"prompt": [1, 2], **bad}))
    assert error.value.param == param
    assert len(engine.waiting) == 0 and sum(o is not None for o in engine.owner) == 1
    engine.run()
    assert running.result().choices[0].finish_reason == "length"


def test_a_full_queue_is_busy() -> None:
    engine = Engine(tiny_gpt(), slots=1, max_len=96, max_queue=2)
    handles = [engine.submit(Request([1, 2, 3], 3)) for _ in range(2)]
    with pytest.raises(Busy, match="busy"):
        engine.submit(Request([1, 2, 3], 3))
    engine.run()
    assert all(h.result().choices[0].finish_reason == "length" for h in handles)


def test_stop_strings_end_tokens_logprobs_and_penalties() -> None:
    text = "abcdefghij klmnop"
    tokenizer = char_tokenizer(text)
    model = tiny_gpt(vocab=tokenizer.get_vocab_size())
    engine = Engine(model, tokenizer, slots=4, max_len=96)
    free = engine.submit(Request("abc", 12, logprobs=True, top_logprobs=3))
    engine.run()
    result = free.result().choices[0]
    ids = tokenizer.encode("abc").ids
    with torch.no_grad():
        log_probs = model(torch.tensor([ids + result.tokens]))[0].log_softmax(-1)
    for step, (token, logprob, top) in enumerate(zip(result.tokens, result.logprobs, result.top_logprobs)):
        expected = log_probs[len(ids) - 1 + step]
        assert logprob == pytest.approx(float(expected[token]), abs=1e-4)
        assert list(top) == expected.topk(3).indices.tolist()
    full = result.text
    assert len(full) == 12
    stop = full[3:5]
    end = result.tokens[6]
    other_end = next(t for t in range(tokenizer.get_vocab_size()) if t not in result.tokens)
    handles = [engine.submit(Request("abc", 12, stop=[stop])),
               engine.submit(Request("abc", 12, end_ids=[other_end, end]))]
    # A large logit bias forces a token; presence and frequency penalties push repeated tokens down.
    forced = tokenizer.token_to_id("z") if tokenizer.token_to_id("z") is not None else 0
    biased = engine.submit(Request("abc", 5, SamplingConfig(temperature=0.0, logit_bias={forced: 100.0})))
    penalised = engine.submit(Request("abc", 12, SamplingConfig(temperature=0.0, frequency_penalty=2.0,
                                                                presence_penalty=2.0)))
    engine.run()
    cut = handles[0].result().choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    ended = handles[1].result().choices[0]
    assert ended.tokens == result.tokens[: result.tokens.index(end)] and ended.finish_reason == "stop"
    assert ended.end_token == end and cut.end_token is None and result.end_token is None  # which end token, if any
    assert biased.result().choices[0].tokens == [forced] * 5
    repeats = lambda tokens: len(tokens) - len(set(tokens))  # noqa: E731
    assert repeats(penalised.result().choices[0].tokens) < repeats(result.tokens)


def test_threads_asyncio_cancel_and_shutdown() -> None:
    model = tiny_gpt()
    ps = prompts()
    expected = [alone(model, p, 0, 10)[0] for p in ps]
    engine = Engine(model, slots=3, max_len=96).start()
    outputs: dict[int, list[int]] = {}

    def client(i: int) -> None:
        handle = engine.submit(Request(ps[i], 10))
        outputs[i] = [d.token for d in handle if d.token >= 0]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()

    async def async_client(i: int) -> list[int]:
        handle = engine.submit(Request(ps[i], 10))
        return [d.token async for d in handle.stream() if d.token >= 0]

    async def both() -> list[list[int]]:
        return list(await asyncio.gather(async_client(4), async_client(5)))

    outputs.update(dict(zip((4, 5), asyncio.run(both()))))
    for t in threads:
        t.join(60)
    assert [outputs[i] for i in range(6)] == expected
    long = engine.submit(Request(ps[0], 80))
    next(iter(long))  # it has started
    long.cancel()
    result = long.result(timeout=30)
    assert result.choices[0].finish_reason == "cancelled" and len(result.choices[0].tokens) < 80
    pending = [engine.submit(Request(p, 40)) for p in ps]
    engine.shutdown(drain=False, timeout=60)
    assert all(h.result(timeout=5).choices[0].finish_reason in ("cancelled", "length") for h in pending)
    assert any(h.result().choices[0].finish_reason == "cancelled" for h in pending)
    with pytest.raises(Busy, match="shutting down"):
        engine.submit(Request(ps[0], 3))
