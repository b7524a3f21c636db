"""Fast decoding on tiny random GPTs: every new position's logits in one pass and the cache's rollback; greedy
speculative decoding (an int4 draft of the same model, a different small model, prompt lookup) gives the target's
own tokens; sampled speculative decoding gives the target's distribution (chi-square on the joint distribution of
two tokens, 20,000 vectorised rounds, and end to end through the decoder), and a wrong acceptance rule fails it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from torchbook.errors import UserInputError
from torchbook.generate import speculative
from torchbook.generate.compiled import StaticDecoder
from torchbook.generate.sampling import SamplingConfig
from torchbook.generate.serving import Engine, Request
from torchbook.generate.speculative import ModelDraft, PromptLookupDraft, SpeculativeDecoder, lookup, verify
from torchbook.models.gpt import GPT, GPTConfig
from torchbook.nn.quantized import quantize_for_decoding

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt(seed: int, vocab: int = 61, layers: int = 2, scale: float = 2.0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab, n_layer=layers, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_len=128,
                       norm="rmsnorm", mlp="swiglu", positions="rope", qkv_bias=False, out_bias=False,
                       mlp_bias=False, tie_embeddings=False)
    model = GPT(config).eval()
    with torch.no_grad():  # larger weights: logits with a spread like a trained model's
        for name, p in model.named_parameters():
            if "embed" not in name:
                p.mul_(scale)
    return model


def target_alone(model: GPT, prompt: list[int], max_tokens: int) -> list[int]:
    engine = Engine(model, slots=1, max_len=128)
    handle = engine.submit(Request(prompt, max_tokens, SamplingConfig(temperature=0.0)))
    engine.run()
    return handle.result().choices[0].tokens


def test_all_positions_and_rollback() -> None:
    model = tiny_gpt(0)
    tokens = torch.randint(0, 61, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)[0]
    cache = model.new_slot_cache(1, 64)
    model.slot_step(tokens[:, :12], cache.view([0], 12))
    every = model.slot_step(tokens[:, 12:17], cache.view([0], 5), all_positions=True)[0]
    torch.testing.assert_close(every, full[12:17], atol=1e-4, rtol=1e-4)
    cache.truncate(0, 14)  # roll back three positions, then feed different tokens there
    other = torch.tensor([[5, 6, 7]])
    again = model.slot_step(other, cache.view([0], 3), all_positions=True)[0]
    with torch.no_grad():
        reference = model(torch.cat([tokens[:, :14], other], 1))[0, 14:]
    torch.testing.assert_close(again, reference, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError):
        cache.truncate(0, 18)


def test_greedy_speculative_is_the_target_alone() -> None:
    target = tiny_gpt(0)
    drafts = {"int4 copy": ModelDraft(quantize_for_decoding(copy.deepcopy(target), "int4"), 128),
              "other model": ModelDraft(tiny_gpt(7, layers=1), 128),
              "prompt lookup": PromptLookupDraft(3)}
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (1, 9, 23)]
    prompts.append(prompts[1] * 4)  # repeats: prompt lookup finds n-grams
    for prompt in prompts:
        expected = target_alone(target, prompt, 30)
        for name, draft in drafts.items():
            for k in ((1, 4) if name == "int4 copy" else (4,)):
                tokens, stats = SpeculativeDecoder(target, draft, k=k, max_len=128).generate(prompt, 30)
                assert tokens == expected, (name, k, len(prompt))
                assert stats.generated == 30 and stats.rounds <= 30
    # The int4 copy (of random weights, so a poor one) agrees often enough to save target passes.
    _, stats = SpeculativeDecoder(target, drafts["int4 copy"], k=4, max_len=128).generate(prompts[2], 30)
    assert stats.acceptance_rate > 0.3 and stats.rounds < 20, stats
    # End tokens stop it at the same place as the target alone.
    end = expected[10]
    tokens, _ = SpeculativeDecoder(target, drafts["int4 copy"], k=4, max_len=128).generate(prompts[-1], 30, end_ids=[end])
    assert tokens == expected[: expected.index(end) + 1]


def test_prompt_lookup_finds_the_latest_longest_ngram() -> None:
    history = [1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 7, 2, 3]
    assert lookup(history, 3, max_ngram=2) == [4, 5, 7]  # "2 3" last seen before 4 5 7
    assert lookup([1, 2, 3, 4, 2], 2, max_ngram=3) == [3, 4]  # only the 1-gram "2" recurs
    assert lookup([1, 2, 3], 2) == []
    with pytest.raises(UserInputError):
        SpeculativeDecoder(tiny_gpt(0), PromptLookupDraft(), k=0)


# -- the sampled output's distribution ---------------------------------------------------------------------------
V, K, SAMPLES = 5, 2, 20_000
PROMPT = [1, 3, 1]  # its last token recurs: prompt lookup proposes from the first token on


def probability_tables(model: GPT) -> list[Tensor]:
    """P[j] of shape (V,) * j + (V,): the model's next-token distribution after PROMPT + any j tokens, j = 0..3."""
    grid = torch.cartesian_prod(*[torch.arange(V)] * 3)  # (V^3, 3), last index fastest
    tokens = torch.cat([torch.tensor(PROMPT).expand(len(grid), -1), grid], dim=1)
    with torch.no_grad():
        probs = model(tokens).softmax(-1).reshape(V, V, V, len(PROMPT) + 3, V).double()
    n = len(PROMPT)
    return [probs[0, 0, 0, n - 1], probs[:, 0, 0, n], probs[:, :, 0, n + 1], probs[:, :, :, n + 2]]


def speculative_pairs(p: list[Tensor], q: list[Tensor], generator: torch.Generator) -> Tensor:
    """The first two output tokens of SAMPLES independent speculative runs with K = 2 (vectorised), (SAMPLES, 2)."""
    rows = torch.arange(SAMPLES)

    def draw(dist: Tensor) -> Tensor:
        return torch.multinomial(dist, 1, generator=generator)[:, 0]

    def round_from(context: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        j = len(context)
        x1 = draw(q[j][tuple(context)] if context else q[0].expand(SAMPLES, V))
        x2 = draw(q[j + 1][(*context, x1)])
        ps = torch.stack([p[j][tuple(context)] if context else p[0].expand(SAMPLES, V),
                          p[j + 1][(*context, x1)], p[j + 2][(*context, x1, x2)]], 1)
        qs = torch.stack([q[j][tuple(context)] if context else q[0].expand(SAMPLES, V), q[j + 1][(*context, x1)]], 1)
        accepted, token = verify(ps, qs, torch.stack([x1, x2], 1), generator)
        output = torch.stack([x1, x2, torch.zeros_like(x1)], 1)
        output[rows, accepted] = token  # the accepted drafts, then the verifier's token
        return output, accepted, token

    first, accepted, _ = round_from([])
    second, _, _ = round_from([first[:, 0]])  # used where the first round yielded a single token
    y2 = torch.where(accepted >= 1, first[:, 1], second[:, 0])
    return torch.stack([first[:, 0], y2], 1)


def chi_square_p(pairs: Tensor, expected_probs: Tensor) -> float:
    """Chi-square goodness of fit of token pairs against the (V, V) expected joint distribution; cells expected
    fewer than 5 times are pooled into one."""
    observed = torch.bincount(pairs[:, 0] * V + pairs[:, 1], minlength=V * V).double()
    expected = expected_probs.reshape(-1) * len(pairs)
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] < 5:
        obs, exp = obs[:-1], exp[:-1]
        exp = exp * obs.sum() / exp.sum()
    statistic = ((obs - exp) ** 2 / exp).sum()
    freedom = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(freedom / 2, dtype=torch.float64), statistic / 2))  # chi2 sf


@pytest.fixture(scope="module")
def tables() -> tuple[list[Tensor], list[Tensor], Tensor]:
    p = probability_tables(tiny_gpt(0, vocab=V, scale=3.0))
    q = probability_tables(tiny_gpt(5, vocab=V, scale=3.0))  # a different model: many rejections
    joint = p[0][:, None] * p[1]  # the target's own P(y1, y2)
    return p, q, joint


def test_sampled_speculative_has_the_target_distribution(tables: tuple[list[Tensor], list[Tensor], Tensor]) -> None:
    p, q, joint = tables
    assert (p[0] - q[0]).abs().sum() > 0.3  # the draft really differs from the target
    pairs = speculative_pairs(p, q, torch.Generator().manual_seed(0))
    assert chi_square_p(pairs, joint) > 1e-3


def test_a_wrong_acceptance_rule_fails_the_test(tables: tuple[list[Tensor], list[Tensor], Tensor],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    p, q, joint = tables
    # A classic mistake: after a rejection, sample from the target's p instead of the residual max(0, p - q).
    monkeypatch.setattr(speculative, "residual", lambda p_, q_: p_)
    pairs = speculative_pairs(p, q, torch.Generator().manual_seed(0))
    assert chi_square_p(pairs, joint) < 1e-3


@pytest.mark.parametrize(("draft_kind", "runs"), [
    ("model", 300), ("prompt lookup", 300),
    pytest.param("model", 4000, marks=[pytest.mark.slow, pytest.mark.timeout(600)]),
    pytest.param("prompt lookup", 4000, marks=[pytest.mark.slow, pytest.mark.timeout(600)])])
def test_the_decoder_samples_the_target_distribution(draft_kind: str, runs: int,
                                                     tables: tuple[list[Tensor], list[Tensor], Tensor]) -> None:
    """End to end: SpeculativeDecoder.generate's first two sampled tokens in `runs` seeded runs (the vectorised
    test above has the statistical power; this one checks that the decoder wires the rule up the same way)."""
    _, _, joint = tables
    target = tiny_gpt(0, vocab=V, scale=3.0)
    draft: speculative.Draft = (ModelDraft(tiny_gpt(5, vocab=V, scale=3.0), 32) if draft_kind == "model"
                                else PromptLookupDraft(2))
    decoder = SpeculativeDecoder(target, draft, k=K, max_len=32)
    pairs = torch.tensor([decoder.generate(PROMPT, 2, SamplingConfig(temperature=1.0, seed=s))[0]
                          for s in range(runs)])
    assert chi_square_p(pairs, joint) > 1e-3


def test_static_step_is_the_engine_step() -> None:
    """The static-shape step (what torch.compile and CUDA graphs take; run eagerly here: no compiling in the
    default suite) reads all max_len positions, masked, and gives the engine's greedy tokens."""
    target = tiny_gpt(0)
    prompt = torch.randint(0, 61, (9,), generator=torch.Generator().manual_seed(4)).tolist()
    decoder = StaticDecoder(target, 64)
    assert decoder.generate(prompt, 30) == target_alone(target, prompt, 30)
    assert decoder.generate(prompt[:3], 5) == target_alone(target, prompt[:3], 5)  # reuse: starts again at 0
