"""The storage protocol every cache, run folder, checkpoint and export goes through, and the registry that
turns what the user typed (a path or a URL) into a store.

A plain path (no `scheme://`) is a `LocalStore` on exactly `Path(url)`; `file://` too. Any scheme fsspec knows
is an `FsspecStore`. Names given to a store are relative to its folder and use "/" between parts.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

import pyarrow as pa

from ..errors import UserError, first_line


@runtime_checkable
class Store(Protocol):
    """A folder, local or remote, rooted at `url`. Every write is all or nothing: a reader sees the old
    content or the new, never a part, and a writer killed mid-way leaves nothing under the final name."""

    url: str  # this folder as the user gave it, for messages
    is_local: bool

    def child(self, name: str) -> Store:
        """The sub-folder `name`."""

    def where(self, name: str = "") -> str:
        """The full path or URL of a member (the folder itself for ""), for messages."""

    def local_path(self, name: str = "") -> Path | None:
        """A member on local disk; None for a remote store."""

    def exists(self, name: str = "") -> bool:
        """A file or a folder (remote: a prefix holding at least one object); "" is the folder itself."""

    def is_file(self, name: str) -> bool: ...

    def size(self, name: str) -> int:
        """Bytes of a file; FileNotFoundError if absent."""

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted names (files and sub-folders, hidden ones too) directly inside that match the fnmatch
        `pattern`, case-sensitively; [] when the folder is absent."""

    def read_bytes(self, name: str) -> bytes:
        """FileNotFoundError if absent."""

    def read_text(self, name: str) -> str:
        """UTF-8."""

    def open_input(self, name: str) -> pa.NativeFile:
        """Random access for `pa.ipc.open_file` (local: memory-mapped; remote: fetched whole in one GET)."""

    def write_bytes(self, name: str, data: bytes) -> None:
        """Create or replace atomically."""

    def write_text(self, name: str, text: str) -> None:
        """Create or replace atomically, UTF-8."""

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Create `name` holding `data` only if it is absent: False (and nothing written) if it exists."""

    def open_output(self, name: str) -> ContextManager[pa.NativeFile]:
        """Stream one file; it appears under `name` only when the block succeeds, never on exception or kill."""

    def remove(self, name: str = "") -> None:
        """A file or a whole folder ("" : this one), gone; absent is fine."""

    def check_writable(self, flag: str) -> None:
        """Before any real work: this folder can be written (a probe written and removed), else a one-line
        UserError naming `flag` and the URL."""

    def lease(self, name: str, holder: str, wait: bool = False) -> ContextManager[None]:
        """Hold the exclusive lease `name` for the block. A second holder is refused at once with a one-line
        UserError naming `holder` (with `wait`: it waits its turn). A holder killed with -9 never blocks the
        rerun: the kernel drops a local lock; a remote lease expires, or is stale at once on its own host."""

    def is_leased(self, name: str) -> bool:
        """Whether a live holder has the lease `name` now."""

    def discard_unfinished(self, prefix: str = "") -> None:
        """Abort writes under `prefix` that were begun and never completed and that `list` does not show (an
        object store's multipart uploads of a killed writer); the caller holds the lease that makes them stale."""

    def upload(self, local: Path, name: str, last: str | None = None) -> None:
        """Copy a local file or folder to `name`, each file atomically; `last` (a path inside the folder, such
        as "config.json") is copied after all the others, so its presence means the rest is complete."""

    def download(self, name: str, local: Path) -> None:
        """Copy a file or folder of the store to `local`."""


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
LOCAL_SCHEMES = ("file", "local")
_FACTORIES: dict[str, Callable[[str], Store]] = {}


def scheme_of(url: str | os.PathLike) -> str | None:
    """The lower-case scheme of `scheme://...`; None for a plain path."""
    match = _SCHEME.match(os.fspath(url))
    return match.group(1).lower() if match else None


def is_remote(url: str) -> bool:
    """Whether `url` names storage off this machine's file system (it has a scheme other than file://)."""
    scheme = scheme_of(url)
    return scheme is not None and scheme not in LOCAL_SCHEMES


def join(url: str, *names: str) -> str:
    """`names` under `url`: `Path` joining for a local path (so it reads as today's messages), "/" for a URL."""
    names = tuple(n for n in names if n)
    if not is_remote(url):
        return str(Path(url).joinpath(*names)) if names else url
    return "/".join([url.rstrip("/"), *(n.strip("/") for n in names)])


def local_path_of(url: str) -> Path:
    """The path of a plain path or a file:// URL."""
    if scheme_of(url) is None:
        return Path(url)
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise UserError(f"{url}: a file:// URL names this machine's files (file:///path), not host {parts.netloc!r}")
    return Path(unquote(parts.path))


def register_store(scheme: str, factory: Callable[[str], Store]) -> None:
    """Open URLs of `scheme` with `factory(url)` (ahead of fsspec's own schemes)."""
    _FACTORIES[scheme.lower()] = factory


def open_store(url: str | os.PathLike) -> Store:
    """The store for a path or URL the user gave; an unknown scheme, or one whose package is missing, is a
    one-line UserError saying what to use or install."""
    url = os.fspath(url)
    scheme = scheme_of(url)
    if scheme is None:
        return _FACTORIES["file"](url)
    if scheme in _FACTORIES:
        return _FACTORIES[scheme](url)
    from fsspec.registry import known_implementations

    if scheme not in known_implementations:
        raise UserError(f"unknown storage scheme '{scheme}://' in {url}: use a local path or one of s3://, gs://, az://, hf://, "
                        "... (any scheme fsspec knows)")
    from fsspec import get_filesystem_class

    try:
        get_filesystem_class(scheme)
    except ImportError as exc:
        needs = "pip install 'taid-cache[s3]'" if scheme in ("s3", "s3a") else first_line(exc)
        raise UserError(f"storage scheme '{scheme}://' in {url} needs a package that is not installed: {needs}") from None
    from .remote import FsspecStore

    return FsspecStore(url)


@contextlib.contextmanager
def remote_errors(url: str, flag: str = "") -> Iterator[None]:
    """For a remote store: failures of its file system that a user's input causes (a missing bucket, wrong credentials, an
    unreachable endpoint) become one-line UserErrors naming `url` (and the option `flag` that gave it)."""
    label = f"{flag} {url}" if flag else url
    try:
        yield
    except FileNotFoundError as exc:
        raise UserError(f"{label}: not found, or its bucket does not exist ({first_line(exc)})") from None
    except PermissionError as exc:
        raise UserError(f"{label}: access denied; check the credentials ({first_line(exc)})") from None
    except _remote_failures() as exc:
        raise UserError(f"{label}: cannot reach the storage ({type(exc).__name__}: {first_line(exc)})") from None


def _remote_failures() -> tuple[type[BaseException], ...]:
    """OSError, and the exception bases of the remote clients that are installed (they do not derive from it)."""
    found: list[type[BaseException]] = [OSError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError, ClientError

        found += [BotoCoreError, ClientError]
    with contextlib.suppress(ImportError):
        from aiohttp import ClientError as HttpClientError

        found.append(HttpClientError)
    return tuple(found)
