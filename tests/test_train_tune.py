"""`torchbook tune`: search spaces, the median pruner fed by the trainer each epoch, the report, resuming."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import optuna
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchbook.errors import UserInputError
from torchbook.recipes import Recipe
from torchbook.runs import RunDir
from torchbook.train import TrainConfig, Trainer
from torchbook.train.tune import apply_sample, check_choices, parse_space, split_arguments, tune


@dataclass
class TinyConfig(TrainConfig):
    hidden: list[int] = field(default_factory=lambda: [8, 8])
    epochs: int = 4
    batch_size: int = 32
    progress: bool = False
    interrupt_trial_at_epoch: int = 0  # test hook: trial 0 raises KeyboardInterrupt after this epoch (once)
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"smoke": {"epochs": 3}}


INTERRUPTED: list[str] = []


class Interrupt:
    def __init__(self, epoch: int, run_dir: str):
        self.epoch, self.run_dir = epoch, run_dir

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if record["epoch"] == self.epoch and self.run_dir.endswith("trial-0000") and self.run_dir not in INTERRUPTED:
            INTERRUPTED.append(self.run_dir)
            raise KeyboardInterrupt


def tiny_run(config: TinyConfig, run_dir: Any = None) -> RunDir:
    """A regression MLP on a fixed synthetic problem (a mechanics test of the tuner, not a quality claim)."""
    run = RunDir.start(run_dir, "tiny", config)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = x[:, :1] * x[:, 1:2] + x[:, 2:3].sin()
    layers: list[nn.Module] = []
    width = 4
    for h in config.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    torch.manual_seed(config.seed)
    model = nn.Sequential(*layers, nn.Linear(width, 1))
    callbacks = [Interrupt(config.interrupt_trial_at_epoch, str(run_dir))] if config.interrupt_trial_at_epoch else []
    Trainer(model, config, run, TensorDataset(x[:192], y[:192]), TensorDataset(x[192:], y[192:]),
            criterion=nn.MSELoss(), callbacks=callbacks).fit()
    return run


TINY = Recipe("tiny", "10", "test recipe", TinyConfig, tiny_run)


def test_spaces_parse_and_apply_to_typed_fields() -> None:
    spaces, fixed = split_arguments(TinyConfig, ["lr=loguniform(1e-4,1e-1)", "hidden=int(4,32)", "epochs=2",
                                                 "optimizer=choice(adam,nadam,sgd)", "momentum=uniform(0.5,0.99)"])
    assert fixed == ["epochs=2"]
    assert str(spaces["lr"]) == "loguniform(1e-4,1e-1)" and spaces["optimizer"].args == ("adam", "nadam", "sgd")
    config = apply_sample(TinyConfig(), {"hidden": 16, "lr": 0.01, "optimizer": "nadam"})
    assert config.hidden == [16, 16] and config.optimizer == "nadam"  # a number sets every layer, depth kept
    assert parse_space("hidden", "choice([32,16],[8])", list[int]).args == ("[32,16]", "[8]")  # type: ignore[union-attr]
    assert apply_sample(TinyConfig(), {"hidden": "[32,16,8]"}).hidden == [32, 16, 8]
    for bad in ["loguniform(0,1)", "int(1.5,3)", "uniform(2,1)", "choice(adam)", "loguniform(1e-4)"]:
        with pytest.raises(UserInputError):
            split_arguments(TinyConfig, [f"lr={bad}"])
    with pytest.raises(UserInputError, match="optimizer"):
        check_choices(TinyConfig(), split_arguments(TinyConfig, ["optimizer=choice(adam,adamz)"])[0])
    with pytest.raises(UserInputError, match="accepted"):
        split_arguments(TinyConfig, ["hiden=int(1,3)"])


@pytest.mark.timeout(120)
def test_tune_prunes_reports_and_resumes_an_interrupted_search(tmp_path: Path) -> None:
    folder = tmp_path / "search"
    items = ["lr=loguniform(1e-4,3e-1)", "hidden=int(2,32)", "interrupt_trial_at_epoch=2"]
    # Trial 0 is interrupted (Ctrl-C) after its epoch-2 checkpoint: the search stops there.
    with pytest.raises(KeyboardInterrupt):
        tune(TINY, trials=8, items=items, folder=folder, pruner_startup_trials=2)
    study = optuna.load_study(study_name="torchbook-tune", storage=f"sqlite:///{folder / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL"]
    # The same command resumes: trial 0 is re-run from its checkpoint, then the search goes on to 8 trials.
    result = tune(TINY, trials=8, items=items, folder=folder, pruner_startup_trials=2)
    study = optuna.load_study(study_name="torchbook-tune", storage=f"sqlite:///{folder / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == 8
    assert states.count("PRUNED") >= 1  # the median pruner stopped some trials from their epoch reports
    resumed = study.trials[1]
    assert resumed.user_attrs["resumes_trial"] == 0 and resumed.user_attrs["run_dir"] == study.trials[0].user_attrs["run_dir"]
    assert resumed.params == study.trials[0].params
    epochs = RunDir(resumed.user_attrs["run_dir"]).metrics("epoch")
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]  # epochs 1-2 kept from before the interruption
    # The objective is the best epoch value the trainer reported, and the report has the best trial.
    best = study.best_trial
    assert result.best_number == best.number and result.best_value == pytest.approx(best.value)
    assert best.value == pytest.approx(min(e["val_loss"] for e in RunDir(result.best_run).metrics("epoch")))
    assert set(result.importances) == {"lr", "hidden"} and sum(result.importances.values()) == pytest.approx(1.0)
    report = (folder / "report.md").read_text()
    assert f"trial {best.number}" in report and "Importances" in report
    assert (folder / "plots" / "optimization_history.png").stat().st_size > 1000
    # A third call with everything done runs nothing and reports again; another search in the folder is refused.
    assert tune(TINY, trials=8, items=items, folder=folder).best_number == best.number
    with pytest.raises(UserInputError, match="another search"):
        tune(TINY, trials=8, items=["lr=loguniform(1e-3,1e-1)"], folder=folder)


@pytest.mark.timeout(120)
def test_cli_tunes_the_book_image_classifier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The book's example: learning rate and hidden size of the chapter-10 MLP (offline digits, smoke preset)."""
    from torchbook.cli import main

    code = main(["tune", "image-classifier", "--trials", "2", "--preset", "smoke", "lr=loguniform(1e-4,1e-1)",
                 "hidden=int(20,300)", "monitor=val_accuracy", "epochs=2", "--dir", str(tmp_path / "t")])
    assert code == 0
    out = capsys.readouterr().out
    assert "best trial" in out and (tmp_path / "t" / "report.md").exists()
    assert main(["tune", "image-classifier", "--trials", "2", "lr=normal(1,2)", "--dir", str(tmp_path / "u")]) == 2


def test_a_killed_trial_left_running_is_resumed_with_its_parameters(tmp_path: Path) -> None:
    folder = tmp_path / "search"
    items = ["lr=loguniform(1e-4,3e-1)", "hidden=int(2,32)", "epochs=2"]
    tune(TINY, trials=1, items=items, folder=folder)
    study = optuna.load_study(study_name="torchbook-tune", storage=f"sqlite:///{folder / 'study.db'}")
    killed = study.ask()  # what a SIGKILLed process leaves behind: a RUNNING trial with its parameters
    killed.suggest_float("lr", 1e-4, 3e-1, log=True)
    killed.suggest_int("hidden", 2, 32)
    killed.set_user_attr("run_dir", str(folder / "trials" / "trial-0001"))
    tune(TINY, trials=2, items=items, folder=folder)
    trials = optuna.load_study(study_name="torchbook-tune", storage=f"sqlite:///{folder / 'study.db'}").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].user_attrs["resumes_trial"] == 1 and trials[2].params == trials[1].params
    assert trials[2].user_attrs["run_dir"] == str(folder / "trials" / "trial-0001")
