"""Autoencoders (chapter 18): the losses against their formulas and torch's own, shapes, and the recipe's runs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import torchbook
from torchbook.config import build_config
from torchbook.errors import UserInputError
from torchbook.models.autoencoder import VAE, Autoencoder, AutoencoderConfig
from torchbook.recipes import autoencoders
from torchbook.train.generative import autoencoder_step, kl_sparsity, vae_kl

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sparsity_penalty_is_the_kl_divergence_of_bernoullis():
    codings = torch.rand(64, 16)
    q = codings.mean(0)
    expected = sum(float(torch.distributions.kl_divergence(torch.distributions.Bernoulli(torch.tensor(0.1)),
                                                           torch.distributions.Bernoulli(qi))) for qi in q)
    assert float(kl_sparsity(codings, 0.1)) == pytest.approx(expected, rel=1e-4)
    assert float(kl_sparsity(torch.full((8, 4), 0.1), 0.1)) == pytest.approx(0.0, abs=1e-6)


def test_vae_kl_is_the_kl_divergence_from_the_standard_normal():
    mean, log_var = torch.randn(5, 3), torch.randn(5, 3)
    q = torch.distributions.Normal(mean, (0.5 * log_var).exp())
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(-1).mean()
    assert float(vae_kl(mean, log_var)) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("kind", ["dense", "conv", "vae"])
def test_autoencoders_map_images_to_codings_and_back(kind):
    config = AutoencoderConfig(kind=kind, image_size=[28, 28], codings=10)
    model = VAE(config) if kind == "vae" else Autoencoder(config)
    x = torch.rand(4, 28, 28)
    assert model.encode(x).shape == (4, 10)
    out = model(x)
    reconstruction = out[0] if kind == "vae" else out
    assert reconstruction.shape == (4, 28, 28) and 0 <= reconstruction.min() and reconstruction.max() <= 1


def test_vae_step_is_mse_plus_kl_over_pixels():
    torch.manual_seed(0)
    model = VAE(AutoencoderConfig(kind="vae", image_size=[8, 8], hidden=[16], codings=4))
    x = torch.rand(6, 8, 8)
    with torch.no_grad():
        torch.manual_seed(1)
        loss = autoencoder_step(kl_weight=1 / 64)(model, (x, None)).loss
        torch.manual_seed(1)
        reconstruction, mean, log_var = model(x)
    assert float(loss) == pytest.approx(float(F.mse_loss(reconstruction, x) + vae_kl(mean, log_var) / 64), rel=1e-6)


def test_denoising_noise_only_while_training():
    model = Autoencoder(AutoencoderConfig(image_size=[8, 8], hidden=[16], codings=4))
    x = torch.rand(6, 8, 8)
    step = autoencoder_step(noise="dropout", noise_level=0.5)
    with torch.no_grad():
        model.eval()
        assert float(step(model, (x, None)).loss) == pytest.approx(float(F.mse_loss(model(x), x)))
        model.train()
        torch.manual_seed(0)
        noisy_loss = float(step(model, (x, None)).loss)
        torch.manual_seed(0)
        assert noisy_loss == pytest.approx(float(F.mse_loss(model(F.dropout(x, 0.5)), x)))


def test_smoke_runs_reload(tmp_path):
    for kind, extra in (("sparse", ["labels=0", "epochs=1"]), ("vae", [])):
        run = autoencoders.run(build_config(autoencoders.Config, preset="smoke", overrides=[f"kind={kind}", *extra]),
                               tmp_path / kind)
        for name in ("report.md", "results.json", "model/model.safetensors", "plots/reconstructions.png",
                     "plots/embedding.png", "plots/learning_curves.png"):
            assert (run.path / name).is_file(), name
        results = json.loads((run.path / "results.json").read_text())
        assert autoencoders.evaluate(run.path)["test_reconstruction_mse"] == pytest.approx(
            results["test_reconstruction_mse"], rel=1e-5)
        assert ("pretrained_test_accuracy" in results) == (kind == "vae")
    assert isinstance(torchbook.load(tmp_path / "vae").model, VAE)
    assert (tmp_path / "vae" / "plots" / "generated.png").is_file()
    assert 0 < results["test_reconstruction_mse"] < 1
    with pytest.raises(UserInputError, match="autoencoder kind"):
        build_config(autoencoders.Config, overrides=["kind=stackd"])


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["stacked", "sparse", "vae"])
def test_quick_gates(tmp_path, kind):
    """quick (Fashion-MNIST, 10 epochs): the stacked autoencoder reconstructs better than PCA with as many
    components and its pretrained encoder beats the same classifier from scratch on 200 labels; the sparse one's
    mean coding activation is near the 0.1 target; the VAE reconstructs with an MSE under 0.05."""
    run = autoencoders.run(build_config(autoencoders.Config, preset="quick", overrides=[f"kind={kind}"]),
                           tmp_path / "run")
    results = json.loads((run.path / "results.json").read_text())
    if kind == "stacked":
        assert results["test_reconstruction_mse"] < results["pca_same_size_mse"]
        assert results["pretrained_test_accuracy"] > results["scratch_test_accuracy"]
    elif kind == "sparse":
        assert 0.05 <= results["mean_coding_activation"] <= 0.2
    else:
        assert results["test_reconstruction_mse"] < 0.05
