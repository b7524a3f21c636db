"""What every environment module of `torchbook.rl` shares: the policy type, Atari ids, checked ids, GIF writing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from torchbook.errors import unknown
from torchbook.io import atomic_write

Policy = Callable[[np.ndarray], np.ndarray]  # a batch of observations -> a batch of actions


def is_atari(env_id: str) -> bool:
    """Atari games (ale-py's `ALE/...` ids) get the book's preprocessing (torchbook/rl/atari.py)."""
    return env_id.startswith("ALE/")


def check_env_id(env_id: str) -> None:
    """A one-line error for an unknown id (closest registered ids first); registers ale-py's Atari games."""
    import gymnasium as gym

    if is_atari(env_id):
        import ale_py

        gym.register_envs(ale_py)
    if env_id not in gym.registry:
        raise unknown("environment id", env_id, [k for k in gym.registry if "/" not in k or k.startswith("ALE/")], limit=8)


def save_gif(frames: list[np.ndarray], path: str | Path, every: int = 2) -> Path:
    """Every `every`-th RGB frame as an animated GIF at 20 frames per second, written atomically."""
    images = [Image.fromarray(f) for f in frames[::every]]

    def write(f: Any) -> None:
        images[0].save(f, format="GIF", save_all=True, append_images=images[1:], duration=50 * every, loop=0)

    return atomic_write(path, write)
