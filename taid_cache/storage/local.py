"""A store on this machine's file system: today's behaviour (`atomic.py`: a temporary sibling, fsync and
os.replace; fcntl.flock leases the kernel drops on kill -9; memory-mapped reads)."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from .. import atomic
from .base import local_path_of


class LocalStore:
    is_local = True

    def __init__(self, root: Path | str, url: str | None = None):
        self.root = Path(root)
        self.url = str(root) if url is None else url

    @classmethod
    def from_url(cls, url: str) -> LocalStore:
        """A plain path (exactly `Path(url)`) or a file:// URL."""
        return cls(local_path_of(url), url)

    def __repr__(self) -> str:
        return f"LocalStore({self.url!r})"

    def _path(self, name: str) -> Path:
        return self.root / name if name else self.root

    def child(self, name: str) -> LocalStore:
        return LocalStore(self._path(name))

    def where(self, name: str = "") -> str:
        return str(self._path(name))

    def local_path(self, name: str = "") -> Path:
        return self._path(name)

    def exists(self, name: str = "") -> bool:
        return self._path(name).exists()

    def is_file(self, name: str) -> bool:
        return self._path(name).is_file()

    def size(self, name: str) -> int:
        return self._path(name).stat().st_size

    def list(self, pattern: str = "*") -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(n for n in os.listdir(self.root) if fnmatch.fnmatchcase(n, pattern))

    def read_bytes(self, name: str) -> bytes:
        return self._path(name).read_bytes()

    def read_text(self, name: str) -> str:
        return self._path(name).read_text(encoding="utf-8")

    def open_input(self, name: str) -> pa.NativeFile:
        return pa.memory_map(str(self._path(name)))

    def _final(self, name: str) -> Path:
        """The path of a file about to be written; its folder created (remote stores have no folders to make)."""
        final = self._path(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        return final

    def write_bytes(self, name: str, data: bytes) -> None:
        with atomic.atomic_path(self._final(name)) as tmp:
            tmp.write_bytes(data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def create_exclusive(self, name: str, data: bytes) -> bool:
        final = self._final(name)
        try:
            fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            final.unlink(missing_ok=True)  # ours, half written: absent is the honest state
            raise
        return True

    @contextlib.contextmanager
    def open_output(self, name: str) -> Iterator[pa.NativeFile]:
        with atomic.atomic_path(self._final(name)) as tmp, pa.OSFile(str(tmp), "wb") as sink:
            yield sink

    def remove(self, name: str = "") -> None:
        atomic.remove(self._path(name))

    def check_writable(self, flag: str) -> None:
        atomic.check_writable_folder(self.root, flag)

    def lease(self, name: str, holder: str, wait: bool = False) -> contextlib.AbstractContextManager[None]:
        return atomic.exclusive_lock(self._path(name), holder, wait)

    def is_leased(self, name: str) -> bool:
        return atomic.is_locked(self._path(name))

    def discard_unfinished(self, prefix: str = "") -> None:
        """Nothing to do: what a killed writer leaves here is a listed hidden temporary, removed by its owner's
        rerun (`remove_temporaries`, `remove_orphans`)."""

    def upload(self, local: Path, name: str, last: str | None = None) -> None:
        for source, member in upload_order(local, name, last):
            with open(source, "rb") as src, self.open_output(member) as sink:
                shutil.copyfileobj(src, sink)

    def download(self, name: str, local: Path) -> None:
        source = self._path(name)
        if source.is_dir():
            shutil.copytree(source, local, dirs_exist_ok=True)
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, local)


def upload_order(local: Path, name: str, last: str | None) -> list[tuple[Path, str]]:
    """(local file, store name) for every file of `local`, `last` at the end; FileNotFoundError if `local`, or
    `last` inside it, is missing."""
    if local.is_file():
        return [(local, name)]
    if not local.is_dir():
        raise FileNotFoundError(f"no file or folder {local} to upload")
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    if last is not None:
        if last not in files:
            raise FileNotFoundError(f"{local / last} (to be uploaded last) does not exist")
        files = [f for f in files if f != last] + [last]
    return [(local / f, f"{name}/{f}" if name else f) for f in files]
