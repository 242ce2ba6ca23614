"""Checksums that let every reader trust what it decodes: sha256 per shard file (checked by `verify` and once at
the start of a run) and crc32 per record batch, over the decoded column contents (checked by every reader
before it decodes a batch, so a byte flipped after the start of a run, or a batch from another cache, is
caught where it is read)."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import UserError


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def column_buffers(column: pa.Array) -> list[np.ndarray]:
    """What a column holds, independent of how Arrow laid it out: list offsets from 0, then the used values."""
    if isinstance(column, pa.ListArray):
        offsets, data = column.offsets.to_numpy(), column.values.to_numpy(zero_copy_only=False)
        return [offsets - offsets[0], data[offsets[0] : offsets[-1]]]
    # Strings (sample ids): small, so their Python form is cheap enough.
    return [np.frombuffer("\0".join(column.to_pylist()).encode(), dtype=np.uint8)]


def batch_crc32(batch: pa.RecordBatch) -> int:
    crc = 0
    for column in batch.columns:
        for values in column_buffers(column):
            crc = zlib.crc32(np.ascontiguousarray(values).view(np.uint8), crc)
    return crc


def check_batch(batch: pa.RecordBatch, expected_rows: int, expected_crc: int, where: str) -> None:
    """Raise a one-line error unless the batch is the one the manifest recorded."""
    if batch.num_rows != expected_rows or batch_crc32(batch) != expected_crc:
        raise UserError(f"bad shard {where}: contents do not match the manifest's checksum (corrupt, or from another cache); run `taid-cache verify`")
