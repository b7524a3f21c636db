"""`cartpole-ppo`: proximal policy optimization on CartPole (chapter 19), beside the book's lean policy.

Defaults are the RL Zoo's tuned CartPole-v1 settings for PPO (8 environments x 32 steps per update, 20 epochs,
gamma 0.98, lambda 0.8, lr 1e-3 decaying linearly, clip 0.2). The report shows the learning curve against
environment steps and wall-clock time, the mean return of the trained policy over 100 evaluation episodes
(greedy actions, seeded), the lean policy's return on the same episodes, and a GIF of the trained policy.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from torchbook.models import save_model
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.rl.envs import evaluate, lean_policy, record_gif
from torchbook.rl.ppo import PPOConfig, train_ppo
from torchbook.runs import RunDir

NAME = "cartpole-ppo"
BOOK_LEAN_MEAN = 41.7  # the book's hard-coded policy over 500 seeded episodes


@dataclass
class Config(PPOConfig):
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    eval_episodes: int = 100
    threads: int = 1  # torch threads: one is fastest for networks this small
    gif: bool = True

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"total_steps": 2048, "eval_episodes": 3},
        "quick": {"total_steps": 60_000},
        "book": {"total_steps": 100_000},
    }

    def validate(self) -> None:
        from torchbook.rl.envs import make_env, require_discrete

        require_discrete(make_env(self.env_id), "PPO")


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    run = RunDir.start(run_dir, NAME, config)
    torch.set_num_threads(config.threads)
    started = time.time()
    report = Report(f"PPO on {config.env_id}", NAME, "19", f"gymnasium {config.env_id} (simulated), seeds {config.seed}+")
    ppo_config = PPOConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(PPOConfig)})
    model = train_ppo(ppo_config, log=run.log)
    save_model(model, run.model_dir, extra={"env_id": config.env_id})
    cap = config.max_episode_steps or None
    returns = evaluate(model.act, config.env_id, config.eval_episodes, max_episode_steps=cap)
    lean = evaluate(lean_policy, config.env_id, config.eval_episodes, max_episode_steps=cap) \
        if config.env_id.startswith("CartPole") else None
    results = {"eval_mean_return": float(returns.mean()), "eval_std_return": float(returns.std()),
               "eval_min_return": float(returns.min()), "eval_episodes": config.eval_episodes,
               "lean_mean_return": float(lean.mean()) if lean is not None else None}
    run.write_json("results.json", results)
    run.log(kind="eval", **results)
    learning_curve(run)
    report.compare(f"mean evaluation return ({config.eval_episodes} episodes)", results["eval_mean_return"], None,
                   "greedy actions; the episode cap is the maximum")
    if lean is not None:
        report.compare("lean policy, mean return (same episodes)", results["lean_mean_return"], BOOK_LEAN_MEAN,
                       "book: 500 seeded episodes")
    report.image("Learning curve", run.plots / "learning_curve.png", run.path)
    if config.gif:
        record_gif(model.act, config.env_id, run.plots / "policy.gif", seed=config.seed)
        report.image("The trained policy", run.plots / "policy.gif", run.path)
    report.write(run.path, time.time() - started)
    return run


def learning_curve(run: RunDir) -> None:
    from torchbook.plots import plt, save_figure

    updates = [r for r in run.metrics("update") if r.get("mean_return") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, label in ((axes[0], "env_steps", "environment steps"), (axes[1], "time_s", "wall-clock seconds")):
        ax.plot([r[key] for r in updates], [r["mean_return"] for r in updates])
        ax.set_xlabel(label)
        ax.set_ylabel("mean return (last 20 episodes)")
        ax.grid(alpha=0.3)
    save_figure(fig, run.plots / "learning_curve.png")


def evaluate_run(run_dir: RunDir | str) -> dict[str, Any]:
    """Reload the saved policy and evaluate it again on the same seeded episodes."""
    import torchbook

    run = RunDir.open(run_dir)
    config = Config(**run.config_values())
    model = torchbook.load(run.path).model
    returns = evaluate(model.act, config.env_id, config.eval_episodes, max_episode_steps=config.max_episode_steps or None)
    return {"eval_mean_return": float(np.mean(returns)), "eval_episodes": len(returns)}


RECIPE = Recipe(NAME, "19", "PPO (clipped objective, GAE) on CartPole-v1, beside the book's lean policy",
                Config, run, evaluate_run)
