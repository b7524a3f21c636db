"""Training faster and bigger (chapter 17, appendix B): torch.compile with a fallback, activation checkpointing."""

from __future__ import annotations

import ctypes
import functools
import logging
import platform
import shutil
import sys
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from torchbook.train.distributed import blocks

log = logging.getLogger(__name__)

COMPILE_BACKEND = "inductor"  # torch.compile's default; tests use a lighter one


class Compiled:
    """`torch.compile(module)` that falls back to the eager module, once and with one clear message, where it
    cannot compile (no C++ compiler, an unsupported Python, an operation dynamo cannot trace). Errors of the model
    itself still surface: the eager call that follows raises them."""

    def __init__(self, module: nn.Module):
        self.eager = module
        self.compiled: Any = None
        self.problem = compile_unavailable()
        if self.problem is None:
            self.compiled = torch.compile(module, backend=COMPILE_BACKEND)
        else:
            fallback_message(self.problem)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as e:
                self.problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                self.compiled = None
                fallback_message(self.problem)
        return self.eager(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.eager, name)


def compile_unavailable() -> str | None:
    """Why torch.compile cannot run here, or None."""
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {sys.version.split()[0]} on this torch build"
    if COMPILE_BACKEND == "inductor" and not torch.cuda.is_available():
        if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            return "the CPU compiler backend needs a C++ compiler (g++ or clang++) on PATH"
    return None


def fallback_message(problem: str) -> None:
    log.warning("could not compile the model (%s); training without compiling", problem)


def enable_activation_checkpointing(model: nn.Module, modules: list[nn.Module] | None = None) -> list[nn.Module]:
    """Activation checkpointing (chapter 17): each block's activations are dropped after its forward pass and
    recomputed during backward, trading compute for memory. Blocks are the children of the model's
    `nn.ModuleList`s (a Transformer's layers) or, without any, the model's top-level children. The weights and
    their names are untouched (saving and loading see the same model); in eval mode or under no_grad the blocks
    run normally. Returns the checkpointed modules."""
    chosen = modules if modules is not None else (blocks(model) or list(model.children()) or [model])
    for module in chosen:
        if getattr(module, "_torchbook_checkpointed", False):
            continue
        module.forward = functools.partial(_checkpointed, module, module.forward)  # type: ignore[method-assign]
        module._torchbook_checkpointed = True  # type: ignore[assignment]
    return chosen


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def return_freed_buffers(threshold: int = 1 << 20) -> bool:
    """On Linux with glibc, serve every allocation of at least `threshold` bytes by its own mmap, so that a freed
    tensor's memory goes back to the system at once. By default glibc raises that threshold (up to 32 MiB) each
    time such a block is freed; after that, the activations recomputed and freed block by block under activation
    checkpointing stay in the process's heap, fragmented, and never shrink it: at SmolLM2's shape, batch 8 x 256,
    a LoRA step's peak RSS was 3.0 GB, of which 0.14 GB were tensors kept for backward (docs/benchmarks.md); with
    the fixed threshold it is 1.6 GB. Returns whether the setting took (False on other C libraries)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except OSError:
        return False


def _checkpointed(module: nn.Module, forward: Any, *args: Any, **kwargs: Any) -> Any:
    if module.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)
