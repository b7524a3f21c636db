"""`cartpole-pg`: REINFORCE with discounted, normalized returns on CartPole (chapter 19), beside the lean policy.

The book's settings: a small policy network (4 inputs, 5 hidden units), 150 iterations of 10 episodes,
discount 0.95, Adam with learning rate 0.01.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from torchbook.recipes import Recipe
from torchbook.recipes.cartpole_ppo import algorithm_config
from torchbook.report import Report
from torchbook.rl.envs import make_env, require_discrete
from torchbook.rl.reinforce import ReinforceConfig, train_reinforce
from torchbook.rl.reporting import evaluate_saved, finish
from torchbook.runs import RunDir

NAME = "cartpole-pg"


@dataclass
class Config(ReinforceConfig):
    hidden: list[int] = field(default_factory=lambda: [5])
    eval_episodes: int = 100
    threads: int = 1
    gif: bool = True

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"iterations": 3, "eval_episodes": 3},
        "quick": {"iterations": 150},
        "book": {},
    }

    def validate(self) -> None:
        require_discrete(make_env(self.env_id), "REINFORCE")


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    run = RunDir.start(run_dir, NAME, config)
    torch.set_num_threads(config.threads)
    report = Report(f"REINFORCE on {config.env_id}", NAME, "19", f"gymnasium {config.env_id} (simulated)")
    model = train_reinforce(algorithm_config(config, ReinforceConfig), log=run.log)
    finish(run, report, model, config.env_id, config.eval_episodes, config.max_episode_steps, config.seed, config.gif)
    return run


def evaluate(run_dir: RunDir | str) -> dict[str, Any]:
    config = Config(**RunDir.open(run_dir).config_values())
    return evaluate_saved(run_dir, config.env_id, config.eval_episodes, config.max_episode_steps)


RECIPE = Recipe(NAME, "19", "REINFORCE policy gradients on CartPole-v1, beside the book's lean policy", Config, run, evaluate)
