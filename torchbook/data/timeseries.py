"""Time series for chapter 13: the Chicago Transit Authority's daily ridership, its periods, and windowed datasets.

Values are scaled to millions of riders (as the book does); MAE figures are reported back in riders.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset

from torchbook.data.download import RemoteFile
from torchbook.data.sources import extract
from torchbook.errors import UserInputError

RIDERSHIP = RemoteFile(
    "https://github.com/ageron/data/raw/main/ridership.tgz",
    "0ff99f3dddd886ddea161b68f25f90b56b0468f5c91949b75376fb494516c794",
    offline="set $TORCHBOOK_MIRROR to a folder holding ridership.tgz (e.g. the shared data mirror)",
)
RIDERSHIP_SOURCE = "Chicago Transit Authority daily boarding totals (Chicago Data Portal), the book's ridership.tgz"
SCALE = 1e6
# The book's periods: train on 2016-2018, validate on January to May 2019, test from June 2019.
PERIODS = {"train": ("2016-01-01", "2018-12-31"), "val": ("2019-01-01", "2019-05-31"), "test": ("2019-06-01", None)}
DAY_TYPES = ["A", "U", "W"]  # Saturday, Sunday/holiday, weekday


def check_daily(frame: pd.DataFrame) -> pd.DataFrame:
    """A clear error if the series skips a day (every model here assumes one row per consecutive day)."""
    steps = frame.index.to_series().diff().dropna()
    gaps = steps[steps != pd.Timedelta(days=1)]
    if len(gaps):
        first = gaps.index[0]
        raise UserInputError(
            f"the series has {len(gaps)} gap(s) in its daily dates, the first before {first.date()} "
            f"({gaps.iloc[0].days} days); fill or trim the data so that every day from start to end is present"
        )
    return frame


def load_ridership(path: str | None = None) -> pd.DataFrame:
    """Daily bus and rail boardings with the day type, indexed by date, sorted, without duplicate rows."""
    csv = path or extract(RIDERSHIP, "ridership/CTA_-_Ridership_-_Daily_Boarding_Totals.csv")
    frame = pd.read_csv(csv, parse_dates=["service_date"], date_format="%m/%d/%Y")
    frame.columns = ["date", "day_type", "bus", "rail", "total"]
    frame = frame.sort_values("date").set_index("date").drop(columns="total").drop_duplicates()
    return check_daily(frame)


def period(frame: pd.DataFrame, start: str | None, end: str | None) -> pd.DataFrame:
    """Rows from `start` to `end` (inclusive); an error naming the data's range if that is outside it."""
    first, last = frame.index.min(), frame.index.max()
    if (start and pd.Timestamp(start) > last) or (end and pd.Timestamp(end) < first):
        raise UserInputError(
            f"the date range {start or '...'} to {end or '...'} is outside the data, which covers "
            f"{first.date()} to {last.date()}"
        )
    return frame.loc[start:end]  # type: ignore[misc]


def features(frame: pd.DataFrame, multivariate: bool) -> np.ndarray:
    """(T, 1): rail in millions; multivariate (T, 5): bus, rail, and next day's type one-hot (A, U, W)."""
    rail = frame[["rail"]].to_numpy(np.float32) / SCALE
    if not multivariate:
        return rail
    bus = frame[["bus"]].to_numpy(np.float32) / SCALE
    next_day = frame["day_type"].shift(-1)
    one_hot = np.stack([(next_day == t).to_numpy(np.float32) for t in DAY_TYPES], axis=1)
    return np.concatenate([bus, rail, one_hot], axis=1)


@dataclass
class Windows:
    """Inputs (N, L, F) and targets: (N, H) for sequence-to-vector, (N, L, H) for sequence-to-sequence."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def dataset(self) -> TensorDataset:
        return TensorDataset(self.inputs, self.targets)


def make_windows(series: np.ndarray, target: np.ndarray, length: int, horizon: int = 1, seq2seq: bool = False) -> Windows:
    """Every window of `length` days of `series` (T, F) with the next `horizon` values of `target` (T,).

    Sequence-to-sequence targets hold, for each of the window's days t, the `horizon` values after day t.
    """
    n = len(series) - length - horizon + 1
    if n <= 0:
        raise UserInputError(f"{len(series)} days are too few for windows of {length} days and a {horizon}-day horizon")
    starts = np.arange(n)
    x = np.stack([series[s : s + length] for s in starts])
    if seq2seq:
        y = np.stack([[target[s + t + 1 : s + t + 1 + horizon] for t in range(length)] for s in starts])
    else:
        y = np.stack([target[s + length : s + length + horizon] for s in starts])
    return Windows(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32)))
