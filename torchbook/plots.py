"""Plots for reports, drawn with matplotlib's Agg backend (no screen needed) and saved atomically as PNG."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
from matplotlib.ticker import MaxNLocator  # noqa: E402

from torchbook.io import atomic_write_bytes  # noqa: E402


def save_figure(fig: Any, path: str | Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def line_plot(
    path: str | Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    logy: bool = False,
) -> Path:
    """One line per named (x, y) series."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, (x, y) in series.items():
        ax.plot(list(x), list(y), marker="o" if len(x) <= 30 else None, markersize=3, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return save_figure(fig, path)


NOT_CURVES = {"time_s", "time"}  # bookkeeping in the epoch records (cumulative seconds), not a learning curve


def learning_curves(path: str | Path, epochs: Sequence[Mapping[str, Any]], title: str = "Learning curves") -> Path:
    """Training and validation loss, and each validation metric, per epoch, from the trainer's `kind=epoch`
    records (one panel per measure; the panel's title says which sets it shows)."""
    keys = sorted({k for e in epochs for k in e if k.startswith(("train_", "val_")) and isinstance(e[k], (int, float))})
    names = sorted({k.split("_", 1)[1] for k in keys} - NOT_CURVES, key=lambda n: (n != "loss", n))
    fig, axes = plt.subplots(1, len(names), figsize=(4.8 * len(names), 3.8), squeeze=False, layout="constrained")
    labels = {"train": "training", "val": "validation"}
    for ax, name in zip(axes[0], names, strict=True):
        shown = []
        for split in ("train", "val"):
            points = [(e["epoch"], e[f"{split}_{name}"]) for e in epochs if f"{split}_{name}" in e]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3 if len(points) > 1 else 7,
                        label=labels[split])
                shown.append(labels[split])
        ax.set_title(f"{name} ({' and '.join(shown)})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
        if len(epochs) == 1:
            ax.text(0.5, 0.05, "one epoch: a single point", transform=ax.transAxes, ha="center", fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def image_grid(path: str | Path, images: Any, ncols: int = 8, title: str = "",
               row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None) -> Path:
    """Grey-scale images (n, H, W) with intensities in [0, 1] (a tensor or an array), `ncols` a row, as one PNG."""
    array = np.asarray(images.detach().cpu() if hasattr(images, "detach") else images, dtype=np.float32)
    nrows = max(1, -(-len(array) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(0.9 * ncols + (1.0 if row_labels else 0), 0.9 * nrows + 0.4),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(array):
            ax.imshow(array[i], cmap="binary", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    for r, label in enumerate(row_labels or []):
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    for c, label in enumerate(col_labels or []):
        axes[0, c].set_title(label, fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
