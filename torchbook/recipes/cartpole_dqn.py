"""`cartpole-dqn`: deep Q-learning on CartPole (chapter 19): replay buffer and target network, with double DQN,
a dueling network and prioritized replay as options (`double=true dueling=true prioritized=true`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torchbook.recipes import Recipe
from torchbook.rl.dqn import DQNConfig, train_dqn
from torchbook.rl.envs import make_env, require_discrete
from torchbook.rl.reporting import algorithm_config, evaluate_agent, run_agent
from torchbook.runs import RunDir

NAME = "cartpole-dqn"


@dataclass
class Config(DQNConfig):
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    eval_episodes: int = 100
    threads: int = 1
    gif: bool = True

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"total_steps": 1500, "learning_starts": 500, "eval_interval": 500, "eval_episodes": 3},
        "quick": {"total_steps": 50_000},
        # Not the book's run (it trains 800 episodes with its own schedule): twice quick's steps on the book's
        # 4-32-32-2 Q-network.
        "long": {"total_steps": 100_000, "hidden": [32, 32]},
    }

    def validate(self) -> None:
        require_discrete(make_env(self.env_id), "DQN")


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    variant = " + ".join(n for n, on in (("double", config.double), ("dueling", config.dueling),
                                          ("prioritized replay", config.prioritized)) if on) or "plain"
    return run_agent(config, run_dir, NAME, f"DQN ({variant})",
                     lambda log: train_dqn(algorithm_config(config, DQNConfig), log=log))


def evaluate(run_dir: RunDir | str, device: str = "auto") -> dict[str, Any]:
    return evaluate_agent(run_dir, Config, device)


RECIPE = Recipe(NAME, "19", "DQN on CartPole-v1 (double, dueling, prioritized replay as options)", Config, run, evaluate)
