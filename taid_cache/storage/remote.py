"""A store on any fsspec file system; object stores above all (S3 through s3fs, GCS, Azure), where one PUT is
atomic, exclusive create is a conditional PUT (If-None-Match: *) and a multipart upload shows nothing until it
completes. A file system without those guarantees (ftp, sftp) gets no atomicity from this class."""

from __future__ import annotations

import contextlib
import copy
import errno
import fnmatch
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import fsspec
import pyarrow as pa

from ..errors import UserError
from .attempts import attempt_name
from .base import join, remote_errors
from .local import upload_order

# Fail fast on an unreachable endpoint (botocore's own retries, then s3fs's, would take minutes), and list
# afresh each time: another process's writes (a lease, a worker's shard) must be seen.
STORAGE_OPTIONS: dict[str, dict[str, Any]] = {
    "s3": {"config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2, "mode": "standard"}},
           "use_listings_cache": False, "skip_instance_cache": True},
}
STORAGE_OPTIONS["s3a"] = STORAGE_OPTIONS["s3"]
LEASE_TTL_ENV = "TAID_CACHE_LEASE_TTL"
DEFAULT_LEASE_TTL = 60.0
LOOKS = 5  # tries to create or take a lease that vanishes as it is looked at, before it counts as held


class FsspecStore:
    is_local = False

    def __init__(self, url: str, lease_ttl: float | None = None, **storage_options: Any):
        protocol, rest = url.split("://", 1)
        protocol = protocol.lower()
        options = {**STORAGE_OPTIONS.get(protocol, {}), **storage_options}
        self.fs, self.root = fsspec.core.url_to_fs(f"{protocol}://{rest}", **options)
        self.root = self.root.rstrip("/")
        self.url = url
        self.lease_ttl = float(lease_ttl if lease_ttl is not None else os.environ.get(LEASE_TTL_ENV, DEFAULT_LEASE_TTL))
        if protocol in ("s3", "s3a"):
            self.fs.retries = 2  # s3fs's own retry loop, around botocore's

    def __repr__(self) -> str:
        return f"FsspecStore({self.url!r})"

    def _path(self, name: str) -> str:
        return f"{self.root}/{name.strip('/')}" if name else self.root

    def child(self, name: str) -> FsspecStore:
        sub = copy.copy(self)  # the same file system (its session and connections)
        sub.url, sub.root = join(self.url, name), self._path(name)
        return sub

    def where(self, name: str = "") -> str:
        return join(self.url, name)

    def local_path(self, name: str = "") -> None:
        return None

    def exists(self, name: str = "") -> bool:
        return self.fs.exists(self._path(name))

    def is_file(self, name: str) -> bool:
        return self.fs.isfile(self._path(name))

    def size(self, name: str) -> int:
        return self.fs.size(self._path(name))

    def list(self, pattern: str = "*") -> list[str]:
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != self.root}
        return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self._path(name))

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def open_input(self, name: str) -> pa.NativeFile:
        return pa.BufferReader(self.read_bytes(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(name), data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def create_exclusive(self, name: str, data: bytes) -> bool:
        return self._create(self._path(name), data)

    def _create(self, path: str, data: bytes) -> bool:
        try:
            with self.fs.open(path, "xb") as f:  # s3fs: a PUT with If-None-Match: *
                f.write(data)
        except FileExistsError:
            return False
        return True

    @contextlib.contextmanager
    def open_output(self, name: str) -> Iterator[pa.NativeFile]:
        f = self.fs.open(self._path(name), "wb")
        try:
            yield pa.PythonFile(f, mode="w")
        except BaseException:
            f.discard()  # s3fs, gcsfs: abort the multipart or resumable upload
            f.closed = True  # so neither close() nor the file's __del__ uploads the part written
            raise
        f.close()  # completes the upload: the object appears whole

    def remove(self, name: str = "") -> None:
        path = self._path(name)
        # Objects only: fs.rm(recursive=True) on a bucket's root would delete the bucket too.
        files = self.fs.find(path)
        if files:
            self.fs.rm(files)
        self.fs.invalidate_cache(path)

    def check_writable(self, flag: str) -> None:
        with remote_errors(self.url, flag):
            probe = self._path(attempt_name(".probe"))
            self.fs.pipe_file(probe, b"")  # first, so a bad endpoint or key costs one request's retries
            self.fs.rm_file(probe)
            if self.fs.isfile(self.root):
                raise UserError(f"{flag} {self.url} is a file, not a folder")

    @contextlib.contextmanager
    def lease(self, name: str, holder: str, wait: bool = False) -> Iterator[None]:
        path, token = self._path(name), uuid.uuid4().hex
        while (etag := self._take(path, token)) is None:
            if not wait:
                raise UserError(f"another process is already writing {holder} (lock {self.where(name)}); wait for it or stop it")
            time.sleep(min(1.0, self.lease_ttl / 4))
        stop = threading.Event()
        refresher = threading.Thread(target=self._refresh, args=(path, token, etag, stop), daemon=True, name=f"lease {name}")
        refresher.start()
        try:
            yield
        finally:
            stop.set()
            refresher.join()
            if (self._read_lease(path) or {}).get("token") == token:
                self.fs.rm_file(path)

    def is_leased(self, name: str) -> bool:
        lease = self._read_lease(self._path(name))
        return lease is not None and not stale(lease)

    def _lease_body(self, token: str) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "expires": time.time() + self.lease_ttl,
                           "token": token}).encode()

    def _take(self, path: str, token: str) -> str | None:
        """Create the lease, or take over a stale one; the lease object's ETag when this process holds it, else
        None. On S3 the takeover replaces the stale object only if it is still the one judged stale (If-Match on
        its ETag), so of two processes taking over one stale lease exactly one wins. Elsewhere it is delete, then
        create once more: two takers within one round trip could both win (fsspec has no conditional replace)."""
        body = self._lease_body(token)
        for _ in range(LOOKS):
            if self._create(path, body):
                return self._etag(path)
            etag, current = self._etag(path), self._read_lease(path)
            if etag is None or current is None:
                # Its holder released it between our create and our look, or a listing cache says so: look afresh.
                self.fs.invalidate_cache(path)
                continue
            if not stale(current):
                return None
            if self._s3 is not None:
                return self._put_if_match(path, body, etag)
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)
        return None  # still there each time we looked, and never ours: held

    @property
    def _s3(self):
        """s3fs's raw client call, for what fsspec does not offer (conditional replace, unfinished uploads)."""
        return getattr(self.fs, "call_s3", None)

    def _etag(self, path: str) -> str | None:
        """The object's ETag; "" on a store that keeps none; None when the object is absent."""
        try:
            return self.fs.info(path).get("ETag", "")
        except FileNotFoundError:
            return None

    def _put_if_match(self, path: str, body: bytes, etag: str | None) -> str | None:
        """Replace the object only if it still has `etag` (S3's If-Match on PUT: compare and swap): its new ETag,
        or None when another process changed it first."""
        bucket, _, key = path.partition("/")
        try:
            return self._s3("put_object", Bucket=bucket, Key=key, Body=body, IfMatch=etag)["ETag"]
        except (FileNotFoundError, OSError) as exc:
            if isinstance(exc, FileNotFoundError) or exc.errno == errno.EINVAL:  # gone, or 412 Precondition Failed
                return None
            raise

    def _read_lease(self, path: str) -> dict | None:
        """The lease's record; None when absent. One that does not parse (not ours to judge) counts as expired."""
        try:
            text = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            lease = json.loads(text)
            return lease if isinstance(lease, dict) else {"expires": 0}
        except ValueError:
            return {"expires": 0}

    def _refresh(self, path: str, token: str, etag: str | None, stop: threading.Event) -> None:
        """Push the expiry forward every ttl/4 while the block runs; a failed refresh (a network blip) is
        retried at the next tick, and the lease lapses only if they keep failing for a whole ttl. On S3 each
        refresh replaces only our own object (If-Match), so a lease another process took over is never overwritten."""
        while not stop.wait(self.lease_ttl / 4):
            with contextlib.suppress(Exception):
                if self._s3 is not None:
                    if (etag := self._put_if_match(path, self._lease_body(token), etag)) is None:
                        return  # taken over (we were stale)
                    continue
                if (self._read_lease(path) or {}).get("token") != token:
                    return  # taken over (we were stale): never overwrite the new holder's lease
                self.fs.pipe_file(path, self._lease_body(token))

    def discard_unfinished(self, prefix: str = "") -> None:
        """Uploads under `prefix` that a killed writer began and never completed: invisible to `list`, yet stored
        (and billed) until aborted. Aborted here (S3's multipart uploads; other stores expire their own)."""
        if self._s3 is None:
            return
        bucket, _, key = self._path(prefix).partition("/")
        marker: dict[str, str] = {}
        while True:
            page = self._s3("list_multipart_uploads", Bucket=bucket, Prefix=key, **marker)
            for upload in page.get("Uploads", []):
                self._s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            if not page.get("IsTruncated"):
                return
            marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def upload(self, local: Path, name: str, last: str | None = None) -> None:
        for source, member in upload_order(local, name, last):
            self.fs.put_file(str(source), self._path(member))

    def download(self, name: str, local: Path) -> None:
        path = self._path(name)
        if self.fs.isfile(path):
            local.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(path, str(local))
            return
        members = self.fs.find(path)
        if not members:
            raise FileNotFoundError(f"no file or folder {self.where(name)}")
        for member in members:
            target = local / member[len(path):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(member, str(target))


def stale(lease: dict) -> bool:
    """Expired, or held by a process of this host that is gone (a kill -9 here never blocks the rerun)."""
    if float(lease.get("expires", 0)) < time.time():
        return True
    return lease.get("host") == socket.gethostname() and not pid_alive(int(lease.get("pid", 0)))


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
