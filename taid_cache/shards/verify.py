"""`verify`: a cache is complete and every shard is intact (checksum, schema, counts), wherever it is stored."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa

from ..errors import UserError
from ..storage import Store, open_store, remote_errors
from .contract import Manifest, ShardEntry
from .manifest import load_manifest
from .reader import ShardFiles
from .schema import shard_schema


def verify_cache(location: str | Path, local_dir: str | None = None) -> Manifest:
    """Return the manifest of a sound cache; raise UserError naming the first bad shard otherwise. A remote
    cache's shards are fetched one ahead, and kept in `local_dir` when given (what training then reads)."""
    cache = open_store(str(location))
    manifest = load_manifest(cache)
    settings = manifest.settings
    expected = shard_schema(settings.vocab_size, settings.top_k, settings.precision, settings.tail_samples,
                            settings.target_logprobs)
    # Every byte from the store itself (a local copy is refreshed with what was checked, never trusted instead).
    files = ShardFiles(cache, manifest, read_ahead=1, local_dir=Path(local_dir) if local_dir else None, reuse_local=False)
    try:
        for index, shard in enumerate(manifest.shards):
            check_shard(cache, files, index, shard, expected)
    finally:
        files.close()
    expected_rows = settings.dataset_rows - manifest.dropped
    if manifest.records != expected_rows:
        raise UserError(f"{cache.url} is incomplete: {manifest.records} records for {expected_rows} kept dataset rows")
    return manifest


def check_shard(cache: Store, files: ShardFiles, index: int, shard: ShardEntry, expected: pa.Schema) -> None:
    """One shard against its manifest entry: present, its bytes' size and sha256, readable, its schema and rows."""
    with remote_errors(cache.url):
        try:
            if cache.is_local:
                with cache.open_input(shard.file) as source:  # memory-mapped: hashed without a copy
                    data = source.read_buffer()
            else:
                data = pa.py_buffer(files.fetched(index))
        except FileNotFoundError:
            raise UserError(f"bad shard {shard.file}: file is missing") from None
    if data.size != shard.bytes or hashlib.sha256(memoryview(data)).hexdigest() != shard.sha256:
        raise UserError(f"bad shard {shard.file}: checksum does not match the manifest")
    try:
        table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    except pa.ArrowException as exc:
        raise UserError(f"bad shard {shard.file}: not readable as Arrow IPC ({exc})") from None
    if not table.schema.equals(expected, check_metadata=True):
        raise UserError(f"bad shard {shard.file}: schema differs from the cache's settings")
    if table.num_rows != shard.records:
        raise UserError(f"bad shard {shard.file}: {table.num_rows} records, manifest says {shard.records}")
