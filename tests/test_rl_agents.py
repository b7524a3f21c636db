"""Chapter 19's other agents: REINFORCE, DQN (and its variants) and A2C; smoke runs here, gates in the slow tier."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch

import torchbook
from torchbook.config import build_config
from torchbook.recipes import cartpole_a2c, cartpole_dqn, cartpole_pg
from torchbook.rl.dqn import QNetwork, QNetworkConfig, ReplayBuffer


@pytest.mark.parametrize("recipe", [cartpole_pg, cartpole_dqn, cartpole_a2c])
def test_smoke_runs_reload(recipe, tmp_path):
    run = recipe.run(build_config(recipe.Config, preset="smoke", overrides=["gif=false"]), tmp_path / "run")
    results = json.loads((run.path / "results.json").read_text())
    assert results["eval_episodes"] == 3 and results["lean_mean_return"] > 0
    model = torchbook.load(run.path).model
    assert model.act(np.zeros((1, 4), np.float32)).shape == (1,)
    assert recipe.evaluate(run.path)["eval_mean_return"] == results["eval_mean_return"]


def test_dqn_variants_smoke(tmp_path):
    overrides = ["gif=false", "double=true", "dueling=true", "prioritized=true"]
    run = cartpole_dqn.run(build_config(cartpole_dqn.Config, preset="smoke", overrides=overrides), tmp_path / "run")
    assert "double + dueling + prioritized replay" in (run.path / "report.md").read_text()


def test_dueling_head_is_value_plus_centered_advantages():
    torch.manual_seed(0)
    net = QNetwork(QNetworkConfig(4, 3, [8], dueling=True))
    x = torch.randn(5, 4)
    h = net.body_act(net.body(x))
    a = net.advantage(h)
    torch.testing.assert_close(net(x), net.state_value(h) + a - a.mean(-1, keepdim=True))
    torch.testing.assert_close(net(x).mean(-1), net.state_value(h).squeeze(-1) + 0 * a.mean(-1), atol=1e-6, rtol=0)


def test_prioritized_replay_samples_by_priority_with_importance_weights():
    buffer = ReplayBuffer(100, 1, alpha=1.0, seed=0)
    for _ in range(4):
        buffer.add(np.zeros(1), 0, 0.0, np.zeros(1), False)
    buffer.update(np.arange(4), np.array([1.0, 1.0, 1.0, 7.0]))
    idx, weights = buffer.sample(20_000, beta=1.0)
    share = np.mean(idx == 3)
    assert 0.65 < share < 0.75  # 7 / 10
    assert weights[idx == 3].max() == pytest.approx((4 * 0.7) ** -1 / (4 * 0.1) ** -1, rel=1e-3)


def median_return(recipe, seeds=(1, 2, 3), preset="quick", **overrides):
    import tempfile

    returns = []
    for seed in seeds:
        args = ["gif=false", f"seed={seed}", *[f"{k}={v}" for k, v in overrides.items()]]
        run = recipe.run(build_config(recipe.Config, preset=preset, overrides=args), tempfile.mkdtemp() + "/run")
        returns.append(json.loads((run.path / "results.json").read_text())["eval_mean_return"])
    return statistics.median(returns), returns


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dqn_solves_cartpole_median_of_3_seeds():
    median, returns = median_return(cartpole_dqn)
    assert median >= 475, returns


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a2c_solves_cartpole_median_of_3_seeds():
    median, returns = median_return(cartpole_a2c)
    assert median >= 475, returns


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_reinforce_reaches_200_median_of_3_seeds():
    median, returns = median_return(cartpole_pg)
    assert median >= 200, returns


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_reinforce_with_the_books_settings_beats_the_lean_policy():
    """Chapter 19's REINFORCE: NAdam lr 0.06, 200 episodes, a step after each. The book says only that it balances
    the pole. One episode per update is noisy: measured mean evaluation returns 9.4, 71.9 and 103.5 with seeds 1-3
    (and 487.8 with seed 42), so the gate is the median of 3 seeds above the lean policy's mean (41.7)."""
    from torchbook.rl.reporting import BOOK_LEAN_MEAN

    median, returns = median_return(cartpole_pg, preset="book")
    assert median > BOOK_LEAN_MEAN, returns
