"""`verify`: a cache is complete and every shard is intact (checksum, schema, counts), wherever it is stored."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa

from ..errors import UserError
from ..storage import open_store, remote_errors
from .contract import Manifest
from .manifest import load_manifest
from .schema import shard_schema


def verify_cache(location: str | Path) -> Manifest:
    """Return the manifest of a sound cache; raise UserError naming the first bad shard otherwise."""
    cache = open_store(str(location))
    manifest = load_manifest(cache)
    settings = manifest.settings
    expected = shard_schema(settings.vocab_size, settings.top_k, settings.precision, settings.tail_samples)
    for shard in manifest.shards:
        with remote_errors(cache.url):
            if not cache.is_file(shard.file):
                raise UserError(f"bad shard {shard.file}: file is missing")
            with cache.open_input(shard.file) as source:  # memory-mapped where local: hashed without a copy
                data = source.read_buffer()
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
    expected_rows = settings.dataset_rows - manifest.dropped
    if manifest.records != expected_rows:
        raise UserError(f"{cache.url} is incomplete: {manifest.records} records for {expected_rows} kept dataset rows")
    return manifest
