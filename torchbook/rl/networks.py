"""Policy and value networks for torchbook's agents (saved with `torchbook.models.save_model`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Categorical

from torchbook.devices import device_of


def mlp(sizes: list[int], activation: type[nn.Module] = nn.Tanh, out_gain: float = 1.0,
        orthogonal: bool = True) -> nn.Sequential:
    """Linear layers of the given sizes with `activation` between them; orthogonal initialization as in PPO
    (`orthogonal=False`: PyTorch's default initialization, as DQN uses)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(n_in, n_out)
        last = i == len(sizes) - 2
        if orthogonal:
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

    def distribution_and_value(self, obs: Tensor) -> tuple[Categorical, Tensor]:
        return self.distribution(obs), self.value(obs)

    @torch.no_grad()
    def act(self, obs: np.ndarray, greedy: bool = True) -> np.ndarray:
        """Actions for a batch of observations: the most probable (greedy) or sampled."""
        logits = self.actor(torch.as_tensor(obs, dtype=torch.float32, device=device_of(self)))
        actions = logits.argmax(-1) if greedy else Categorical(logits=logits, validate_args=False).sample()
        return actions.cpu().numpy()


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
        logits = self.actor(torch.as_tensor(obs, dtype=torch.float32, device=device_of(self)))
        return (logits.argmax(-1) if greedy else Categorical(logits=logits, validate_args=False).sample()).cpu().numpy()


@dataclass
class CNNActorCriticConfig:
    obs_shape: list[int]  # (frames, height, width): the book's Atari preprocessing gives 4 x 84 x 84 uint8
    n_actions: int
    hidden: int = 512  # the fully connected layer after the convolutions (Mnih et al., 2015)


def layer_init(layer: nn.Module, gain: float = float(np.sqrt(2))) -> nn.Module:
    """Orthogonal weights and zero biases, PPO's initialization (Engstrom et al., 2020: it matters)."""
    nn.init.orthogonal_(layer.weight, gain)  # type: ignore[arg-type]
    nn.init.zeros_(layer.bias)  # type: ignore[arg-type]
    return layer


class CNNActorCritic(nn.Module):
    """The Nature-DQN convolutional trunk (Mnih et al., 2015) shared by an actor head and a critic head (chapter 19).

    Input: uint8 frames (B, 4, 84, 84) as stored in the rollout buffer (4x smaller than float32); they are scaled
    to [0, 1] here. Trunk: conv 32 8x8 stride 4, conv 64 4x4 stride 2, conv 64 3x3 stride 1, linear 512, ReLUs.
    Sharing the trunk halves the compute of separate actor and critic networks, as in the PPO paper's Atari runs.
    """

    config_class = CNNActorCriticConfig

    def __init__(self, config: CNNActorCriticConfig):
        super().__init__()
        self.config = config
        frames, height, width = config.obs_shape
        convs = nn.Sequential(
            layer_init(nn.Conv2d(frames, 32, 8, stride=4)), nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = convs(torch.zeros(1, frames, height, width)).shape[1]  # 64 x 7 x 7 = 3136 for 84 x 84
        self.trunk = nn.Sequential(convs, layer_init(nn.Linear(flat, config.hidden)), nn.ReLU())
        self.actor = layer_init(nn.Linear(config.hidden, config.n_actions), gain=0.01)  # near-uniform policy at first
        self.critic = layer_init(nn.Linear(config.hidden, 1), gain=1.0)
        # Channels-last convolutions run their backward pass about 1.4x faster on CPU (oneDNN), measured here.
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def features(self, obs: Tensor) -> Tensor:
        return self.trunk((obs.float() / 255.0).contiguous(memory_format=torch.channels_last))

    def forward(self, obs: Tensor) -> Tensor:
        """Action logits (B, n_actions)."""
        return self.actor(self.features(obs))

    def value(self, obs: Tensor) -> Tensor:
        return self.critic(self.features(obs)).squeeze(-1)

    def distribution(self, obs: Tensor) -> Categorical:
        return Categorical(logits=self(obs), validate_args=False)

    def distribution_and_value(self, obs: Tensor) -> tuple[Categorical, Tensor]:
        """The policy and the value from one pass through the shared trunk."""
        hidden = self.features(obs)
        return Categorical(logits=self.actor(hidden), validate_args=False), self.critic(hidden).squeeze(-1)

    @torch.no_grad()
    def act(self, obs: np.ndarray, greedy: bool = False) -> np.ndarray:
        """Actions for a batch of uint8 frame stacks. Sampled by default, as PPO trains and as CleanRL evaluates:
        a greedy Breakout policy can wait forever without pressing FIRE to launch the ball."""
        logits = self(torch.as_tensor(obs, device=device_of(self)))
        actions = logits.argmax(-1) if greedy else Categorical(logits=logits, validate_args=False).sample()
        return actions.cpu().numpy()


Agent = ActorCritic | CNNActorCritic  # what train_ppo trains: a policy and a value, one `distribution_and_value`
