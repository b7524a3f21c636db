"""`cartpole-ppo`: proximal policy optimization on CartPole (chapter 19), beside the book's lean policy.

Defaults are the RL Zoo's tuned CartPole-v1 settings for PPO (8 environments x 32 steps per update, 20 epochs,
gamma 0.98, lambda 0.8, lr 1e-3 decaying linearly, clip 0.2). The report shows the learning curve against
environment steps and wall-clock time, the mean return of the trained policy over 100 evaluation episodes
(greedy actions, seeded), the lean policy's return on the same episodes, and a GIF of the trained policy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.rl.envs import make_env, require_discrete
from torchbook.rl.ppo import PPOConfig, train_ppo
from torchbook.rl.reporting import evaluate_saved, finish
from torchbook.runs import RunDir

NAME = "cartpole-ppo"


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
        require_discrete(make_env(self.env_id), "PPO")


def algorithm_config(config: Any, cls: type) -> Any:
    """The algorithm's own config, taken from the recipe's (which extends it with evaluation settings)."""
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    run = RunDir.start(run_dir, NAME, config)
    torch.set_num_threads(config.threads)
    report = Report(f"PPO on {config.env_id}", NAME, "19", f"gymnasium {config.env_id} (simulated), seeds {config.seed}+")
    model = train_ppo(algorithm_config(config, PPOConfig), log=run.log)
    finish(run, report, model, config.env_id, config.eval_episodes, config.max_episode_steps, config.seed, config.gif)
    return run


def evaluate(run_dir: RunDir | str) -> dict[str, Any]:
    config = Config(**RunDir.open(run_dir).config_values())
    return evaluate_saved(run_dir, config.env_id, config.eval_episodes, config.max_episode_steps)


RECIPE = Recipe(NAME, "19", "PPO (clipped objective, GAE) on CartPole-v1, beside the book's lean policy",
                Config, run, evaluate)
