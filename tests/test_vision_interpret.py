"""Interpretation and calibration against their definitions and references: ECE equals torchmetrics', the fitted
temperature minimizes the validation NLL (scipy), integrated gradients are complete, occlusion of a linear model is
exact, saliency is the input gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchbook.train.calibration import calibration_summary, expected_calibration_error, fit_temperature
from torchbook.train.interpret import integrated_gradients, occlusion, pixel_map, saliency

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ece_equals_torchmetrics():
    from torchmetrics.classification import MulticlassCalibrationError

    torch.manual_seed(0)
    logits = torch.randn(3000, 10) * 2
    labels = torch.where(torch.rand(3000) < 0.7, logits.argmax(1), torch.randint(0, 10, (3000,)))
    probs = logits.softmax(1)
    reference = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")(probs, labels)
    assert expected_calibration_error(probs, labels, 15) == pytest.approx(float(reference), abs=1e-6)


def test_temperature_scaling_minimizes_the_nll_and_keeps_predictions():
    from scipy.optimize import minimize_scalar

    torch.manual_seed(0)
    labels = torch.randint(0, 5, (2000,))
    logits = F.one_hot(labels, 5).float() * 1.5 + torch.randn(2000, 5)
    logits = logits * 4  # an overconfident classifier
    t = fit_temperature(logits, labels)
    best = minimize_scalar(lambda v: float(F.cross_entropy(logits / v, labels)), bounds=(0.05, 20), method="bounded")
    assert t == pytest.approx(best.x, rel=1e-3)
    summary = calibration_summary(logits, labels, logits, labels)
    assert summary["ece_after"] < summary["ece_before"] and summary["nll_after"] < summary["nll_before"]
    assert torch.equal((logits / t).argmax(1), logits.argmax(1))


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))

    def forward(self, x):
        return self.net(x)


def test_integrated_gradients_are_complete():
    torch.manual_seed(0)
    model = Small().eval()
    x, target = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    attributions = integrated_gradients(model, x, target, steps=128)
    with torch.no_grad():
        gap = model(x).gather(1, target[:, None]).squeeze(1) - model(torch.zeros_like(x)).gather(1, target[:, None]).squeeze(1)
    assert torch.allclose(attributions.sum((1, 2, 3)), gap, atol=1e-3 * gap.abs().max() + 1e-5)
    assert pixel_map(attributions).shape == (4, 8, 8)


def test_occlusion_of_a_linear_model_is_the_occluded_contribution():
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    x, target = torch.rand(2, 1, 8, 8), torch.tensor([2, 0])
    heat = occlusion(linear, x, target, window=4, stride=4)  # non-overlapping windows
    w = linear[1].weight[target].view(2, 8, 8)
    contribution = (w * x[:, 0]).unfold(1, 4, 4).unfold(2, 4, 4).sum((-1, -2))  # (2, 2, 2) per window
    assert torch.allclose(heat[:, ::4, ::4], contribution, atol=1e-5)


def test_saliency_is_the_input_gradient():
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    x, target = torch.rand(2, 1, 8, 8), torch.tensor([1, 2])
    expected = linear[1].weight[target].abs().view(2, 8, 8)
    assert torch.allclose(saliency(linear, x, target), expected)
