"""Cache bookkeeping: one part file per worker (its settings, committed shards and resume cursor), and
`manifest.json`, the merged view written once every worker has finished.

The commit protocol, the same on a local disk and on an object store: a shard is written under a name no other
attempt uses (shards/contract.py), and becomes part of the cache only when the worker's part file names it;
the manifest, written last, names every shard. A killed writer leaves at most objects that no part file names,
which the next run of that worker removes (`remove_orphans`). Each worker only ever writes its own part file,
so N independent processes can share one output folder. A worker that finishes marks its part done and then
looks at the others; whichever sees all parts done writes the manifest (two that finish together write the
same content, each write atomic), so at least one does.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import UserError
from ..settings import describe_differences
from ..storage import Store, open_store, remote_errors
from . import fidelity
from .contract import FORMAT_VERSION, CacheSettings, Manifest, WorkerPart, lease_name, part_file_name, worker_stem

MANIFEST = "manifest.json"
PARTS_DIR = "parts"
LAYOUT_LEASE = "layout.lock"


def read_record(store: Store, name: str, what: str) -> Any:
    """A JSON file of the cache, parsed; a missing, empty or corrupt one is a one-line error naming it."""
    label = f"{store.where(name)} ({what})"
    try:
        text = store.read_text(name)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {label}: {exc.__class__.__name__ if not str(exc) else str(exc).splitlines()[0]}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UserError(f"{label} is corrupt (not valid JSON: {str(exc).splitlines()[0]})") from None


def write_record(store: Store, name: str, record: Any) -> None:
    store.write_text(name, json.dumps(record, indent=2, sort_keys=True) + "\n")


def parts_of(cache: Store) -> Store:
    return cache.child(PARTS_DIR)


def save_part(cache: Store, part: WorkerPart) -> None:
    write_record(parts_of(cache), part_file_name(part.worker_index, part.num_workers), part.to_json())


def remove_part(cache: Store, part: WorkerPart) -> None:
    parts_of(cache).remove(part_file_name(part.worker_index, part.num_workers))


def load_parts(cache: Store) -> list[WorkerPart]:
    parts = parts_of(cache)
    return [read_part(parts, name) for name in parts.list("worker-*.json")]


def read_part(parts: Store, name: str) -> WorkerPart:
    return WorkerPart.from_json(read_record(parts, name, "a worker's part file"), f"{parts.where(name)} (a worker's part file)")


def worker_lease(cache: Store, worker_index: int) -> tuple[Store, str]:
    """Where the lease a worker holds for its whole run lives."""
    return parts_of(cache), lease_name(worker_index)


def layout_lease(cache: Store) -> tuple[Store, str]:
    """The lease under which a worker decides which parts the folder holds."""
    return parts_of(cache), LAYOUT_LEASE


def check_compatible(cache: Store, settings: CacheSettings) -> None:
    """Refuse to add to a folder that holds a cache made with other settings, or anything else. A part that
    committed no shard holds no data, so a corrected command may start over it."""
    parts = load_parts(cache)
    recorded = [p.settings for p in parts if p.shards]
    if cache.is_file(MANIFEST):
        recorded.append(load_manifest(cache).settings)
    for old in recorded:
        diff = describe_differences(old.to_json(), settings.to_json(), "there", "now")
        if diff:
            raise UserError(f"{cache.url} holds a cache made with other settings: {diff}; use another --output")
    others = [name for name in cache.list() if name != PARTS_DIR]
    if not recorded and others and not parts:
        raise UserError(f"{cache.url} is not empty and holds no taid-cache cache; use an empty or new --output")


def remove_orphans(cache: Store, part: WorkerPart) -> None:
    """What a killed attempt of this worker wrote and no part file names: shards and their temporaries."""
    listed = {s.file for s in part.shards}
    stem = worker_stem(part.worker_index)
    for name in cache.list(f"{stem}-*") + cache.list(f".{stem}-*"):
        if name not in listed:
            cache.remove(name)
    cache.discard_unfinished(stem)  # an upload the kill cut short: never an object, yet stored until aborted


def try_finalize(cache: Store) -> bool:
    """Write manifest.json if every worker's part is done; return whether the cache is complete."""
    parts = load_parts(cache)
    if not parts:
        return False
    num_workers = parts[0].num_workers
    if len(parts) != num_workers or not all(p.done for p in parts):
        return False
    parts.sort(key=lambda p: p.worker_index)
    shards = tuple(s for p in parts for s in p.shards)
    manifest = Manifest(
        format_version=FORMAT_VERSION, settings=parts[0].settings, num_workers=num_workers,
        records=sum(s.records for s in shards), tokens=sum(s.tokens for s in shards), entries=sum(s.entries for s in shards),
        bytes=sum(s.bytes for s in shards), dropped=sum(p.cursor.dropped for p in parts),
        truncated=sum(p.cursor.truncated for p in parts), fidelity=fidelity.means([s.fidelity for s in shards]), shards=shards)
    write_record(cache, MANIFEST, manifest.to_json())
    return True


def load_manifest(location: Store | str | os.PathLike) -> Manifest:
    """The finished cache's manifest, every field checked, or a one-line error saying why there is none."""
    cache = open_store(location) if isinstance(location, (str, os.PathLike)) else location
    with remote_errors(cache.url):
        if cache.is_file(MANIFEST):
            where = f"{cache.where(MANIFEST)} (the cache's manifest)"
            return Manifest.from_json(read_record(cache, MANIFEST, "the cache's manifest"), where)
        if not cache.exists():
            raise UserError(f"no cache at {cache.url}: no such folder")
        parts = load_parts(cache)
    if not parts:
        raise UserError(f"{cache.url} is not a taid-cache cache (no {MANIFEST})")
    done = sum(p.done for p in parts)
    if done == parts[0].num_workers:
        raise UserError(f"{cache.url}: {MANIFEST} is missing although all {done} workers finished; rerun any worker's "
                        "dump-teacher command to rebuild it")
    raise UserError(f"{cache.url} is incomplete: {done} of {parts[0].num_workers} workers finished; rerun the missing ones")
