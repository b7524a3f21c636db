"""`breakout-ppo`: PPO on Atari Breakout from pixels (chapter 19), beside random play.

The book's preprocessing (torchbook/rl/atari.py: frame skip 4 with sticky actions, grayscale 84x84, frame stack 4,
noop and fire reset), clipped rewards and episodic life for training only, and the Nature-DQN CNN shared by the
actor and the critic. Settings are CleanRL's ppo_atari (8 environments x 128 steps, 4 epochs of 4 minibatches,
lr 2.5e-4 annealed, clip 0.1, entropy 0.01, gamma 0.99, lambda 0.95); the book uses 4 environments and reports a
mean reward of about 20 at 1M steps and human level near 10M (it gives no number for human level).

Where we differ from the book's environment: the book trains on `BreakoutNoFrameskip-v4` (no sticky actions; the
frame skipping and preprocessing done by gymnasium's wrappers), we on `ALE/Breakout-v5` through ale-py's
`AtariVectorEnv`, which does the same preprocessing in C++ with v5's sticky actions (repeat_action_probability
0.25). Why: gymnasium's `AtariPreprocessing` needs OpenCV, which torchbook does not install, so the vector env
is the one implementation. Sticky actions make the game harder to play precisely, so our scores are not directly
comparable with the book's.

The report gives the mean *unclipped* score over whole evaluation games (sampled actions, as trained; each game
cut after 5 minutes of play, 4,500 steps), random play on the same games, the learning curve against environment
steps and wall-clock time, and a GIF. Training is checkpointed every `checkpoint_every` updates; an interrupted
run continues with `torchbook run breakout-ppo --resume RUN_DIR`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torchbook.errors import UserInputError
from torchbook.recipes import Recipe
from torchbook.rl.atari import EVAL_MAX_STEPS
from torchbook.rl.envs import is_atari, make_env, require_discrete
from torchbook.rl.ppo import PPOConfig, train_ppo
from torchbook.rl.reporting import algorithm_config, evaluate_saved, run_agent
from torchbook.runs import RunDir

NAME = "breakout-ppo"


@dataclass
class Config(PPOConfig):
    env_id: str = "ALE/Breakout-v5"
    total_steps: int = 10_000_000  # agent steps (x4 emulator frames)
    n_envs: int = 8
    n_steps: int = 128
    epochs: int = 4
    minibatches: int = 4
    lr: float = 2.5e-4
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.1
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    max_grad_norm: float = 0.5
    clip_rewards: bool = True
    episodic_life: bool = True
    # Updates between checkpoints; every checkpoint restarts the games, so keep segments longer than most games
    # (50 x 128 steps per environment = 14 minutes of play; about 7 minutes of training here).
    checkpoint_every: int = 50
    time_budget_s: float = 0.0
    eval_episodes: int = 30  # whole games; fewer than CartPole's 100, as a game can last thousands of steps
    eval_max_steps: int = EVAL_MAX_STEPS  # 5 minutes of play per evaluation game
    threads: int = 1  # torch threads: the machine is shared (and one thread is the best per core here)
    gif: bool = True

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"total_steps": 512, "n_envs": 4, "n_steps": 64, "epochs": 1, "minibatches": 2,
                  "checkpoint_every": 2, "eval_episodes": 2, "eval_max_steps": 200},
        # One hour on one busy core: the PPO paper's 3 epochs (not CleanRL's 4) for more steps per CPU-second.
        "medium": {"total_steps": 500_000, "epochs": 3, "time_budget_s": 3_300.0},
        "book": {"total_steps": 10_000_000, "checkpoint_every": 100},
    }

    def validate(self) -> None:
        require_discrete(make_env(self.env_id), "PPO")
        if not is_atari(self.env_id):
            raise UserInputError(f"breakout-ppo plays Atari games (ALE/...), not {self.env_id!r}; "
                                 "for CartPole use cartpole-ppo")


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    run = RunDir.start(run_dir, NAME, config)  # started here so that training can checkpoint into it
    ppo = algorithm_config(config, PPOConfig)
    return run_agent(config, run, NAME, "PPO", lambda log: train_ppo(ppo, log=log, run=run),
                     eval_max_steps=config.eval_max_steps)


def evaluate(run_dir: RunDir | str, device: str = "auto") -> dict[str, Any]:
    config = RunDir.open(run_dir).load_config(Config)
    return evaluate_saved(run_dir, config.env_id, config.eval_episodes, config.eval_max_steps, device)


RECIPE = Recipe(NAME, "19", "PPO from pixels on Atari Breakout (the book's preprocessing, Nature CNN), resumable",
                Config, run, evaluate)
