"""`cartpole-ppo`: proximal policy optimization on CartPole (chapter 19), beside the book's lean policy.

Defaults are the RL Zoo's tuned CartPole-v1 settings for PPO (8 environments x 32 steps per update, 20 epochs,
gamma 0.98, lambda 0.8, lr 1e-3 decaying linearly, clip 0.2). The report shows the learning curve against
environment steps and wall-clock time, the mean return of the trained policy over 100 evaluation episodes
(greedy actions, seeded), the lean policy's return on the same episodes, and a GIF of the trained policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torchbook.recipes import Recipe
from torchbook.rl.envs import make_env, require_discrete
from torchbook.rl.ppo import PPOConfig, train_ppo
from torchbook.rl.reporting import algorithm_config, evaluate_agent, run_agent
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
        # The book has no PPO on CartPole (its PPO plays Breakout): a longer run than quick.
        "long": {"total_steps": 100_000},
    }

    def validate(self) -> None:
        require_discrete(make_env(self.env_id), "PPO")


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    return run_agent(config, run_dir, NAME, "PPO", lambda log: train_ppo(algorithm_config(config, PPOConfig), log=log))


def evaluate(run_dir: RunDir | str, device: str = "auto") -> dict[str, Any]:
    return evaluate_agent(run_dir, Config, device)


RECIPE = Recipe(NAME, "19", "PPO (clipped objective, GAE) on CartPole-v1, beside the book's lean policy",
                Config, run, evaluate)
