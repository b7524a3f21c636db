"""Chapter 19's Atari part: the book's preprocessing on the real ALE games, the CNN actor-critic, PPO from pixels
with clipped rewards and unclipped reported scores, exact resume, and the breakout-ppo recipe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import torchbook
from torchbook.cli import main
from torchbook.config import build_config
from torchbook.errors import UserInputError
from torchbook.hub import save_model
from torchbook.recipes import breakout_ppo
from torchbook.rl import ppo
from torchbook.rl.atari import AtariPool, evaluate, random_policy
from torchbook.rl.networks import CNNActorCritic, CNNActorCriticConfig
from torchbook.rl.ppo import PPOConfig, train_ppo
from torchbook.runs import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")


def test_preprocessing_gives_stacks_of_84x84_grayscale_frames():
    pool = AtariPool("ALE/Breakout-v5", n=2, seed=0)
    assert pool.observation_space.shape == (4, 84, 84) and int(pool.action_space.n) == 4
    obs = pool.reset()
    assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
    rng = np.random.default_rng(0)
    moved = False
    for _ in range(20):
        new, _, terminated, truncated, _ = pool.step(rng.integers(4, size=2))
        ongoing = ~(terminated | truncated)
        # The stack slides by one frame per agent step: the 3 newest old frames are the 3 oldest new ones.
        np.testing.assert_array_equal(new[ongoing, :3], obs[ongoing, 1:])
        moved |= bool((new[:, 3] != new[:, 2]).any())
        obs = new
    assert moved  # consecutive frames differ (the ball and the paddle move), so the stack carries motion
    pool.close()


def test_episodic_life_ends_the_learners_episode_at_each_life_but_scores_whole_games():
    pool = AtariPool("ALE/Breakout-v5", n=2, seed=0, episodic_life=True)
    pool.reset()
    rng = np.random.default_rng(0)
    terminations, rewards = 0, 0.0
    while len(pool.finished) < 2:
        _, reward, terminated, truncated, _ = pool.step(rng.integers(4, size=2))
        terminations += int(terminated.sum())
        rewards += float(reward.sum())
    assert terminations >= 5 * len(pool.finished)  # Breakout has 5 lives: one learner episode per life
    scores = [r for r, _ in pool.finished]
    assert sum(scores) <= rewards and max(scores) >= 1  # a random game scores a point or two, over all lives
    assert all(length > 50 for _, length in pool.finished)  # whole games, not single lives
    pool.close()


def test_ppo_trains_on_clipped_rewards_and_reports_unclipped_scores(monkeypatch):
    """Space Invaders pays 5 to 30 points per alien: the learner sees their sign, the pool keeps the points."""
    points: list[np.ndarray] = []
    real_step = AtariPool.step
    monkeypatch.setattr(AtariPool, "step", lambda self, a: (out := real_step(self, a)) and points.append(out[1]) or out)
    learned: list[torch.Tensor] = []
    real_gae = ppo.gae
    monkeypatch.setattr(ppo, "gae", lambda rewards, *a: learned.append(rewards.clone()) or real_gae(rewards, *a))
    config = PPOConfig(env_id="ALE/SpaceInvaders-v5", n_envs=2, n_steps=256, total_steps=512, epochs=1,
                       minibatches=1, clip_rewards=True, seed=0)
    train_ppo(config)
    game_points = np.stack(points)
    assert game_points.max() >= 5  # the pool's rewards are the game's points
    # No time-limit cut in 256 steps, so the learner's rewards are exactly the points' signs.
    np.testing.assert_array_equal(torch.cat(learned).numpy(), np.sign(game_points).astype(np.float32))


def test_cnn_actor_critic_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = CNNActorCritic(CNNActorCriticConfig([4, 84, 84], 4)).eval()
    obs = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    save_model(model, tmp_path / "model", extra={"env_id": "ALE/Breakout-v5"})
    loaded = torchbook.load(tmp_path / "model").model
    assert isinstance(loaded, CNNActorCritic)
    torch.testing.assert_close(loaded(obs), model(obs), rtol=0, atol=0)
    torch.testing.assert_close(loaded.value(obs), model.value(obs), rtol=0, atol=0)
    dist, value = loaded.distribution_and_value(obs)
    torch.testing.assert_close(dist.logits, model.distribution(obs).logits)
    assert loaded.act(obs.numpy()).shape == (3,) and loaded.act(obs.numpy(), greedy=True).dtype == np.int64


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    config = PPOConfig(env_id="ALE/Breakout-v5", n_envs=2, n_steps=16, total_steps=4 * 32, epochs=1,
                       minibatches=2, clip_rewards=True, episodic_life=True, checkpoint_every=2, seed=3)
    whole = train_ppo(config, run=RunDir.start(tmp_path / "whole", "test", {}))

    run = RunDir.start(tmp_path / "interrupted", "test", {})

    def interrupt_after_update_3(**record):
        run.log(**record)
        if record.get("update") == 3:  # past the checkpoint of update 2, before the final one
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_ppo(config, log=interrupt_after_update_3, run=run)
    resumed = train_ppo(config, run=run)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["update"] for r in run.metrics("update")] == [1, 2, 3, 4]  # update 3's first try purged
    assert [r["env_steps"] for r in run.metrics("update")] == [r["env_steps"] for r in
                                                               RunDir(tmp_path / "whole").metrics("update")]


def test_time_budget_stops_training_cleanly(tmp_path):
    config = PPOConfig(env_id="ALE/Breakout-v5", n_envs=2, n_steps=16, total_steps=10_000, epochs=1,
                       checkpoint_every=5, time_budget_s=1e-9)
    run = RunDir.start(tmp_path / "r", "test", {})
    train_ppo(config, run=run)
    assert run.metrics("update") == [] and run.metrics("stopped")[0]["update"] == 0
    assert (run.checkpoints / "step-000000000.pt").is_file()  # resumable, and resuming stops at once again


def test_evaluation_scores_whole_games_with_a_step_cap():
    returns = evaluate(random_policy(4, seed=0), "ALE/Breakout-v5", episodes=3, seed=0, max_episode_steps=100)
    assert returns.shape == (3,) and (returns >= 0).all()
    def never_fire(obs: np.ndarray) -> np.ndarray:
        return np.zeros(len(obs), dtype=np.int64)

    # A policy that never presses FIRE after losing a life would wait forever: the cap ends its games.
    assert evaluate(never_fire, "ALE/Breakout-v5", episodes=2, seed=0, max_episode_steps=300).tolist() == [0, 0]


def test_smoke_preset_end_to_end_and_play(tmp_path):
    run = breakout_ppo.run(build_config(breakout_ppo.Config, preset="smoke"), tmp_path / "run")
    for name in ("report.md", "results.json", "model/model.safetensors", "plots/learning_curve.png", "plots/policy.gif"):
        assert (run.path / name).is_file(), name
    results = json.loads((run.path / "results.json").read_text())
    assert results["eval_episodes"] == 2 and results["env_steps"] == 512 and results["random_mean_return"] >= 0
    report = (run.path / "report.md").read_text()
    assert "random policy, mean return" in report and "unclipped" in report
    assert breakout_ppo.evaluate(run.path)["eval_mean_return"] == results["eval_mean_return"]  # seeded sampling
    assert main(["play", str(run.path), "--output", str(tmp_path / "p.gif")]) == 0
    gif = Image.open(tmp_path / "p.gif")
    assert gif.size == (160, 210) and gif.n_frames > 1  # the colour screen, not the agent's 84x84 view


def test_bad_environments_are_one_line_errors(capsys):
    with pytest.raises(UserInputError, match="unknown environment id 'ALE/Breakot-v5'; accepted: ALE/Breakout-v5"):
        build_config(breakout_ppo.Config, overrides=["env_id=ALE/Breakot-v5"])
    assert main(["run", "breakout-ppo", "--preset", "smoke", "env_id=Pendulum-v1"]) == 2
    assert "needs discrete actions, but Pendulum-v1 has Box actions" in capsys.readouterr().err
    with pytest.raises(UserInputError, match="plays Atari games"):
        build_config(breakout_ppo.Config, overrides=["env_id=CartPole-v1"])


@pytest.mark.slow
@pytest.mark.timeout(4200)
def test_medium_preset_beats_random_play(tmp_path):
    """The gate: within the medium preset's hour, a mean unclipped score of at least 5 (random play: about 1.5)."""
    run = breakout_ppo.run(build_config(breakout_ppo.Config, preset="medium", overrides=["gif=false"]), tmp_path / "r")
    results = json.loads((run.path / "results.json").read_text())
    assert results["eval_mean_return"] >= 5, results
    assert results["eval_mean_return"] > 2 * results["random_mean_return"]
