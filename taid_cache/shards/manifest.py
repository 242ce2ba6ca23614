"""Cache bookkeeping: one part file per worker (its settings, committed shards and resume cursor), and
`manifest.json`, the merged view written once every worker has finished.

Each worker only ever writes its own part file, so N independent processes can share one output folder.
A worker that finishes marks its part done and then looks at the others; whichever sees all parts done
writes the manifest (two that finish together write the same content, atomically), so at least one does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import read_json, write_json
from ..errors import UserError
from ..settings import describe_differences
from . import fidelity
from .schema import FORMAT_VERSION

MANIFEST = "manifest.json"
PARTS_DIR = "parts"


@dataclass
class WorkerPart:
    settings: dict[str, Any]
    worker_index: int
    num_workers: int
    row_start: int
    row_end: int
    # Where the worker stands: the next source row, and rows dropped and truncated so far.
    cursor: dict[str, int] = field(default_factory=dict)
    shards: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False


def part_path(cache: Path, worker_index: int, num_workers: int) -> Path:
    return cache / PARTS_DIR / f"worker-{worker_index:05d}-of-{num_workers:05d}.json"


def worker_lock(cache: Path, worker_index: int) -> Path:
    """The lock a worker holds for its whole run (any worker count): held means that worker is alive."""
    return cache / PARTS_DIR / f"worker-{worker_index:05d}.lock"


def shard_prefix(worker_index: int) -> str:
    return f"shard-w{worker_index:05d}"


def save_part(cache: Path, part: WorkerPart) -> None:
    write_json(part_path(cache, part.worker_index, part.num_workers), asdict(part))


def load_parts(cache: Path) -> list[WorkerPart]:
    folder = cache / PARTS_DIR
    if not folder.is_dir():
        return []
    return [read_part(p) for p in sorted(folder.glob("worker-*.json"))]


def read_part(path: Path) -> WorkerPart:
    record = read_json(path, "a worker's part file")
    try:
        part = WorkerPart(**record)
    except TypeError:
        raise UserError(f"{path} (a worker's part file) is corrupt: not a taid-cache part record") from None
    for i, shard in enumerate(part.shards):
        check_shard(shard, f"{path} (a worker's part file, shard {i})")
    return part


def check_compatible(cache: Path, settings: dict[str, Any]) -> None:
    """Refuse to add to a folder that holds a cache made with other settings, or anything else. A part that
    committed no shard holds no data, so a corrected command may start over it."""
    recorded = [p.settings for p in load_parts(cache) if p.shards]
    if (cache / MANIFEST).exists():
        recorded.append(load_manifest(cache)["settings"])
    for old in recorded:
        diff = describe_differences(old, settings, "there", "now")
        if diff:
            raise UserError(f"{cache} holds a cache made with other settings: {diff}; use another --output")
    others = [p for p in cache.iterdir() if p.name != PARTS_DIR] if cache.is_dir() else []
    if not recorded and others and not load_parts(cache):
        raise UserError(f"{cache} is not empty and holds no taid-cache cache; use an empty or new --output")


def try_finalize(cache: Path) -> bool:
    """Write manifest.json if every worker's part is done; return whether the cache is complete."""
    parts = load_parts(cache)
    if not parts:
        return False
    num_workers = parts[0].num_workers
    if len(parts) != num_workers or not all(p.done for p in parts):
        return False
    parts.sort(key=lambda p: p.worker_index)
    shards = [s for p in parts for s in p.shards]
    write_json(
        cache / MANIFEST,
        {
            "format_version": FORMAT_VERSION,
            "settings": parts[0].settings,
            "num_workers": num_workers,
            "records": sum(s["records"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "entries": sum(s["entries"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "dropped": sum(p.cursor["dropped"] for p in parts),
            "truncated": sum(p.cursor["truncated"] for p in parts),
            "fidelity": fidelity.means(shards),
            "shards": shards,
        },
    )
    return True


def cache_identity(manifest: dict[str, Any]) -> str:
    """What a cache holds, named: the manifest lists every shard's sha256, so equal identities mean equal data
    (wherever the folder now lives)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


# What the readers use of a manifest, with the types they expect (checked once, on open).
MANIFEST_FIELDS = {"settings": dict, "num_workers": int, "records": int, "tokens": int, "entries": int, "bytes": int,
                   "dropped": int, "truncated": int, "fidelity": dict, "shards": list}
SETTINGS_FIELDS = {"teacher": str, "teacher_hash": str, "tokenizer_hash": str, "vocab_size": int, "tokenizer_size": int,
                   "top_k": int, "top_p": (float, int, type(None)), "tail_samples": int, "precision": str, "dataset_rows": int,
                   "engine": str}
SHARD_FIELDS = {"file": str, "records": int, "tokens": int, "entries": int, "bytes": int, "sha256": str, "batch_rows": list,
                "batch_crc32": list, "fidelity": dict, "cursor": dict}


def check_fields(record: Any, fields: dict[str, Any], where: str) -> None:
    """Each field present with its type (an int never a bool), or a one-line error naming it."""
    for name, kind in fields.items():
        if not isinstance(record, dict) or name not in record:
            raise UserError(f"{where} is corrupt: it has no {name!r}")
        value = record[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise UserError(f"{where} is corrupt: {name!r} is {value!r}")


def check_manifest(manifest: Any, where: str) -> None:
    check_fields(manifest, MANIFEST_FIELDS, where)
    check_fields(manifest["settings"], SETTINGS_FIELDS, f"{where} (its settings)")
    for i, shard in enumerate(manifest["shards"]):
        check_shard(shard, f"{where} (shard {i})")


def check_shard(shard: Any, where: str) -> None:
    check_fields(shard, SHARD_FIELDS, where)
    rows, crcs = shard["batch_rows"], shard["batch_crc32"]
    if len(rows) != len(crcs) or not all(isinstance(v, int) and not isinstance(v, bool) for v in rows + crcs):
        raise UserError(f"{where} is corrupt: its batch_rows and batch_crc32 are not lists of as many integers")


def load_manifest(cache: Path) -> dict[str, Any]:
    """The finished cache's manifest, its fields checked, or a one-line error saying why there is none."""
    if (cache / MANIFEST).is_file():
        where = f"{cache / MANIFEST} (the cache's manifest)"
        manifest = read_json(cache / MANIFEST, "the cache's manifest")
        if not isinstance(manifest, dict) or "settings" not in manifest or "shards" not in manifest:
            raise UserError(f"{where} is corrupt: not a taid-cache manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{cache} is in cache format {manifest.get('format_version')}; this taid-cache reads format "
                            f"{FORMAT_VERSION} only: dump the teacher again with this version")
        check_manifest(manifest, where)
        return manifest
    if not cache.is_dir():
        raise UserError(f"no cache at {cache}: no such folder")
    parts = load_parts(cache)
    if not parts:
        raise UserError(f"{cache} is not a taid-cache cache (no {MANIFEST})")
    done = sum(p.done for p in parts)
    if done == parts[0].num_workers:
        raise UserError(f"{cache}: {MANIFEST} is missing although all {done} workers finished; rerun any worker's "
                        "dump-teacher command to rebuild it")
    raise UserError(f"{cache} is incomplete: {done} of {parts[0].num_workers} workers finished; rerun the missing ones")
