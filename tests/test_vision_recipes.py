"""Vision training (chapters 11, 12, 16): augmentation transforms and the training step against their definitions
and torch's own losses; smoke runs of the recipes write reloadable run folders; slow gates on Fashion-MNIST."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchbook
from torchbook.config import build_config
from torchbook.data.image_transforms import cutmix, mixup, random_crop, random_flip
from torchbook.errors import UserInputError
from torchbook.recipes import cnn, vit
from torchbook.train.vision import AugmentOptions, classification_step

pytestmark = pytest.mark.usefixtures("one_thread")


def test_random_crop_is_a_window_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.rand(16, 2, 6, 7)
    out = random_crop(x, 2)
    padded = F.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(len(x)):
        matches = [(t, left) for t in range(5) for left in range(5)
                   if torch.equal(out[i], padded[i, :, t : t + 6, left : left + 7])]
        assert matches, f"crop {i} is no window of its padded image"
        offsets.add(matches[0])
    assert len(offsets) > 3  # the offsets vary across the batch


def test_random_flip_mirrors_some_images_and_keeps_the_others():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 5, 5)
    out = random_flip(x)
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_mixup_and_cutmix_mix_targets_like_the_images():
    torch.manual_seed(0)
    x = torch.stack([torch.full((1, 8, 8), float(i)) for i in range(6)])  # image i is constant i
    target = F.one_hot(torch.arange(6), 6).float()
    mixed, soft = mixup(x, target, alpha=0.4)
    # the pixel value is the target-weighted mean of the image indices
    assert torch.allclose(mixed[:, 0, 0, 0], soft @ torch.arange(6.0), atol=1e-5)
    cut, soft = cutmix(x, target, alpha=1.0)
    assert torch.allclose(cut.mean((1, 2, 3)), soft @ torch.arange(6.0), atol=1e-5)
    assert torch.allclose(soft.sum(1), torch.ones(6))


def test_classification_step_is_torchs_cross_entropy_with_label_smoothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 5, (8,))
    step = classification_step(AugmentOptions(label_smoothing=0.1), 5)
    loss = step(model, (x, y)).loss
    assert torch.allclose(loss, F.cross_entropy(model(x), y, label_smoothing=0.1), atol=1e-6)
    with torch.no_grad():  # evaluation: the plain loss, with predictions and targets for the metrics
        out = step(model, (x, y))
    assert torch.allclose(out.loss, F.cross_entropy(model(x), y)) and torch.equal(out.target, y)


def check_run(run_dir, recipe_module) -> dict:
    for name in ("config.json", "metrics.jsonl", "split.json", "report.md", "results.json", "model/model.safetensors"):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    loaded = torchbook.load(run_dir)
    assert not loaded.model.training
    assert recipe_module.evaluate(run_dir)["test_accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-6)
    return results


def test_cnn_smoke_run_reloads(tmp_path):
    config = build_config(cnn.Config, preset="smoke", overrides=["crop_padding=2", "flip=true", "mixup=0.2",
                                                                  "interpret=false"])
    results = check_run(cnn.run(config, tmp_path / "run").path, cnn)
    assert results["model"] == "cnn" and "mlp_test_accuracy" in results
    assert "crop_padding=2" in results["augmentation"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cnn_recipe_trains_resnet34_with_stochastic_depth(tmp_path):
    """model=resnet34 end to end on 64 images (slow only for its size: 21M parameters, checkpoints with Adam's
    state are a quarter of a gigabyte)."""
    config = build_config(cnn.Config, preset="smoke", overrides=[
        "model=resnet34", "drop_path=0.1", "limit=64", "val_limit=64", "test_limit=64", "compare_mlp=false",
        "interpret=false"])
    results = check_run(cnn.run(config, tmp_path / "run").path, cnn)
    model = torchbook.load(tmp_path / "run").model
    assert [len(stage) for stage in model.stages] == [3, 4, 6, 3] and results["parameters"] > 21_000_000
    with pytest.raises(UserInputError, match="resnet34"):
        build_config(cnn.Config, preset="smoke", overrides=["drop_path=0.1"])  # the CNN has no residual units


def test_vit_smoke_run_reloads_with_attention_maps(tmp_path):
    config = build_config(vit.Config, preset="smoke", overrides=["compare_cnn=false"])
    run = vit.run(config, tmp_path / "run")
    check_run(run.path, vit)
    assert (run.path / "plots" / "attention_rollout.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cnn_quick_beats_the_mlp_in_the_same_time(tmp_path):
    """Chapter 12's point: on the same Fashion-MNIST images in the same training time, the CNN beats the MLP."""
    run = cnn.run(build_config(cnn.Config, preset="quick"), tmp_path / "run")
    results = json.loads((run.path / "results.json").read_text())
    assert results["test_accuracy"] > results["mlp_test_accuracy"]
    assert results["test_accuracy"] >= 0.84  # measured 0.8545 (MLP 0.8441)


def test_chapter11_initializations_have_their_variances():
    from torchbook.models.mlp import MLP, MLPConfig

    torch.manual_seed(0)
    for init, variance in (("he", lambda i, o: 2 / i), ("lecun", lambda i, o: 1 / i), ("glorot", lambda i, o: 2 / (i + o))):
        model = MLP(MLPConfig(400, 10, [300], init=init, standardize=False))
        weight = model.layers[0].weight.detach()
        assert float(weight.var()) == pytest.approx(variance(400, 300), rel=0.05), init
        assert torch.all(model.layers[0].bias == 0)


def test_self_normalizing_net_keeps_activations_standardized_where_relu_default_fades():
    """Chapter 11: 30 SELU layers with LeCun init keep mean ~0 and std ~1 on standardized inputs."""
    from torchbook.models.mlp import MLP, MLPConfig

    torch.manual_seed(0)
    x = torch.randn(2000, 100)

    def last_hidden(config: MLPConfig) -> torch.Tensor:
        with torch.no_grad():
            return MLP(config).eval().layers[:-1](x)

    selu = last_hidden(MLPConfig(100, 10, [100] * 30, "selu", 0.1, standardize=False, init="lecun", alpha_dropout=True))
    assert abs(float(selu.mean())) < 0.2 and 0.7 < float(selu.std()) < 1.3
    relu = last_hidden(MLPConfig(100, 10, [100] * 30, "relu", standardize=False))  # PyTorch's default init
    assert float(relu.std()) < 0.1  # the signal fades (0.04 here)


def test_image_classifier_batch_norm_option_and_depth_experiment(tmp_path):
    from torchbook.recipes import image_classifier

    config = build_config(image_classifier.Config, preset="smoke",
                          overrides=["batch_norm=true", "init=he", "depth_experiment=[2,6]", "depth_epochs=1"])
    run = image_classifier.run(config, tmp_path / "run")
    model = torchbook.load(run.path).model
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    rows = json.loads((run.path / "depth_experiment.json").read_text())["rows"]
    assert [r[0] for r in rows] == [2, 6] and all(0 <= v <= 1 for r in rows for v in r[1:])
    assert "Depth experiment" in (run.path / "report.md").read_text()


def test_transfer_learning_smoke_run(tmp_path):
    from torchbook.recipes import transfer_learning

    run = transfer_learning.run(build_config(transfer_learning.Config, preset="smoke"), tmp_path / "run")
    results = json.loads((run.path / "results.json").read_text())
    assert len(results["draws"]) == 2 and 0.4 < results["scratch_mean"] <= 1.0
    assert transfer_learning.evaluate(run.path)["model_a_test_accuracy"] == pytest.approx(
        results["model_a_test_accuracy"], abs=1e-6)
    report = (run.path / "report.md").read_text()
    assert "0.925" in report and "0.716" in report


def test_cnn_run_calibrates_interprets_and_predicts_image_files(tmp_path, capsys):
    """The smoke run's report has the calibration table, reliability diagram and attribution maps; `torchbook
    predict RUN IMAGE...` classifies PNG files exactly as the model does on the same pixels."""
    from PIL import Image

    from torchbook.cli import main
    from torchbook.train.image_predict import predict_images
    from torchbook.train.vision import image_splits

    config = build_config(cnn.Config, preset="smoke", overrides=["compare_mlp=false", "dense=[32]", "dropout=0.3",
                                                                  "mc_samples=5"])
    run = cnn.run(config, tmp_path / "run")
    results = json.loads((run.path / "results.json").read_text())
    assert results["temperature"] > 0 and 0 <= results["ece_after"] <= 1 and "mc_accuracy" in results
    report = (run.path / "report.md").read_text()
    assert "Calibration and uncertainty" in report and "integrated gradients" in report
    for name in ("reliability.png", "attributions.png"):
        assert (run.path / "plots" / name).read_bytes()[:4] == b"\x89PNG"

    test = image_splits("fashion-mnist", 42, test_limit=3).test
    paths = []
    for i, image in enumerate(test.tensors[0][:, 0]):
        path = tmp_path / f"item{i}.png"
        Image.fromarray((image.numpy() * 255).round().astype("uint8")).save(path)
        paths.append(path)
    predictions = predict_images(run.path, paths, top=2, saliency_dir=tmp_path / "overlays")
    model = torchbook.load(run.path).model
    with torch.no_grad():
        expected = (model(test.tensors[0][:3]) / results["temperature"]).softmax(-1)
    for prediction, probs in zip(predictions, expected):
        best = int(probs.argmax())
        assert prediction.top[0][0] == cnn_classes()[best]
        assert prediction.top[0][1] == pytest.approx(float(probs[best]), abs=1e-5)
        assert prediction.saliency_path.read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["predict", str(run.path), *map(str, paths), "--top", "3"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0] == "image,rank,class,probability" and len(rows) == 1 + 3 * 3
    assert main(["predict", str(run.path), str(tmp_path / "missing.png")]) == 2


def cnn_classes() -> list[str]:
    from torchbook.data.images import FASHION_CLASSES

    return FASHION_CLASSES


def test_augmented_training_resumes_exactly(tmp_path):
    """Crops, flips and mixup draw from torch's generator, which checkpoints save: a run stopped after 5 steps
    and resumed ends with exactly the weights of an uninterrupted run."""
    import dataclasses

    from torchbook.runs import RunDir
    from torchbook.train import TrainConfig, Trainer

    @dataclasses.dataclass
    class Settings(AugmentOptions, TrainConfig):
        pass

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(96, 1, 8, 8), torch.randint(0, 3, (96,)))
    settings = Settings(epochs=2, batch_size=16, checkpoint_every=2, progress=False, crop_padding=1, flip=True,
                        mixup=0.4, label_smoothing=0.1)

    def trained(folder, max_steps: int = 0, expect_resume: bool = False):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2), nn.Linear(144, 3))
        config = dataclasses.replace(settings, max_steps=max_steps)
        run = RunDir.start(folder, "test", settings)
        trainer = Trainer(model, config, run, data, step=classification_step(config, 3))
        if expect_resume:  # the interrupted run's last checkpoint (step 4) is where this one starts
            assert trainer.resume() and trainer.global_step == 4
        trainer.fit()
        return model.state_dict()

    reference = trained(tmp_path / "reference")
    trained(tmp_path / "resumed", max_steps=5)
    resumed = trained(tmp_path / "resumed", expect_resume=True)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_vit_quick_learns_fashion_mnist(tmp_path):
    """The quick ViT (3 layers, 7x7 patches, 5 epochs on 10,000 images) learns: measured 0.7951 test accuracy
    (the quarter-width CNN in the same 50 s: 0.8153). The comparison with the CNN is reported, not gated."""
    run = vit.run(build_config(vit.Config, preset="quick"), tmp_path / "run")
    results = json.loads((run.path / "results.json").read_text())
    assert results["test_accuracy"] >= 0.77
    assert 0.5 < results["cnn_test_accuracy"] <= 1.0
