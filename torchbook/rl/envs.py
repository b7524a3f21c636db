"""Gymnasium environments for torchbook's agents: checked ids, seeded vectors of environments, evaluation, GIFs.

`EnvPool` steps N copies of an environment and resets a finished one in the same step (its last observation
is kept as `final_obs`, so an agent can bootstrap a value when an episode was only cut by the time limit).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from torchbook.errors import UserInputError
from torchbook.rl import atari
from torchbook.rl.base import Policy, check_env_id, is_atari, save_gif

__all__ = ["EnvPool", "Policy", "check_env_id", "evaluate", "is_atari", "lean_policy", "make_env", "make_pool",
           "record_gif", "require_discrete", "save_gif"]

def make_env(env_id: str, max_episode_steps: int | None = None, render_mode: str | None = None) -> Any:
    """gymnasium.make with a one-line error for an unknown id (closest registered ids first)."""
    import gymnasium as gym

    check_env_id(env_id)
    if render_mode is not None:  # pygame renders off-screen: no display, no audio, no runtime-dir warnings

        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
        os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
    kwargs: dict[str, Any] = {"render_mode": render_mode}
    if max_episode_steps:
        kwargs["max_episode_steps"] = max_episode_steps
    return gym.make(env_id, **kwargs)


def require_discrete(env: Any, algorithm: str) -> int:
    """The number of actions; a clear error for an environment whose actions are not discrete."""
    import gymnasium as gym

    if not isinstance(env.action_space, gym.spaces.Discrete):
        raise UserInputError(
            f"{algorithm} needs discrete actions, but {env.spec.id if env.spec else 'this environment'} has "
            f"{type(env.action_space).__name__} actions {env.action_space}; choose a discrete-action environment "
            "such as CartPole-v1"
        )
    return int(env.action_space.n)


@dataclass
class EnvPool:
    """N seeded copies of one environment, stepped together, each reset as soon as its episode ends."""

    env_id: str
    n: int
    seed: int = 0
    max_episode_steps: int | None = None
    envs: list[Any] = field(default_factory=list, init=False)
    episode_returns: np.ndarray = field(init=False)
    episode_lengths: np.ndarray = field(init=False)
    finished: list[tuple[float, int]] = field(default_factory=list, init=False)  # (return, length) per episode

    def __post_init__(self) -> None:
        self.envs = [make_env(self.env_id, self.max_episode_steps) for _ in range(self.n)]
        self.observation_space, self.action_space = self.envs[0].observation_space, self.envs[0].action_space
        self.episode_returns = np.zeros(self.n)
        self.episode_lengths = np.zeros(self.n, dtype=np.int64)

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start new episodes in every environment, environment i seeded with seed + i (default: self.seed)."""
        seed = self.seed if seed is None else seed
        self.episode_returns[:], self.episode_lengths[:] = 0.0, 0
        return np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(self.envs)])

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """obs, rewards, terminated, truncated, final_obs (the observation before an automatic reset)."""
        results = [env.step(a.item() if hasattr(a, "item") else a) for env, a in zip(self.envs, actions)]
        obs = np.stack([r[0] for r in results])
        final_obs = obs.copy()
        rewards = np.array([r[1] for r in results], dtype=np.float64)
        terminated = np.array([r[2] for r in results])
        truncated = np.array([r[3] for r in results])
        self.episode_returns += rewards
        self.episode_lengths += 1
        for i in np.flatnonzero(terminated | truncated):
            self.finished.append((float(self.episode_returns[i]), int(self.episode_lengths[i])))
            self.episode_returns[i], self.episode_lengths[i] = 0.0, 0
            obs[i] = self.envs[i].reset()[0]
        return obs, rewards, terminated, truncated, final_obs

    def close(self) -> None:
        for env in self.envs:
            env.close()


def make_pool(env_id: str, n: int, seed: int = 0, max_episode_steps: int | None = None,
              episodic_life: bool = False) -> Any:
    """An `EnvPool`, or for an Atari id (`ALE/...`) an `AtariPool` with the book's preprocessing."""
    if is_atari(env_id):
        return atari.AtariPool(env_id, n, seed, max_episode_steps, episodic_life)
    return EnvPool(env_id, n, seed, max_episode_steps)


def evaluate(policy: Policy, env_id: str, episodes: int = 100, seed: int = 10_000,
             max_episode_steps: int | None = None) -> np.ndarray:
    """The return of each of `episodes` episodes, episode k seeded with seed + k (Atari: whole games, unclipped)."""
    if is_atari(env_id):
        return atari.evaluate(policy, env_id, episodes, seed, max_episode_steps)
    env = make_env(env_id, max_episode_steps)
    returns = []
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy(obs[None])[0].item())
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return np.array(returns)


def lean_policy(obs: np.ndarray) -> np.ndarray:
    """The book's hard-coded CartPole policy: push left when the pole leans left (angle < 0), else right."""
    return (obs[:, 2] >= 0).astype(np.int64)


def record_gif(policy: Policy, env_id: str, path: str | Path, seed: int = 0, max_frames: int = 500,
               every: int = 2) -> Path:
    """Play one episode and save every `every`-th frame as an animated GIF (20 frames per second)."""
    if is_atari(env_id):
        return atari.record_gif(policy, env_id, path, seed, every=every)
    env = make_env(env_id, render_mode="rgb_array")
    obs, _ = env.reset(seed=seed)
    frames = [env.render()]
    for _ in range(max_frames):
        obs, _, terminated, truncated, _ = env.step(policy(obs[None])[0].item())
        frames.append(env.render())
        if terminated or truncated:
            break
    env.close()
    return save_gif(frames, path, every)
