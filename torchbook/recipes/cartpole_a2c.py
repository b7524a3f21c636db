"""`cartpole-a2c`: advantage actor-critic on CartPole (chapter 19).

A2C is PPO's loop with one pass over each short rollout, one minibatch and full returns (lambda = 1): with the
probability ratio at exactly 1, the clipped objective's gradient is the plain policy gradient weighted by the
advantage, plus the value and entropy terms. Settings: 8 environments x 8 steps, gamma 0.99, RMSprop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torchbook.recipes import Recipe
from torchbook.rl.envs import make_env, require_discrete
from torchbook.rl.ppo import PPOConfig, train_ppo
from torchbook.rl.reporting import algorithm_config, evaluate_agent, run_agent
from torchbook.runs import RunDir

NAME = "cartpole-a2c"


@dataclass
class Config(PPOConfig):
    total_steps: int = 200_000
    n_envs: int = 8
    n_steps: int = 8
    epochs: int = 1
    minibatches: int = 1
    lr: float = 7e-4
    optimizer: str = "rmsprop"
    gamma: float = 0.99
    gae_lambda: float = 1.0
    normalize_advantages: bool = False
    ent_coef: float = 0.0
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    eval_episodes: int = 100
    threads: int = 1
    gif: bool = True

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"total_steps": 2048, "eval_episodes": 3},
        "quick": {"total_steps": 200_000},
        # Not the book's run (its actor-critic trains 400 episodes): 2.5 times quick's steps.
        "long": {"total_steps": 500_000},
    }

    def validate(self) -> None:
        require_discrete(make_env(self.env_id), "A2C")


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    return run_agent(config, run_dir, NAME, "A2C", lambda log: train_ppo(algorithm_config(config, PPOConfig), log=log))


def evaluate(run_dir: RunDir | str, device: str = "auto") -> dict[str, Any]:
    return evaluate_agent(run_dir, Config, device)


RECIPE = Recipe(NAME, "19", "Advantage actor-critic (A2C) on CartPole-v1", Config, run, evaluate)
