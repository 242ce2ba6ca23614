"""Training checkpoints with torch.distributed.checkpoint: every rank writes and reads only its own shards of the
model and optimizer state (no rank ever holds the whole optimizer state), plus its own RNG states (CUDA's
included on GPU). Rank 0 names one temporary folder for all ranks and renames it into place once complete, so
a kill at any moment leaves either the previous checkpoint or the complete new one. A checkpoint that cannot be
read anyway (a disk error, a truncated copy) is skipped for the one before it, with a warning."""

from __future__ import annotations

import pickle
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..atomic import fsync_path, read_json, remove, temporary_name, write_json
from ..errors import UserError, first_line
from .distributed import Dist, all_reduce_max, broadcast_object

KEEP = 2


def checkpoints(output: Path) -> list[Path]:
    folder = output / "checkpoints"
    return sorted(p for p in folder.glob("step-*") if p.is_dir()) if folder.is_dir() else []


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(output: Path, step: int, model, optimizer, scheduler, extra: dict[str, Any], env: Dist,
                    describe: Callable[[Path], None]) -> None:
    """`describe(folder)` (rank 0) writes what turns the checkpoint into a model folder: the student's config and
    tokenizer (`checkpoint_to_hf`)."""
    final = output / "checkpoints" / f"step-{step:08d}"
    tmp = None
    if env.rank == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(final, ignore_errors=True)  # an unreadable one a resumed run skipped: this step replaces it
        tmp = temporary_name(final)
        tmp.mkdir()
    tmp = broadcast_object(tmp, env)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict()}, checkpoint_id=tmp)
    torch.save(rng_state(), tmp / f"rng-{env.rank:05d}.pt")
    if env.active:
        dist.barrier()
    if env.rank == 0:
        describe(tmp)
        write_json(tmp / "meta.json", {"step": step, **extra})
        fsync_path(tmp)
        tmp.rename(final)
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


UNREADABLE = (UserError, OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, ValueError, CheckpointException)


def load_newest(output: Path, model, optimizer, scheduler, env: Dist, warn: Callable[[str], None]) -> dict[str, Any]:
    """Restore the newest checkpoint that loads on every rank, warning about each one skipped; returns its meta.
    Every rank decides together (a failure anywhere skips the checkpoint everywhere), so all load the same step."""
    for path in reversed(checkpoints(output)):
        error = None
        try:
            meta = read_json(path / "meta.json", "checkpoint meta")
            rng = torch.load(path / f"rng-{env.rank:05d}.pt", weights_only=False)
        except UNREADABLE as exc:
            error = first_line(exc)
        failed = all_reduce_max(torch.tensor(float(error is not None)), env).item() > 0
        if not failed:
            try:  # collective: torch.distributed.checkpoint raises on every rank if any rank fails
                load_state(path, model, optimizer, scheduler)
                set_rng_state(rng)
                return meta
            except UNREADABLE as exc:
                error = first_line(exc)
        warn(f"warning: checkpoint {path.name} cannot be read ({error or 'on another rank'}); trying the one before it")
    raise UserError(f"--resume: no checkpoint in {output}/checkpoints can be read")


def load_state(path: Path, model, optimizer, scheduler) -> None:
    """Restore into the (sharded) model and optimizer, each rank reading its own shards."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict()}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])


def remove_interrupted_saves(output: Path) -> None:
    """Temporary folders of saves a kill interrupted (each can be checkpoint-sized): never read, so removed."""
    for tmp in [*(output / "checkpoints").glob(".step-*.tmp-*"), *output.glob(".*.tmp-*")]:
        remove(tmp)


def checkpoint_to_hf(checkpoint: Path, out: Path) -> Path:
    """A checkpoint's student as a Hugging Face folder (`from_pretrained` loads it): the DCP model state, gathered
    whole, in the architecture of the config saved beside it."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..atomic import atomic_path

    if not (checkpoint / "meta.json").is_file() or not (checkpoint / ".metadata").is_file():
        raise UserError(f"{checkpoint} is not a train-student checkpoint (no meta.json and .metadata)")
    if not (checkpoint / "config.json").is_file():
        raise UserError(f"{checkpoint} has no config.json: it was written by a taid-cache that did not keep the student's "
                        "config in its checkpoints")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder: write the student into a new one")
    with tempfile.TemporaryDirectory() as scratch:
        try:
            dcp_to_torch_save(checkpoint, Path(scratch) / "state.pt")
            state = torch.load(Path(scratch) / "state.pt", weights_only=False)["model"]
        except UNREADABLE as exc:
            raise UserError(f"cannot read the checkpoint {checkpoint}: {first_line(exc)}") from None
    prefix = "lm."  # the trainer's LossModel wraps the student as `.lm`
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    config = AutoConfig.from_pretrained(checkpoint)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(weights, strict=True, assign=True)
    model.tie_weights()
    if out.is_dir():
        out.rmdir()
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(checkpoint).save_pretrained(tmp)
    return out
