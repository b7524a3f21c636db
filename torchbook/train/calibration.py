"""Calibration of a classifier's probabilities: expected calibration error (ECE), the reliability diagram, and
temperature scaling (Guo et al. 2017), which divides the logits by one scalar T fitted on validation data.

A classifier is calibrated when, among the examples it gives confidence p, a fraction p is right. ECE bins the
examples by confidence (the top probability) and averages |accuracy - confidence| over the bins, weighted by their
size: the same definition as torchmetrics' `MulticlassCalibrationError(norm="l1")` (tests check they agree).
Temperature scaling keeps every prediction (argmax is unchanged) and only softens or sharpens the confidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ReliabilityBins:
    """Per confidence bin: mean confidence, accuracy and the number of examples (empty bins have count 0)."""

    edges: Tensor
    confidence: Tensor
    accuracy: Tensor
    count: Tensor

    @property
    def ece(self) -> float:
        total = self.count.sum().clamp_min(1)
        return float(((self.accuracy - self.confidence).abs() * self.count).sum() / total)


def reliability_bins(probs: Tensor, labels: Tensor, n_bins: int = 15) -> ReliabilityBins:
    """probs (N, C) class probabilities, labels (N,) -> equal-width confidence bins [lo, hi) over [0, 1] (a
    confidence of exactly 1 joins the last bin)."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(index, minlength=n_bins).float()
    conf_sum = torch.zeros(n_bins).index_add_(0, index, confidence.float())
    acc_sum = torch.zeros(n_bins).index_add_(0, index, correct)
    safe = count.clamp_min(1)
    return ReliabilityBins(edges, conf_sum / safe, acc_sum / safe, count)


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """ECE = sum over bins of |bin| / N * |accuracy(bin) - confidence(bin)|."""
    return reliability_bins(probs, labels, n_bins).ece


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 100) -> float:
    """The temperature T > 0 minimizing the cross-entropy of softmax(logits / T) on held-out data (L-BFGS on
    log T, so T stays positive)."""
    logits, labels = logits.detach().float(), labels.detach()
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    return temperature if math.isfinite(temperature) else 1.0


def calibration_summary(val_logits: Tensor, val_labels: Tensor, test_logits: Tensor, test_labels: Tensor,
                        n_bins: int = 15) -> dict[str, Any]:
    """Fit T on validation logits; ECE and NLL on the test logits before and after, with both reliability bins."""
    temperature = fit_temperature(val_logits, val_labels)
    before, after = test_logits.softmax(1), (test_logits / temperature).softmax(1)
    return {
        "temperature": temperature,
        "ece_before": expected_calibration_error(before, test_labels, n_bins),
        "ece_after": expected_calibration_error(after, test_labels, n_bins),
        "nll_before": float(F.cross_entropy(test_logits, test_labels)),
        "nll_after": float(F.cross_entropy(test_logits / temperature, test_labels)),
        "bins_before": reliability_bins(before, test_labels, n_bins),
        "bins_after": reliability_bins(after, test_labels, n_bins),
    }


def reliability_plot(path: str | Path, curves: dict[str, ReliabilityBins]) -> Path:
    """The reliability diagram: accuracy against confidence per bin (the diagonal is perfect calibration)."""
    from torchbook.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    for name, bins in curves.items():
        used = bins.count > 0
        ax.plot(bins.confidence[used].numpy(), bins.accuracy[used].numpy(), marker="o", markersize=4,
                label=f"{name} (ECE {bins.ece:.3f})")
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram (test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
