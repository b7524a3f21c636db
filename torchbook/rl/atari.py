"""The book's Atari preprocessing (chapter 19) on ale-py's own vectorised environment.

Every observation is what DeepMind's DQN and PPO agents see (Mnih et al., 2015; Machado et al., 2018):

    frame skip 4       the action is repeated on 4 emulator frames, the last two max-pooled (sprites flicker)
    grayscale, 84x84   the 210x160 RGB screen reduced to what the network needs
    frame stack 4      the last 4 frames, so the network can see the ball's motion
    noop reset         up to 30 no-op frames at reset, so episodes do not all start alike
    fire reset         FIRE at reset, which launches the ball in Breakout
    sticky actions     ALE v5's repeat_action_probability 0.25, applied on every emulator frame

`ale_py.vector_env.AtariVectorEnv` does all of this in C++ (about 850 preprocessed Breakout steps/s for 8
environments on one busy core here; a *seeded* reset reloads the ROM, about 0.35 s per environment); gymnasium's `AtariPreprocessing` wrapper needs OpenCV, which torchbook does
not install. Reward clipping (to -1, 0, 1) and episodic life (a lost life ends the *learner's* episode, the game
goes on) are training-only options: the clipping is done by the learner (`PPOConfig.clip_rewards`), so the returns
reported here are always the game's own unclipped scores over whole games (all lives).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchbook.rl.base import Policy, check_env_id, save_gif

FRAME_SKIP = 4
SCREEN_SIZE = 84
FRAME_STACK = 4
NOOP_MAX = 30
STICKY_ACTIONS = 0.25  # ALE v5's repeat_action_probability (Machado et al., 2018)
MAX_FRAMES = 108_000  # ALE v5's cap: 30 minutes of play at 60 frames per second
EVAL_MAX_STEPS = 4_500  # 18,000 frames = 5 minutes of play, Mnih et al. (2015)'s evaluation cap


def game_name(env_id: str) -> str:
    """'ALE/Breakout-v5' -> 'breakout', the ROM name ale-py knows (a one-line error for an unknown id)."""
    import gymnasium as gym

    check_env_id(env_id)
    return str(gym.spec(env_id).kwargs["game"])


def make_vector_env(env_id: str, n: int, max_episode_steps: int | None = None, episodic_life: bool = False,
                    rgb: bool = False) -> Any:
    """`n` preprocessed copies of an Atari game; `rgb=True` gives the raw 210x160 colour screen instead (GIFs).

    Environments reset themselves in the step that ends a game (gymnasium's SameStep autoreset), the last
    observation of the finished game in `info["final_obs"]`. With `episodic_life`, a lost life reports
    `terminated` but the game continues (ale-py's `life_loss_info`; its `episodic_life` would restart the game).
    """
    from ale_py.vector_env import AtariVectorEnv

    view: dict[str, Any] = {"grayscale": False, "img_height": 210, "img_width": 160, "stack_num": 1, "maxpool": False} if rgb else {
        "grayscale": True, "img_height": SCREEN_SIZE, "img_width": SCREEN_SIZE, "stack_num": FRAME_STACK}
    return AtariVectorEnv(
        game_name(env_id), n, num_threads=1,  # one thread: the machine's cores belong to the learner
        frameskip=FRAME_SKIP, noop_max=NOOP_MAX, use_fire_reset=True, repeat_action_probability=STICKY_ACTIONS,
        max_num_frames_per_episode=(max_episode_steps * FRAME_SKIP) if max_episode_steps else MAX_FRAMES,
        reward_clipping=False, episodic_life=False, life_loss_info=episodic_life, autoreset_mode="SameStep", **view,
    )


@dataclass
class AtariPool:
    """`EnvPool`'s interface over an `AtariVectorEnv`: `finished` holds whole games' unclipped (return, length)."""

    env_id: str
    n: int
    seed: int = 0
    max_episode_steps: int | None = None
    episodic_life: bool = False
    env: Any = field(init=False)
    lives: np.ndarray = field(init=False)
    episode_returns: np.ndarray = field(init=False)
    episode_lengths: np.ndarray = field(init=False)
    finished: list[tuple[float, int]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.env = make_vector_env(self.env_id, self.n, self.max_episode_steps, self.episodic_life)
        self.observation_space = self.env.single_observation_space
        self.action_space = self.env.single_action_space

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start new games in every environment, environment i seeded with seed + i."""
        obs, info = self.env.reset(seed=self.seed if seed is None else seed)
        self.lives = info["lives"].copy()
        self.episode_returns, self.episode_lengths = np.zeros(self.n), np.zeros(self.n, dtype=np.int64)
        return obs

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """obs, rewards (unclipped), terminated (at a lost life too with episodic_life), truncated, final_obs."""
        obs, rewards, terminated, truncated, info = self.env.step(np.asarray(actions))
        # A game is over when it was reset in this step: cut, or ended other than by losing one of several lives.
        game_over = truncated | (terminated & ~(info["lives"] < self.lives))
        self.lives = info["lives"].copy()
        final_obs = obs.copy()
        if game_over.any():
            final_obs[game_over] = info["final_obs"][game_over]
        self.episode_returns += rewards
        self.episode_lengths += 1
        for i in np.flatnonzero(game_over):
            self.finished.append((float(self.episode_returns[i]), int(self.episode_lengths[i])))
            self.episode_returns[i], self.episode_lengths[i] = 0.0, 0
        return obs, rewards.astype(np.float64), terminated, truncated, final_obs

    def close(self) -> None:
        self.env.close()


def evaluate(policy: Policy, env_id: str, episodes: int = 30, seed: int = 10_000,
             max_episode_steps: int | None = EVAL_MAX_STEPS) -> np.ndarray:
    """The unclipped score of `episodes` whole games played side by side (game k seeded with seed + k), each
    cut after `max_episode_steps` agent steps so that a policy that never launches the ball cannot hang.
    A sampling policy draws from torch's generator, seeded here (and restored after) so scores are repeatable."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _play_games(policy, env_id, episodes, seed, max_episode_steps)


def _play_games(policy: Policy, env_id: str, episodes: int, seed: int, max_episode_steps: int | None) -> np.ndarray:
    env = make_vector_env(env_id, episodes, max_episode_steps or EVAL_MAX_STEPS)
    obs, info = env.reset(seed=seed)
    lives = info["lives"].copy()
    returns, playing = np.zeros(episodes), np.ones(episodes, dtype=bool)
    actions = np.zeros(episodes, dtype=np.int64)
    while playing.any():
        actions[playing] = policy(obs[playing])  # finished games keep stepping (they restarted) but are ignored
        obs, rewards, terminated, truncated, info = env.step(actions)
        returns += rewards * playing
        playing &= ~(truncated | (terminated & ~(info["lives"] < lives)))
        lives = info["lives"].copy()
    env.close()
    return returns


def random_policy(n_actions: int, seed: int = 0) -> Policy:
    """Uniformly random actions: the baseline every Atari result is compared with (Mnih et al., 2015)."""
    rng = np.random.default_rng(seed)
    return lambda obs: rng.integers(n_actions, size=len(obs))


def record_gif(policy: Policy, env_id: str, path: str | Path, seed: int = 0, max_frames: int = 2_000,
               every: int = 2) -> Path:
    """Play one game and save its colour screen as a GIF. The policy sees the preprocessed frames of one
    environment; a twin environment with the same seed and the same actions shows the game in colour (both
    are deterministic given the seed, so they play the same game)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        frames = _play_frames(policy, env_id, seed, max_frames)
    return save_gif(frames, path, every)


def _play_frames(policy: Policy, env_id: str, seed: int, max_frames: int) -> list[np.ndarray]:
    agent_env = make_vector_env(env_id, 1)
    screen_env = make_vector_env(env_id, 1, rgb=True)
    obs, info = agent_env.reset(seed=seed)
    screen, _ = screen_env.reset(seed=seed)
    lives, frames = info["lives"].copy(), [screen[0, -1]]
    for _ in range(max_frames):
        actions = np.asarray(policy(obs))
        obs, _, terminated, truncated, info = agent_env.step(actions)
        screen = screen_env.step(actions)[0]
        if (truncated | (terminated & ~(info["lives"] < lives))).any():
            break
        lives = info["lives"].copy()
        frames.append(screen[0, -1])
    agent_env.close()
    screen_env.close()
    return frames
