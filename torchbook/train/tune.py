"""Hyperparameter search (book chapter 10) with Optuna: `torchbook tune RECIPE --trials N name=SPACE ...`.

Each trial runs the whole recipe (its own run folder under `<folder>/trials/`) with sampled values; a callback
added to every Trainer the recipe builds (`torchbook.train.callbacks.extra_callbacks`, so recipes need no
change) reports the monitored validation metric (`monitor`, default `val_loss`) at each epoch to Optuna's median
pruner, which stops unpromising trials. The TPE sampler proposes the values. The study lives in
`<folder>/study.db` (SQLite): running the same command again resumes the search, and a trial that was
interrupted resumes from its own last checkpoint. `<folder>/report.md` holds the best trial, the parameter
importances and a plot of the optimization history.

SPACE is one of `loguniform(LOW,HIGH)`, `uniform(LOW,HIGH)`, `int(LOW,HIGH)`, `logint(LOW,HIGH)` or
`choice(A,B,...)`. For a list field (like `hidden=[300,100]`) a number sets every element (the depth stays),
and a choice may list whole lists: `hidden=choice([300,100],[100,50])`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_origin

from torchbook.config import build_config, field_types, parse_value, split_override, to_dict
from torchbook.errors import UserInputError
from torchbook.io import atomic_write_json
from torchbook.report import Report
from torchbook.train.callbacks import extra_callbacks
from torchbook.train.config import monitor_mode

log = logging.getLogger(__name__)

SPACE_KINDS = ("loguniform", "uniform", "int", "logint", "choice")
_SPACE = re.compile(r"^\s*(loguniform|uniform|int|logint|choice)\s*\((.*)\)\s*$", re.S)
SETTINGS_FILE = "tune.json"


@dataclass(frozen=True)
class Space:
    """One searched config field: `kind` over `args` (two bounds, or the choices as text)."""

    name: str
    kind: str
    args: tuple[str, ...]

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.args))
        low, high = self.args
        if self.kind in ("int", "logint"):
            return trial.suggest_int(self.name, int(float(low)), int(float(high)), log=self.kind == "logint")
        return trial.suggest_float(self.name, float(low), float(high), log=self.kind == "loguniform")

    def __str__(self) -> str:
        return f"{self.kind}({','.join(self.args)})"


def split_top_level(text: str) -> list[str]:
    """'a,[1,2],b' -> ['a', '[1,2]', 'b']: commas inside brackets do not split."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def parse_space(name: str, text: str, field_type: Any) -> Space | None:
    """The search space `text` describes, None if it is a plain value; a clear error if it is malformed."""
    match = _SPACE.match(text)
    if match is None:
        return None
    kind, body = match.group(1), match.group(2)
    args = tuple(split_top_level(body))
    if kind == "choice":
        if len(args) < 2:
            raise UserInputError(f"{name}={text}: choice needs at least two values, like choice(adam,nadam)")
        for arg in args:  # every choice must be a valid value of the field
            parse_value(arg, field_type, name)
        return Space(name, kind, args)
    if len(args) != 2:
        raise UserInputError(f"{name}={text}: {kind} takes two bounds, like {kind}(1e-4,1e-1)")
    try:
        low, high = float(args[0]), float(args[1])
    except ValueError:
        raise UserInputError(f"{name}={text}: the bounds must be numbers") from None
    if not low < high:
        raise UserInputError(f"{name}={text}: the lower bound must be below the upper bound")
    if kind in ("loguniform", "logint") and low <= 0:
        raise UserInputError(f"{name}={text}: a log scale needs a positive lower bound")
    if kind in ("int", "logint") and not (low.is_integer() and high.is_integer()):
        raise UserInputError(f"{name}={text}: int bounds must be whole numbers")
    return Space(name, kind, args)


def split_arguments(config_class: type, items: Sequence[str]) -> tuple[dict[str, Space], list[str]]:
    """`key=SPACE` items become search spaces, `key=value` items fixed overrides."""
    types = field_types(config_class)
    spaces: dict[str, Space] = {}
    fixed: list[str] = []
    for item in items:
        key, text = split_override(item, types, expected=f"key=value or key=SPACE ({', '.join(SPACE_KINDS)})")
        space = parse_space(key, text, types[key])
        if space is None:
            fixed.append(f"{key}={text}")
        else:
            spaces[key] = space
    return spaces, fixed


def apply_sample(config: Any, values: dict[str, Any]) -> Any:
    """The config with the sampled values, converted to each field's type; a number given to a list field sets
    every element of the current list."""
    types = field_types(type(config))
    changes = {}
    for key, value in values.items():
        tp = types[key]
        if isinstance(value, str):
            value = parse_value(value, tp, key)
        if get_origin(tp) in (list, tuple) and not isinstance(value, (list, tuple)):
            current = getattr(config, key)
            value = [value] * max(1, len(current))
        elif tp is float:
            value = float(value)
        changes[key] = value
    config = dataclasses.replace(config, **changes)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def check_choices(base: Any, spaces: dict[str, Space]) -> None:
    """Every value a choice offers must make a valid config (an unknown optimizer fails now, not at trial 7)."""
    for space in spaces.values():
        if space.kind == "choice":
            for arg in space.args:
                apply_sample(base, {space.name: arg})


class PruningReporter:
    """A Trainer callback: reports the monitored metric to the Optuna trial each epoch, keeps the best value and
    raises optuna.TrialPruned when the median pruner says so (the trial's last checkpoint stays in its folder)."""

    def __init__(self, trial: Any, metric: str):
        self.trial = trial
        self.metric = metric
        self.minimize = monitor_mode(metric) == "min"
        self.best: float | None = None

    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        import optuna

        if self.metric not in record:
            return
        value = float(record[self.metric])
        if self.best is None or (value < self.best if self.minimize else value > self.best):
            self.best = value
        self.trial.report(value, int(record["epoch"]))
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.metric}={value:.4g} at epoch {record['epoch']} is below the median")


@dataclass
class TuneResult:
    folder: Path
    best_number: int
    best_value: float
    best_params: dict[str, Any]
    best_run: str
    importances: dict[str, float]
    counts: dict[str, int]


def tune(
    recipe: Any,
    trials: int,
    items: Sequence[str] = (),
    preset: str | None = None,
    folder: str | Path | None = None,
    seed: int = 42,
    pruner_startup_trials: int = 5,
    pruner_warmup_epochs: int = 1,
    run_recipe: Callable[..., Any] | None = None,
) -> TuneResult:
    """Search `recipe`'s config over the `key=SPACE` items (the `key=value` items are fixed) for `trials` finished
    trials in total, in `folder` (default `runs/tune/<recipe>/<timestamp>`); resumable. `recipe` is a
    `torchbook.recipes.Recipe` (the train layer does not import recipes: the CLI looks the name up)."""
    import optuna

    if trials < 1:
        raise UserInputError(f"the number of trials must be at least 1, got {trials}", param="trials")
    spaces, fixed = split_arguments(recipe.config, items)
    if not spaces:
        raise UserInputError("give at least one key=SPACE to search, e.g. lr=loguniform(1e-4,1e-1)")
    base = build_config(recipe.config, preset=preset, overrides=fixed)
    check_choices(base, spaces)
    metric = str(getattr(base, "monitor", "val_loss"))
    folder = Path(folder) if folder is not None else Path("runs") / "tune" / recipe.name / time.strftime("%Y%m%d-%H%M%S")
    settings = {"recipe": recipe.name, "preset": preset, "fixed": fixed, "spaces": {k: str(v) for k, v in spaces.items()},
                "metric": metric}
    settings_path = folder / SETTINGS_FILE
    if settings_path.exists():
        old = json.loads(settings_path.read_text())
        if old != settings:
            raise UserInputError(
                f"{str(folder)!r} holds another search ({old['recipe']}, {old['spaces']}, fixed {old['fixed']}); "
                "give the same recipe, preset and key=value/SPACE items to resume it, or another folder", param="dir"
            )
    else:
        atomic_write_json(settings_path, settings)

    log.info("tuning %s in %s (a search started again in the same folder resumes it)", recipe.name, folder)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=f"sqlite:///{(folder / 'study.db').resolve()}",
        study_name="torchbook-tune",
        direction="minimize" if monitor_mode(metric) == "min" else "maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=pruner_startup_trials, n_warmup_steps=pruner_warmup_epochs),
        load_if_exists=True,
    )
    resume_interrupted(study)
    run = run_recipe or recipe.run

    def objective(trial: Any) -> float:
        config = apply_sample(base, {name: space.suggest(trial) for name, space in spaces.items()})
        run_dir = trial.user_attrs.get("resume_dir") or str(folder / "trials" / f"trial-{trial.number:04d}")
        trial.set_user_attr("run_dir", run_dir)
        trial.set_user_attr("config", to_dict(config))
        reporter = PruningReporter(trial, metric)
        try:
            with extra_callbacks(reporter):
                run(config, run_dir)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        if reporter.best is None:
            raise UserInputError(
                f"recipe {recipe.name!r} logged no epoch metric {metric!r}; set monitor= to one it logs (e.g. val_loss)"
            )
        return reporter.best

    remaining = trials - len(finished(study))
    if remaining > 0:
        study.optimize(objective, n_trials=remaining)
    return write_report(study, folder, recipe, metric, settings)


def finished(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def resume_interrupted(study: Any) -> None:
    """Trials left RUNNING (the process was killed) or interrupted (Ctrl-C) are marked failed and queued again
    with the same parameters and the same run folder, so the trainer resumes them from their last checkpoint."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    already = {t.user_attrs.get("resumes_trial") for t in trials}
    for trial in trials:
        if trial.number in already or "run_dir" not in trial.user_attrs:
            continue
        if trial.state == TrialState.RUNNING:
            study.tell(trial.number, state=TrialState.FAIL)
        elif not (trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted")):
            continue
        study.enqueue_trial(trial.params, user_attrs={"resume_dir": trial.user_attrs["run_dir"], "resumes_trial": trial.number})


def write_report(study: Any, folder: Path, recipe: Any, metric: str, settings: dict[str, Any]) -> TuneResult:
    """report.md (best trial, importances, all trials), history.png, best.json."""
    import optuna
    from optuna.trial import TrialState

    from torchbook.plots import line_plot
    done = finished(study)
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    if not complete:
        raise UserInputError(f"no trial of {str(folder)!r} completed (all pruned or failed); run more trials",
                             param="trials")
    best = study.best_trial
    try:
        with warnings.catch_warnings():  # "too few trials": the note below says so
            warnings.simplefilter("ignore")
            importances = {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
        importance_note = "How much each parameter explains the objective (Optuna's default importance evaluator; sums to 1)."
    except (RuntimeError, ValueError) as e:
        importances = {}
        importance_note = f"not computable yet ({e}); it needs at least two completed trials with varied values."

    # Optimization history: each completed trial's value and the best so far.
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    numbers = [t.number for t in complete]
    values = [float(t.value) for t in complete]
    best_so_far = [min(values[: i + 1]) if minimize else max(values[: i + 1]) for i in range(len(values))]
    plots = folder / "plots"
    line_plot(plots / "optimization_history.png", {metric: (numbers, values), "best so far": (numbers, best_so_far)},
              "Optimization history", "trial", metric)

    report = Report(f"Hyperparameter search: {recipe.name}", recipe.name, recipe.chapter,
                    "the recipe's own data (each trial's report.md names it)")
    report.compare(f"best {metric}", float(best.value), None, f"trial {best.number}")
    counts = {s.name.lower(): sum(t.state == s for t in study.get_trials(deepcopy=False))
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    search = ", ".join(f"`{k}={v}`" for k, v in settings["spaces"].items())
    report.text("Search", f"Optuna TPE sampler, median pruner on `{metric}` per epoch; searched {search}; fixed: "
                f"{', '.join(f'`{f}`' for f in settings['fixed']) or 'none'}; preset: {settings['preset'] or 'defaults'}. "
                f"Trials: {counts['complete']} completed, {counts['pruned']} pruned, {counts['fail']} failed or "
                f"interrupted. Study: `study.db` (the same search started again in this folder resumes it).")
    report.table("Best trial", ["parameter", "value"], [[k, v] for k, v in best.params.items()]
                 + [["run folder", best.user_attrs.get("run_dir", "-")]])
    report.text("Parameter importances", importance_note)
    if importances:
        report.table("Importances", ["parameter", "importance"], [[k, v] for k, v in importances.items()])
    report.image("Optimization history", plots / "optimization_history.png", folder)
    names = list(settings["spaces"])
    rows = [[t.number, t.state.name.lower(), t.value if t.value is not None else "-",
             *[t.params.get(n, "-") for n in names]] for t in study.get_trials(deepcopy=False)]
    report.table("All trials", ["trial", "state", metric, *names], rows)
    spent = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in study.get_trials(deepcopy=False)
                if t.datetime_complete is not None and t.datetime_start is not None)
    report.write(folder, wall_clock_s=spent)
    result = TuneResult(folder, best.number, float(best.value), dict(best.params),
                        str(best.user_attrs.get("run_dir", "")), importances, counts)
    atomic_write_json(folder / "best.json", {"trial": best.number, metric: best.value, "params": best.params,
                                             "run_dir": result.best_run, "importances": importances})
    return result
