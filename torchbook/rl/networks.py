"""Policy and value networks for torchbook's agents (saved with `torchbook.models.save_model`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Categorical


def mlp(sizes: list[int], activation: type[nn.Module] = nn.Tanh, out_gain: float = 1.0) -> nn.Sequential:
    """Linear layers of the given sizes with `activation` between them; orthogonal initialization as in PPO."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(n_in, n_out)
        last = i == len(sizes) - 2
        nn.init.orthogonal_(linear.weight, out_gain if last else np.sqrt(2))
        nn.init.zeros_(linear.bias)
        layers += [linear] if last else [linear, activation()]
    return nn.Sequential(*layers)


@dataclass
class ActorCriticConfig:
    obs_dim: int
    n_actions: int
    hidden: list[int] = field(default_factory=lambda: [64, 64])


class ActorCritic(nn.Module):
    """Separate actor (action logits) and critic (state value) MLPs over a flat observation."""

    config_class = ActorCriticConfig

    def __init__(self, config: ActorCriticConfig):
        super().__init__()
        self.config = config
        self.actor = mlp([config.obs_dim, *config.hidden, config.n_actions], out_gain=0.01)
        self.critic = mlp([config.obs_dim, *config.hidden, 1], out_gain=1.0)

    def forward(self, obs: Tensor) -> Tensor:
        """Action logits (B, n_actions)."""
        return self.actor(obs)

    def value(self, obs: Tensor) -> Tensor:
        return self.critic(obs).squeeze(-1)

    def distribution(self, obs: Tensor) -> Categorical:
        return Categorical(logits=self.actor(obs), validate_args=False)

    @torch.no_grad()
    def act(self, obs: np.ndarray, greedy: bool = True) -> np.ndarray:
        """Actions for a batch of observations: the most probable (greedy) or sampled."""
        logits = self.actor(torch.as_tensor(obs, dtype=torch.float32))
        actions = logits.argmax(-1) if greedy else Categorical(logits=logits, validate_args=False).sample()
        return actions.numpy()


@dataclass
class PolicyConfig:
    obs_dim: int
    n_actions: int
    hidden: list[int] = field(default_factory=lambda: [5])


class CategoricalPolicy(nn.Module):
    """A policy network alone (REINFORCE): observation -> action logits."""

    config_class = PolicyConfig

    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.config = config
        self.actor = mlp([config.obs_dim, *config.hidden, config.n_actions], activation=nn.ReLU)

    def forward(self, obs: Tensor) -> Tensor:
        return self.actor(obs)

    def distribution(self, obs: Tensor) -> Categorical:
        return Categorical(logits=self.actor(obs), validate_args=False)

    @torch.no_grad()
    def act(self, obs: np.ndarray, greedy: bool = True) -> np.ndarray:
        logits = self.actor(torch.as_tensor(obs, dtype=torch.float32))
        return (logits.argmax(-1) if greedy else Categorical(logits=logits, validate_args=False).sample()).numpy()
