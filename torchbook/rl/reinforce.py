"""REINFORCE (Williams, 1992), as in chapter 19: play several episodes with the current policy, weight each
action's log-probability by its discounted return, normalized over all the iteration's actions, and ascend.

    for each iteration:
        play `episodes_per_iteration` episodes, sampling actions from pi(a|s)
        G_t = r_t + gamma G_{t+1};   normalize all G_t of the iteration to mean 0, std 1
        loss = -sum_t log pi(a_t|s_t) G_t / episodes_per_iteration
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from torchbook.errors import unknown
from torchbook.rl.envs import make_env, require_discrete
from torchbook.rl.networks import CategoricalPolicy, PolicyConfig
from torchbook.rl.tabular import discounted_returns


@dataclass
class ReinforceConfig:
    env_id: str = "CartPole-v1"
    max_episode_steps: int = 0
    iterations: int = 150
    episodes_per_iteration: int = 10
    gamma: float = 0.95
    lr: float = 0.01
    optimizer: str = "adam"  # adam or nadam (chapter 19's REINFORCE uses NAdam, lr 0.06)
    hidden: list[int] = field(default_factory=lambda: [5])
    seed: int = 42


def train_reinforce(config: ReinforceConfig, log: Callable[..., Any] | None = None) -> CategoricalPolicy:
    torch.manual_seed(config.seed)
    env = make_env(config.env_id, config.max_episode_steps or None)
    n_actions = require_discrete(env, "REINFORCE")
    policy = CategoricalPolicy(PolicyConfig(int(np.prod(env.observation_space.shape)), n_actions, list(config.hidden)))
    optimizers = {"adam": torch.optim.Adam, "nadam": torch.optim.NAdam}
    if config.optimizer not in optimizers:
        raise unknown("optimizer", config.optimizer, optimizers)
    optimizer = optimizers[config.optimizer](policy.parameters(), lr=config.lr)
    started, steps, episode = time.perf_counter(), 0, 0
    for iteration in range(config.iterations):
        log_probs, returns, totals = [], [], []
        for _ in range(config.episodes_per_iteration):
            obs, _ = env.reset(seed=config.seed + episode)
            episode += 1
            rewards, done = [], False
            while not done:
                dist = policy.distribution(torch.as_tensor(obs, dtype=torch.float32))
                action = dist.sample()
                log_probs.append(dist.log_prob(action))
                obs, reward, terminated, truncated, _ = env.step(action.item())
                rewards.append(float(reward))
                done = terminated or truncated
            steps += len(rewards)
            totals.append(sum(rewards))
            returns.append(discounted_returns(rewards, config.gamma))
        flat = np.concatenate(returns)
        weights = torch.as_tensor((flat - flat.mean()) / (flat.std() + 1e-8), dtype=torch.float32)
        loss = -(torch.stack(log_probs) * weights).sum() / config.episodes_per_iteration
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if log is not None:
            log(kind="update", update=iteration + 1, env_steps=steps, time_s=round(time.perf_counter() - started, 3),
                mean_return=float(np.mean(totals)), episodes=episode)
    env.close()
    return policy.eval()
