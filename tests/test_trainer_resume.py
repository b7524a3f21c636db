"""A run killed with SIGKILL at any moment and resumed ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from torchbook.errors import TrainingDiverged
from torchbook.runs import RunDir
from torchbook.train import Step, TrainConfig, Trainer

# Dropout (so the RNG state matters), Adam (optimizer state), a schedule, grad accumulation, validation with
# early-stopping bookkeeping, and a checkpoint every 3 optimizer steps.
ARGS = [
    "data=digits", "dropout=0.3", "epochs=8", "limit=600", "batch_size=32", "optimizer=adam", "lr=0.003",
    "schedule=cosine", "grad_accum=2", "checkpoint_every=3", "patience=50",
]


def torchbook(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "torchbook.cli", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen[bytes]) -> None:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err.decode()[-2000:]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def epoch_losses(run_dir: Path) -> list[tuple[int, float, float]]:
    return [(r["epoch"], r["train_loss"], r["val_loss"]) for r in RunDir(run_dir).metrics("epoch")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    finish(torchbook("run", "image-classifier", *ARGS, "--run-dir", str(run_dir)))
    return run_dir


def assert_same_run(run_dir: Path, reference: Path) -> None:
    ours, theirs = weights(run_dir), weights(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), f"{name} differs after resume"
    assert epoch_losses(run_dir) == epoch_losses(reference)


def test_sigkill_at_a_random_step_then_resume(tmp_path: Path, reference: Path):
    run_dir = tmp_path / "run"
    proc = torchbook("run", "image-classifier", *ARGS, "--run-dir", str(run_dir))
    target = random.Random().randint(4, 20)  # kill once checkpoint step >= 3 * target exists: a random moment
    deadline = time.time() + 180
    checkpoints = run_dir / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.stem.split("-")[1]) for p in checkpoints.glob("step-*.sha256")] if checkpoints.exists() else []
        if steps and max(steps) >= 3 * target:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "model").exists()
    finish(torchbook("run", "image-classifier", "--resume", str(run_dir)))
    assert_same_run(run_dir, reference)


def test_kill_in_the_middle_of_writing_a_checkpoint(tmp_path: Path, reference: Path):
    run_dir = tmp_path / "run"
    crash_step = str(3 * random.Random().randint(3, 25))
    proc = torchbook("run", "image-classifier", *ARGS, "--run-dir", str(run_dir),
                     env={"TORCHBOOK_CRASH_DURING_CHECKPOINT": crash_step})
    proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL
    leftovers = list((run_dir / "checkpoints").glob(".step-*.tmp"))
    assert leftovers, "the crash should leave a half-written temporary file"
    assert not (run_dir / "checkpoints" / f"step-{int(crash_step):09d}.pt").exists()
    finish(torchbook("run", "image-classifier", "--resume", str(run_dir)))
    assert_same_run(run_dir, reference)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path, reference: Path):
    run_dir = tmp_path / "run"
    crash_step = str(3 * 15)
    proc = torchbook("run", "image-classifier", *ARGS, "--run-dir", str(run_dir),
                     env={"TORCHBOOK_CRASH_DURING_CHECKPOINT": crash_step})
    proc.communicate(timeout=240)
    newest = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncate it
    proc = torchbook("run", "image-classifier", "--resume", str(run_dir))
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err.decode()
    assert f"skipping checkpoint {newest}" in err.decode() and "corrupt or truncated" in err.decode()
    assert_same_run(run_dir, reference)


class Exploding(torch.nn.Module):
    """A linear model whose output becomes NaN from the 5th forward pass in training."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.linear(x)
        return out * float("nan") if self.training and self.calls >= 5 else out


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path: Path):
    run = RunDir.start(tmp_path / "run", "test", {"x": 1})
    data = torch.utils.data.TensorDataset(torch.randn(64, 3), torch.randn(64, 1))
    config = TrainConfig(epochs=3, batch_size=8, checkpoint_every=2, progress=False)
    trainer = Trainer(Exploding(), config, run, data, criterion=torch.nn.MSELoss())
    with pytest.raises(TrainingDiverged, match=r"the loss became nan at step 5 \(epoch 1, batch 5\)"):
        trainer.fit()
    assert sorted(p.name for p in run.checkpoints.glob("*.pt")) == ["step-000000002.pt", "step-000000004.pt"]


def test_custom_step_function_and_accumulation_equivalence():
    """Two accumulated micro-batches of 16 give the same weights as one batch of 32 (a model without dropout)."""
    x, y = torch.randn(128, 5), torch.randn(128, 1)

    def train(batch_size: int, accum: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 1)
        config = TrainConfig(epochs=2, batch_size=batch_size, grad_accum=accum, optimizer="sgd", lr=0.1, progress=False)
        order = [list(range(i, i + 16)) for i in range(0, 128, 16)]

        def step(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Step:
            return Step(torch.nn.functional.mse_loss(m(batch[0]), batch[1]), count=len(batch[0]))

        batches = (lambda e: order) if accum == 2 else (lambda e: [order[i] + order[i + 1] for i in range(0, 8, 2)])
        Trainer(model, config, None, torch.utils.data.TensorDataset(x, y), step=step, batches=batches).fit()
        return model.weight.detach().clone()

    torch.testing.assert_close(train(16, 2), train(32, 1), atol=1e-6, rtol=0)


def test_a_kill_between_an_epochs_record_and_its_checkpoint_logs_the_epoch_once(tmp_path: Path):
    """A step checkpoint that falls on an epoch's last batch holds the epoch unfinished; if the process dies after
    the epoch's record but before the epoch-end checkpoint, resuming must not log that epoch twice (it did: a
    flaky failure of the SIGKILL test above)."""
    from torchbook.checkpoint import list_checkpoints, load_latest, save_checkpoint

    run = RunDir.start(tmp_path / "run", "test", {"x": 1})
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3), torch.randn(32, 1))
    config = TrainConfig(epochs=3, batch_size=8, checkpoint_every=4, keep_checkpoints=5, progress=False)
    Trainer(torch.nn.Linear(3, 1), config, run, data, criterion=torch.nn.MSELoss()).fit()
    assert [r["epoch"] for r in run.metrics("epoch")] == [1, 2, 3]
    # Turn the newest checkpoint (epoch 3's end, step 12) into the one the step checkpoint at epoch 3's last batch
    # was: epoch 3 not finished, all 4 of its batches done. Epoch 3's record stays in metrics.jsonl, as after a kill.
    state, _ = load_latest(run.checkpoints)
    assert state is not None and state["position"]["global_step"] == 12 and state["position"]["epoch"] == 3
    state["position"].update(epoch=2, batch_in_epoch=4)
    for path in list_checkpoints(run.checkpoints):
        path.unlink()
        path.with_suffix(".sha256").unlink(missing_ok=True)
    save_checkpoint(run.checkpoints, 12, state)
    Trainer(torch.nn.Linear(3, 1), config, run, data, criterion=torch.nn.MSELoss()).fit()
    assert [r["epoch"] for r in run.metrics("epoch")] == [1, 2, 3]


def test_train_loss_after_fit_is_the_last_epochs_not_zero(tmp_path: Path):
    """Recipes read `trainer.train_loss()` after `fit()` (the reward-model book run reported 0.0): it is the last
    epoch's mean, as logged in its record."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    run = RunDir.start(tmp_path / "run", "test", {"x": 1})
    trainer = Trainer(torch.nn.Linear(3, 1), TrainConfig(epochs=2, batch_size=8, progress=False), run,
                      torch.utils.data.TensorDataset(x, y), criterion=torch.nn.MSELoss())
    trainer.fit()
    last = run.metrics("epoch")[-1]["train_loss"]
    assert last > 0.1
    assert trainer.train_loss() == pytest.approx(last)
