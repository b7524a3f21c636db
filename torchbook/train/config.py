"""TrainConfig: the trainer's settings. Recipe configs inherit it, so every key is flat (`lr=0.01 epochs=5`)."""

from __future__ import annotations

from dataclasses import dataclass

from torchbook.devices import check_device
from torchbook.errors import UserInputError, unknown

PARALLEL_MODES = ("none", "ddp", "fsdp")
# The names `torchbook.train.optim` implements (it checks that its tables have exactly these).
OPTIMIZER_NAMES = ("sgd", "adam", "adamw", "nadam", "adamax", "rmsprop", "adagrad")
SCHEDULE_NAMES = ("constant", "cosine", "warmup", "exponential", "cosine_restarts", "onecycle", "plateau")


def monitor_mode(name: str) -> str:
    """Lower is better for losses and errors, higher for everything else (accuracy, F1, BLEU...)."""
    lowered = name.lower()
    return "min" if any(w in lowered for w in ("loss", "mae", "mse", "rmse", "error", "perplexity", "bpc")) else "max"


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
    # Training at scale (chapters 11 and 17, appendix B); the defaults keep plain single-process fp32 training.
    compile: bool = False  # torch.compile the training forward (falls back to eager, with a message, if it cannot)
    activation_checkpointing: bool = False  # recompute the blocks' activations in backward (less memory, more time)
    release_memory: bool = True  # CPU + activation_checkpointing on glibc's malloc: freed buffers of 1 MiB+ return to
    # the system at once (train/speed.py::return_freed_buffers): a lower peak RSS, paid in page faults; not needed
    # under jemalloc, which the `torchbook` command runs on when installed (torchbook.allocator; docs/benchmarks.md)
    parallel: str = "none"  # none, ddp (DistributedDataParallel), fsdp (FSDP2 fully_shard); launch with torchrun
    tensorboard: bool = False  # TensorBoard events in <run>/tensorboard: scalars, lr, weight histograms
    # Regularization (chapter 11): L1/L2 penalties on the weights parameter group (not biases or norm scales),
    # max-norm on each neuron's incoming weights after every step.
    l1: float = 0.0
    l2: float = 0.0
    max_norm: float = 0.0  # 0 = off
    # Schedule settings (see torchbook.train.optim.SCHEDULES).
    decay_steps: int = 0  # exponential: lr falls 10x every decay_steps steps (0: over the whole run)
    restart_steps: int = 0  # cosine_restarts: steps of the first cycle (0: a tenth of the run)
    restart_mult: int = 1  # cosine_restarts: each cycle is this many times longer than the previous
    plateau_factor: float = 0.5  # plateau: multiply lr by this...
    plateau_patience: int = 2  # ...after this many epochs without improvement of `monitor`

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZER_NAMES:
            raise unknown("optimizer", self.optimizer, OPTIMIZER_NAMES)
        if self.schedule not in SCHEDULE_NAMES:
            raise unknown("schedule", self.schedule, SCHEDULE_NAMES)
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise unknown("precision", self.precision, ["fp32", "bf16", "fp16"])
        for name in ("epochs", "batch_size", "grad_accum", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name}={getattr(self, name)} must be at least 1")
        if self.lr <= 0:
            raise UserInputError(f"lr={self.lr} must be positive")
        check_device(self.device)
        if self.parallel not in PARALLEL_MODES:
            raise unknown("parallel mode", self.parallel, PARALLEL_MODES)
        for name in ("l1", "l2", "max_norm", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise UserInputError(f"{name}={getattr(self, name)} must be 0 (off) or positive")
        if not 0 < self.plateau_factor < 1:
            raise UserInputError(f"plateau_factor={self.plateau_factor} must be between 0 and 1")
        if self.restart_mult < 1:
            raise UserInputError(f"restart_mult={self.restart_mult} must be at least 1")
