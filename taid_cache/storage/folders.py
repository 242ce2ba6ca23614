"""Folders that appear complete or not at all, on any store: an export, a checkpoint.

Local: filled under a hidden temporary sibling, fsynced and renamed into place (a rename is atomic there).
An object store has no rename: the folder is filled in place and becomes complete when its marker object,
written last, is there; a marker of "in progress", written first, tells a rerun that what it finds is an
interrupted attempt of ours (removed) rather than somebody else's data (refused).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from .. import atomic
from ..errors import UserError
from .base import Store, is_remote, open_store, remote_errors

SUCCESS = "_SUCCESS"  # the marker of a complete folder (the Hadoop / Spark convention other tools know)
IN_PROGRESS = ".taid-cache-incomplete"


@contextlib.contextmanager
def new_folder(target: Store, hint: str) -> Iterator[Store]:
    """A new folder at `target` to fill; refused (one line, `hint` saying what to do) if something is there
    already. What an interrupted attempt left is removed first."""
    path = target.local_path()
    if path is not None:
        yield from _local_folder(path, target.url, hint)
        return
    with remote_errors(target.url):
        names = target.list()
        if names and IN_PROGRESS not in names:
            raise UserError(f"{target.url} exists and is not empty: {hint}")
        target.remove()
        target.discard_unfinished()
        target.check_writable("the output")
        target.write_bytes(IN_PROGRESS, b"")
    yield target
    with remote_errors(target.url):
        target.write_bytes(SUCCESS, b"")
        target.remove(IN_PROGRESS)


def _local_folder(path: Path, url: str, hint: str) -> Iterator[Store]:
    if path.is_file() or (path.is_dir() and any(path.iterdir())):
        raise UserError(f"{url} exists and is not an empty folder: {hint}")
    atomic.check_writable_folder(path.parent, "the output's folder")
    atomic.remove_temporaries(path)  # an interrupted attempt's hidden folder: never read
    if path.is_dir():
        path.rmdir()  # empty: the finished folder is renamed into its place
    with atomic.atomic_path(path) as tmp:
        tmp.mkdir()
        yield open_store(str(tmp))


def fetch_local(location: str, scratch: Path) -> Path:
    """A local path for `location`: itself when local, else the file or folder it names, downloaded into
    `scratch` (a one-line error naming the URI when it cannot be)."""
    if not is_remote(location):
        return Path(location)
    parent, _, name = location.rstrip("/").rpartition("/")
    store = open_store(parent)
    with remote_errors(location):
        if not store.exists(name):
            raise UserError(f"{location}: no such file or folder")
        store.download(name, scratch / name)
    return scratch / name
