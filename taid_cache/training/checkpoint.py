"""Training checkpoints with torch.distributed.checkpoint: every rank writes and reads only its own shards of the
model and optimizer state (no rank ever holds the whole optimizer state), plus its own RNG states (CUDA's
included on GPU). Rank 0 names one temporary folder for all ranks and renames it into place once complete, so
a kill at any moment leaves either the previous checkpoint or the complete new one. A checkpoint that cannot be
read anyway (a disk error, a truncated copy) is skipped for the one before it, with a warning."""

from __future__ import annotations

import io
import json
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..atomic import fsync_path, remove, temporary_name
from ..errors import UserError, first_line, root_cause
from ..storage import Store, is_remote, open_store
from .distributed import Dist, all_reduce_max, broadcast_object

KEEP = 2


FOLDER = "checkpoints"
META = "meta.json"  # written last: on an object store, its presence is what makes a checkpoint complete


def checkpoints(output: Store) -> list[str]:
    """The complete checkpoints' names (step-NNNNNNNN), oldest first. Locally a checkpoint is renamed into place
    whole; on an object store it is complete once its meta.json is there."""
    folder = output.child(FOLDER)
    names = [n for n in folder.list("step-*") if not n.startswith(".")]
    if output.is_local:
        return [n for n in names if (folder.local_path(n)).is_dir()]
    return [n for n in names if folder.is_file(f"{n}/{META}")]


def step_of(name: str) -> int:
    return int(name[5:])


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


def save_checkpoint(output: Store, step: int, model, optimizer, scheduler, extra: dict[str, Any], env: Dist,
                    describe: Callable[[Path], None]) -> None:
    """`describe(folder)` (rank 0) writes what turns the checkpoint into a model folder: the student's config and
    tokenizer (`checkpoint_to_hf`)."""
    folder, name = output.child(FOLDER), f"step-{step:08d}"
    target = None
    if env.rank == 0:
        folder.remove(name)  # an unreadable one a resumed run skipped: this step replaces it
        target = staging_place(folder, name)
    target = broadcast_object(target, env)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict()}
    dcp.save(state, storage_writer=storage_writer(target))
    where = open_store(target)
    where.write_bytes(f"rng-{env.rank:05d}.pt", rng_bytes())
    if env.active:
        dist.barrier()
    if env.rank == 0:
        with tempfile.TemporaryDirectory(prefix="taid-cache-describe-") as scratch:
            describe(Path(scratch))
            where.upload(Path(scratch), "")
        where.write_text(META, json.dumps({"step": step, **extra}, indent=2, sort_keys=True) + "\n")
        commit_staged(folder, name, target)
        for old in checkpoints(output)[:-KEEP]:
            folder.remove(f"{old}/{META}")  # first: a kill mid-removal leaves no "complete" checkpoint without its files
            folder.remove(old)
    if env.active:
        dist.barrier()


def staging_place(folder: Store, name: str) -> str:
    """Where a checkpoint is written: locally a hidden temporary sibling (renamed into place when complete), on an
    object store the checkpoint's own prefix (complete when its meta.json, written last, is there)."""
    local = folder.local_path(name)
    if local is None:
        return folder.where(name)
    tmp = temporary_name(local)
    tmp.mkdir(parents=True)
    return str(tmp)


def commit_staged(folder: Store, name: str, target: str) -> None:
    local = folder.local_path(name)
    if local is not None:
        fsync_path(Path(target))
        Path(target).rename(local)


def storage_writer(location: str):
    """DCP's writer: its file-system writer locally, its fsspec writer for a URI (every rank writes its own files)."""
    if is_remote(location):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(location)
    return dcp.FileSystemWriter(location)


def storage_reader(location: str):
    if is_remote(location):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(location)
    return dcp.FileSystemReader(location)


def rng_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    return buffer.getvalue()


def read_meta(folder: Store, name: str) -> dict[str, Any]:
    """A checkpoint's meta.json, parsed; a one-line error naming it when it cannot be."""
    where = folder.where(f"{name}/{META}")
    try:
        return json.loads(folder.read_text(f"{name}/{META}"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {where} (checkpoint meta): {first_line(exc)}") from None


def readable_meta(output: Store) -> dict[str, Any] | None:
    """The meta of the newest checkpoint whose meta.json reads, or None when there is none."""
    folder = output.child(FOLDER)
    for name in reversed(checkpoints(output)):
        try:
            return read_meta(folder, name)
        except UserError:
            continue
    return None


class Stateful(Protocol):
    """What a checkpoint keeps of an object (torch.distributed.checkpoint's Stateful, in JSON here)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointManager:
    """A run's checkpoints: the model, the optimizer and the LR schedule through DCP (each rank its own shards),
    each rank's RNG, and in meta.json the run's settings, `progress` (its keys at the top: step, tokens, elapsed
    time) and every other Stateful of `states` under its name."""

    def __init__(self, output: Store, progress: Stateful, states: dict[str, Stateful], settings: dict[str, Any],
                 describe: Callable[[Path], None], added_since: frozenset[str] = frozenset()) -> None:
        # added_since: states a checkpoint of an earlier release may lack; they then keep their initial value.
        self.output, self.progress, self.states, self.settings, self.describe = output, progress, states, settings, describe
        self.added_since = added_since

    def save(self, step: int, model, optimizer, scheduler, env: Dist) -> None:
        extra = {"settings": self.settings, **self.progress.state_dict(), **{k: s.state_dict() for k, s in self.states.items()}}
        extra.pop("step")
        save_checkpoint(self.output, step, model, optimizer, scheduler, extra, env, self.describe)

    def restore(self, model, optimizer, scheduler, env: Dist, warn: Callable[[str], None]) -> None:
        """The newest readable checkpoint into the model, optimizer, schedule and every state."""
        meta = load_newest(self.output, model, optimizer, scheduler, env, warn)
        self.progress.load_state_dict(meta)
        for name, state in self.states.items():
            if name in meta or name not in self.added_since:
                state.load_state_dict(meta[name])


UNREADABLE = (UserError, OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, ValueError, CheckpointException)


def load_newest(output: Store, model, optimizer, scheduler, env: Dist, warn: Callable[[str], None]) -> dict[str, Any]:
    """Restore the newest checkpoint that loads on every rank, warning about each one skipped; returns its meta.
    Every rank decides together (a failure anywhere skips the checkpoint everywhere), so all load the same step."""
    folder = output.child(FOLDER)
    for name in reversed(checkpoints(output)):
        error = None
        try:
            meta = read_meta(folder, name)
            rng = torch.load(io.BytesIO(folder.read_bytes(f"{name}/rng-{env.rank:05d}.pt")), weights_only=False)
        except UNREADABLE as exc:
            error = first_line(root_cause(exc))
        failed = all_reduce_max(torch.tensor(float(error is not None)), env).item() > 0
        if not failed:
            try:  # collective: torch.distributed.checkpoint raises on every rank if any rank fails
                load_state(folder.where(name), model, optimizer, scheduler)
                set_rng_state(rng)
                return meta
            except UNREADABLE as exc:
                error = first_line(root_cause(exc))
        warn(f"warning: checkpoint {name} cannot be read ({error or 'on another rank'}); trying the one before it")
    raise UserError(f"--resume: no checkpoint in {output.where(FOLDER)} can be read")


def load_state(location: str, model, optimizer, scheduler) -> None:
    """Restore into the (sharded) model and optimizer, each rank reading its own shards."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict()}
    dcp.load(state, storage_reader=storage_reader(location))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])


def remove_interrupted_saves(output: Store) -> None:
    """What saves a kill interrupted left (each can be checkpoint-sized): never read, so removed. Locally, hidden
    temporary folders; on an object store, checkpoint prefixes without their meta.json."""
    local = output.local_path()
    if local is not None:
        for tmp in [*(local / FOLDER).glob(".step-*.tmp-*"), *local.glob(".*.tmp-*")]:
            remove(tmp)
        return
    folder, complete = output.child(FOLDER), set(checkpoints(output))
    for name in folder.list("step-*"):
        if name not in complete:
            folder.remove(name)
    output.discard_unfinished()  # uploads a kill cut short (checkpoint files, the final student): the run holds the lease


def check_shard_files(checkpoint: Path) -> None:
    """Every shard file the checkpoint's .metadata points into is there and long enough (a truncated copy read as
    "CheckpointException ranks:dict_keys([0])", its cause an EOFError without a word)."""
    try:
        storage = dcp.FileSystemReader(str(checkpoint)).read_metadata().storage_data
    except UNREADABLE as exc:
        raise UserError(f"cannot read the checkpoint {checkpoint}: its .metadata: {first_line(root_cause(exc))}") from None
    needed: dict[str, int] = {}
    for info in (storage or {}).values():
        path, end = getattr(info, "relative_path", None), getattr(info, "offset", 0) + getattr(info, "length", 0)
        if isinstance(path, str):
            needed[path] = max(needed.get(path, 0), end)
    for name, end in sorted(needed.items()):
        file = checkpoint / name
        if not file.is_file():
            raise UserError(f"the checkpoint {checkpoint} is incomplete: {name}, which its .metadata lists, is missing")
        if file.stat().st_size < end:
            raise UserError(f"the checkpoint {checkpoint} is truncated: {name} has {file.stat().st_size:,} bytes, its "
                            f".metadata needs {end:,} (copy it again from the run folder)")


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
    check_shard_files(checkpoint)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            dcp_to_torch_save(checkpoint, Path(scratch) / "state.pt")
            state = torch.load(Path(scratch) / "state.pt", weights_only=False)["model"]
        except UNREADABLE as exc:  # a CheckpointException's own message names only the ranks that failed
            raise UserError(f"cannot read the checkpoint {checkpoint} (truncated or damaged?): "
                            f"{first_line(root_cause(exc))}") from None
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
