"""Run folders, reports, atomic writes, and model save/load."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import torchbook
from torchbook.errors import CheckpointError, UserInputError
from torchbook.hub import load_model, save_model
from torchbook.io import atomic_write, atomic_write_json
from torchbook.models.mlp import MLP, MLPConfig
from torchbook.report import Report, fmt
from torchbook.runs import RunDir


def test_run_dir_start_resume_and_conflict(tmp_path):
    run = RunDir.start(tmp_path / "r", "demo", {"lr": 0.1})
    assert run.read_json("config.json") == {"recipe": "demo", "config": {"lr": 0.1}}
    assert RunDir.start(tmp_path / "r", "demo", {"lr": 0.1}).path == run.path  # same config: resumed
    with pytest.raises(UserInputError, match="already holds a run with another recipe or config"):
        RunDir.start(tmp_path / "r", "demo", {"lr": 0.2})
    RunDir.start(tmp_path / "r", "demo", {"lr": 0.2}, overwrite=True)


def test_metrics_log_survives_a_torn_last_line(tmp_path):
    run = RunDir.start(tmp_path / "r", "demo", {})
    run.log(kind="epoch", epoch=1, loss=0.5)
    with open(run.path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "epoch", "epo')  # a process killed mid-write
    assert [r["epoch"] for r in run.metrics("epoch")] == [1]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = atomic_write_json(tmp_path / "x.json", {"v": 1})

    def broken(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, broken)
    assert path.read_text().strip().startswith("{") and '"v": 1' in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_report_puts_ours_beside_the_book(tmp_path):
    report = Report("T", "demo", "10", "the data")
    report.compare("test RMSE", 41446.3, 41446, "close").table("sizes", ["split", "n"], [["train", 16512]])
    text = report.render(wall_clock_s=1.5)
    assert "| test RMSE | 41,446 | 41,446 | close |" in text
    assert "- data: the data" in text and "wall-clock time: 1.5 s" in text and "| train | 16,512 |" in text
    assert fmt(0.91234) == "0.9123" and fmt(None) == "-" and fmt(3) == "3"


@dataclass
class TiedConfig:
    vocab: int = 11
    dim: int = 4


class Tied(nn.Module):
    """Embedding and output layer share one weight (weight tying) — safetensors must still save it."""

    config_class = TiedConfig

    def __init__(self, config: TiedConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.out = nn.Linear(config.dim, config.vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x):
        return self.out(self.embed(x))


def test_save_and_load_round_trip_including_tied_weights(tmp_path):
    model = MLP(MLPConfig(5, 2, [7], "gelu", 0.1))
    model.standardize.fit(torch.randn(20, 5) * 3 + 1)  # buffers are saved too
    save_model(model, tmp_path / "mlp")
    loaded = load_model(tmp_path / "mlp")
    x = torch.randn(3, 5)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    assert loaded.config == model.config and not loaded.training

    tied = Tied(TiedConfig())
    save_model(tied, tmp_path / "tied")
    from safetensors.torch import load_file

    reloaded = Tied(TiedConfig())  # a test class: load_model imports only torchbook's, so load the state by hand
    reloaded.load_state_dict(load_file(str(tmp_path / "tied" / "model.safetensors")))
    tokens = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(reloaded(tokens), tied(tokens))


def test_load_names_what_is_wrong(tmp_path):
    save_model(MLP(MLPConfig(2, 1, [3])), tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="is corrupt"):
        torchbook.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"torchbook_class": "os:system", "config": {}}')
    with pytest.raises(CheckpointError, match="only torchbook's own classes"):
        torchbook.load(tmp_path / "m")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="holds no model"):
        torchbook.load(empty)
