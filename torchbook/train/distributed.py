"""Data-parallel training (book chapter 17): DistributedDataParallel and fully sharded data parallel (FSDP2).

`torchbook run RECIPE parallel=ddp` under `torchrun --nproc_per_node N` trains one model on N processes: every
process builds the same model and the same seeded global batches, takes its shard of each global batch
(`global[rank::world]`), and the gradients are averaged across processes, so N processes with per-process batch
B/N follow the same trajectory as one process with batch B. gloo on CPU, NCCL on CUDA. Only rank 0 writes files.

FSDP shards parameters, gradients and optimizer state across the processes (`torch.distributed.fsdp.fully_shard`);
each block of the model (the children of its `nn.ModuleList`s) is sharded on its own, then the whole model.
"""

from __future__ import annotations

import atexit
import copy
import datetime
import os
import socket
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchbook.errors import UserInputError


@dataclass
class Dist:
    """The process's place in a distributed run (rank 0 of 1 when not distributed)."""

    mode: str = "none"  # none, ddp, fsdp
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """How many processes torchrun (or another launcher setting WORLD_SIZE) started."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(mode: str, device_name: str) -> tuple[Dist, torch.device | None]:
    """Join the process group torchrun described in the environment; return our place and our device.

    The device is None when not distributed (the trainer's own choice applies)."""
    world = launched_world_size()
    if mode == "none":
        if world > 1:
            raise UserInputError(
                f"this process is one of {world} started by torchrun, but parallel=none would train {world} "
                "separate copies; add parallel=ddp or parallel=fsdp"
            )
        return Dist(), None
    if not dist.is_available():
        raise UserInputError(f"parallel={mode} needs torch.distributed, which this torch build lacks")
    if "RANK" not in os.environ and not dist.is_initialized():
        # A single process asking for DDP/FSDP: a world of one (handy for tests and for resuming on one machine).
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        atexit.register(teardown)
    return Dist(mode, dist.get_rank(), dist.get_world_size(), local_rank), device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shard(indices: Any, d: Dist) -> tuple[list[int], float, bool]:
    """This process's part of one global batch, the loss weight that makes the average over processes equal
    the mean over the global batch, and whether the part is real (a process whose share is empty runs one example
    with weight 0, because every process must take part in every collective)."""
    indices = list(indices)
    if not d.active or d.world_size == 1:
        return indices, 1.0, True
    local = indices[d.rank :: d.world_size]
    if not local:
        return indices[:1], 0.0, False
    return local, len(local) * d.world_size / len(indices), True


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    """Sum each value over processes (identity when not distributed)."""
    if not d.active or d.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's `obj` on every process."""
    if not d.active or d.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the children of each `nn.ModuleList` (a Transformer's layers). These are what
    FSDP shards one by one and what activation checkpointing recomputes."""
    found: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            found.extend(module)
    return found


class DDP(nn.parallel.DistributedDataParallel):
    """DistributedDataParallel that lets attribute reads through to the model (`model.config` in a step function)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """The module that trains: `model` under DDP, or a fully sharded copy of it under FSDP (the caller keeps the
    plain `model` to hand back full weights at the end)."""
    if d.mode == "ddp":
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if d.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        sharded = copy.deepcopy(model)
        with torch.no_grad():  # every process starts from rank 0's weights, whatever its seed did
            for tensor in [*sharded.parameters(), *sharded.buffers()]:
                dist.broadcast(tensor.data, src=0)
        mesh = init_device_mesh(device.type, (d.world_size,))
        for block in blocks(sharded):
            fully_shard(block, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        return sharded
    return model


def full_model_state(module: nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """The full, plain state dict (collective under FSDP: every process must call it; every process gets it)."""
    if d.mode != "fsdp":
        inner = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
        return inner.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))  # type: ignore[return-value]


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> dict[str, Any]:
    """The optimizer's state in torch's ordinary format (parameters numbered in group order), whole, whatever the
    sharding: so a checkpoint written by any number of processes resumes on any other number (collective under FSDP)."""
    if d.mode != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    groups, start = [], 0
    for group in optimizer.param_groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        groups.append({**settings, "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    if not optimizer.state:  # before the first step; torch would take a zero step to create the state (Adam's t+1)
        return {"state": {}, "param_groups": groups}
    by_name: Any = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True))
    number = {name: i for i, name in enumerate(_names_in_optimizer_order(module, optimizer))}
    return {"state": {number[name]: value for name, value in by_name["state"].items()}, "param_groups": groups}


def _names_in_optimizer_order(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def load_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], d: Dist
) -> None:
    if d.mode != "fsdp":
        optimizer.load_state_dict(state)
        return
    if not state["state"]:  # saved before the first step: only the group settings (lr...) to restore
        for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    ordered = _names_in_optimizer_order(module, optimizer)
    by_name: Any = {
        "state": {ordered[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [ordered[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(module, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def load_model_state(module: nn.Module, state: dict[str, torch.Tensor], d: Dist) -> None:
    if d.mode != "fsdp":
        inner = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
        inner.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True))  # type: ignore[arg-type]


def no_gradient_sync(module: nn.Module, d: Dist) -> Any:
    """A context in which backward accumulates gradients locally (micro-batches before the last of an optimizer
    step), saving one all-reduce per micro-batch."""
    if d.mode == "ddp":
        return module.no_sync()  # type: ignore[operator]
    if d.mode == "fsdp":

        @contextmanager
        def fsdp_no_sync() -> Any:
            module.set_requires_gradient_sync(False)  # type: ignore[operator]
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)  # type: ignore[operator]

        return fsdp_no_sync()
    return nullcontext()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly sharded DTensor) parameter or gradient held by this process."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
