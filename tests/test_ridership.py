"""Chapter 13: ridership data, windows, baselines, the forecasting models and the ridership recipe."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import mirror_has

import torchbook
from torchbook.cli import main
from torchbook.config import build_config
from torchbook.data.timeseries import check_daily, load_ridership, make_windows, period
from torchbook.errors import UserInputError
from torchbook.models.forecasting import KINDS, ForecastConfig, Forecaster, rollout
from torchbook.recipes import ridership

pytestmark = pytest.mark.skipif(not mirror_has("ridership.tgz"), reason="ridership.tgz is not in $TORCHBOOK_MIRROR")


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return load_ridership()


def test_naive_baseline_reproduces_the_book_exactly(frame):
    assert round(ridership.naive_mae(frame)) == ridership.BOOK_NAIVE_MAE == 42_143


def test_gaps_and_dates_outside_the_data_are_clear_errors(frame):
    with pytest.raises(UserInputError, match=r"1 gap\(s\).*before 2019-03-02 \(2 days\)"):
        check_daily(frame.drop(pd.Timestamp("2019-03-01")))
    with pytest.raises(UserInputError, match="outside the data, which covers 2001-01-01 to 2021-11-30"):
        period(frame, "2030-01-01", None)


def test_windows_line_up_inputs_and_targets():
    series = np.arange(20, dtype=np.float32)[:, None]
    vec = make_windows(series, series[:, 0], length=5, horizon=3)
    assert vec.inputs.shape == (13, 5, 1) and vec.targets.shape == (13, 3)
    assert vec.inputs[2, :, 0].tolist() == [2, 3, 4, 5, 6] and vec.targets[2].tolist() == [7, 8, 9]
    seq = make_windows(series, series[:, 0], length=5, horizon=3, seq2seq=True)
    assert seq.targets.shape == (13, 5, 3)
    assert seq.targets[2, 0].tolist() == [3, 4, 5] and seq.targets[2, -1].tolist() == [7, 8, 9]
    with pytest.raises(UserInputError, match="too few"):
        make_windows(series[:6], series[:6, 0], length=5, horizon=3)


def test_multivariate_features_hold_tomorrows_day_type(frame):
    from torchbook.data.timeseries import features

    x = features(frame.loc["2019-03-01":"2019-03-03"], multivariate=True)  # Fri, Sat, Sun
    assert x.shape == (3, 5)
    assert x[0, 2:].tolist() == [1, 0, 0]  # Friday's row: tomorrow is a Saturday (A)
    assert x[1, 2:].tolist() == [0, 1, 0]  # Saturday's row: tomorrow is a Sunday (U)


def test_written_out_rnn_equals_torch_rnn():
    torch.manual_seed(0)
    reference = torch.nn.RNN(5, 32, batch_first=True)
    ours = Forecaster(ForecastConfig("rnn-cell", n_features=5))
    cell = ours.body.cell
    with torch.no_grad():
        for mine, theirs in ((cell.ih.weight, reference.weight_ih_l0), (cell.ih.bias, reference.bias_ih_l0),
                             (cell.hh.weight, reference.weight_hh_l0), (cell.hh.bias, reference.bias_hh_l0)):
            mine.copy_(theirs)
    x = torch.randn(4, 56, 5)
    torch.testing.assert_close(ours.body(x), reference(x)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_every_model_kind_gives_the_right_shapes(kind):
    x = torch.randn(2, 56, 5)
    vec = Forecaster(ForecastConfig(kind, n_features=5, horizon=14))
    assert vec(x).shape == (2, 14)
    if kind != "linear":
        seq = Forecaster(ForecastConfig(kind, n_features=5, horizon=14, seq2seq=True))
        assert seq(x).shape == (2, len(range(56)[seq.output_steps(56)]), 14)


def test_causal_models_do_not_see_the_future():
    """Changing the last input day must not change the sequence outputs for earlier days."""
    torch.manual_seed(0)
    for kind in ("wavenet", "gru", "ln-rnn"):
        model = Forecaster(ForecastConfig(kind, n_features=1, horizon=2, seq2seq=True)).eval()
        x = torch.randn(1, 56, 1)
        changed = x.clone()
        changed[0, -1] += 5
        torch.testing.assert_close(model(x)[:, :-1], model(changed)[:, :-1])


def test_rollout_feeds_forecasts_back():
    model = Forecaster(ForecastConfig("linear", n_features=1, seq_len=3))
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[0.0, 0.0, 1.0]]))  # tomorrow = today + 1
        model.head.bias.fill_(1.0)
    assert rollout(model, torch.tensor([[[1.0], [2.0], [3.0]]]), 3).tolist() == [[4.0, 5.0, 6.0]]


def test_smoke_run_reloads_and_forecasts(tmp_path, capsys):
    run = ridership.run(build_config(ridership.Config, preset="smoke"), tmp_path / "run")
    results = json.loads((run.path / "results.json").read_text())
    assert round(results["naive"]) == 42_143 and results["sarima"] > 0
    report = (run.path / "report.md").read_text()
    assert "| naive (7-day lag) | 42,143 |" in report and "SARIMA" in report
    assert torchbook.load(run.path).meta["extra"]["rung"] == "linear"
    assert ridership.evaluate(run.path)["val_mae"] == pytest.approx(results["linear"]["val_mae_median"], rel=1e-5)
    assert main(["forecast", str(run.path), "--days", "14", "--end", "2019-06-30"]) == 0
    out = capsys.readouterr().out
    assert "2019-07-01" in out and "2019-07-14" in out and "plot:" in out
    assert main(["forecast", str(run.path), "--end", "1999-01-01"]) == 2
    assert "outside the data" in capsys.readouterr().err


def test_linear_model_learns_to_beat_the_naive_baseline(tmp_path):
    config = build_config(ridership.Config, overrides=["model=linear", "seeds=1", "sarima_days=-1", "epochs=60"])
    results = json.loads((ridership.run(config, tmp_path / "run").path / "results.json").read_text())
    assert results["linear"]["val_mae_median"] < results["naive"]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 92 daily SARIMA refits
def test_sarima_refitted_daily_matches_the_book(frame):
    mae, days = ridership.sarima_mae(frame)
    assert days == 92
    assert abs(mae - ridership.BOOK_SARIMA_MAE) / ridership.BOOK_SARIMA_MAE < 0.03


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)  # the whole ladder took about 2 hours of one core
def test_the_ladder_matches_the_book(tmp_path):
    """The whole ladder, 3 seeds each: the book's ordering holds and each figure is within 15% of the book's."""
    run = ridership.run(build_config(ridership.Config, overrides=["sarima_days=-1"]), tmp_path / "run")
    results = json.loads((run.path / "results.json").read_text())
    neural = {k: v["val_mae_median"] for k, v in results.items() if isinstance(v, dict)}
    assert results["naive"] > max(neural.values())
    assert sorted(neural.values()).index(neural["multivariate"]) < 4
    for name, rung in ridership.LADDER.items():
        if rung.book_mae:
            assert abs(neural[name] - rung.book_mae) <= 0.15 * rung.book_mae, name
    t14 = results["seq2seq"]["val_mae_t14"]  # the book: 35,315 at t+14
    assert abs(t14 - ridership.BOOK_SEQ2SEQ_T14) <= 0.15 * ridership.BOOK_SEQ2SEQ_T14


@pytest.mark.parametrize("name", list(ridership.LADDER))
def test_every_rung_trains_and_validates_with_the_trainer(name, frame, tmp_path):
    """One epoch of every model of the ladder through the shared trainer (the conv + GRU rung's strided targets
    once broke validation)."""
    config = build_config(ridership.Config, overrides=[f"model={name}", "epochs=1", "seeds=1", "sarima_days=-1"])
    model, results = ridership.train_rung(name, ridership.LADDER[name], config, 0, frame,
                                          ridership.RunDir(tmp_path / name))
    assert np.isfinite(results["val_mae"]) and results["val_mae"] > 0
