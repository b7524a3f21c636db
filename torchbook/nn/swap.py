"""Replacing a model's layers in place: the one helper that weight-only quantization (and LoRA adapters) use.

`swap_modules(model, replace, kind=nn.Linear, names=None)` calls `replace(name, module)` for every submodule of
`kind` whose name matches one of `names` (shell-style patterns such as "*.attn.*_proj"; None: all) and puts the
module it returns in the old one's place (None keeps the old one). It knows nothing of any model's layout: a
model that needs some layers treated differently says which (for example `GPT.output_layers`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase

from torch import nn


def name_matches(name: str, patterns: Iterable[str] | None) -> bool:
    """True when `patterns` is None or `name` matches one of them (shell-style: *, ?, [...])."""
    return patterns is None or any(fnmatchcase(name, pattern) for pattern in patterns)


def swap_modules(model: nn.Module, replace: Callable[[str, nn.Module], nn.Module | None],
                 kind: type[nn.Module] | tuple[type[nn.Module], ...] = nn.Linear,
                 names: Iterable[str] | None = None) -> list[str]:
    """Swap submodules of `kind` (named as `names` allow) for what `replace(name, module)` returns; the names
    of the swapped modules, in order."""
    patterns = None if names is None else list(names)
    swapped = []
    for name, module in list(model.named_modules()):
        if not name or not isinstance(module, kind) or not name_matches(name, patterns):
            continue
        new = replace(name, module)
        if new is None or new is module:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        swapped.append(name)
    return swapped
