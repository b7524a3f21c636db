"""Loading a state dict into a model, checked once for every format: tensors the model lacks or the checkpoint
lacks are a `CheckpointError` naming the first few, never a silently half-loaded model."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from torchbook.errors import CheckpointError


def tied_aliases(model: nn.Module) -> set[str]:
    """Parameter names that share their tensor with an earlier parameter (a tied output layer, for example):
    a checkpoint may store such a tensor once."""
    first: dict[int, str] = {}
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases.add(name)
        first.setdefault(id(param), name)
    return aliases


def load_state(model: nn.Module, state: Mapping[str, Tensor], source: str) -> nn.Module:
    """Copy `state` into `model`; a `CheckpointError` saying what `source` lacks or has too much of."""
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    missing = [name for name in missing if name not in tied_aliases(model)]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match {type(model).__name__}: missing tensors {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model
