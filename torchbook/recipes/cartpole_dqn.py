"""`cartpole-dqn`: deep Q-learning on CartPole (chapter 19): replay buffer and target network, with double DQN,
a dueling network and prioritized replay as options (`double=true dueling=true prioritized=true`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from torchbook.recipes import Recipe
from torchbook.recipes.cartpole_ppo import algorithm_config
from torchbook.report import Report
from torchbook.rl.dqn import DQNConfig, train_dqn
from torchbook.rl.envs import make_env, require_discrete
from torchbook.rl.reporting import evaluate_saved, finish
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
        "book": {"total_steps": 100_000, "hidden": [32, 32]},
    }

    def validate(self) -> None:
        require_discrete(make_env(self.env_id), "DQN")


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    run = RunDir.start(run_dir, NAME, config)
    torch.set_num_threads(config.threads)
    variant = " + ".join(n for n, on in (("double", config.double), ("dueling", config.dueling),
                                          ("prioritized replay", config.prioritized)) if on) or "plain"
    report = Report(f"DQN ({variant}) on {config.env_id}", NAME, "19", f"gymnasium {config.env_id} (simulated)")
    model = train_dqn(algorithm_config(config, DQNConfig), log=run.log)
    finish(run, report, model, config.env_id, config.eval_episodes, config.max_episode_steps, config.seed, config.gif)
    return run


def evaluate(run_dir: RunDir | str) -> dict[str, Any]:
    config = Config(**RunDir.open(run_dir).config_values())
    return evaluate_saved(run_dir, config.env_id, config.eval_episodes, config.max_episode_steps)


RECIPE = Recipe(NAME, "19", "DQN on CartPole-v1 (double, dueling, prioritized replay as options)", Config, run, evaluate)
