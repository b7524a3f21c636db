"""Deterministic train/validation/test splits, recorded in the run folder (`split.json`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split


def split_indices(
    n: int, val: float, test: float, seed: int, stratify: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Indices of a train/val/test split of `n` examples: the same for the same (n, fractions, seed, labels)."""
    index = np.arange(n)
    rest, test_idx = train_test_split(index, test_size=test, random_state=seed, stratify=stratify) if test else (index, index[:0])
    if val:
        strat = stratify[rest] if stratify is not None else None
        train_idx, val_idx = train_test_split(rest, test_size=val / (1 - test), random_state=seed, stratify=strat)
    else:
        train_idx, val_idx = rest, rest[:0]
    return {"train": np.sort(train_idx), "val": np.sort(val_idx), "test": np.sort(test_idx)}


def split_record(splits: dict[str, np.ndarray], source: str, seed: int, **extra: Any) -> dict[str, Any]:
    """What goes into split.json: sizes, seed, the data source and the indices themselves."""
    return {
        "source": source,
        "seed": seed,
        "sizes": {name: int(len(idx)) for name, idx in splits.items()},
        "indices": {name: idx.tolist() for name, idx in splits.items()},
        **extra,
    }
