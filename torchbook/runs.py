"""Run folders: `runs/<recipe>/<run-id>/` holds everything a run made, and nothing from elsewhere is needed.

Layout::

    config.json        {"recipe": ..., "config": {...}}  replayable with `torchbook run RECIPE --config`
    metrics.jsonl      one JSON object per logged event (train steps, epochs, evaluation)
    checkpoints/       the trainer's atomic, checksummed checkpoints
    model/             the final model: model.safetensors + config.json (+ tokenizer.json) or a joblib file
    split.json         the data split (sizes, seed, indices or manifest)
    plots/*.png        learning curves and the recipe's own plots
    report.md          the evaluation beside the book's figure, the data source, the wall-clock time
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchbook.config import C, build_config, to_dict
from torchbook.errors import CheckpointError, RunExists, RunFinished, UserInputError
from torchbook.io import (
    atomic_write_json,
    atomic_write_text,
    is_main_process,
    is_read_only,
    make_read_only,
    to_jsonable,
)

RUNS_ROOT = Path("runs")
# Settings that change how a run computes, not what it learns: a resumed run may change them (more memory-frugal
# activation checkpointing after running out of memory, another device, no progress bar). Everything else must
# match the run's config.json, or the resumed run would be a different one.
RESUME_SETTINGS = ("device", "num_workers", "progress", "compile", "activation_checkpointing", "release_memory")


def _what_it_learns(record: dict[str, Any], keys: Any = None) -> Any:
    """The record without the settings a resume may change (and, given `keys`, only those config keys)."""
    config = {k: v for k, v in record.get("config", {}).items()
              if k not in RESUME_SETTINGS and (keys is None or k in keys)}
    return to_jsonable({**record, "config": config})


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


class RunDir:
    """A run folder. Create with `RunDir.start(...)` (new or resumed) or open with `RunDir.open(path)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # -- creation -------------------------------------------------------------------------------------------
    @classmethod
    def start(
        cls, run_dir: RunDir | str | Path | None, recipe: str, config: Any, overwrite: bool = False
    ) -> RunDir:
        """Create the folder and write config.json; an existing folder of the same recipe and config is resumed.

        `run_dir=None` makes `runs/<recipe>/<timestamp>/`.
        """
        if isinstance(run_dir, RunDir):
            run_dir = run_dir.path
        if run_dir is None:
            base = RUNS_ROOT / recipe / new_run_id()
            path, n = base, 1
            while path.exists():
                n += 1
                path = base.with_name(f"{base.name}-{n}")
        else:
            path = Path(run_dir)
        rd = cls(path)
        record = {"recipe": recipe, "config": to_dict(config) if dataclasses.is_dataclass(config) else config}
        if not is_main_process():  # distributed: rank 0 writes the run folder, the other processes only train
            make_read_only(path)
            return rd
        if path.exists() and not path.is_dir():
            raise RunExists(f"{str(path)!r} is a file, not a folder; give a new or empty folder for the run")
        if path.is_dir() and any(path.iterdir()) and not rd.config_path.exists():
            # Never delete or mix into a folder that is not a run: it may hold anything.
            raise RunExists(f"{str(path)!r} already holds files and is not a torchbook run folder; give a new or "
                            "empty folder for the run")
        if rd.config_path.exists() and not overwrite:
            old = rd.read_json("config.json")
            # A key the run's config.json lacks is newer than the run: it takes its default (a new setting's default
            # is the behaviour from before it existed), so the run still resumes.
            if _what_it_learns(old) != _what_it_learns(record, keys=old.get("config", {}).keys()):
                raise RunExists(f"run folder {str(path)!r} already holds a run with another recipe or config")
            if rd.finished:
                raise RunFinished(f"run folder {str(path)!r} holds a finished run (its report.md is written); "
                                  "nothing to resume")
            before, after = to_jsonable(old).get("config", {}), to_jsonable(record)["config"]
            changed = {k: v for k, v in after.items() if before.get(k) != v}
            if changed:
                rd.log(kind="resume", changed=changed)
        elif overwrite and rd.config_path.exists():
            shutil.rmtree(path)  # a torchbook run (checked above), replaced on request
        path.mkdir(parents=True, exist_ok=True)
        if rd.has("failed.json"):
            (path / "failed.json").unlink()  # tried again: the old failure no longer describes the run
        path.mkdir(parents=True, exist_ok=True)
        rd.write_json("config.json", record)
        return rd

    @classmethod
    def open(cls, path: RunDir | str | Path) -> RunDir:
        """Open an existing run folder; a clear error if it is not one."""
        rd = cls(path.path if isinstance(path, RunDir) else path)
        if not rd.path.is_dir():
            raise CheckpointError(f"run folder {str(path)!r} does not exist")
        if not rd.config_path.exists():
            raise CheckpointError(f"{str(path)!r} is not a torchbook run folder (no config.json)")
        try:
            rd.read_json("config.json")
        except json.JSONDecodeError:
            raise CheckpointError(f"{str(rd.config_path)!r} is corrupt (not valid JSON)") from None
        return rd

    # -- places ---------------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def plots(self) -> Path:
        p = self.path / "plots"
        if not is_read_only(p):
            p.mkdir(parents=True, exist_ok=True)
        return p

    def require(self, recipes: tuple[str, ...], purpose: str) -> RunDir:
        """This run, if it is a run of one of `recipes`; else an error saying what `purpose` needs."""
        if self.recipe not in recipes:
            raise UserInputError(f"{str(self.path)!r} is a {self.recipe} run; {purpose} needs a run of "
                                 f"{' or '.join(recipes)}")
        return self

    @property
    def finished(self) -> bool:
        """A run is finished once its report.md is written: every recipe writes it last."""
        return (self.path / "report.md").exists()

    @property
    def failure(self) -> str | None:
        """Why the run failed, if it did (`mark_failed`) and has not been tried again since."""
        return str(self.read_json("failed.json")["reason"]) if self.has("failed.json") else None

    def mark_failed(self, reason: str) -> None:
        """Record why the run stopped (shown by `report`); the run folder and its checkpoints stay."""
        self.write_json("failed.json", {"reason": reason, "time": time.strftime("%Y-%m-%d %H:%M:%S")})

    @property
    def recipe(self) -> str:
        return str(self.read_json("config.json")["recipe"])

    def config_values(self) -> dict[str, Any]:
        return dict(self.read_json("config.json")["config"])

    def load_config(self, cls: type[C]) -> C:
        """The run's config rebuilt as `cls`, the one way every config is built (`build_config`: typed, validated)."""
        return build_config(cls, base=self.config_values())

    # -- files ----------------------------------------------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self.path / name, obj)

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def once(self, name: str, compute: Callable[[], Any]) -> Any:
        """`compute()`'s JSON result, written to `name` in the run folder the first time and read back when the run
        is resumed, so work done before training (a baseline evaluation, reference log-probabilities) is not
        repeated by every resume."""
        if self.has(name):
            return self.read_json(name)
        value = to_jsonable(compute())
        self.write_json(name, value)
        return value

    def has(self, name: str) -> bool:
        return (self.path / name).exists()

    def log(self, **record: Any) -> None:
        """Append one event to metrics.jsonl (flushed at once, so a killed run keeps what it logged)."""
        record.setdefault("time", round(time.time(), 3))
        if is_read_only(self.path):
            return
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(to_jsonable(record)) + "\n")
            f.flush()

    def metrics(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The logged events, optionally only those with `kind == kind`; a torn last line is ignored."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if kind is None or record.get("kind") == kind:
                out.append(record)
        return out

    def truncate_metrics(self, keep: Any) -> None:
        """Keep only the events for which `keep(record)` is true (used when resuming from a checkpoint)."""
        kept = [r for r in self.metrics() if keep(r)]
        atomic_write_text(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
