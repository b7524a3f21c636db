"""Time to solve CartPole-v1 (mean greedy evaluation return >= 475 over 10 episodes) and environment steps/s:
torchbook's PPO and DQN against Stable-Baselines3's with the RL Zoo's tuned CartPole hyperparameters, in one run.

Every CHECK_EVERY environment steps both sides are evaluated the same way (10 seeded episodes, greedy actions);
evaluation time is excluded from the clocks. Medians over 3 seeds, and the ratios ours / theirs.

    MPLBACKEND=Agg .venv/bin/python benchmarks/rl.py [--seeds 3] [--budget 100000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch

from torchbook.rl.dqn import DQNConfig, train_dqn
from torchbook.rl.envs import evaluate
from torchbook.rl.ppo import PPOConfig, train_ppo

ENV, TARGET, CHECK_EVERY, EPISODES = "CartPole-v1", 475.0, 4096, 10


class Clock:
    """Wall-clock training time with evaluation pauses removed; remembers when the target was first reached."""

    def __init__(self) -> None:
        self.start, self.paused, self.next_check = time.perf_counter(), 0.0, CHECK_EVERY
        self.solved_at: tuple[float, int] | None = None
        self.steps = 0

    def check(self, act: Any, steps: int) -> bool:
        self.steps = steps
        if steps < self.next_check:
            return False
        self.next_check += CHECK_EVERY
        pause = time.perf_counter()
        score = float(evaluate(act, ENV, EPISODES, seed=123_456).mean())
        self.paused += time.perf_counter() - pause
        if score >= TARGET and self.solved_at is None:
            self.solved_at = (self.elapsed(), steps)
        return self.solved_at is not None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused


def ours(algorithm: str, seed: int, budget: int) -> Clock:
    clock = Clock()
    if algorithm == "ppo":
        train_ppo(PPOConfig(total_steps=budget, seed=seed), should_stop=lambda m, s: clock.check(m.act, s))
    else:
        train_dqn(DQNConfig(total_steps=budget, seed=seed, eval_interval=10**9),
                  should_stop=lambda q, s: clock.check(q.act, s))
    return clock


def sb3(algorithm: str, seed: int, budget: int) -> Clock:
    from stable_baselines3 import DQN, PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    clock = Clock()

    class Stop(BaseCallback):
        def _on_step(self) -> bool:
            act = lambda obs: self.model.predict(obs, deterministic=True)[0]  # noqa: E731
            return not clock.check(act, self.num_timesteps)

    linear = lambda start: (lambda progress: progress * start)  # noqa: E731  # the Zoo's lin_ schedules
    if algorithm == "ppo":  # rl-zoo3 hyperparams/ppo.yml, CartPole-v1
        model: Any = PPO("MlpPolicy", make_vec_env(ENV, n_envs=8, seed=seed), n_steps=32, batch_size=256, gae_lambda=0.8,
                         gamma=0.98, n_epochs=20, ent_coef=0.0, learning_rate=linear(0.001), clip_range=linear(0.2),
                         seed=seed, device="cpu")
    else:  # rl-zoo3 hyperparams/dqn.yml, CartPole-v1
        model = DQN("MlpPolicy", ENV, learning_rate=2.3e-3, batch_size=64, buffer_size=100_000, learning_starts=1000,
                    gamma=0.99, target_update_interval=10, train_freq=256, gradient_steps=128,
                    exploration_fraction=0.16, exploration_final_eps=0.04, policy_kwargs={"net_arch": [256, 256]},
                    seed=seed, device="cpu")
    clock.start = time.perf_counter()
    model.learn(total_timesteps=budget, callback=Stop())
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=100_000, help="environment steps at most per run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch threads 1, target {TARGET} over {EPISODES} episodes, checked every {CHECK_EVERY} steps")
    for algorithm in ("ppo", "dqn"):
        rows: dict[str, list[tuple[float, int, float]]] = {"torchbook": [], "sb3": []}
        for seed in range(args.seeds):
            for name, fn in (("torchbook", ours), ("sb3", sb3)):
                clock = fn(algorithm, seed, args.budget)
                solved_time, solved_steps = clock.solved_at or (float("inf"), clock.steps)
                rate = clock.steps / max(clock.elapsed(), 1e-9)
                rows[name].append((solved_time, solved_steps, rate))
                print(f"{algorithm} {name:9} seed {seed}: solved in {solved_time:7.1f} s at {solved_steps:6d} steps, "
                      f"{rate:7.0f} env steps/s", flush=True)
        med = {n: [statistics.median(r[i] for r in rows[n]) for i in range(3)] for n in rows}
        print(f"{algorithm} medians: time to solve torchbook {med['torchbook'][0]:.1f} s vs SB3 {med['sb3'][0]:.1f} s "
              f"(ratio SB3/torchbook {med['sb3'][0] / med['torchbook'][0]:.2f}x); steps/s {med['torchbook'][2]:.0f} vs "
              f"{med['sb3'][2]:.0f} ({med['torchbook'][2] / med['sb3'][2]:.2f}x)")
        np.set_printoptions(precision=2)


if __name__ == "__main__":
    main()
