"""The run folder of train-student (a local folder or an object-store prefix): what a fresh run, a resumed one
and an interrupted final save find there.

Local: the final student is written whole into a hidden staging folder, renamed to `.student.staged` once
complete, and only then moved into the run folder file by file, config.json last (without it nothing loads the
folder as a model). A kill at any moment leaves either no student, or a complete staged one that the next start
(fresh or --resume) finishes installing. Object store: the student is written into a local temporary folder
and uploaded file by file, config.json last, so again a folder without config.json holds no student; a kill
mid-upload is finished by --resume, which saves the student again from the last checkpoint's steps.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from ..atomic import atomic_path
from ..errors import UserError
from ..storage import Store
from .distributed import Dist, broadcast_object

STAGED = ".student.staged"
LOCK = ".taid-cache.lock"  # held by the run's rank 0 for the run's life
# What a run that died before its first checkpoint leaves: nothing a rerun could continue from.
UNRECOVERABLE = {"metrics.jsonl", "tensorboard", "wandb", "checkpoints"}


@contextlib.contextmanager
def staged_student(output: Store) -> Iterator[Path]:
    """The local folder to save the final student into; on success it is put in place: locally it becomes
    `.student.staged` (then `install_staged`), on an object store it is uploaded, config.json last."""
    local = output.local_path()
    if local is not None:
        with atomic_path(local / STAGED) as folder:
            yield folder
        return
    with tempfile.TemporaryDirectory(prefix="taid-cache-student-") as scratch:
        yield Path(scratch)
        output.upload(Path(scratch), "", last="config.json")


def install_staged(output: Store) -> bool:
    """Move a complete staged student into the run folder (config.json last); False when there is none."""
    local = output.local_path()
    staged = local / STAGED if local is not None else None
    if staged is None or not staged.is_dir():
        return False
    for f in sorted(staged.iterdir(), key=lambda p: p.name == "config.json"):
        os.replace(f, local / f.name)
    staged.rmdir()
    return True


def is_finished(output: Store) -> bool:
    """The student is in place: config.json (moved in last) with its weights, nothing left staged."""
    weights = bool(output.list("model*.safetensors"))
    return output.is_file("config.json") and weights and not output.exists(STAGED)


def clear_unrecoverable(output: Store, has_checkpoint: bool) -> bool:
    """For a fresh run: True when the folder is empty or holds only what a run that died before its first
    checkpoint leaves (those are removed); False when it holds anything worth keeping."""
    if not output.exists():
        return True
    entries = output.list()
    if has_checkpoint or "config.json" in entries or STAGED in entries:
        return False
    if not all(e in UNRECOVERABLE or e.startswith(".") for e in entries):
        return False
    for e in entries:
        if e != LOCK:  # this run's own lock: removing it would let a second run take a fresh one
            output.remove(e)
    return True


def refuse_non_empty(output: Store) -> UserError:
    return UserError(f"{output.url} is not empty: use --resume to continue a run, or another --output")


@contextlib.contextmanager
def run_lock(output: Store, env: Dist) -> Iterator[None]:
    """One run per folder: rank 0 holds the folder's lease for the whole run, and every rank of a second run
    started into it stops with one line before it touches anything (its metrics, checkpoints, student)."""
    with contextlib.ExitStack() as held:
        error = None
        if env.rank == 0:
            try:
                held.enter_context(output.lease(LOCK, f"the run in {output.url}"))
            except UserError as exc:
                error = str(exc)
        error = broadcast_object(error, env)
        if error is not None:
            raise UserError(error)
        yield
