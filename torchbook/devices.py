"""Which device computes: `choose_device("auto")` picks CUDA, then Apple's MPS, then the CPU; `check_device` says
clearly when a device that was asked for is not there (before anything is created)."""

from __future__ import annotations

import re

import torch

from torchbook.errors import UserInputError

DEVICE_NAME = re.compile(r"^(auto|cpu|mps|meta|cuda(:\d+)?)$")


def available_devices() -> list[str]:
    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda", *[f"cuda:{i}" for i in range(torch.cuda.device_count())]]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


def check_device(name: str) -> None:
    """A `UserInputError` (param "device") for a device name that is malformed or not on this machine."""
    if not DEVICE_NAME.match(name):
        raise UserInputError(f"unknown device {name!r}; accepted: {', '.join(available_devices())}", param="device")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            built = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UserInputError(f"device {name!r} is not available: {built}; accepted: "
                                 f"{', '.join(available_devices())}", param="device")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserInputError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} "
                                 "CUDA device(s)", param="device")
    if name == "mps" and "mps" not in available_devices():
        raise UserInputError("device 'mps' is not available on this machine; accepted: "
                             f"{', '.join(available_devices())}", param="device")


def device_of(model: torch.nn.Module) -> torch.device:
    """Where a model's weights are (the CPU for a model without any): tensors made for it go there."""
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def choose_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU; another name is checked and used as it is."""
    check_device(name)
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
