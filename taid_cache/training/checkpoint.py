"""Training checkpoints: full (gathered) state written by rank 0 into a folder renamed into place, so a kill at
any moment leaves either the previous checkpoint or the complete new one. A checkpoint that cannot be read
anyway (a disk error, a truncated copy) is skipped for the one before it, with a warning."""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from ..atomic import atomic_path, read_json, write_json
from ..errors import UserError, first_line
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
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(final, ignore_errors=True)  # an unreadable one a resumed run skipped: this step replaces it
        with atomic_path(final) as tmp:
            tmp.mkdir()
            rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
            torch.save({"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rng}, tmp / "state.pt")
            write_json(tmp / "meta.json", {"step": step, **extra})
        for old in checkpoints(output)[:-KEEP]:
            shutil.rmtree(old)
    if env.active:
        dist.barrier()


def readable_meta(output: Path) -> dict[str, Any] | None:
    """The meta of the newest checkpoint whose meta.json reads, or None when there is none."""
    for path in reversed(checkpoints(output)):
        try:
            return read_json(path / "meta.json", "checkpoint meta")
        except UserError:
            continue
    return None


def load_newest(output: Path, model, optimizer, scheduler, warn: Callable[[str], None]) -> dict[str, Any]:
    """Restore the newest checkpoint that loads, warning about each one skipped; returns its meta."""
    for path in reversed(checkpoints(output)):
        try:
            return load_checkpoint(path, model, optimizer, scheduler)
        except (UserError, OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError) as exc:
            warn(f"warning: checkpoint {path.name} cannot be read ({first_line(exc)}); trying the one before it")
    raise UserError(f"--resume: no checkpoint in {output}/checkpoints can be read")


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore into (possibly sharded) model and optimizer; returns the checkpoint's meta."""
    meta = read_json(path / "meta.json", "checkpoint meta")
    state = torch.load(path / "state.pt", weights_only=False, map_location="cpu")
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=full)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=full)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return meta
