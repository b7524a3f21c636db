"""GANs (chapter 18): the alternating step updates one player at a time through the one trainer, the Fréchet
distance behaves, and the `gan` recipe's run folder reloads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import torchbook
from torchbook.config import build_config
from torchbook.errors import UserInputError
from torchbook.models.gan import GAN, GANConfig
from torchbook.recipes import gan
from torchbook.train import TrainConfig, Trainer
from torchbook.train.frechet import PenultimateFeatures, feature_classifier, frechet_distance
from torchbook.train.generative import GANStep

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", ["dense", "dcgan"])
def test_gan_step_alternates_players_through_the_trainer(kind):
    """Batches listed twice: the first step moves only the discriminator, the second only the generator."""
    torch.manual_seed(0)
    model = GAN(GANConfig(kind=kind, image_size=[8, 8], codings=4, generator_hidden=[8], discriminator_hidden=[8],
                          channels=[4, 8]))
    images = torch.rand(16, 8, 8)
    data = torch.utils.data.TensorDataset(images, torch.zeros(16, dtype=torch.long))
    snapshots = []

    class Watch:
        def on_step_end(self, trainer, loss):
            snapshots.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})

    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = TrainConfig(epochs=1, batch_size=16, lr=1e-2, progress=False)
    Trainer(model, config, None, data, step=GANStep(0.1), batches=lambda epoch: [list(range(16))] * 4,
            callbacks=[Watch()]).fit()

    def moved(a, b, prefix):
        return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix) and "running" not in k
                   and "num_batches" not in k)

    states = [before, *snapshots]
    for i, (a, b) in enumerate(zip(states[:-1], states[1:])):
        discriminator_turn = i % 2 == 0
        assert moved(a, b, "discriminator.") == discriminator_turn, i
        assert moved(a, b, "generator.") == (not discriminator_turn), i
    assert int(model.phase) == 0  # four turns: back to the discriminator's


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # dead ReLU features of a small classifier: scipy's check
def test_frechet_distance_is_small_for_the_same_distribution_and_large_for_noise(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHBOOK_CACHE", str(tmp_path))
    from torchbook.data.images import load_digits

    digits = load_digits()
    classifier = feature_classifier(digits.images[:1200], digits.labels[:1200], 10, seed=0, dataset="digits")
    again = feature_classifier(digits.images[:1200], digits.labels[:1200], 10, seed=0, dataset="digits")
    assert all(torch.equal(a, b) for a, b in zip(classifier.state_dict().values(), again.state_dict().values()))
    features = PenultimateFeatures(classifier)
    real, other = digits.images[1200:1500], digits.images[1500:1797]
    same = frechet_distance(features, real, other)
    noise = frechet_distance(features, real, np.random.default_rng(0).random(real.shape, dtype=np.float32))
    assert same < noise / 4
    # torchmetrics' formula on the features, recomputed with scipy
    from scipy import linalg

    a = features(torch.from_numpy(real)).double().numpy()
    b = features(torch.from_numpy(other)).double().numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert same == pytest.approx(expected, rel=1e-3)


def test_gan_smoke_run_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHBOOK_CACHE", str(tmp_path / "cache"))
    run = gan.run(build_config(gan.Config, preset="smoke", overrides=["epochs=1", "fd_samples=50"]), tmp_path / "run")
    for name in ("report.md", "results.json", "model/model.safetensors", "plots/samples_per_epoch.png",
                 "plots/mode_collapse.png", "plots/samples.png"):
        assert (run.path / name).is_file(), name
    results = json.loads((run.path / "results.json").read_text())
    assert gan.evaluate(run.path)["frechet_distance"] == pytest.approx(results["frechet_distance"], rel=1e-4)
    assert isinstance(torchbook.load(run.path).model, GAN)
    assert gan.sample_images(run.path, n=3).shape == (3, 8, 8)
    with pytest.raises(UserInputError, match="steps"):
        gan.sample_images(run.path, n=3, steps=5)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gan_quick_learns_every_class(tmp_path):
    """quick (dense GAN, Fashion-MNIST, 5 epochs): generated images cover the classes (class entropy above 1.8 of
    a possible 2.30, no class above 40%) and are far closer to the test images than uniform noise."""
    run = gan.run(build_config(gan.Config, preset="quick"), tmp_path / "run")
    results = json.loads((run.path / "results.json").read_text())
    assert results["class_entropy"] > 1.8 and results["top_class_share"] < 0.4
    assert results["frechet_distance"] < 100


def test_gan_training_resumes_exactly(tmp_path):
    """Stopped mid-epoch and resumed from the last checkpoint (the phase buffer and the trainer's position in the
    doubled batch list restored), the GAN ends with exactly the weights of an uninterrupted run."""
    import dataclasses

    from torchbook.runs import RunDir

    data = torch.utils.data.TensorDataset(torch.rand(96, 8, 8), torch.zeros(96, dtype=torch.long))

    def batches(epoch):
        order = torch.randperm(96, generator=torch.Generator().manual_seed(epoch)).tolist()
        return [b for i in range(0, 96, 16) for b in (order[i : i + 16],) * 2]

    def train(run_dir, max_steps=0):
        torch.manual_seed(0)
        model = GAN(GANConfig(image_size=[8, 8], codings=4, generator_hidden=[16], discriminator_hidden=[16]))
        config = TrainConfig(epochs=2, batch_size=16, lr=1e-2, checkpoint_every=3, progress=False)
        run = RunDir.start(run_dir, "gan-test", {"test": 1})
        Trainer(model, dataclasses.replace(config, max_steps=max_steps), run, data, step=GANStep(0.1),
                batches=batches).fit()
        return model.state_dict()

    reference = train(tmp_path / "a")
    train(tmp_path / "b", max_steps=5)  # stops after a discriminator turn: the generator plays next
    resumed = train(tmp_path / "b")
    for name, value in reference.items():
        assert torch.equal(value, resumed[name]), name
