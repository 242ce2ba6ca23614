"""Training checkpoints: full (gathered) state written by rank 0 into a folder renamed into place, so a kill at
any moment leaves either the previous checkpoint or the complete new one."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from ..atomic import read_json, write_json
from .student import Dist

KEEP = 2


def checkpoints(output: Path) -> list[Path]:
    folder = output / "checkpoints"
    return sorted(folder.glob("step-*")) if folder.is_dir() else []


def save_checkpoint(output: Path, step: int, model, optimizer, scheduler, extra: dict[str, Any], env: Dist) -> None:
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=full)
    optim_state = get_optimizer_state_dict(model, optimizer, options=full)
    if env.rank == 0:
        final = output / "checkpoints" / f"step-{step:08d}"
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        torch.save({"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rng}, tmp / "state.pt")
        write_json(tmp / "meta.json", {"step": step, **extra})
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        for old in checkpoints(output)[:-KEEP]:
            shutil.rmtree(old)
    if env.active:
        dist.barrier()


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore into (possibly sharded) model and optimizer; returns the checkpoint's meta."""
    state = torch.load(path / "state.pt", weights_only=False, map_location="cpu")
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=full)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=full)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return read_json(path / "meta.json")
