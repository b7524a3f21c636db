"""Deep Q-networks (Mnih et al., 2015) as in chapter 19, with the chapter's variants as options:
double DQN (van Hasselt et al., 2016), a dueling head (Wang et al., 2016) and prioritized replay (Schaul et al.,
2016, proportional, with importance-sampling weights).

    for each environment step:
        act epsilon-greedily (epsilon decays linearly), store (s, a, r, s', done) in the replay buffer
        every train_freq steps, gradient_steps times: sample a batch; y = r + gamma (1 - done) Q_target(s', argmax_a' Q(s', a'))  (double)
                                                 or r + gamma (1 - done) max_a' Q_target(s', a')              (plain)
                                minimize Huber(Q(s, a), y) (weighted by importance weights with prioritized replay)
        every target_update_interval environment steps: Q_target <- Q
DQN is known to be unstable on CartPole (the book says so): every `eval_interval` steps the greedy policy is
evaluated on a few episodes and the best weights are kept.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from torchbook.devices import device_of
from torchbook.rl.envs import EnvPool, evaluate, make_env, require_discrete
from torchbook.rl.networks import mlp


@dataclass
class QNetworkConfig:
    obs_dim: int
    n_actions: int
    hidden: list[int] = field(default_factory=lambda: [32, 32])
    dueling: bool = False


class QNetwork(nn.Module):
    """Q(s, .) from a flat observation; the dueling head computes V(s) + A(s, a) - mean_a A(s, a)."""

    config_class = QNetworkConfig

    def __init__(self, config: QNetworkConfig):
        super().__init__()
        self.config = config
        *body, last = [config.obs_dim, *config.hidden]
        # PyTorch's default initialization, as Stable-Baselines3's DQN: on CartPole it solved in 4k, 41k and 37k
        # steps (seeds 1-3, benchmarks/rl.py's measure) against 66k, 74k and unsolved in 100k with orthogonal init.
        self.body = mlp([*body, last], activation=nn.ReLU, orthogonal=False) if config.hidden else nn.Identity()
        self.body_act = nn.ReLU() if config.hidden else nn.Identity()
        self.advantage = nn.Linear(last, config.n_actions)
        self.state_value = nn.Linear(last, 1) if config.dueling else None

    def forward(self, obs: Tensor) -> Tensor:
        h = self.body_act(self.body(obs))
        advantages = self.advantage(h)
        if self.state_value is None:
            return advantages
        return self.state_value(h) + advantages - advantages.mean(-1, keepdim=True)

    @torch.no_grad()
    def act(self, obs: np.ndarray, greedy: bool = True) -> np.ndarray:
        return self(torch.as_tensor(obs, dtype=torch.float32, device=device_of(self))).argmax(-1).cpu().numpy()


@dataclass
class DQNConfig:
    env_id: str = "CartPole-v1"
    max_episode_steps: int = 0
    # The RL Zoo's tuned CartPole-v1 settings: bursts of 128 gradient steps every 256 environment steps.
    total_steps: int = 50_000
    buffer_size: int = 100_000
    learning_starts: int = 1_000
    batch_size: int = 64
    lr: float = 2.3e-3
    gamma: float = 0.99
    train_freq: int = 256
    gradient_steps: int = 128
    target_update_interval: int = 10
    eps_start: float = 1.0
    eps_end: float = 0.04
    exploration_fraction: float = 0.16
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    double: bool = False
    dueling: bool = False
    prioritized: bool = False
    per_alpha: float = 0.6
    per_beta0: float = 0.4
    eval_interval: int = 5_000
    eval_episodes_during: int = 5
    seed: int = 42


class ReplayBuffer:
    """A circular buffer of transitions; with `alpha > 0`, sampled in proportion to priority^alpha."""

    def __init__(self, size: int, obs_dim: int, alpha: float = 0.0, seed: int = 0):
        self.size, self.alpha, self.n, self.pos = size, alpha, 0, 0
        self.obs = np.zeros((size, obs_dim), np.float32)
        self.next_obs = np.zeros((size, obs_dim), np.float32)
        self.actions = np.zeros(size, np.int64)
        self.rewards = np.zeros(size, np.float32)
        self.dones = np.zeros(size, np.float32)
        self.priorities = np.zeros(size, np.float64)
        self.max_priority = 1.0  # new transitions get the highest priority seen so far
        self.rng = np.random.default_rng(seed)

    def add(self, obs: np.ndarray, action: int, reward: float, next_obs: np.ndarray, done: bool) -> None:
        i = self.pos
        self.obs[i], self.actions[i], self.rewards[i], self.next_obs[i], self.dones[i] = obs, action, reward, next_obs, done
        self.priorities[i] = self.max_priority
        self.pos, self.n = (i + 1) % self.size, min(self.n + 1, self.size)

    def sample(self, batch: int, beta: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Indices and importance-sampling weights (all ones without prioritization)."""
        if self.alpha == 0:
            return self.rng.integers(0, self.n, batch), np.ones(batch, np.float32)
        p = self.priorities[: self.n] ** self.alpha
        p /= p.sum()
        idx = self.rng.choice(self.n, batch, p=p)
        weights = (self.n * p[idx]) ** -beta
        return idx, (weights / weights.max()).astype(np.float32)

    def update(self, idx: np.ndarray, td_errors: np.ndarray) -> None:
        self.priorities[idx] = np.abs(td_errors) + 1e-6
        self.max_priority = max(self.max_priority, float(self.priorities[idx].max()))


def train_dqn(config: DQNConfig, log: Callable[..., Any] | None = None,
              should_stop: Callable[[QNetwork, int], bool] | None = None) -> QNetwork:
    """Train a Q-network; `should_stop(q, env_steps)`, called every `train_freq` steps, ends training early."""
    torch.manual_seed(config.seed)
    probe = make_env(config.env_id)
    n_actions = require_discrete(probe, "DQN")
    obs_dim = int(np.prod(probe.observation_space.shape))
    probe.close()
    q = QNetwork(QNetworkConfig(obs_dim, n_actions, list(config.hidden), config.dueling))
    target = copy.deepcopy(q)
    optimizer = torch.optim.Adam(q.parameters(), lr=config.lr)
    buffer = ReplayBuffer(config.buffer_size, obs_dim, config.per_alpha if config.prioritized else 0.0, config.seed)
    pool = EnvPool(config.env_id, 1, config.seed, config.max_episode_steps or None)
    rng = np.random.default_rng(config.seed)
    obs = pool.reset()
    best_return, best_state = -np.inf, copy.deepcopy(q.state_dict())
    started = time.perf_counter()
    for step in range(config.total_steps):
        progress = step / config.total_steps
        epsilon = max(config.eps_end, config.eps_start - (config.eps_start - config.eps_end) * progress
                      / config.exploration_fraction)
        action = int(rng.integers(n_actions)) if rng.random() < epsilon else int(q.act(obs)[0])
        next_obs, reward, terminated, truncated, final_obs = pool.step(np.array([action]))
        # A time-limit cut is not a failure: only `terminated` stops the bootstrap.
        buffer.add(obs[0], action, float(reward[0]), final_obs[0], bool(terminated[0]))
        obs = next_obs
        for _ in range(config.gradient_steps if step >= config.learning_starts and step % config.train_freq == 0 else 0):
            beta = config.per_beta0 + (1 - config.per_beta0) * progress
            idx, weights = buffer.sample(config.batch_size, beta)
            b_obs, b_next = torch.from_numpy(buffer.obs[idx]), torch.from_numpy(buffer.next_obs[idx])
            with torch.no_grad():
                if config.double:
                    best_next = q(b_next).argmax(-1, keepdim=True)
                    next_q = target(b_next).gather(-1, best_next).squeeze(-1)
                else:
                    next_q = target(b_next).max(-1).values
                y = torch.from_numpy(buffer.rewards[idx]) + config.gamma * (1 - torch.from_numpy(buffer.dones[idx])) * next_q
            q_taken = q(b_obs).gather(-1, torch.from_numpy(buffer.actions[idx])[:, None]).squeeze(-1)
            losses = nn.functional.smooth_l1_loss(q_taken, y, reduction="none")
            loss = (torch.from_numpy(weights) * losses).mean()
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(q.parameters(), 10.0)
            optimizer.step()
            if config.prioritized:
                buffer.update(idx, (q_taken - y).detach().numpy())
        # Counted in environment steps (as Stable-Baselines3 does): with bursts of training every train_freq steps,
        # the target is refreshed before each burst and stays fixed during it.
        if step % config.target_update_interval == 0:
            target.load_state_dict(q.state_dict())
        if should_stop is not None and step % config.train_freq == 0 and step and should_stop(q, step + 1):
            best_state = copy.deepcopy(q.state_dict())
            break
        if (step + 1) % config.eval_interval == 0:
            score = float(evaluate(q.act, config.env_id, config.eval_episodes_during, seed=1_000_000 + step,
                                   max_episode_steps=config.max_episode_steps or None).mean())
            if score >= best_return:
                best_return, best_state = score, copy.deepcopy(q.state_dict())
            if log is not None:
                recent = [r for r, _ in pool.finished[-20:]]
                log(kind="update", env_steps=step + 1, time_s=round(time.perf_counter() - started, 3),
                    mean_return=float(np.mean(recent)) if recent else None, eval_return=score, epsilon=epsilon)
    pool.close()
    q.load_state_dict(best_state)
    return q.eval()
