"""`cartpole-pg`: REINFORCE with discounted, normalized returns on CartPole (chapter 19), beside the lean policy.

The book's settings: a small policy network (4 inputs, 5 hidden units), 150 iterations of 10 episodes,
discount 0.95, Adam with learning rate 0.01.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torchbook.recipes import Recipe
from torchbook.rl.envs import make_env, require_discrete
from torchbook.rl.reinforce import ReinforceConfig, train_reinforce
from torchbook.rl.reporting import algorithm_config, evaluate_agent, run_agent
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
    return run_agent(config, run_dir, NAME, "REINFORCE", lambda log: train_reinforce(algorithm_config(config, ReinforceConfig), log=log))


def evaluate(run_dir: RunDir | str) -> dict[str, Any]:
    return evaluate_agent(run_dir, Config)


RECIPE = Recipe(NAME, "19", "REINFORCE policy gradients on CartPole-v1, beside the book's lean policy", Config, run, evaluate)
