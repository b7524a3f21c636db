"""`cartpole-pg`: REINFORCE with discounted, normalized returns on CartPole (chapter 19), beside the lean policy.

The book's settings (the defaults and the `book` preset): a small policy network (4 inputs, 5 hidden units),
discount 0.95, NAdam with learning rate 0.06, 200 episodes with a gradient step after each. The `quick` preset is
ours: 150 iterations of 10 episodes each (returns normalized over the iteration's episodes), Adam with lr 0.01.
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
    iterations: int = 200  # the book: 200 episodes...
    episodes_per_iteration: int = 1  # ...each followed by a gradient step...
    optimizer: str = "nadam"  # ...with NAdam...
    lr: float = 0.06  # ...at lr 0.06
    eval_episodes: int = 100
    threads: int = 1
    gif: bool = True

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"iterations": 3, "eval_episodes": 3},
        "quick": {"iterations": 150, "episodes_per_iteration": 10, "optimizer": "adam", "lr": 0.01},  # ours
        "book": {},
    }

    def validate(self) -> None:
        require_discrete(make_env(self.env_id), "REINFORCE")


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    return run_agent(config, run_dir, NAME, "REINFORCE", lambda log: train_reinforce(algorithm_config(config, ReinforceConfig), log=log))


def evaluate(run_dir: RunDir | str, device: str = "auto") -> dict[str, Any]:
    return evaluate_agent(run_dir, Config, device)


RECIPE = Recipe(NAME, "19", "REINFORCE policy gradients on CartPole-v1, beside the book's lean policy", Config, run, evaluate)
