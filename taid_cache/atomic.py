"""Files that are either absent or complete: atomic writes, atomic folder installs, JSON that reads as one-line
errors when corrupt, and an exclusive lock for a process's share of an output folder.

Temporary names carry the host, the pid and a random part, so processes on different nodes of a shared file
system never write the same temporary file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError, first_line


def temporary_name(final: Path) -> Path:
    """A hidden sibling of `final` that no other process, here or on another node, will choose."""
    return final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_path(path: Path) -> None:
    """Flush a file, or every file in a folder and the folder itself, to disk."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path (file or folder) to fill; on success it is fsynced and renamed to `final`.
    On failure nothing is left behind."""
    tmp = temporary_name(final)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, final)
    finally:
        remove(tmp)


def remove(path: Path) -> None:
    """A file or a folder, gone."""
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def remove_temporaries(final: Path) -> None:
    """What a killed process left of `atomic_path(final)` (a kill skips its clean-up): never read, so removed."""
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        remove(tmp)


def write_text(final: Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text)


def write_json(final: Path, obj: Any) -> None:
    write_text(final, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, what: str | None = None) -> Any:
    """Parsed JSON; a missing, empty or corrupt file is a one-line error naming it (and what it is)."""
    label = f"{path}" + (f" ({what})" if what else "")
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"cannot read {label}: {first_line(exc)}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UserError(f"{label} is corrupt (not valid JSON: {first_line(exc)})") from None


@contextlib.contextmanager
def exclusive_lock(path: Path, holder: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed) for the block; a second process asking for the
    same lock is refused at once with a one-line error naming `holder` (with `wait`: it waits its turn, for
    short critical sections). The kernel drops the lock when the process dies, so a kill -9 never leaves a
    stale lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another process is already writing {holder} (lock {path}); wait for it or stop it") from None
        yield
    finally:
        os.close(fd)


def is_locked(path: Path) -> bool:
    """Whether a live process holds `exclusive_lock(path)` now (a lock of this process's counts too)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def check_writable_folder(folder: Path, flag: str) -> None:
    """`folder` is, or can be made, a folder this process can write into: created (empty) if missing, and a
    probe file written and removed. Checked before any real work, so a bad output fails in one line at once."""
    try:
        str(folder).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{flag} {ascii(str(folder))} is not a UTF-8 path: the files taid-cache writes (Arrow, safetensors) "
                        "need UTF-8 names; use another") from None
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temporary_name(folder / "probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{flag} {folder}: cannot write there ({first_line(exc)})") from None
