"""Proximal policy optimization (Schulman et al., 2017) with generalized advantage estimation (chapter 19).

`gae` and `ppo_loss` are the algorithm's two equations as standalone functions, so that RLHF's PPO reuses them
with a language model as the policy; `train_ppo` is the loop for gymnasium environments:

    for each update:
        collect n_steps x n_envs transitions with the current policy
        advantages = GAE(rewards, values, dones)      returns = advantages + values
        for each epoch, for each minibatch:
            ratio = exp(log pi(a|s) - log pi_old(a|s))
            loss  = -min(ratio A, clip(ratio, 1-eps, 1+eps) A) + vf_coef (V(s) - R)^2 - ent_coef H(pi(.|s))
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from torchbook.rl.envs import EnvPool, make_env, require_discrete
from torchbook.rl.networks import ActorCritic, ActorCriticConfig


@dataclass
class PPOConfig:
    env_id: str = "CartPole-v1"
    max_episode_steps: int = 0  # 0: the environment's own cap (500 for CartPole-v1; the book's variant: 1000)
    total_steps: int = 100_000
    n_envs: int = 8
    n_steps: int = 32  # steps per environment per update
    epochs: int = 20  # passes over each rollout
    minibatches: int = 1
    lr: float = 1e-3
    optimizer: str = "adam"  # adam or rmsprop (A2C's)
    anneal_lr: bool = True  # linear decay to 0 over training
    gamma: float = 0.98
    gae_lambda: float = 0.8
    clip: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    max_grad_norm: float = 0.5
    normalize_advantages: bool = True
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    seed: int = 42


def gae(rewards: Tensor, values: Tensor, dones: Tensor, last_value: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalized advantage estimation over a (T, N) rollout.

    delta_t = r_t + gamma V(s_{t+1}) (1 - done_t) - V(s_t);  A_t = delta_t + gamma lambda (1 - done_t) A_{t+1}.
    `dones[t]` says the episode ended at step t (so s_{t+1} belongs to a new episode).
    """
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    next_value = last_value
    for t in reversed(range(len(rewards))):
        not_done = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * not_done - values[t]
        running = delta + gamma * lam * not_done * running
        advantages[t] = running
        next_value = values[t]
    return advantages


def ppo_loss(new_logprob: Tensor, old_logprob: Tensor, advantages: Tensor, values: Tensor, returns: Tensor,
             entropy: Tensor, clip: float, vf_coef: float, ent_coef: float) -> tuple[Tensor, dict[str, float]]:
    """The clipped surrogate objective plus the value and entropy terms (to minimize), and diagnostics."""
    ratio = (new_logprob - old_logprob).exp()
    policy_loss = -torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages).mean()
    value_loss = 0.5 * (values - returns).pow(2).mean()
    loss = policy_loss + vf_coef * value_loss - ent_coef * entropy.mean()
    with torch.no_grad():
        stats = {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(), "entropy": entropy.mean().item(),
                 "clip_fraction": ((ratio - 1).abs() > clip).float().mean().item()}
    return loss, stats


def train_ppo(config: PPOConfig, log: Callable[..., Any] | None = None,
              model: ActorCritic | None = None,
              should_stop: Callable[[ActorCritic, int], bool] | None = None) -> ActorCritic:
    """Train an actor-critic on `config.env_id`; `log(**record)` receives one record per update;
    `should_stop(model, env_steps)`, called after each update, ends training early when it returns True."""
    torch.manual_seed(config.seed)
    probe = make_env(config.env_id)
    n_actions = require_discrete(probe, "PPO")
    obs_dim = int(np.prod(probe.observation_space.shape))
    probe.close()
    model = model or ActorCritic(ActorCriticConfig(obs_dim, n_actions, list(config.hidden)))
    if config.optimizer == "rmsprop":
        optimizer: torch.optim.Optimizer = torch.optim.RMSprop(model.parameters(), lr=config.lr, alpha=0.99, eps=1e-5)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, eps=1e-5)
    pool = EnvPool(config.env_id, config.n_envs, config.seed, config.max_episode_steps or None)
    obs = torch.as_tensor(pool.reset(), dtype=torch.float32)
    n, t_max = config.n_envs, config.n_steps
    updates = max(1, config.total_steps // (n * t_max))
    started, steps = time.perf_counter(), 0
    for update in range(updates):
        if config.anneal_lr:
            optimizer.param_groups[0]["lr"] = config.lr * (1 - update / updates)
        buf_obs = torch.zeros(t_max, n, obs_dim)
        buf_actions = torch.zeros(t_max, n, dtype=torch.long)
        buf_logprob, buf_values, buf_rewards, buf_dones = (torch.zeros(t_max, n) for _ in range(4))
        with torch.no_grad():
            for t in range(t_max):
                dist = model.distribution(obs)
                action = dist.sample()
                buf_obs[t], buf_actions[t], buf_logprob[t], buf_values[t] = obs, action, dist.log_prob(action), model.value(obs)
                next_obs, raw_reward, terminated, truncated, final_obs = pool.step(action.numpy())
                reward = torch.as_tensor(raw_reward, dtype=torch.float32)
                if truncated.any():  # cut by the time limit, not failed: bootstrap with the final state's value
                    cut = torch.as_tensor(truncated & ~terminated)
                    final_values = model.value(torch.as_tensor(final_obs, dtype=torch.float32))
                    reward = reward + config.gamma * final_values * cut
                buf_rewards[t] = reward
                buf_dones[t] = torch.as_tensor(terminated | truncated, dtype=torch.float32)
                obs = torch.as_tensor(next_obs, dtype=torch.float32)
            advantages = gae(buf_rewards, buf_values, buf_dones, model.value(obs), config.gamma, config.gae_lambda)
            returns = advantages + buf_values
        steps += n * t_max
        flat = (buf_obs.reshape(-1, obs_dim), buf_actions.reshape(-1), buf_logprob.reshape(-1),
                advantages.reshape(-1), returns.reshape(-1))
        batch = n * t_max
        size = batch // config.minibatches
        for _ in range(config.epochs):
            order = torch.randperm(batch)
            for start in range(0, batch, size):
                idx = order[start : start + size]
                b_obs, b_actions, b_logprob, b_adv, b_returns = (x[idx] for x in flat)
                if config.normalize_advantages:
                    b_adv = (b_adv - b_adv.mean()) / (b_adv.std() + 1e-8)
                dist = model.distribution(b_obs)
                loss, stats = ppo_loss(dist.log_prob(b_actions), b_logprob, b_adv, model.value(b_obs), b_returns,
                                       dist.entropy(), config.clip, config.vf_coef, config.ent_coef)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
        if log is not None:
            recent = [r for r, _ in pool.finished[-20:]]
            log(kind="update", update=update + 1, env_steps=steps, time_s=round(time.perf_counter() - started, 3),
                mean_return=float(np.mean(recent)) if recent else None, episodes=len(pool.finished), **stats)
        if should_stop is not None and should_stop(model, steps):
            break
    pool.close()
    return model.eval()
