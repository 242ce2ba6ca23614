"""The process group: one rank or many (torchrun), NCCL on GPU and gloo on CPU, and the few collectives the
trainer needs, each a no-op on one rank."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK: NCCL on GPU, gloo on CPU. One process gets a one-rank group of its own, so
    one process and N ranks train through the same FSDP2 path (and mixed-precision policy)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if world > 1:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(dist.get_rank(), world, device)


def close_distributed(env: Dist, barrier: bool = True) -> None:
    """Tear the process group down before exit; left to interpreter teardown, gloo's threads can abort the process.
    After an error, no barrier: the other ranks may never reach it."""
    if dist.is_initialized():
        if barrier and env.active:
            dist.barrier()
        dist.destroy_process_group()


def broadcast_object(value: Any, env: Dist) -> Any:
    """Rank 0's `value` on every rank."""
    if not env.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(value: Any, env: Dist) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not env.active:
        return [value]
    out: list[Any] = [None] * env.world
    dist.all_gather_object(out, value)
    return out


def all_reduce_sum(value: torch.Tensor, env: Dist, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """A copy of `value` on the rank's device, reduced over ranks (NCCL reduces device tensors only)."""
    value = value.to(env.device, copy=True)
    if env.active:
        dist.all_reduce(value, op=op)
    return value


def all_reduce_max(value: torch.Tensor, env: Dist) -> torch.Tensor:
    return all_reduce_sum(value, env, dist.ReduceOp.MAX)
