"""Both translators decode through the one engine: teacher-forced logits equal step-by-step decoding, outputs are
identical with and without the cache. (Beam search against greedy is checked on trained models: a random
model is nearly uniform, where a narrow beam has no reason to win; see test_translation_recipes.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchbook.generate import beam_search, decode
from torchbook.models.seq2seq_rnn import Seq2SeqConfig, Seq2SeqRNN
from torchbook.models.transformer import TransformerConfig, TransformerTranslator

pytestmark = pytest.mark.usefixtures("one_thread")


VOCAB = 50


def models() -> list[tuple[str, nn.Module]]:
    torch.manual_seed(0)
    found: list[tuple[str, nn.Module]] = [
        ("transformer-post-norm", TransformerTranslator(TransformerConfig(VOCAB, 32, 4, 2, 2, 64, max_len=40))),
        ("transformer-pre-norm", TransformerTranslator(
            TransformerConfig(VOCAB, 32, 4, 2, 2, 64, max_len=40, norm_first=True, final_norm=True))),
    ]
    for cell, attention in (("gru", "luong"), ("lstm", "bahdanau"), ("gru", "none")):
        found.append((f"rnn-{cell}-{attention}", Seq2SeqRNN(
            Seq2SeqConfig(VOCAB, 16, 32, 2, cell, attention, max_len=40))))
    for _, model in found:
        model.eval()
        with torch.no_grad():  # a peakier random model, so greedy and beam search differ
            model.head.weight.mul_(4.0)  # type: ignore[union-attr, operator]
    return found


MODELS = models()


def sources() -> torch.Tensor:
    torch.manual_seed(1)
    src = torch.randint(3, VOCAB, (8, 9))
    src[:, -1] = 2
    src[2, 5:] = 0  # padding
    src[2, 4] = 2
    src[5, 7:] = 0
    src[5, 6] = 2
    return src


@pytest.mark.parametrize(("name", "model"), MODELS, ids=[n for n, _ in MODELS])
@torch.no_grad()
def test_teacher_forcing_equals_incremental_decoding(name: str, model: nn.Module) -> None:
    src, tgt = sources(), torch.randint(3, VOCAB, (8, 6))
    tgt[:, 0] = 1
    full = model(src, tgt)
    state = model.start_decoding(8, source=src)  # type: ignore[operator]
    steps = [model.decode_step(tgt[:, t : t + 1], state) for t in range(6)]  # type: ignore[operator]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("name", "model"), MODELS, ids=[n for n, _ in MODELS])
def test_decoding_with_and_without_cache_is_identical(name: str, model: nn.Module) -> None:
    src = sources()
    first = torch.ones(8, 1, dtype=torch.long)
    runs = {}
    for use_cache in (True, False):
        greedy = decode(model, model.start_decoding(8, source=src), first, 12, 2, use_cache=use_cache)  # type: ignore[operator, arg-type]
        beam = beam_search(model, model.start_decoding(8, source=src), first, 3, 1.0, 12, 2, use_cache=use_cache)  # type: ignore[operator, arg-type]
        runs[use_cache] = (greedy, beam)
    for a, b in zip(runs[True], runs[False]):
        assert torch.equal(a.tokens, b.tokens)
        torch.testing.assert_close(a.log_prob, b.log_prob, atol=1e-4, rtol=1e-4)
