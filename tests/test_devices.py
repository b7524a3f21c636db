"""Every tensor made next to a model goes to the model's device (issue #14), checked on a CPU-only machine.

While a check runs, tensors made without a device go to PyTorch's `meta` device: an operation that mixes one of
them with the model's (CPU) tensors, or that reads its values, fails there exactly as a tensor left on the CPU
fails beside a model on a GPU. The model and its inputs are made before, on the CPU.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from torchbook.data.timeseries import make_windows
from torchbook.data.tokenizers import char_tokenizer, special_ids, train_bpe
from torchbook.devices import check_device, device_of
from torchbook.errors import UserInputError
from torchbook.generate.text import generate_text
from torchbook.models.char_rnn import CharRNN, CharRNNConfig
from torchbook.models.forecasting import ForecastConfig, Forecaster, rollout
from torchbook.models.gpt import GPT, GPTConfig
from torchbook.models.seq2seq_rnn import Seq2SeqConfig, Seq2SeqRNN
from torchbook.models.transformer import TransformerConfig, TransformerTranslator
from torchbook.recipes import get_recipe, recipe_infos
from torchbook.recipes.char_rnn import rnn_nats
from torchbook.recipes.gpt_pretrain import gpt_nats
from torchbook.recipes.ridership import predictions
from torchbook.rl.networks import ActorCritic, ActorCriticConfig
from torchbook.train.language_model import sample
from torchbook.train.translation import translate
from torchbook.train.vision import accuracy

TEXT = "to be or not to be, that is the question: whether 'tis nobler in the mind to suffer " * 4


@contextmanager
def strays_on_meta() -> Iterator[None]:
    with torch.device("meta"):
        yield


def test_the_check_itself_catches_a_tensor_made_without_a_device() -> None:
    model = torch.nn.Linear(3, 2)
    with strays_on_meta(), pytest.raises((RuntimeError, NotImplementedError)):
        model(torch.zeros(1, 3)).sum().item()


def test_character_rnn_sampling_and_scoring() -> None:
    torch.manual_seed(0)
    tokenizer = char_tokenizer(TEXT)
    model = CharRNN(CharRNNConfig(tokenizer.get_vocab_size(), 8, 16, 1)).eval()
    ids = torch.tensor(tokenizer.encode(TEXT[:60]).ids)
    with strays_on_meta():
        assert sample(model, tokenizer, "to be", 10, temperature=1.0, seed=0).startswith("to be")
        nats, _ = rnn_nats(model, ids, first_input=0)
    assert nats > 0


def test_gpt_sampling_scoring_and_batched_generation() -> None:
    torch.manual_seed(0)
    tokenizer = train_bpe([TEXT], 300, prepend_space=False)
    model = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2, d_model=16, d_ff=32,
                          max_len=64)).eval()
    ids = [special_ids(tokenizer)["bos"]] + tokenizer.encode(TEXT[:80], add_special_tokens=False).ids
    with strays_on_meta():
        assert sample(model, tokenizer, "to be", 8, temperature=0.7, seed=0).startswith("to be")
        nats = gpt_nats(model, ids, block_size=16, stride=8)
        completions = generate_text(model, tokenizer, ["to be", "the question of"], 6)
    assert nats > 0 and len(completions) == 2


@pytest.mark.parametrize("kind", ["transformer", "rnn"])
def test_translation_greedy_and_beam(kind: str) -> None:
    torch.manual_seed(0)
    tokenizer = train_bpe([TEXT, "me gusta el fútbol con mis amigos"], 300)
    ids = special_ids(tokenizer)
    common = dict(vocab_size=tokenizer.get_vocab_size(), pad_id=ids["pad"], bos_id=ids["bos"], eos_id=ids["eos"])
    model = (TransformerTranslator(TransformerConfig(d_model=16, n_heads=2, n_encoder_layers=1, n_decoder_layers=1,
                                                     d_ff=32, max_len=32, **common)) if kind == "transformer"
             else Seq2SeqRNN(Seq2SeqConfig(embed_dim=8, hidden=16, layers=1, max_len=32, **common))).eval()
    with strays_on_meta():
        for beam in (1, 3):
            assert len(translate(model, tokenizer, ["to be or not", ""], beam=beam, max_new_tokens=5)) == 2


def test_forecasting_predictions_and_rollout() -> None:
    torch.manual_seed(0)
    model = Forecaster(ForecastConfig(kind="rnn", hidden=8)).eval()
    series = np.random.default_rng(0).random((80, 1)).astype(np.float32)
    windows = make_windows(series, series[:, 0], 56)
    window = torch.from_numpy(series[-56:])[None]
    with strays_on_meta():
        out, targets = predictions(model, windows)
        assert float((out - targets).abs().mean()) >= 0
        assert rollout(model, window, 3).shape == (1, 3)


def test_reinforcement_learning_policy_acts_on_numpy_observations() -> None:
    model = ActorCritic(ActorCriticConfig(obs_dim=4, n_actions=2)).eval()
    with strays_on_meta():
        actions = model.act(np.zeros((3, 4), dtype=np.float32))
    assert actions.shape == (3,)


def test_image_accuracy_moves_each_chunk_to_the_model() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    images, labels = torch.rand(10, 4, 4), torch.randint(0, 3, (10,))
    with torch.no_grad():
        expected = float((model(images).argmax(1) == labels).float().mean())
        with strays_on_meta():
            assert accuracy(model, TensorDataset(images, labels), batch_size=4) == expected


def test_every_recipe_evaluates_on_a_chosen_device() -> None:
    """`torchbook eval --device` hands its device to the recipe's `evaluate(run_dir, device=...)`."""
    for name in recipe_infos():
        recipe = get_recipe(name)
        if recipe.evaluate is not None:
            parameter = inspect.signature(recipe.evaluate).parameters.get("device")
            assert parameter is not None and parameter.default == "auto", recipe.name


def test_device_names_are_checked() -> None:
    check_device("cpu")
    check_device("auto")
    assert device_of(torch.nn.Linear(2, 2)).type == "cpu"
    for bad in ("gpu", "cuda:x"):
        with pytest.raises(UserInputError, match="unknown device"):
            check_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="not available"):
            check_device("cuda")
