"""Chapter 19: the book's MDP, returns, GAE and the PPO loss, environments, and PPO on CartPole."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import torchbook
from torchbook.cli import main
from torchbook.config import build_config
from torchbook.errors import UserInputError
from torchbook.recipes import cartpole_ppo
from torchbook.rl import tabular
from torchbook.rl.envs import EnvPool, evaluate, lean_policy, make_env, require_discrete
from torchbook.rl.ppo import gae, ppo_loss

BOOK_Q = np.array([[18.92, 17.03, 13.62], [0.0, -np.inf, -4.88], [-np.inf, 50.13, -np.inf]])


def test_q_value_iteration_gives_the_books_q_values_and_policy():
    q = tabular.q_value_iteration(gamma=0.90)
    np.testing.assert_array_equal(np.round(q, 2), BOOK_Q)
    assert q.argmax(axis=1).tolist() == [0, 0, 1]
    np.testing.assert_allclose(tabular.value_iteration(gamma=0.90), q.max(axis=1), atol=1e-6)


def test_q_learning_finds_the_optimal_policy():
    q = tabular.q_learning(steps=10_000)
    assert q.argmax(axis=1).tolist() == [0, 0, 1]
    assert abs(q[0, 0] - BOOK_Q[0, 0]) / BOOK_Q[0, 0] < 0.05 and abs(q[2, 1] - BOOK_Q[2, 1]) / BOOK_Q[2, 1] < 0.05


def test_td_learning_matches_exact_policy_evaluation():
    """TD(0) under the random policy converges to the solution of V = r_pi + gamma P_pi V."""
    gamma = 0.9
    p_pi, r_pi = np.zeros((3, 3)), np.zeros(3)
    for s, actions in enumerate(tabular.POSSIBLE_ACTIONS):
        for a in actions:
            t = np.array(tabular.TRANSITION_PROBABILITIES[s][a])
            p_pi[s] += t / len(actions)
            r_pi[s] += (t * np.array(tabular.REWARDS[s][a])).sum() / len(actions)
    exact = np.linalg.solve(np.eye(3) - gamma * p_pi, r_pi)
    np.testing.assert_allclose(tabular.td_learning(gamma, steps=200_000, alpha=0.002), exact, atol=1.5)


def test_discounted_returns_are_the_books():
    assert tabular.discounted_returns([10, 0, -50], 0.8).tolist() == [-22, -40, -50]


def test_the_lean_policy_baseline_matches_the_book():
    """500 episodes seeded 0..499 (the book's variant caps episodes at 1000 steps; the lean policy never gets near)."""
    returns = evaluate(lean_policy, "CartPole-v1", episodes=500, seed=0, max_episode_steps=1000)
    assert round(returns.mean(), 1) == 41.7 and round(returns.std(), 1) == 8.4
    assert (returns.min(), returns.max()) == (24, 63)


def test_gae_reduces_to_td_errors_and_to_returns():
    torch.manual_seed(0)
    rewards, values = torch.randn(5, 2), torch.randn(5, 2)
    dones = torch.tensor([[0, 0], [0, 1], [0, 0], [1, 0], [0, 0]], dtype=torch.float32)
    last = torch.randn(2)
    next_values = torch.cat([values[1:], last[None]])
    td = rewards + 0.9 * next_values * (1 - dones) - values
    torch.testing.assert_close(gae(rewards, values, dones, last, 0.9, 0.0), td)
    returns = torch.zeros(5, 2)  # lambda = 1: advantages are discounted returns (bootstrapped) minus values
    running = last
    for t in reversed(range(5)):
        running = rewards[t] + 0.9 * running * (1 - dones[t])
        returns[t] = running
    torch.testing.assert_close(gae(rewards, values, dones, last, 0.9, 1.0), returns - values)


def test_ppo_loss_clips_the_ratio():
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    new = torch.log(torch.tensor([1.5, 0.9, 0.5, 1.1]))  # ratios
    loss, stats = ppo_loss(new, old, adv, torch.zeros(4), torch.zeros(4), torch.zeros(4), 0.2, 0.5, 0.0)
    # min(r A, clip(r) A): 1.2 (clipped), 0.9, -0.8 (clipped), -1.1
    assert loss.item() == pytest.approx(-(1.2 + 0.9 - 0.8 - 1.1) / 4)
    assert stats["clip_fraction"] == pytest.approx(0.5)


def test_environment_errors_are_clear():
    with pytest.raises(UserInputError, match="unknown environment id 'CartPol-v1'; accepted: CartPole-v1"):
        make_env("CartPol-v1")
    with pytest.raises(UserInputError, match="needs discrete actions, but Pendulum-v1 has Box actions"):
        require_discrete(make_env("Pendulum-v1"), "PPO")


def test_env_pool_resets_finished_episodes_and_keeps_their_statistics():
    pool = EnvPool("CartPole-v1", n=3, seed=0)
    obs = pool.reset()
    for _ in range(200):
        obs, rewards, terminated, truncated, final = pool.step(np.zeros(3, dtype=np.int64))  # always push left
    assert len(pool.finished) >= 3 and all(length < 200 for _, length in pool.finished)
    assert all(ret == length for ret, length in pool.finished)  # CartPole pays 1 per step


def test_smoke_run_reloads_and_plays(tmp_path):
    run = cartpole_ppo.run(build_config(cartpole_ppo.Config, preset="smoke"), tmp_path / "run")
    for name in ("report.md", "results.json", "model/model.safetensors", "plots/learning_curve.png", "plots/policy.gif"):
        assert (run.path / name).is_file(), name
    model = torchbook.load(run.path).model
    assert model.act(np.zeros((2, 4), dtype=np.float32)).shape == (2,)
    assert main(["play", str(run.path), "--output", str(tmp_path / "p.gif")]) == 0
    assert (tmp_path / "p.gif").read_bytes()[:6] == b"GIF89a"


def test_ppo_quick_preset_solves_cartpole(tmp_path):
    """The make-test gate: PPO's quick preset reaches a mean evaluation return of at least 475 on CartPole-v1."""
    run = cartpole_ppo.run(build_config(cartpole_ppo.Config, preset="quick", overrides=["gif=false"]), tmp_path / "r")
    results = json.loads((run.path / "results.json").read_text())
    assert results["eval_mean_return"] >= 475, results
    assert results["eval_mean_return"] > 5 * results["lean_mean_return"]
