"""The run folder of train-student: what a fresh run, a resumed one and an interrupted final save find there.

The final student is written whole into a hidden staging folder, renamed to `.student.staged` once complete,
and only then moved into the run folder file by file, config.json last (without it nothing loads the folder
as a model). A kill at any moment leaves either no student, or a complete staged one that the next start
(fresh or --resume) finishes installing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from ..atomic import atomic_path, exclusive_lock
from ..errors import UserError
from .distributed import Dist, broadcast_object

STAGED = ".student.staged"
LOCK = ".taid-cache.lock"  # held by the run's rank 0 for the run's life
# What a run that died before its first checkpoint leaves: nothing a rerun could continue from.
UNRECOVERABLE = {"metrics.jsonl", "tensorboard", "wandb", "checkpoints"}


def staged_student(output: Path):
    """Context manager: the folder to save the final student into; on success it becomes `.student.staged`."""
    return atomic_path(output / STAGED)


def install_staged(output: Path) -> bool:
    """Move a complete staged student into the run folder (config.json last); False when there is none."""
    staged = output / STAGED
    if not staged.is_dir():
        return False
    for f in sorted(staged.iterdir(), key=lambda p: p.name == "config.json"):
        os.replace(f, output / f.name)
    staged.rmdir()
    return True


def is_finished(output: Path) -> bool:
    """The student is in place: config.json (moved in last) with its weights, nothing left staged."""
    weights = any(output.glob("model*.safetensors"))
    return (output / "config.json").is_file() and weights and not (output / STAGED).exists()


def clear_unrecoverable(output: Path, has_checkpoint: bool) -> bool:
    """For a fresh run: True when the folder is empty or holds only what a run that died before its first
    checkpoint leaves (those are removed); False when it holds anything worth keeping."""
    if not output.is_dir():
        return True
    entries = list(output.iterdir())
    if has_checkpoint or (output / "config.json").exists() or (output / STAGED).exists():
        return False
    if not all(e.name in UNRECOVERABLE or e.name.startswith(".") for e in entries):
        return False
    for e in entries:
        if e.name != LOCK:  # this run's own lock: removing it would let a second run take a fresh one
            shutil.rmtree(e) if e.is_dir() else e.unlink()
    return True


def refuse_non_empty(output: Path) -> UserError:
    return UserError(f"{output} is not empty: use --resume to continue a run, or another --output")


@contextlib.contextmanager
def run_lock(output: Path, env: Dist) -> Iterator[None]:
    """One run per folder: rank 0 holds the folder's lock for the whole run, and every rank of a second run
    started into it stops with one line before it touches anything (its metrics, checkpoints, student)."""
    with contextlib.ExitStack() as held:
        error = None
        if env.rank == 0:
            try:
                held.enter_context(exclusive_lock(output / LOCK, f"the run in {output}"))
            except UserError as exc:
                error = str(exc)
        error = broadcast_object(error, env)
        if error is not None:
            raise UserError(error)
        yield
