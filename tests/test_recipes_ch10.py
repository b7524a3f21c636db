"""The chapter-10 recipes: smoke runs write a complete, reloadable run folder; quick presets pass their gates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_debian_fashion, needs_housing

import torchbook
from torchbook.cli import main
from torchbook.config import build_config
from torchbook.data import images
from torchbook.errors import CheckpointError
from torchbook.recipes import image_classifier, regression_mlp


def check_run_folder(run_dir: Path) -> None:
    for name in ("config.json", "metrics.jsonl", "split.json", "report.md", "results.json",
                 "model/model.safetensors", "model/config.json", "plots/learning_curves.png"):
        assert (run_dir / name).is_file(), name
    report = (run_dir / "report.md").read_text()
    assert "wall-clock time" in report and "- data: " in report and "| metric | ours | book |" in report
    for image in (run_dir / "plots").glob("*.png"):
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_image_classifier_smoke_run_reloads(tmp_path):
    config = build_config(image_classifier.Config, preset="smoke")
    run = image_classifier.run(config, tmp_path / "run")
    check_run_folder(run.path)
    results = json.loads((run.path / "results.json").read_text())
    loaded = torchbook.load(run.path)
    assert loaded.recipe == "image-classifier" and not loaded.model.training
    assert image_classifier.evaluate(run.path)["test_accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-6)
    split = json.loads((run.path / "split.json").read_text())
    assert sum(split["sizes"].values()) == 600 + 270 + 360
    assert not set(split["indices"]["train"]) & set(split["indices"]["test"])
    # the config.json replays
    assert main(["run", "image-classifier", "--config", str(run.path / "config.json"),
                 "--run-dir", str(tmp_path / "replay")]) == 0
    assert json.loads((tmp_path / "replay" / "results.json").read_text())["test_accuracy"] == results["test_accuracy"]


@needs_housing
def test_regression_mlp_smoke_run_reloads(tmp_path):
    run = regression_mlp.run(build_config(regression_mlp.Config, preset="smoke"), tmp_path / "run")
    check_run_folder(run.path)
    results = json.loads((run.path / "results.json").read_text())
    assert regression_mlp.evaluate(run.path)["test_rmse"] == pytest.approx(results["test_rmse"], rel=1e-5)
    model = torchbook.load(run.path).model
    # the model standardizes raw features itself: a district with the training means predicts near the mean price
    x = model.standardize.mean[None]
    with torch.no_grad():
        assert 1.0 < float(model(x)) < 3.5


def test_load_rejects_a_corrupt_model(tmp_path):
    run = image_classifier.run(build_config(image_classifier.Config, preset="smoke", overrides=["epochs=1"]),
                               tmp_path / "run")
    weights = run.path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors.* is corrupt"):
        torchbook.load(run.path)
    with pytest.raises(CheckpointError, match="does not exist"):
        torchbook.load(tmp_path / "nowhere")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_image_classifier_quick_gate(tmp_path):
    """quick on digits: at least 95% test accuracy, and better than logistic regression from the same run."""
    run = image_classifier.run(build_config(image_classifier.Config, preset="quick"), tmp_path / "run")
    results = json.loads((run.path / "results.json").read_text())
    assert results["test_accuracy"] >= 0.95
    assert results["test_accuracy"] > results["baseline_logistic_test_accuracy"]


def test_fashion_mnist_split_is_the_books_random_split():
    """The book: `torch.manual_seed(42)` then `random_split(train_and_valid_data, [55_000, 5_000])`."""
    torch.manual_seed(42)
    book_train, book_val = torch.utils.data.random_split(range(60_000), [55_000, 5_000])
    torch.manual_seed(0)  # our split does not depend on the global generator's state
    ours = images.book_split(60_000, seed=42)
    assert ours["train"].tolist() == list(book_train.indices) and ours["val"].tolist() == list(book_val.indices)
    assert sorted(ours["train"].tolist() + ours["val"].tolist()) == list(range(60_000))


@needs_debian_fashion
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_image_classifier_book_preset_reproduces_the_books_validation_accuracy(tmp_path):
    """Chapter 10: "87.2% accuracy on the validation set" (Fashion-MNIST, the book's split and settings). Ours must
    be within 2 points of it: the book's run differs in its initial weights and shuffling, and over the last epochs
    of one run the validation accuracy itself moves by about a point from epoch to epoch (measured: README)."""
    run = image_classifier.run(build_config(image_classifier.Config, preset="book", overrides=["progress=false"]),
                               tmp_path / "run")
    results = json.loads((run.path / "results.json").read_text())
    assert results["dataset"] == "fashion-mnist"
    assert results["val_accuracy"] == pytest.approx(image_classifier.BOOK_VAL_ACCURACY, abs=0.02)
    assert results["test_accuracy"] > results["baseline_logistic_test_accuracy"]
    assert "| validation accuracy | " in (run.path / "report.md").read_text()


@needs_housing
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_regression_mlp_quick_gate(tmp_path):
    """The book's validation RMSE is 0.639 (batch 32, lr 0.02, 20 epochs): ours, on the validation set too, must be
    no worse (measured 0.579 with seed 42; 0.556 and 0.583 with seeds 1 and 2). The test RMSE must beat the linear
    regression of the same run."""
    run = regression_mlp.run(build_config(regression_mlp.Config, preset="quick"), tmp_path / "run")
    results = json.loads((run.path / "results.json").read_text())
    assert results["val_rmse"] <= regression_mlp.BOOK_VAL_RMSE
    assert results["test_rmse"] < results["baseline_linear_test_rmse"]


def test_trainer_learns_and_early_stopping_restores_best(tmp_path):
    """On digits, validation accuracy rises well above chance; with patience, the best epoch's weights are kept."""
    from torchbook.runs import RunDir

    config = build_config(image_classifier.Config, overrides=["data=digits", "epochs=30", "optimizer=adam", "lr=0.05",
                                                             "patience=3", "restore_best=true", "progress=false"])
    prep = image_classifier.prepare(config)
    model = torchbook.models.mlp.MLP(torchbook.models.mlp.MLPConfig(64, 10, [64], standardize=False))
    from torchbook.train import Trainer

    trainer = Trainer(model, config, RunDir.start(tmp_path / "r", "t", {}), prep.train, prep.val,
                      criterion=torch.nn.CrossEntropyLoss(), metrics=image_classifier.accuracy_metric(10))
    trainer.fit()
    epochs = trainer.run.metrics("epoch")  # type: ignore[union-attr]
    best = int(np.argmin([e["val_loss"] for e in epochs]))
    assert len(epochs) < 30 and len(epochs) - 1 - best == 3  # stopped 3 epochs after the best
    assert trainer.evaluate(prep.val)["loss"] == pytest.approx(epochs[best]["val_loss"], rel=1e-5)
    assert epochs[best]["val_accuracy"] > 0.9
