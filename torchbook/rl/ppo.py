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

from torchbook.checkpoint import load_latest, save_checkpoint
from torchbook.rl.envs import make_env, make_pool, require_discrete
from torchbook.rl.networks import ActorCritic, ActorCriticConfig, Agent, CNNActorCritic, CNNActorCriticConfig
from torchbook.runs import RunDir


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
    hidden: list[int] = field(default_factory=lambda: [64, 64])  # MLP sizes (image observations get the CNN)
    clip_rewards: bool = False  # train on sign(reward) (Atari); reported returns stay unclipped
    episodic_life: bool = False  # Atari: a lost life ends the learner's episode (the game goes on)
    checkpoint_every: int = 0  # updates between checkpoints in the run folder (0: none); resumable when > 0
    time_budget_s: float = 0.0  # stop training cleanly after this much training time (0: no limit)
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


def build_model(pool: Any, config: PPOConfig) -> Agent:
    """An MLP actor-critic for flat observations, the Nature-DQN CNN one for image stacks (Atari)."""
    shape = tuple(pool.observation_space.shape)
    n_actions = int(pool.action_space.n)
    if len(shape) == 3:
        return CNNActorCritic(CNNActorCriticConfig(list(shape), n_actions))
    return ActorCritic(ActorCriticConfig(int(np.prod(shape)), n_actions, list(config.hidden)))


def segment_seed(config: PPOConfig, update: int) -> int:
    """The environments' seed for the segment of updates starting at `update` (the config's seed at the start)."""
    if update == 0:
        return config.seed
    return int(np.random.SeedSequence([config.seed, update]).generate_state(1)[0] % 2**30)


def train_ppo(config: PPOConfig, log: Callable[..., Any] | None = None,
              model: Agent | None = None,
              should_stop: Callable[[Agent, int], bool] | None = None,
              run: RunDir | None = None) -> Agent:
    """Train an actor-critic on `config.env_id`; `log(**record)` receives one record per update;
    `should_stop(model, env_steps)`, called after each update, ends training early when it returns True.

    With `run` and `config.checkpoint_every`, a checkpoint (model, optimizer, update, env steps, torch RNG,
    learning curve) is written atomically to `run.checkpoints` every that many updates and at the end, and a
    call on a run folder that has one continues from it, ending with the same weights as an uninterrupted run.
    That is possible because every checkpoint falls on an episode boundary: all environments start new episodes
    (seeded from the seed and the update index) after each checkpoint, in an interrupted run as in an
    uninterrupted one. The episodes cut there are bootstrapped like time-limit cuts.
    """
    torch.manual_seed(config.seed)
    probe = make_env(config.env_id)
    require_discrete(probe, "PPO")
    probe.close()
    pool = make_pool(config.env_id, config.n_envs, config.seed, config.max_episode_steps or None, config.episodic_life)
    model = model or build_model(pool, config)
    obs_shape = tuple(pool.observation_space.shape)
    # Images stay uint8 in the rollout buffer (4x less memory); the network scales them. Vectors are float32.
    obs_dtype = torch.uint8 if pool.observation_space.dtype == np.uint8 else torch.float32
    if config.optimizer == "rmsprop":
        optimizer: torch.optim.Optimizer = torch.optim.RMSprop(model.parameters(), lr=config.lr, alpha=0.99, eps=1e-5)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, eps=1e-5)
    n, t_max = config.n_envs, config.n_steps
    updates = max(1, config.total_steps // (n * t_max))
    log = log or (run.log if run is not None else None)
    checkpoints = run.checkpoints if run is not None and config.checkpoint_every > 0 else None
    first_update, steps, time_before, saved = 0, 0, 0.0, -1  # saved: the update of the newest checkpoint
    if checkpoints is not None:
        state, _ = load_latest(checkpoints)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            first_update, steps, time_before = state["update"], state["env_steps"], state["time_s"]
            saved = first_update
            pool.finished = list(state["finished"])
            assert run is not None
            run.truncate_metrics(lambda r: r.get("kind") != "update" or r["update"] <= first_update)
    started = time.perf_counter()

    def save(update: int) -> None:
        nonlocal saved
        if checkpoints is not None:
            saved = update
            save_checkpoint(checkpoints, update, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "update": update, "env_steps": steps, "time_s": time_before + time.perf_counter() - started,
                "finished": pool.finished})

    done = first_update  # updates completed
    for update in range(first_update, updates):
        if config.time_budget_s and time_before + time.perf_counter() - started >= config.time_budget_s:
            if log is not None:
                log(kind="stopped", update=update, env_steps=steps, reason=f"time budget {config.time_budget_s} s")
            break
        if update == first_update or (checkpoints is not None and update % config.checkpoint_every == 0):
            obs = torch.as_tensor(pool.reset(segment_seed(config, update)), dtype=obs_dtype)
        if config.anneal_lr:
            optimizer.param_groups[0]["lr"] = config.lr * (1 - update / updates)
        buf_obs = torch.zeros(t_max, n, *obs_shape, dtype=obs_dtype)
        buf_actions = torch.zeros(t_max, n, dtype=torch.long)
        buf_logprob, buf_values, buf_rewards, buf_dones = (torch.zeros(t_max, n) for _ in range(4))
        with torch.no_grad():
            for t in range(t_max):
                dist, value = model.distribution_and_value(obs)
                action = dist.sample()
                buf_obs[t], buf_actions[t], buf_logprob[t], buf_values[t] = obs, action, dist.log_prob(action), value
                next_obs, raw_reward, terminated, truncated, final_obs = pool.step(action.numpy())
                if config.clip_rewards:  # the sign only (DQN's trick): one learning rate fits every game's scale
                    raw_reward = np.sign(raw_reward)
                reward = torch.as_tensor(raw_reward, dtype=torch.float32)
                if truncated.any():  # cut by the time limit, not failed: bootstrap with the final state's value
                    cut = torch.as_tensor(truncated & ~terminated)
                    final_values = model.value(torch.as_tensor(final_obs, dtype=obs_dtype))
                    reward = reward + config.gamma * final_values * cut
                buf_rewards[t] = reward
                buf_dones[t] = torch.as_tensor(terminated | truncated, dtype=torch.float32)
                obs = torch.as_tensor(next_obs, dtype=obs_dtype)
            advantages = gae(buf_rewards, buf_values, buf_dones, model.value(obs), config.gamma, config.gae_lambda)
            returns = advantages + buf_values
        steps += n * t_max
        flat = (buf_obs.reshape(-1, *obs_shape), buf_actions.reshape(-1), buf_logprob.reshape(-1),
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
                dist, values = model.distribution_and_value(b_obs)
                loss, stats = ppo_loss(dist.log_prob(b_actions), b_logprob, b_adv, values, b_returns,
                                       dist.entropy(), config.clip, config.vf_coef, config.ent_coef)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
        if log is not None:
            recent = [r for r, _ in pool.finished[-20:]]
            log(kind="update", update=update + 1, env_steps=steps,
                time_s=round(time_before + time.perf_counter() - started, 3),
                mean_return=float(np.mean(recent)) if recent else None, episodes=len(pool.finished), **stats)
        done = update + 1
        if checkpoints is not None and done % config.checkpoint_every == 0:
            save(done)
        if should_stop is not None and should_stop(model, steps):
            break
    if checkpoints is not None and saved != done:
        save(done)  # the final state, so that a run killed while evaluating resumes straight to the evaluation
    pool.close()
    return model.eval()
