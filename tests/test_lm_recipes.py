"""The language-model recipes of issue #6 (chapters 14-15): char-rnn and gpt-pretrain on tiny Shakespeare.

Default tier: both smoke runs end to end (report, reload, samples), the char-RNN's decoding with and without its
state, bits per character against direct computations. Slow tier: char-rnn's quick gate and the 10-minute
comparison (gpt-pretrain below char-rnn in bits per character on the same held-out characters)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import mirror_has

import torchbook
from torchbook.config import build_config
from torchbook.data.tokenizers import char_tokenizer
from torchbook.errors import UserInputError
from torchbook.generate import Sampler, SamplingConfig, decode
from torchbook.models.char_rnn import CharRNN, CharRNNConfig
from torchbook.models.gpt import GPT, GPTConfig
from torchbook.recipes import char_rnn, gpt_pretrain
from torchbook.recipes.char_rnn import rnn_nats
from torchbook.recipes.gpt_pretrain import gpt_nats
from torchbook.train.language_model import bits_per_character, sample

needs_shakespeare = pytest.mark.skipif(not mirror_has("tinyshakespeare.txt"),
                                       reason="tinyshakespeare.txt is not in $TORCHBOOK_MIRROR")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def char_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("char-rnn") / "run"
    char_rnn.run(build_config(char_rnn.Config, "smoke", []), str(path))
    return path


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gpt-pretrain") / "run"
    gpt_pretrain.run(build_config(gpt_pretrain.Config, "smoke", []), str(path))
    return path


@needs_shakespeare
@pytest.mark.parametrize("which", ["char_run", "gpt_run"])
def test_smoke_run_is_complete_reloads_and_samples_again(which: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(which)
    for name in ("config.json", "metrics.jsonl", "report.md", "results.json", "split.json", "model/model.safetensors",
                 "model/tokenizer.json", "plots/learning_curves.png", "plots/training_loss.png"):
        assert (path / name).is_file(), name
    results = json.loads((path / "results.json").read_text())
    split = json.loads((path / "split.json").read_text())
    assert split["characters"]["held_out"][0] == 1_060_000  # the book's split: 1,000,000 train + 60,000 validation
    assert results["held_out_chars"] == 2000  # the smoke preset scores a 2,000-character slice
    # Bits per character of the held-out text: below a uniform guess over the 39 characters (the model learned
    # something) for char-rnn; finite and positive for the tiny smoke GPT.
    assert 0 < results["held_out_bpc"] < (math.log2(39) if which == "char_run" else 16)
    report = (path / "report.md").read_text()
    assert "tiny Shakespeare" in report and "bits per character" in report and "temperature 1.5" in report
    assert [t for t, _ in results["samples"]] == [0.01, 0.5, 1.0, 1.5]
    assert all(text.startswith("to be or not to b") for _, text in results["samples"])
    loaded = torchbook.load(path)
    assert loaded.recipe == ("char-rnn" if which == "char_run" else "gpt-pretrain")
    assert loaded.tokenizer.get_vocab_size() == loaded.model.config.vocab_size
    # The reloaded model samples exactly what the run sampled (same seed), through the decoding engine.
    config = (char_rnn.Config if which == "char_run" else gpt_pretrain.Config)(**loaded.run_config)
    length = config.sample_chars if which == "char_run" else config.sample_tokens  # type: ignore[attr-defined]
    temperature, text = results["samples"][2]
    assert sample(loaded.model, loaded.tokenizer, "to be or not to b", length, temperature, config.sample_seed) == text
    # And `evaluate` reproduces the held-out bits per character from the saved model.
    recipe = char_rnn if which == "char_run" else gpt_pretrain
    assert recipe.evaluate(path)["held_out_bpc"] == pytest.approx(results["held_out_bpc"], rel=1e-5)


@needs_shakespeare
def test_both_recipes_score_exactly_the_same_held_out_characters(char_run: Path, gpt_run: Path) -> None:
    char_split = json.loads((char_run / "split.json").read_text())
    gpt_split = json.loads((gpt_run / "split.json").read_text())
    assert char_split["characters"]["held_out"] == gpt_split["characters"]["held_out"]
    assert char_split["lowercase"] == gpt_split["lowercase"] and char_split["sha256"] == gpt_split["sha256"]
    gpt_results = json.loads((gpt_run / "results.json").read_text())
    assert gpt_results["tokens_per_char"] == gpt_results["held_out_tokens"] / gpt_results["held_out_chars"]


def test_char_rnn_decodes_the_same_tokens_with_and_without_its_state() -> None:
    torch.manual_seed(0)
    model = CharRNN(CharRNNConfig(vocab_size=20, embed_dim=6, hidden=16)).eval()
    prompt = torch.randint(0, 20, (3, 5))
    for choose_config in (SamplingConfig(temperature=0), SamplingConfig(temperature=1.0, seed=7)):
        with_cache = decode(model, model.start_decoding(3), prompt, 30, choose=Sampler(choose_config))
        without = decode(model, model.start_decoding(3), prompt, 30, choose=Sampler(choose_config), use_cache=False)
        assert torch.equal(with_cache.tokens, without.tokens)
        assert torch.allclose(with_cache.log_prob, without.log_prob, atol=1e-4)
    greedy = decode(model, model.start_decoding(3), prompt, 30).tokens
    sampled = decode(model, model.start_decoding(3), prompt, 30, choose=Sampler(SamplingConfig(2.0, seed=7))).tokens
    assert not torch.equal(greedy, sampled)  # sampling at a high temperature departs from greedy decoding


def test_bits_per_character_of_known_models() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (257,))
    # A char-RNN whose output layer is zero predicts every character with probability 1/20: log2(20) bits each.
    uniform_rnn = CharRNN(CharRNNConfig(vocab_size=20, embed_dim=6, hidden=16))
    torch.nn.init.zeros_(uniform_rnn.head.weight)
    torch.nn.init.zeros_(uniform_rnn.head.bias)
    nats, _ = rnn_nats(uniform_rnn, ids, first_input=3, chunk=50)
    assert bits_per_character(nats, len(ids)) == pytest.approx(math.log2(20), rel=1e-6)
    # A trained-looking (random) char-RNN read in chunks of 50 with its state carried = one full-sequence pass.
    model = CharRNN(CharRNNConfig(vocab_size=20, embed_dim=6, hidden=16))
    logits, _ = model(torch.cat([torch.tensor([3]), ids[:-1]])[None])
    direct = float(F.cross_entropy(logits[0], ids, reduction="sum").detach())
    assert rnn_nats(model, ids, first_input=3, chunk=50)[0] == pytest.approx(direct, rel=1e-5)
    # A GPT with zero embeddings (tied to its output layer) is uniform over its vocabulary: 3 tokens for every 8
    # characters gives 3/8 * log2(300) bits per character.
    gpt = GPT(GPTConfig(vocab_size=300, n_layer=1, n_head=2, d_model=16, d_ff=32, max_len=16))
    torch.nn.init.zeros_(gpt.embed.weight)
    tokens = [1] + torch.randint(4, 300, (240,)).tolist()
    assert bits_per_character(gpt_nats(gpt, tokens, 16, 8), 640) == pytest.approx(3 / 8 * math.log2(300), rel=1e-6)
    # A random GPT whose window covers the whole text: the sliding window scores what one forward pass does.
    gpt = GPT(GPTConfig(vocab_size=300, n_layer=2, n_head=2, d_model=16, d_ff=32, max_len=64)).eval()
    tokens = [1] + torch.randint(4, 300, (40,)).tolist()
    with torch.no_grad():
        log_probs = gpt(torch.tensor([tokens[:-1]])).log_softmax(-1)[0]
    direct = -float(log_probs.gather(1, torch.tensor(tokens[1:])[:, None]).sum())
    assert gpt_nats(gpt, tokens, 64, 8) == pytest.approx(direct, rel=1e-5)
    # With a short window, every target still counts once and sees at least block_size - stride tokens.
    short = gpt_nats(gpt, tokens, 16, 4)
    assert short == pytest.approx(direct, rel=0.2) and short != pytest.approx(direct, rel=1e-6)


def test_bad_input_gives_clear_errors() -> None:
    tokenizer = char_tokenizer("to be or not\n")
    model = CharRNN(CharRNNConfig(vocab_size=tokenizer.get_vocab_size()))
    with pytest.raises(UserInputError, match="'Z' are not in the model's vocabulary"):
        sample(model, tokenizer, "to Ze", 5, 1.0, seed=0)
    with pytest.raises(UserInputError, match="prompts of equal length only"):
        model.start_decoding(2, attention_mask=torch.tensor([[0, 1], [1, 1]]))
    with pytest.raises(UserInputError, match="leaves no held-out text"):
        char_rnn.load_text(build_config(char_rnn.Config, "smoke", ["train_chars=1100000"]))
    with pytest.raises(UserInputError, match="eval_stride"):
        build_config(gpt_pretrain.Config, "smoke", ["eval_stride=100"]).validate()


@pytest.mark.slow
@pytest.mark.timeout(900)  # 110 s of training, then evaluation and samples
@needs_shakespeare
def test_char_rnn_quick_reaches_its_validation_accuracy(tmp_path: Path) -> None:
    """The quick gate, ours (110 s of training on windows of 100 characters; the book prints no accuracy for this
    model): next-character validation accuracy of at least 40% (measured: 44.2% after 204 steps on the loaded
    2-core machine), and held-out bits per
    character well below a unigram model's (4.44 bits with the training text's character frequencies)."""
    char_rnn.run(build_config(char_rnn.Config, "quick", []), str(tmp_path / "run"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["val_accuracy"] >= 0.40
    assert results["held_out_bpc"] < 3.0


@pytest.mark.slow
@pytest.mark.timeout(2700)  # two 10-minute training budgets, then evaluation
@needs_shakespeare
def test_gpt_pretrain_beats_char_rnn_in_ten_minutes(tmp_path: Path) -> None:
    """Issue #6: with the same 10-minute training budget and the same held-out characters, the small GPT with a
    BPE tokenizer has fewer bits per character than the char-RNN (about 20 minutes plus evaluation)."""
    figures = {}
    for recipe in (char_rnn, gpt_pretrain):
        path = tmp_path / recipe.NAME
        recipe.run(build_config(recipe.Config, "compare", []), str(path))  # type: ignore[attr-defined]
        figures[recipe.NAME] = json.loads((path / "results.json").read_text())
    assert figures["char-rnn"]["held_out_chars"] == figures["gpt-pretrain"]["held_out_chars"] == 55_394
    assert figures["gpt-pretrain"]["held_out_bpc"] < figures["char-rnn"]["held_out_bpc"]
