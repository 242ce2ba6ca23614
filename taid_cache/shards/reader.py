"""Reading a finished cache: one mapping per sequence, decoded to plain numpy arrays."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from ..errors import UserError, first_line
from .codec import decode_logprobs, ragged_grid, unpack_ragged
from .integrity import check_batch
from .manifest import load_manifest


def _list_rows(column: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (flat values, offsets) so rows are cheap numpy slices."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)
    return values[offsets[0] : offsets[-1]], offsets - offsets[0]


def decode_batch(batch: pa.RecordBatch, settings: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Decode every sequence of one record batch."""
    k, precision = settings["top_k"], settings["precision"]
    cols = {name: _list_rows(batch.column(name)) for name in batch.schema.names if name != "sample_id"}
    for i, sample_id in enumerate(batch.column("sample_id").to_pylist()):
        row = {name: values[offsets[i] : offsets[i + 1]] for name, (values, offsets) in cols.items()}
        counts = row["topk_counts"].astype(np.int64)
        logprobs = decode_logprobs(row["topk_logprobs"], counts, precision)
        topk_ids, topk_logprobs = unpack_ragged(row["topk_ids"], logprobs, counts, k)
        record = {
            "sample_id": sample_id,
            "input_ids": row["input_ids"].astype(np.int64),
            "loss_mask": row["loss_mask"].astype(bool),
            "topk_ids": topk_ids,
            "topk_logprobs": topk_logprobs,
            "tail_logmass": row["tail_logmass"].astype(np.float32),
        }
        if "sample_ids" in row:  # a --tail-samples cache: the draws off the head, N columns per position
            n, counts = settings["tail_samples"], row["sample_counts"].astype(np.int64)
            record["sample_ids"], record["sample_logprobs"] = unpack_ragged(
                row["sample_ids"], decode_logprobs(row["sample_logprobs"], counts, precision), counts, n)
            record["sample_draws"] = ragged_grid(row["sample_draws"].astype(np.int64), counts, n, 0)
        yield record


@contextlib.contextmanager
def open_shard(cache: Path, shard: dict[str, Any]) -> Iterator[pa.ipc.RecordBatchFileReader]:
    """An Arrow reader over one shard of the manifest; a missing or unreadable file is a one-line error."""
    try:
        with pa.memory_map(str(cache / shard["file"])) as source:
            reader = pa.ipc.open_file(source)
            if reader.num_record_batches != len(shard["batch_rows"]):
                raise UserError(f"bad shard {shard['file']}: {reader.num_record_batches} record batches, the manifest says "
                                f"{len(shard['batch_rows'])}; run `taid-cache verify`")
            yield reader
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"bad shard {shard['file']}: cannot read it ({first_line(exc)}); run `taid-cache verify`") from None


def checked_batch(reader: pa.ipc.RecordBatchFileReader, shard: dict[str, Any], b: int) -> pa.RecordBatch:
    batch = reader.get_batch(b)
    check_batch(batch, shard["batch_rows"][b], shard["batch_crc32"][b], f"{shard['file']} (record batch {b})")
    return batch


def iter_shard(cache: Path, shard: dict[str, Any], settings: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Decode every sequence of one shard, each record batch checked against the manifest first."""
    with open_shard(cache, shard) as reader:
        for b in range(reader.num_record_batches):
            yield from decode_batch(checked_batch(reader, shard, b), settings)


class RandomAccess:
    """Sequences by (shard number, row) for a reader that visits rows nearly in order (a shuffle buffer):
    decoded record batches are kept in a small LRU cache."""

    def __init__(self, cache: Path, manifest: dict[str, Any], capacity: int = 16) -> None:
        self.cache, self.manifest, self.capacity = cache, manifest, capacity
        self._starts = [np.cumsum([0, *s["batch_rows"]]) for s in manifest["shards"]]
        self._decoded: OrderedDict[tuple[int, int], list[dict[str, Any]]] = OrderedDict()

    def get(self, shard: int, row: int) -> dict[str, Any]:
        b = int(np.searchsorted(self._starts[shard], row, side="right")) - 1
        key = (shard, b)
        if key not in self._decoded:
            entry = self.manifest["shards"][shard]
            with open_shard(self.cache, entry) as reader:
                self._decoded[key] = list(decode_batch(checked_batch(reader, entry, b), self.manifest["settings"]))
            if len(self._decoded) > self.capacity:
                self._decoded.popitem(last=False)
        self._decoded.move_to_end(key)
        return self._decoded[key][row - int(self._starts[shard][b])]


def read_cache(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield every sequence of a finished cache, in dataset order across all workers' shards.

    Each item: `sample_id` (str), `input_ids` [T] int64, `loss_mask` [T] bool, `topk_ids` [T-1, k] int64 and
    `topk_logprobs` [T-1, k] float32, row j being the teacher's top-k for token j+1, and `tail_logmass` [T-1]
    float32, the log of the teacher's mass off row j's stored entries. Entries dropped by --top-p hold id -1
    and log-prob -inf (their mass is in the tail). A `--tail-samples N` cache adds `sample_ids`,
    `sample_draws` and `sample_logprobs` [T-1, N]: row j's distinct draws off the head, how often each was
    drawn (summing to N), and its log-prob (id -1, 0 draws, -inf in unused slots).
    """
    cache = Path(path)
    manifest = load_manifest(cache)
    for shard in manifest["shards"]:
        yield from iter_shard(cache, shard, manifest["settings"])
