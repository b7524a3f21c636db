"""DDP and FSDP (chapter 17) on 2 CPU processes (gloo): each ends with the weights of a single-process run with
the same global batch, and checkpoints resume on a different number of processes."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

from torchbook.runs import RunDir
from torchbook.train import TrainConfig, Trainer

ATOL = 1e-6


def data() -> tuple[TensorDataset, TensorDataset]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(100, 6, generator=generator)
    y = (x @ torch.randn(6, 2, generator=generator)).tanh() + 0.05 * torch.randn(100, 2, generator=generator)
    return TensorDataset(x[:84], y[:84]), TensorDataset(x[84:], y[84:])


class Net(nn.Module):
    """No dropout, no batch norm: every process computes the same function of its shard. Two blocks in a
    ModuleList, so FSDP shards them one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(6, 16), nn.Tanh()), nn.Sequential(nn.Linear(16, 16), nn.Tanh())])
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


# 84 examples in global batches of 16: the last holds 4, so uneven shards are exercised too.
BASE: dict[str, Any] = dict(epochs=3, batch_size=16, lr=0.05, optimizer="adam", grad_accum=2, grad_clip=0.5,
                            l2=1e-3, max_norm=2.0, schedule="cosine", progress=False, seed=3, log_every=1)


class StopAt:
    """Interrupt training after optimizer step `step` (its checkpoint written), like a killed run."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer: Trainer, loss: float) -> None:
        trainer.should_stop = trainer.should_stop or trainer.global_step == self.step


def train(run_dir: str | None, stop_at: int = 0, **overrides: Any) -> dict[str, torch.Tensor]:
    config = TrainConfig(**{**BASE, "checkpoint_every": 5, **overrides})
    config.validate()
    train_set, val_set = data()
    torch.manual_seed(1)
    trainer = Trainer(Net(), config, RunDir(run_dir) if run_dir else None, train_set, val_set,
                      criterion=nn.MSELoss(), callbacks=[StopAt(stop_at)] if stop_at else [])
    trainer.fit()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _worker(rank: int, world: int, port: int, out: str, jobs: list[tuple[str, str | None, dict[str, Any]]]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    results = {name: train(run_dir, **overrides) for name, run_dir, overrides in jobs}
    if rank == 0:
        torch.save(results, out)


def launch(world: int, tmp_path: Path, jobs: list[tuple[str, str | None, dict[str, Any]]]) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / f"result-{port}.pt")
    mp.start_processes(_worker, args=(world, port, out, jobs), nprocs=world, start_method="fork")
    return torch.load(out)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= ATOL, f"max |difference| {diff:.3g} > {ATOL}"
    return diff


@pytest.fixture(scope="module")
def single() -> dict[str, torch.Tensor]:
    return train(None)


@pytest.mark.timeout(120)
def test_ddp_and_fsdp_match_one_process_and_resume_across_process_counts(tmp_path: Path, single: Any) -> None:
    # Single-process runs interrupted after step 5 (mid-epoch), to be resumed by 2 processes.
    for name in ("single_to_ddp", "single_to_fsdp"):
        train(str(tmp_path / name), stop_at=5)
    # One launch of 2 processes runs every distributed job (starting processes is the slow part).
    jobs = [
        ("ddp", None, {"parallel": "ddp"}),
        ("fsdp", None, {"parallel": "fsdp"}),
        ("fsdp_interrupted", str(tmp_path / "fsdp_to_single"), {"parallel": "fsdp", "stop_at": 5}),
        ("ddp_resumed", str(tmp_path / "single_to_ddp"), {"parallel": "ddp"}),
        ("fsdp_resumed", str(tmp_path / "single_to_fsdp"), {"parallel": "fsdp"}),
        ("fsdp_fp16", None, {"parallel": "fsdp", "precision": "fp16"}),  # sharded gradient scaler
        ("ddp_bf16", None, {"parallel": "ddp", "precision": "bf16"}),
    ]
    results = launch(2, tmp_path, jobs)
    for name in ("fsdp_fp16", "ddp_bf16"):  # the same trajectory, within half-precision rounding
        reference = train(None, precision=name.split("_")[1])
        assert max((results[name][k] - reference[k]).abs().max().item() for k in reference) < 5e-3
    diffs = {name: assert_same(results[name], single) for name in ("ddp", "fsdp", "ddp_resumed", "fsdp_resumed")}
    # FSDP's checkpoint (written by rank 0 of 2 processes) resumed by one process without any parallel mode.
    diffs["fsdp_to_single"] = assert_same(train(str(tmp_path / "fsdp_to_single")), single)
    print("max |difference| to the one-process run:", {k: f"{v:.2g}" for k, v in diffs.items()})
    assert (results["fsdp_interrupted"]["head.weight"] - single["head.weight"]).abs().max() > 1e-3  # it did stop


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_cli_trains_a_recipe_with_fsdp_and_only_rank_0_writes(tmp_path: Path) -> None:
    """The real launcher and the real CLI: `torchrun --nproc_per_node 2 torchbook run image-classifier parallel=fsdp`."""
    import shutil
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", shutil.which("torchbook") or "torchbook",
               "run", "image-classifier", "parallel=fsdp", "epochs=2", "--preset", "smoke", "--run-dir", str(run_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "report.md").exists() and (run_dir / "model" / "model.safetensors").exists()
    epochs = RunDir(run_dir).metrics("epoch")
    assert [r["epoch"] for r in epochs] == [1, 2]  # logged once (rank 0), not once per process
    assert done.stdout.count("report:") >= 1


def test_torchrun_processes_without_a_parallel_mode_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchbook.errors import UserInputError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserInputError, match="add parallel=ddp or parallel=fsdp"):
        Trainer(Net(), TrainConfig(progress=False), None, data()[0], criterion=nn.MSELoss())
    with pytest.raises(UserInputError, match="accepted: ddp"):
        TrainConfig(parallel="dpp").validate()
