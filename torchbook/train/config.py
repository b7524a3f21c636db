"""TrainConfig: the trainer's settings. Recipe configs inherit it, so every key is flat (`lr=0.01 epochs=5`)."""

from __future__ import annotations

from dataclasses import dataclass

from torchbook.errors import UserInputError, unknown


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"  # see torchbook.train.optim.OPTIMIZERS
    weight_decay: float = 0.0
    momentum: float = 0.0  # SGD and RMSProp
    nesterov: bool = False  # SGD
    schedule: str = "constant"  # see torchbook.train.optim.SCHEDULES
    warmup_steps: int = 0
    grad_clip: float = 0.0  # max global gradient norm, 0 = off
    grad_accum: int = 1  # micro-batches per optimizer step
    patience: int = 0  # early stopping after this many epochs without improvement, 0 = off
    monitor: str = "val_loss"  # the epoch metric for early stopping and best weights
    restore_best: bool = True  # end with the weights of the best epoch (when there is validation data)
    checkpoint_every: int = 0  # optimizer steps between checkpoints (0: at epoch ends only)
    keep_checkpoints: int = 2
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    precision: str = "fp32"  # fp32, bf16 (autocast), fp16 (autocast + gradient scaling, CUDA)
    seed: int = 42
    max_steps: int = 0  # stop after this many optimizer steps, 0 = no cap
    time_budget_s: float = 0.0  # stop after this much wall-clock training time, 0 = none
    log_every: int = 20  # optimizer steps between kind="step" records
    num_workers: int = 0  # data-loader worker processes
    progress: bool = True  # progress bar (shown on a terminal only)

    def validate(self) -> None:
        from torchbook.train.optim import OPTIMIZERS, SCHEDULES

        if self.optimizer not in OPTIMIZERS:
            raise unknown("optimizer", self.optimizer, OPTIMIZERS)
        if self.schedule not in SCHEDULES:
            raise unknown("schedule", self.schedule, SCHEDULES)
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise unknown("precision", self.precision, ["fp32", "bf16", "fp16"])
        for name in ("epochs", "batch_size", "grad_accum", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name}={getattr(self, name)} must be at least 1")
        if self.lr <= 0:
            raise UserInputError(f"lr={self.lr} must be positive")
