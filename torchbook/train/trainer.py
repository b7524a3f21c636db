"""The one training loop of torchbook (book chapters 10-11): every supervised recipe trains through `Trainer`.

A recipe hands the trainer a model, data and a loss; the trainer chooses the device, batches the data in a
seeded order, runs forward/backward with gradient accumulation and clipping, steps the optimizer and the
learning-rate schedule, validates each epoch with torchmetrics, stops early and restores the best weights,
logs to the run folder and writes checkpoints from which an interrupted run resumes *exactly*: the model,
optimizer, schedule, random-number generators and the position in the data are all restored, so a resumed
run ends with the same weights as an uninterrupted one (on CPU).

Training at scale (chapters 11 and 17, appendix B) is configuration of the same loop: `precision=bf16|fp16`
(autocast; fp16 adds gradient scaling), `compile=true`, `activation_checkpointing=true`, `parallel=ddp|fsdp`
under torchrun (see torchbook.train.distributed), `l1`/`l2`/`max_norm` regularization, `tensorboard=true`.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate
from tqdm import tqdm

from torchbook.allocator import allocator_in_use
from torchbook.checkpoint import load_latest, save_checkpoint
from torchbook.devices import choose_device
from torchbook.errors import TrainingDiverged
from torchbook.runs import RunDir
from torchbook.train import distributed
from torchbook.train.callbacks import TensorBoardLogger, active_extra_callbacks
from torchbook.train.config import TrainConfig, monitor_mode
from torchbook.train.optim import PER_EPOCH_SCHEDULES, build_optimizer, build_scheduler
from torchbook.train.regularization import add_penalty_gradients, apply_max_norm, mc_dropout
from torchbook.train.speed import Compiled, enable_activation_checkpointing, return_freed_buffers

log = logging.getLogger(__name__)


@dataclass
class Step:
    """What one forward pass gives the trainer: the loss, and optionally predictions and targets for metrics.

    `count` is how many examples (or tokens) the loss averages over, so epoch means are weighted correctly.
    """

    loss: Tensor
    preds: Tensor | None = None
    target: Tensor | None = None
    count: int | None = None


StepFn = Callable[[nn.Module, Any], Step]
MetricFactory = Callable[[], Any]


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside tuples, lists and dicts to `device` (asynchronously from pinned memory on CUDA)."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, (list, tuple)):
        moved = [to_device(x, device) for x in batch]
        return type(batch)(moved) if not hasattr(batch, "_fields") else type(batch)(*moved)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def supervised_step(criterion: Callable[[Tensor, Tensor], Tensor]) -> StepFn:
    """The default step for `(inputs..., target)` batches: loss = criterion(model(*inputs), target)."""

    def step(model: nn.Module, batch: Any) -> Step:
        *inputs, target = batch
        preds = model(*inputs)
        return Step(criterion(preds, target), preds.detach(), target, count=len(target))

    return step


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Train `model` on `train_data`, validating on `val_data`, with the settings of `config`.

    Args:
        model: any `nn.Module`.
        config: a `TrainConfig` (recipe configs inherit it).
        run: the run folder; checkpoints go to `run.checkpoints`, records to `run.metrics`. None: no files.
        train_data, val_data: map-style datasets; a `TensorDataset` is indexed directly (fast path).
        criterion: for `(inputs..., target)` batches, the loss `criterion(model(*inputs), target)`.
        step: or a function `step(model, batch) -> Step` for anything else (exactly one of criterion/step).
        metrics: name -> factory of a torchmetrics metric updated with `(preds, target)` on validation data.
        collate_fn: list of dataset items -> batch (default: torch's `default_collate`).
        batches: `batches(epoch) -> list of index lists`, deterministic per epoch (e.g. length bucketing);
            default: a shuffle seeded by (seed, epoch), cut into `batch_size` batches.
        callbacks: objects with any of `on_fit_start(trainer)`, `on_step_end(trainer, loss)`,
            `on_epoch_end(trainer, record)` and `on_fit_end(trainer)`; setting `trainer.should_stop` stops.
            Callbacks registered with `torchbook.train.callbacks.extra_callbacks` are added after these.

    `trainer.model` is always the plain model (under DDP, FSDP or compile, `trainer.train_module` is the wrapped
    one that trains); after `fit()` it holds the final (or best) weights on every process.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        run: RunDir | None,
        train_data: Dataset[Any],
        val_data: Dataset[Any] | None = None,
        *,
        criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
        step: StepFn | None = None,
        metrics: dict[str, MetricFactory] | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        batches: Callable[[int], Sequence[Sequence[int]]] | None = None,
        callbacks: Iterable[Any] = (),
    ):
        if (criterion is None) == (step is None):
            raise TypeError("give exactly one of `criterion` (for (inputs, target) batches) or `step`")
        self.config = config
        self.run = run
        self.dist, dist_device = distributed.setup(config.parallel, config.device)
        self.device = dist_device or choose_device(config.device)
        self.model = model.to(self.device)
        self.train_data = train_data
        self.val_data = val_data
        self.step_fn: StepFn = step if step is not None else supervised_step(criterion)  # type: ignore[arg-type]
        self.metric_factories = dict(metrics or {})
        self.collate_fn = collate_fn or default_collate
        self.batches_fn = batches
        self.callbacks = list(callbacks) + active_extra_callbacks()
        if config.tensorboard:
            self.callbacks.append(TensorBoardLogger())
        self.is_main = self.dist.is_main  # only rank 0 writes files
        self.should_stop = False
        # The module that trains: the model itself, or DDP around it, or a fully sharded copy (FSDP).
        self.train_module = distributed.wrap(self.model, self.dist, self.device)
        if config.activation_checkpointing:
            inner = self.train_module.module if self.dist.mode == "ddp" else self.train_module
            enable_activation_checkpointing(inner)  # type: ignore[arg-type]
            # What checkpointing frees: glibc's heap keeps it, fragmented (speed.py); jemalloc, which the
            # `torchbook` command runs on when installed (torchbook.allocator), reuses it without that.
            if self.device.type == "cpu" and config.release_memory and allocator_in_use() == "system":
                return_freed_buffers()
        self.forward_module: Any = Compiled(self.train_module) if config.compile else self.train_module
        self.fitting = False
        # Reading the loss back every step stalls a GPU; on CUDA it is read when a log, a checkpoint, the progress
        # bar, an on_step_end callback or the epoch end needs it (the NaN check then names "at or before step N").
        self.sync_every_step = self.device.type != "cuda"
        self.step_callbacks = False  # set by fit(): does any callback want the loss of every step?
        self.optimizer = build_optimizer(self.train_module if self.dist.mode == "fsdp" else self.model, config)
        self.steps_per_epoch = math.ceil(len(self.batches(0)) / config.grad_accum)
        total = config.epochs * self.steps_per_epoch
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
        if self.dist.mode == "fsdp" and config.precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler: Any = ShardedGradScaler(self.device.type)  # agrees on inf/NaN across the shards
        else:
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        # Position and bookkeeping, all saved in checkpoints.
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.finished_epoch_loss: float | None = None  # the last finished epoch's mean (train_loss between epochs)
        self.epoch_loss_sum = 0.0
        self.epoch_count = 0
        self.best_value: float | None = None
        self.best_state: dict[str, Tensor] | None = None
        self.best_epoch = -1
        self.bad_epochs = 0
        self.train_time = 0.0

    # -- data -----------------------------------------------------------------------------------------------
    def batches(self, epoch: int) -> Sequence[Sequence[int]]:
        """The index batches of `epoch`: the same for the same (seed, epoch), so a resumed run sees the same data."""
        if self.batches_fn is not None:
            return self.batches_fn(epoch)
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        order = torch.randperm(len(self.train_data), generator=generator).tolist()  # type: ignore[arg-type]
        size = self.config.batch_size
        return [order[i : i + size] for i in range(0, len(order), size)]

    def iterate(self, dataset: Dataset[Any], batches: Sequence[Sequence[int]]) -> Iterable[Any]:
        """Yield collated batches of `dataset` in the order of `batches`, already on the device."""
        if isinstance(dataset, TensorDataset) and self.config.num_workers == 0:
            # One index tensor for the whole epoch, cut into batches (cheaper than one conversion per batch).
            flat = torch.as_tensor([i for idx in batches for i in idx], dtype=torch.long)
            on_device = all(t.device == self.device for t in dataset.tensors)
            for index in flat.split([len(idx) for idx in batches]):
                batch = tuple(t[index] for t in dataset.tensors)
                yield batch if on_device else to_device(batch, self.device)
            return
        loader = DataLoader(
            dataset,
            batch_sampler=batches,  # type: ignore[arg-type]
            collate_fn=self.collate_fn,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        for batch in loader:
            yield to_device(batch, self.device)

    def eval_batches(self, dataset: Dataset[Any], batch_size: int | None = None) -> list[list[int]]:
        size = batch_size or max(self.config.batch_size, 256)
        n = len(dataset)  # type: ignore[arg-type]
        return [list(range(i, min(i + size, n))) for i in range(0, n, size)]

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, Tensor]:
        """The current weights as a plain state dict (gathered from the shards under FSDP: a collective call)."""
        if self.dist.mode == "fsdp" and self.fitting:
            return distributed.full_model_state(self.train_module, self.dist)
        return self.model.state_dict()

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, whole and rank-independent (resumable on any number of processes).
        Under FSDP every process must call it (it gathers the shards)."""
        loss_sum, count = distributed.all_reduce_sum([self.epoch_loss_sum, float(self.epoch_count)], self.dist)
        return {
            "model": self.full_state_dict(),
            "optimizer": distributed.optimizer_state(self.train_module, self.optimizer, self.dist),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "position": {
                "global_step": self.global_step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "epoch_loss_sum": loss_sum,
                "epoch_count": int(count),
                "train_time": self.train_time,
            },
            "early_stopping": {
                "best_value": self.best_value,
                "best_state": self.best_state,
                "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.dist.mode == "fsdp":
            distributed.load_model_state(self.train_module, state["model"], self.dist)
        self.model.load_state_dict(state["model"])
        distributed.load_optimizer_state(self.train_module, self.optimizer, state["optimizer"], self.dist)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for key, value in state["position"].items():
            setattr(self, key, value)
        for key, value in state["early_stopping"].items():
            setattr(self, key, value)
        if not self.is_main:  # the saved loss sum is the sum over all processes: count it once
            self.epoch_loss_sum, self.epoch_count = 0.0, 0
        set_rng_state(state["rng"])

    def save_checkpoint(self) -> None:
        if self.run is None:
            return
        state = self.state_dict()  # on every process: gathering FSDP shards is collective
        if self.is_main:
            save_checkpoint(self.run.checkpoints, self.global_step, state, self.config.keep_checkpoints)

    def resume(self) -> bool:
        """Load the newest intact checkpoint of the run, if any; drop records logged after it."""
        if self.run is None:
            return False
        state = load_latest(self.run.checkpoints, map_location="cpu")[0] if self.is_main else None
        state = distributed.broadcast_object(state, self.dist)  # rank 0 reads, everyone resumes
        if state is None:
            return False
        self.load_state_dict(state)
        step = self.global_step
        if self.is_main:
            # Records of what the restored state has not done yet go: later steps, and epochs it has not finished
            # (a process killed between an epoch's record and that epoch's checkpoint, when a step checkpoint fell
            # on the epoch's last batch, would otherwise log the epoch twice).
            done = self.epoch

            def keep(r: dict[str, Any]) -> bool:
                if r.get("kind") == "epoch":
                    return int(r.get("epoch", 0)) <= done
                return r.get("kind") != "step" or r.get("step", 0) <= step

            self.run.truncate_metrics(keep)
        log.info("resumed from step %d (epoch %d, batch %d)", step, self.epoch + 1, self.batch_in_epoch)
        return True

    # -- training -------------------------------------------------------------------------------------------
    def log(self, **record: Any) -> None:
        if self.run is not None and self.is_main:
            self.run.log(**record)

    def callback(self, name: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, name, None)
            if fn is not None:
                fn(self, *args)

    def fit(self) -> nn.Module:
        """Train for `config.epochs` (or until early stopping, max_steps or the time budget); return the model."""
        config = self.config
        seed_everything(config.seed)
        self.fitting = True
        if self.dist.mode == "fsdp" and self.device.type == "cuda":
            self.model.to("cpu")  # the plain model waits on the CPU while training: only shards occupy the GPU
        self.step_callbacks = any(hasattr(cb, "on_step_end") for cb in self.callbacks)
        if not self.resume():
            self.save_checkpoint() if config.checkpoint_every else None
        self.callback("on_fit_start")
        stopped_early = False
        while self.epoch < config.epochs and not self.should_stop:
            self.train_epoch()
            if self.should_stop and self.batch_in_epoch != 0:
                break  # max_steps or the time budget cut the epoch short
            record = self.end_epoch()
            if self.improved(record):
                self.bad_epochs = 0
            else:
                self.bad_epochs += 1
                if config.patience and self.bad_epochs >= config.patience:
                    stopped_early = True
                    self.should_stop = True
            self.save_checkpoint()
            self.callback("on_epoch_end", record)
            self.agree_to_stop()
        if self.dist.mode == "fsdp":  # hand the plain model the trained weights, gathered from the shards
            self.model.to(self.device)
            self.model.load_state_dict(distributed.full_model_state(self.train_module, self.dist))
        self.fitting = False
        if config.restore_best and self.best_state is not None:
            self.model.load_state_dict(self.best_state)
            if self.dist.mode == "fsdp":
                distributed.load_model_state(self.train_module, self.best_state, self.dist)
        if stopped_early:
            self.log(kind="early_stop", step=self.global_step, best_epoch=self.best_epoch + 1, best=self.best_value)
        self.plot()
        self.callback("on_fit_end")
        return self.model

    def train_epoch(self) -> None:
        config = self.config
        batches = self.batches(self.epoch)
        self.model.train()

        bar = tqdm(
            total=len(batches),
            initial=self.batch_in_epoch,
            desc=f"epoch {self.epoch + 1}/{config.epochs}",
            disable=None if config.progress and self.is_main else True,
            leave=False,
            file=sys.stderr,
        )
        started = time.perf_counter()
        accumulated = 0
        pending: list[tuple[Tensor, int]] = []  # CUDA: losses not yet read back (see sync_every_step)
        loss_value = math.nan
        remaining = batches[self.batch_in_epoch :]
        shards = [distributed.shard(idx, self.dist) for idx in remaining] if self.dist.active else None
        local_batches = [s[0] for s in shards] if shards is not None else remaining
        for i, batch in enumerate(self.iterate(self.train_data, local_batches)):
            last_micro_batch = accumulated + 1 == config.grad_accum or self.batch_in_epoch + 1 == len(batches)
            sync = nullcontext() if last_micro_batch else distributed.no_gradient_sync(self.train_module, self.dist)
            with sync:
                with self.autocast():
                    out = self.step_fn(self.forward_module, batch)
                loss = out.loss
                count = out.count if out.count is not None else 1
                if shards is not None and not shards[i][2]:
                    count = 0  # a stand-in example on a process whose share of this batch is empty
                if self.sync_every_step:
                    loss_value = loss.item()
                    self.check_finite([loss_value], exact=True)
                    self.epoch_loss_sum += loss_value * count
                else:
                    pending.append((loss.detach(), count))
                if shards is not None:  # weight each process's mean so that their average is the global mean
                    loss = loss * shards[i][1]
                self.scaler.scale(loss / config.grad_accum if config.grad_accum > 1 else loss).backward()
            self.epoch_count += count
            self.batch_in_epoch += 1
            accumulated += 1
            bar.update(1)
            if accumulated == config.grad_accum or self.batch_in_epoch == len(batches):
                accumulated = 0
                self.optimizer_step()
                log_due = bool(config.log_every and self.global_step % config.log_every == 0)
                checkpoint_due = bool(config.checkpoint_every and self.global_step % config.checkpoint_every == 0)
                if pending and (log_due or checkpoint_due or not bar.disable or self.step_callbacks
                                or self.batch_in_epoch == len(batches) or self.out_of_budget()):
                    loss_value = self.flush(pending)
                if not bar.disable:
                    bar.set_postfix(loss=f"{self.epoch_loss_sum / max(1, self.epoch_count):.4f}", lr=f"{self.lr:.2e}")
                if log_due:
                    self.log(kind="step", step=self.global_step, epoch=self.epoch + 1, loss=loss_value, lr=self.lr)
                self.callback("on_step_end", loss_value)
                self.train_time += time.perf_counter() - started
                started = time.perf_counter()
                if self.out_of_budget():
                    self.should_stop = True
                self.agree_to_stop()
                if self.should_stop and pending:
                    loss_value = self.flush(pending)
                if checkpoint_due:
                    self.save_checkpoint()
                if self.should_stop:
                    break
        if pending:
            self.flush(pending)
        bar.close()

    def flush(self, pending: list[tuple[Tensor, int]]) -> float:
        """Read the pending losses back in one transfer, check them, add them to the epoch sum; the last one."""
        values = torch.stack([loss.float() for loss, _ in pending]).tolist()
        self.check_finite(values, exact=False)
        for value, (_, count) in zip(values, pending):
            self.epoch_loss_sum += value * count
        pending.clear()
        return float(values[-1])

    def check_finite(self, values: list[float], exact: bool) -> None:
        bad = next((v for v in values if not math.isfinite(v)), None)
        if bad is None:
            return
        where = f"at step {self.global_step + 1}" if exact else f"at or before step {self.global_step}"
        batch = self.batch_in_epoch + 1 if exact else self.batch_in_epoch
        raise TrainingDiverged(
            f"the loss became {bad} {where} (epoch {self.epoch + 1}, batch {batch}); lower lr, "
            "clip gradients (grad_clip=1.0) or check the data; the last good checkpoint is kept in the run folder"
        )

    def optimizer_step(self) -> None:
        config = self.config
        penalties = config.l1 or config.l2 or any(g.get("l1") or g.get("l2") for g in self.optimizer.param_groups)
        if config.grad_clip or penalties:
            self.scaler.unscale_(self.optimizer)
        if penalties:
            add_penalty_gradients(self.optimizer)
        if config.grad_clip:
            nn.utils.clip_grad_norm_(self.train_module.parameters(), config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if config.max_norm or any(g.get("max_norm") for g in self.optimizer.param_groups):
            apply_max_norm(self.optimizer)
        if self.config.schedule not in PER_EPOCH_SCHEDULES:
            self.scheduler.step()
        self.global_step += 1

    def agree_to_stop(self) -> None:
        """Distributed: stop on every process when any wants to (a time budget or a callback may differ)."""
        if self.dist.active and self.dist.world_size > 1:
            self.should_stop = distributed.all_reduce_sum([float(self.should_stop)], self.dist)[0] > 0

    def out_of_budget(self) -> bool:
        c = self.config
        return bool((c.max_steps and self.global_step >= c.max_steps) or (c.time_budget_s and self.train_time >= c.time_budget_s))

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def end_epoch(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "kind": "epoch",
            "epoch": self.epoch + 1,
            "step": self.global_step,
            "lr": self.lr,
            "train_loss": self.train_loss(),
            "train_time_s": round(self.train_time, 3),
        }
        if self.val_data is not None:
            record.update({f"val_{k}": v for k, v in self.evaluate(self.val_data).items()})
        if self.config.schedule in PER_EPOCH_SCHEDULES:
            monitor = self.config.monitor
            # Without `monitor` in the record (no validation data), the training loss; negated for a "max" scheduler.
            fallback = record["train_loss"] if monitor_mode(monitor) == "min" else -record["train_loss"]
            self.scheduler.step(record.get(monitor, fallback))
        self.log(**record)
        if self.config.progress and self.is_main and sys.stderr.isatty():
            # The live bar (loss, lr, rate, ETA) vanishes at the epoch's end; this line with the metrics stays.
            summary = "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k == "train_loss" or k.startswith("val_"))
            log.info("epoch %s/%s  %s", record["epoch"], self.config.epochs, summary)
        self.finished_epoch_loss = record["train_loss"]
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_loss_sum = 0.0
        self.epoch_count = 0
        return record

    def train_loss(self) -> float:
        """The epoch's mean training loss so far (over all processes); between epochs (after `fit()`, say), the
        finished epoch's, not the 0 of an epoch with no batch yet."""
        loss_sum, count = distributed.all_reduce_sum([self.epoch_loss_sum, float(self.epoch_count)], self.dist)
        if count == 0 and self.finished_epoch_loss is not None:
            return self.finished_epoch_loss
        return loss_sum / max(1.0, count)

    def improved(self, record: dict[str, Any]) -> bool:
        """Track the best epoch by `config.monitor` (falls back to train_loss without validation data)."""
        key = self.config.monitor if self.config.monitor in record else "train_loss"
        value = float(record[key])
        better = self.best_value is None or (
            value < self.best_value if monitor_mode(key) == "min" else value > self.best_value
        )
        if better:
            self.best_value, self.best_epoch = value, self.epoch - 1
            if self.val_data is not None and self.config.restore_best:
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.full_state_dict().items()}
        return better

    # -- evaluation -----------------------------------------------------------------------------------------
    @property
    def eval_module(self) -> nn.Module:
        """The module that evaluates: the sharded one while FSDP trains, else the plain model (eager)."""
        return self.train_module if self.dist.mode == "fsdp" and self.fitting else self.model

    @torch.no_grad()
    def evaluate(self, dataset: Dataset[Any], batch_size: int | None = None) -> dict[str, float]:
        """Mean loss and every metric over `dataset`, in eval mode (split across processes when distributed;
        torchmetrics gathers the metric states)."""
        module = self.eval_module
        was_training = module.training
        module.eval()
        metrics = {name: factory().to(self.device) for name, factory in self.metric_factories.items()}
        loss_sum, count = 0.0, 0
        shards = [distributed.shard(idx, self.dist) for idx in self.eval_batches(dataset, batch_size)]
        for (_, _, real), batch in zip(shards, self.iterate(dataset, [s[0] for s in shards])):
            with self.autocast():
                out = self.step_fn(module, batch)
            if not real:
                continue
            n = out.count if out.count is not None else 1
            loss_sum += out.loss.item() * n
            count += n
            if out.preds is not None and out.target is not None:
                for metric in metrics.values():
                    # contiguous: torchmetrics flattens with .view, which a strided target (every k-th step of a
                    # sequence, as the conv + GRU forecaster predicts) cannot take.
                    metric.update(out.preds.float().contiguous(), out.target.contiguous())
        module.train(was_training)
        loss_sum, total = distributed.all_reduce_sum([loss_sum, float(count)], self.dist)
        results = {"loss": loss_sum / max(1.0, total)}
        results.update({name: float(metric.compute()) for name, metric in metrics.items()})
        return results

    @torch.no_grad()
    def predict(self, dataset: Dataset[Any], batch_size: int | None = None) -> Tensor:
        """The model's outputs for every example of `dataset` (inputs = all but the last item of each example)."""
        module = self.eval_module
        module.eval()
        outputs = []
        for batch in self.iterate(dataset, self.eval_batches(dataset, batch_size)):
            inputs = batch[:-1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else (batch,)
            with self.autocast():
                outputs.append(module(*inputs).float().cpu())
        return torch.cat(outputs)

    def predict_mc(
        self,
        dataset: Dataset[Any],
        samples: int = 30,
        transform: Callable[[Tensor], Tensor] | None = None,
        batch_size: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """MC dropout (chapter 11): mean and standard deviation over `samples` passes with dropout left on, e.g.
        `transform=lambda z: z.softmax(-1)` for class probabilities. Seed torch first for repeatable draws."""
        means, stds = [], []
        for batch in self.iterate(dataset, self.eval_batches(dataset, batch_size)):
            inputs = batch[:-1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else (batch,)
            with self.autocast():
                mean, std = mc_dropout(self.eval_module, tuple(inputs), samples, transform)
            means.append(mean.cpu())
            stds.append(std.cpu())
        return torch.cat(means), torch.cat(stds)

    def plot(self) -> None:
        if self.run is None or not self.is_main:
            return
        epochs = self.run.metrics("epoch")
        if epochs:
            from torchbook.plots import learning_curves

            learning_curves(self.run.plots / "learning_curves.png", epochs)
