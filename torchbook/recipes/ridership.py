"""`ridership`: forecasting Chicago's daily rail ridership, chapter 13's whole ladder.

Baselines: the naive 7-day lag and SARIMA (1,0,0)(0,1,1,7) refitted every day (statsmodels), both measured on
March to May 2019 as in the book. Neural models (all trained by the shared trainer: Huber loss, SGD with momentum
0.9, early stopping on validation MAE with patience 50, at most 500 epochs) see 56-day windows of the 2016-2018
period and are validated on January to May 2019; validation MAE is reported in riders. `model=all` trains the
ladder with `seeds` seeds each and reports the median beside the book's figure.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
import torchmetrics
from safetensors.torch import load_file

import torchbook
from torchbook.data.timeseries import (
    PERIODS,
    RIDERSHIP_SOURCE,
    SCALE,
    Windows,
    features,
    load_ridership,
    make_windows,
    period,
)
from torchbook.devices import device_of
from torchbook.errors import UserInputError
from torchbook.hub import save_model
from torchbook.models.forecasting import ForecastConfig, Forecaster, rollout
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.runs import RunDir
from torchbook.train import Step, TrainConfig, Trainer

NAME = "ridership"
MAX_FORECAST_DAYS = 366
SEQ_LEN = 56
BOOK_NAIVE_MAE = 42_143
BOOK_SARIMA_MAE = 32_041


@dataclass(frozen=True)
class Rung:
    """One model of the ladder: what it sees, what it predicts, the book's learning rate and figure."""

    kind: str
    multivariate: bool = False
    horizon: int = 1
    seq2seq: bool = False
    layers: int = 1
    lr: float = 0.05
    book_mae: float | None = None
    note: str = ""


LADDER: dict[str, Rung] = {
    "linear": Rung("linear", lr=0.003, book_mae=37_726, note="56 days -> next day"),
    "rnn-cell": Rung("rnn-cell", book_mae=30_659, note="the simple RNN written out cell by cell (the book's 30,659)"),
    "rnn": Rung("rnn", note="nn.RNN, 32 units (the book: 'a similar result', no figure); also rolled out 14 days"),
    "deep-rnn": Rung("deep-rnn", layers=3, lr=0.01, book_mae=29_273, note="3 recurrent layers"),
    "multivariate": Rung("rnn", multivariate=True, book_mae=23_227, note="bus, rail, next day type"),
    "seq2vec": Rung("rnn", multivariate=True, horizon=14, lr=0.02, note="next 14 days at once (t+1 MAE)"),
    "seq2seq": Rung("rnn", multivariate=True, horizon=14, seq2seq=True, lr=0.1, book_mae=23_350, note="t+1 MAE"),
    "ln-rnn": Rung("ln-rnn", multivariate=True, horizon=14, seq2seq=True, lr=0.1, note="layer-normalized cells, seq2seq"),
    "lstm": Rung("lstm", multivariate=True, horizon=14, seq2seq=True, lr=0.1, note="seq2seq"),
    "gru": Rung("gru", multivariate=True, horizon=14, seq2seq=True, lr=0.1, note="seq2seq"),
    "conv-gru": Rung("conv-gru", multivariate=True, horizon=14, seq2seq=True, lr=0.1, note="strided conv + GRU, seq2seq"),
    "wavenet": Rung("wavenet", multivariate=True, horizon=14, seq2seq=True, lr=0.1, note="dilated causal convs"),
}
BOOK_SEQ2SEQ_T14 = 35_315
ModelName = Literal[
    "all", "naive", "sarima", "linear", "rnn-cell", "rnn", "deep-rnn", "multivariate", "seq2vec", "seq2seq",
    "ln-rnn", "lstm", "gru", "conv-gru", "wavenet",
]


@dataclass
class Config(TrainConfig):
    model: ModelName = "all"
    seeds: int = 3  # neural models are trained with seeds seed, seed+1, ...; the report gives the median
    book_lr: bool = True  # use the book's learning rate for each model (ignores lr)
    sarima_days: int = 0  # refit SARIMA on this many days of March-May 2019 (0 = all 92, -1 = skip SARIMA)
    epochs: int = 500
    patience: int = 50
    batch_size: int = 32
    optimizer: str = "sgd"
    momentum: float = 0.9
    lr: float = 0.05
    monitor: str = "val_mae"
    progress: bool = False

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"model": "linear", "epochs": 3, "seeds": 1, "sarima_days": 2},
        "quick": {"model": "multivariate", "seeds": 1, "sarima_days": 10},
        "book": {},
    }


# -- data -----------------------------------------------------------------------------------------------------
def split_windows(frame: pd.DataFrame, rung: Rung, split: str) -> Windows:
    """The rung's windows inside one of the book's periods (features computed on the whole series first)."""
    start, end = PERIODS[split]
    series = features(frame, rung.multivariate)
    rail = frame["rail"].to_numpy(np.float32) / SCALE
    rows = frame.index.get_indexer(period(frame, start, end).index)
    return make_windows(series[rows], rail[rows], SEQ_LEN, rung.horizon, rung.seq2seq)


# -- baselines ------------------------------------------------------------------------------------------------
def naive_mae(frame: pd.DataFrame) -> float:
    """Tomorrow's rail ridership = today's minus one week's: MAE over March-May 2019 (the book: 42,143)."""
    return float(frame["rail"].diff(7)["2019-03":"2019-05"].abs().mean())


def sarima_mae(frame: pd.DataFrame, days: int = 0) -> tuple[float, int]:
    """SARIMA (1,0,0)(0,1,1,7) refitted each day on 2019 so far, forecasting the next day (the book: 32,041)."""
    from statsmodels.tsa.arima.model import ARIMA

    rail = frame["rail"].asfreq("D")
    dates = pd.date_range("2019-03-01", "2019-05-31")
    dates = dates[:days] if days else dates
    errors = []
    for today in dates:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fitted = ARIMA(rail["2019-01-01":today - pd.Timedelta(days=1)], order=(1, 0, 0),
                           seasonal_order=(0, 1, 1, 7)).fit()
        errors.append(abs(float(fitted.forecast().iloc[0]) - rail[today]))
    return float(np.mean(errors)), len(dates)


# -- neural models --------------------------------------------------------------------------------------------
def build(rung: Rung) -> Forecaster:
    return Forecaster(ForecastConfig(rung.kind, 5 if rung.multivariate else 1, SEQ_LEN, rung.horizon, rung.seq2seq,
                                     layers=rung.layers))


def train_rung(name: str, rung: Rung, config: Config, seed: int, frame: pd.DataFrame,
               folder: RunDir) -> tuple[Forecaster, dict[str, float]]:
    """Train one model of the ladder (resumable in its own folder) and measure its validation MAE in riders."""
    cfg = dataclasses.replace(config, seed=seed, lr=rung.lr if config.book_lr else config.lr)
    run = RunDir.start(folder.path, f"{NAME}/{name}", cfg)
    torch.manual_seed(seed)
    model = build(rung)
    train, val = split_windows(frame, rung, "train"), split_windows(frame, rung, "val")
    huber = torch.nn.HuberLoss()

    def step(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Step:
        x, y = batch
        out = m(x)
        if rung.seq2seq:
            y = y[:, model.output_steps(y.size(1))]
        return Step(huber(out, y), out.detach(), y, count=len(x))

    if run.has("results.json"):
        results = run.read_json("results.json")

        model.load_state_dict(load_file(str(run.model_dir / "model.safetensors")))
        return model.eval(), results
    trainer = Trainer(model, cfg, run, train.dataset(), val.dataset(), step=step,
                      metrics={"mae": lambda: torchmetrics.MeanAbsoluteError()})
    trainer.fit()
    model.eval()
    results = {"val_mae": mae_next_day(model, val), "epochs": len(run.metrics("epoch"))}
    if rung.horizon > 1:
        results["val_mae_t14"] = mae_next_day(model, val, day=rung.horizon)
    if not rung.multivariate and rung.horizon == 1:  # 14 days ahead by feeding forecasts back
        ahead = make_windows(features(period(frame, *PERIODS["val"]), False),
                             period(frame, *PERIODS["val"])["rail"].to_numpy(np.float32) / SCALE, SEQ_LEN, 14)
        predicted = rollout(model, ahead.inputs, 14)
        results["val_mae_rollout14"] = float((predicted - ahead.targets).abs().mean() * SCALE)
    save_model(model, run.model_dir)
    run.write_json("results.json", results)
    return model, results


@torch.no_grad()
def predictions(model: Forecaster, windows: Windows) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H) forecasts and targets from each window's last day."""
    device = device_of(model)
    out = model(windows.inputs.to(device))
    targets = windows.targets.to(device)
    if model.config.seq2seq:
        out, targets = out[:, -1], targets[:, -1]
    return out, targets


def mae_next_day(model: Forecaster, windows: Windows, day: int = 1) -> float:
    """Validation MAE in riders of the forecast `day` days ahead (1 = tomorrow)."""
    out, targets = predictions(model, windows)
    return float((out[:, day - 1] - targets[:, day - 1]).abs().mean() * SCALE)


# -- the recipe -----------------------------------------------------------------------------------------------
def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    run = RunDir.start(run_dir, NAME, config)
    started = time.time()
    frame = load_ridership()
    report = Report("Forecasting Chicago's rail ridership", NAME, "13", RIDERSHIP_SOURCE)
    run.write_json("split.json", {"source": RIDERSHIP_SOURCE, "periods": PERIODS, "window_days": SEQ_LEN,
                                  "naive_and_sarima_period": ["2019-03-01", "2019-05-31"]})
    rows: list[list[Any]] = []
    summary: dict[str, Any] = {}
    naive = naive_mae(frame)  # costs nothing: every report shows it
    if naive:
        summary["naive"] = naive
        rows.append(["naive (7-day lag)", naive, "-", BOOK_NAIVE_MAE, pct(naive, BOOK_NAIVE_MAE), "March-May 2019"])
        report.compare("naive 7-day lag, validation MAE", naive, BOOK_NAIVE_MAE, "March-May 2019")
    if config.sarima_days >= 0:
        sarima, days = sarima_mae(frame, config.sarima_days)
        summary["sarima"] = sarima
        note = "92 daily refits" if days == 92 else f"only {days} of the 92 days (sarima_days)"
        rows.append(["SARIMA (1,0,0)(0,1,1,7)", sarima, "-", BOOK_SARIMA_MAE, pct(sarima, BOOK_SARIMA_MAE), note])
        report.compare("SARIMA refitted daily, validation MAE", sarima, BOOK_SARIMA_MAE, note)

    names = list(LADDER) if config.model == "all" else [config.model] if config.model in LADDER else []
    best: tuple[float, str, Forecaster] | None = None
    for name in names:
        rung = LADDER[name]
        maes, extras = [], []
        for seed in range(config.seed, config.seed + config.seeds):
            model, results = train_rung(name, rung, config, seed, frame, RunDir(run.path / "models" / f"{name}-seed{seed}"))
            maes.append(results["val_mae"])
            extras.append(results)
            if best is None or results["val_mae"] < best[0]:
                best = (results["val_mae"], name, model)
        median = statistics.median(maes)
        summary[name] = {"val_mae_median": median, "seeds": maes,
                         **{k: statistics.median(e[k] for e in extras) for k in extras[0] if k.startswith("val_mae_")}}
        rows.append([name, median, ", ".join(f"{m:,.0f}" for m in maes), rung.book_mae,
                     pct(median, rung.book_mae) if rung.book_mae else "-", rung.note])
        if rung.book_mae:
            report.compare(f"{name}, validation MAE (median of {config.seeds})", median, rung.book_mae,
                           within(median, rung.book_mae))
        run.log(kind="eval", model=name, **summary[name])
    if "seq2seq" in summary:
        t14 = summary["seq2seq"]["val_mae_t14"]
        report.compare("seq2seq, validation MAE at t+14", t14, BOOK_SEQ2SEQ_T14, within(t14, BOOK_SEQ2SEQ_T14))
    if "rnn" in summary:
        report.compare("rnn rolled out 14 days, mean validation MAE", summary["rnn"]["val_mae_rollout14"], None,
                       "autoregressive rollout")

    report.table("Validation MAE (riders)", ["model", "ours (median)", "seeds", "book", "ours vs book", "note"], rows)
    if best is not None:
        best_mae, best_name, best_model = best
        save_model(best_model, run.model_dir, extra={"rung": best_name, **dataclasses.asdict(LADDER[best_name])})
        forecast_plot(run.plots / "validation_forecasts.png", frame, best_name, best_model)
        versus = ""
        if naive:  # the baseline may win (a smoke run's few epochs): the heading says so rather than "best model"
            versus = (f"; {'worse' if best_mae > naive else 'better'} than the naive baseline ({best_mae:,.0f} against "
                      f"{naive:,.0f}; naive is measured on March-May 2019 only)")
        report.image(f"Validation period: {best_name}, the best of the trained models{versus}, against the truth",
                     run.plots / "validation_forecasts.png", run.path)
        summary["best"] = best_name
    if len(names) > 1:
        report.text("Ordering", ordering_text(summary))
    report.text("Notes", "Naive and SARIMA are measured on March-May 2019, the neural models on every 56-day window "
                         "of January-May 2019 (their targets start late February), as in the book. Values are "
                         "scaled to millions of riders for training; MAE is reported in riders.")
    run.write_json("results.json", summary)
    report.write(run.path, time.time() - started)
    return run


def pct(ours: float, book: float | None) -> str:
    return f"{(ours - book) / book:+.1%}" if book else "-"


def within(ours: float, book: float, tolerance: float = 0.15) -> str:
    return f"{pct(ours, book)} ({'within' if abs(ours - book) <= tolerance * book else 'outside'} 15%)"


def ordering_text(summary: dict[str, Any]) -> str:
    neural = {k: v["val_mae_median"] for k, v in summary.items() if isinstance(v, dict)}
    lines = []
    if "naive" in summary and neural:
        worst = max([summary["naive"], *neural.values()])
        lines.append(f"- naive is the worst: {'yes' if worst == summary['naive'] else 'no'}")
    if "multivariate" in neural:
        rank = sorted(neural.values()).index(neural["multivariate"]) + 1
        lines.append(f"- multivariate ranks {rank} of {len(neural)} neural models")
    return "\n".join(lines) or "-"


def forecast_plot(path: Any, frame: pd.DataFrame, name: str, model: Forecaster) -> None:
    from torchbook.plots import plt, save_figure

    rung = LADDER[name]
    val = split_windows(frame, rung, "val")
    out, targets = (t.cpu() for t in predictions(model, val))
    dates = period(frame, *PERIODS["val"]).index[SEQ_LEN : SEQ_LEN + len(out)]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(dates, targets[:, 0] * SCALE, label="truth", color="black")
    ax.plot(dates, out[:, 0] * SCALE, label=f"{name}, next-day forecast")
    ax.set_ylabel("rail riders per day")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


@torch.no_grad()
def forecast(run_dir: RunDir | str, days: int = 14, end: str | None = None, device: str = "cpu") -> pd.DataFrame:
    """Forecast `days` of rail ridership after `end` (default: the last day of the data) with a run's saved model.

    A multi-day model forecasts directly (up to its horizon); a next-day univariate model is rolled out.
    The day type after the last known day is taken from the calendar (weekday, Saturday, Sunday).
    """
    run = RunDir.open(run_dir).require((NAME,), "forecasting")
    if days < 1 or days > MAX_FORECAST_DAYS:
        raise UserInputError(f"days={days} must be between 1 and {MAX_FORECAST_DAYS} (at most a year)", param="days")
    if end is not None:
        valid = re.fullmatch(r"\d{4}-\d{2}-\d{2}", end) is not None
        try:
            pd.Timestamp(end)
        except ValueError:
            valid = False
        if not valid:
            raise UserInputError(f"the end date {end!r} is not a date; give YYYY-MM-DD", param="end")
    loaded = torchbook.load(run.path, map_location=device)
    model: Forecaster = loaded.model
    name = loaded.meta["extra"].get("rung", "?")
    frame = load_ridership()
    history = period(frame, None, end) if end else frame
    if end and pd.Timestamp(end) > frame.index.max():
        raise UserInputError(f"the end date {end} is after the data's last day, {frame.index.max().date()}",
                             param="end")
    if len(history) < SEQ_LEN:
        raise UserInputError(f"forecasting needs {SEQ_LEN} days of history before the end date; the data starts "
                             f"{frame.index.min().date()}", param="end")
    last_day = history.index[-1]
    series = features(history, model.config.n_features > 1)
    if model.config.n_features > 1:  # tomorrow's day type, from the calendar
        weekday = (last_day + pd.Timedelta(days=1)).weekday()
        series[-1, 2:] = [weekday == 5, weekday == 6, weekday < 5]
    window = torch.from_numpy(series[-SEQ_LEN:].copy())[None].to(device_of(model))
    if model.config.horizon >= days:
        out = model(window)
        values = (out[:, -1] if model.config.seq2seq else out)[0, :days]
    elif model.config.n_features == 1 and model.config.horizon == 1:
        values = rollout(model, window, days)[0]
    else:
        raise UserInputError(f"this run's model ({name}) forecasts {model.config.horizon} day(s) and needs future "
                             f"bus ridership to roll out further; ask for {model.config.horizon} day(s) or less",
                             param="days")
    dates = pd.date_range(last_day + pd.Timedelta(days=1), periods=days)
    return pd.DataFrame({"rail_forecast": (values.cpu().numpy() * SCALE).round().astype(int)}, index=dates.rename("date"))


def plot_forecast(path: Any, frame: pd.DataFrame, table: pd.DataFrame) -> None:
    from torchbook.plots import plt, save_figure

    history = frame["rail"].loc[: table.index[0] - pd.Timedelta(days=1)].iloc[-8 * 7 :]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(history.index, history.to_numpy(), label="rail riders (data)", color="black")
    ax.plot(table.index, table["rail_forecast"], marker="o", markersize=3, label="forecast")
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_ylabel("riders per day")
    fig.autofmt_xdate()  # slanted dates that do not overlap
    save_figure(fig, path)


def evaluate(run_dir: RunDir | str, device: str = "auto") -> dict[str, Any]:
    """Reload the saved (best) model on `device` and measure its validation MAE again."""
    run = RunDir.open(run_dir)
    loaded = torchbook.load(run.path, map_location=device)
    rung = LADDER[loaded.meta["extra"]["rung"]]
    return {"model": loaded.meta["extra"]["rung"], "val_mae": mae_next_day(loaded.model, split_windows(load_ridership(), rung, "val"))}


RECIPE = Recipe(NAME, "13", "Chicago rail ridership: naive, SARIMA, linear, RNNs, seq2seq, LSTM/GRU, WaveNet",
                Config, run, evaluate)
