"""The one trainer of torchbook: `Trainer`, its `TrainConfig`, and the `Step` a custom step function returns."""

from torchbook.train.callbacks import extra_callbacks
from torchbook.train.config import TrainConfig
from torchbook.train.trainer import Step, Trainer, choose_device, seed_everything, to_device

__all__ = ["Trainer", "TrainConfig", "Step", "choose_device", "seed_everything", "to_device", "extra_callbacks"]
