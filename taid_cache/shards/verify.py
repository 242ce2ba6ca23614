"""`verify`: a cache is complete and every shard is intact (checksum, schema, counts)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from ..errors import UserError
from .manifest import load_manifest
from .schema import shard_schema
from .integrity import file_sha256


def verify_cache(path: str | Path) -> dict:
    """Return the manifest of a sound cache; raise UserError naming the first bad shard otherwise."""
    cache = Path(path)
    manifest = load_manifest(cache)
    settings = manifest["settings"]
    expected = shard_schema(settings["vocab_size"], settings["top_k"], settings["precision"], settings.get("tail_samples", 0))
    for shard in manifest["shards"]:
        file = cache / shard["file"]
        if not file.is_file():
            raise UserError(f"bad shard {shard['file']}: file is missing")
        if file.stat().st_size != shard["bytes"] or file_sha256(file) != shard["sha256"]:
            raise UserError(f"bad shard {shard['file']}: checksum does not match the manifest")
        try:
            with pa.memory_map(str(file)) as source:
                table = pa.ipc.open_file(source).read_all()
        except pa.ArrowException as exc:
            raise UserError(f"bad shard {shard['file']}: not readable as Arrow IPC ({exc})") from None
        if not table.schema.equals(expected, check_metadata=True):
            raise UserError(f"bad shard {shard['file']}: schema differs from the cache's settings")
        if table.num_rows != shard["records"]:
            raise UserError(f"bad shard {shard['file']}: {table.num_rows} records, manifest says {shard['records']}")
    expected_rows = settings["dataset_rows"] - manifest["dropped"]
    if manifest["records"] != expected_rows:
        raise UserError(f"{cache} is incomplete: {manifest['records']} records for {expected_rows} kept dataset rows")
    return manifest
