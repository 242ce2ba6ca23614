"""Reading a finished cache: typed records (`CacheRecord`), decoded to plain numpy arrays, from a local folder or
an object store (`ShardFiles`: memory-mapped where local; fetched whole, ahead of need, where remote)."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import threading
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from ..errors import UserError, first_line
from ..storage import Store, open_store, remote_errors
from .codec import decode_logprobs, ragged_grid, unpack_ragged
from .contract import CacheRecord, CacheSettings, Manifest, ShardEntry
from .integrity import InvariantBroken, check_batch, check_invariants, invariant_error
from .manifest import load_manifest


def _list_rows(column: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (flat values, offsets) so rows are cheap numpy slices."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)
    return values[offsets[0] : offsets[-1]], offsets - offsets[0]


def decode_batch(batch: pa.RecordBatch, settings: CacheSettings, where: str = "(a record batch)",
                 checked: bool = True) -> Iterator[CacheRecord]:
    """Decode every sequence of one record batch, once its invariants hold (integrity.check_invariants: a broken
    one is a one-line error naming `where`, the record and what is broken). `checked=False` only measures them."""
    k, n, precision = settings.top_k, settings.tail_samples, settings.precision
    cols = {name: _list_rows(batch.column(name)) for name in batch.schema.names if name != "sample_id"}
    if settings.target_logprobs and "target_logprob" not in cols:
        raise UserError("bad shard: the cache's settings say --target-logprobs, its shard has no target_logprob column; "
                        "run `taid-cache verify`")
    # The log-probs of the whole batch decoded at once (integers summed exactly: the same floats as per record),
    # after the structure they are decoded by is checked.
    counts_all = cols["topk_counts"][0].astype(np.int64)
    drawn_all = cols["sample_counts"][0].astype(np.int64) if settings.sampled else None
    if checked:
        try:
            head_lps, drawn_lps = check_invariants(batch, settings)
        except InvariantBroken as broken:
            raise invariant_error(batch, broken, where) from None
    else:
        head_lps = decode_logprobs(cols["topk_logprobs"][0], counts_all, precision)
        drawn_lps = decode_logprobs(cols["sample_logprobs"][0], drawn_all, precision) if settings.sampled else None
    position_rows = cols["topk_counts"][1]
    for i, sample_id in enumerate(batch.column("sample_id").to_pylist()):
        row = {name: values[offsets[i] : offsets[i + 1]] for name, (values, offsets) in cols.items()}
        counts = row["topk_counts"].astype(np.int64)
        head = slice(cols["topk_logprobs"][1][i], cols["topk_logprobs"][1][i + 1])
        topk_ids, topk_logprobs = unpack_ragged(row["topk_ids"], head_lps[head], counts, k)
        optional: dict[str, np.ndarray] = {}  # the columns of a sampled or --target-logprobs cache
        if settings.sampled:  # the draws off the head, N columns per position
            drawn = drawn_all[position_rows[i] : position_rows[i + 1]]
            tail = slice(cols["sample_logprobs"][1][i], cols["sample_logprobs"][1][i + 1])
            ids, logprobs = unpack_ragged(row["sample_ids"], drawn_lps[tail], drawn, n)
            optional = {"sample_ids": ids, "sample_logprobs": logprobs,
                        "sample_draws": ragged_grid(row["sample_draws"].astype(np.int64), drawn, n, 0)}
        if settings.target_logprobs:  # the exact float32 log-prob of each actual next token
            optional["target_logprob"] = row["target_logprob"].astype(np.float32)
        yield CacheRecord(sample_id, row["input_ids"].astype(np.int64), row["loss_mask"].astype(bool), topk_ids, topk_logprobs,
                          row["tail_logmass"].astype(np.float32), **optional)


class ShardFiles:
    """The shard files of one cache, opened for Arrow's random access.

    Local: memory-mapped in place. Remote: each shard is fetched whole (one GET) and kept in memory, the
    `capacity` most recent ones; with `read_ahead`, the next shards of `order` (the sequence in which the reader
    will first need them) are fetched in background threads while the current ones are read. With `local_dir`,
    fetched shards are also kept there (named by their sha256, checked on the way in) and reused by later runs."""

    def __init__(self, cache: Store, manifest: Manifest, order: Iterator[int] | None = None, read_ahead: int = 0,
                 local_dir: Path | None = None, buffer: int = 1, reuse_local: bool = True) -> None:
        self.cache, self.manifest, self.reuse_local = cache, manifest, reuse_local
        self._local = open_store(str(local_dir)) if local_dir is not None else None
        self.read_ahead = read_ahead if not cache.is_local and manifest.shards else 0
        # Held in memory: every shard a shuffle buffer of `buffer` rows can still draw from, and those ahead.
        fewest = min((s.records for s in manifest.shards), default=1)
        self.capacity = self.read_ahead + 2 + math.ceil(buffer / max(fewest, 1))
        self._order = order if order is not None else itertools.cycle(range(len(manifest.shards)))
        self._upcoming: deque[int] = deque()  # `order` from the reader's position on
        self._fetched: OrderedDict[int, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = None
        if not cache.is_local:
            self._pool = ThreadPoolExecutor(max_workers=max(1, min(self.read_ahead, 4)), thread_name_prefix="taid-cache-fetch")
            with self._lock:
                for s in self._peek(self.read_ahead):  # the first ones start now, while the student loads
                    self._submit(s)

    def open(self, index: int) -> pa.NativeFile:
        entry = self.manifest.shards[index]
        if self.cache.is_local:
            return self.cache.open_input(entry.file)
        return pa.BufferReader(self.fetched(index))

    def fetched(self, index: int) -> bytes:
        """A remote shard's bytes: from memory, the local folder, or the store (what a reader ahead asked for). A
        fetch that failed is forgotten (the next asks again) and said as the store's failure, naming the cache."""
        with self._lock:
            self._advance(index)
            future = self._submit(index)
            self._fetched.move_to_end(index)
        try:
            return future.result()
        except BaseException:
            with self._lock:
                if self._fetched.get(index) is future:
                    del self._fetched[index]
            with remote_errors(self.cache.url):
                raise

    def _peek(self, n: int) -> list[int]:
        while len(self._upcoming) < n:
            self._upcoming.append(next(self._order))
        return list(itertools.islice(self._upcoming, n))

    def _advance(self, index: int) -> None:
        """A shard the order reaches next (within a few places: a shuffle buffer mixes neighbours) moves the
        reader's position past it and fetches the `read_ahead` after it; one it has passed (rows of a previous
        shard still in the buffer) changes nothing."""
        if not self.read_ahead:
            return
        window = self._peek(self.read_ahead + 4)
        if index in window:
            for _ in range(window.index(index) + 1):
                self._upcoming.popleft()
            for s in self._peek(self.read_ahead):
                self._submit(s)

    def _submit(self, index: int) -> Future:
        if index not in self._fetched:
            self._fetched[index] = self._pool.submit(self._fetch, self.manifest.shards[index])
            while len(self._fetched) > self.capacity:
                self._fetched.popitem(last=False)
        return self._fetched[index]

    def _fetch(self, entry: ShardEntry) -> bytes:
        name = f"{entry.sha256}.arrow"
        if self._local is not None and self.reuse_local and self._local.is_file(name):
            return self._local.read_bytes(name)
        data = self.cache.read_bytes(entry.file)
        if self._local is not None and hashlib.sha256(data).hexdigest() == entry.sha256:  # only what the manifest names
            self._local.write_bytes(name, data)
        return data

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def open_shard(files: ShardFiles, index: int) -> Iterator[pa.ipc.RecordBatchFileReader]:
    """An Arrow reader over one shard of the manifest; a missing or unreadable file is a one-line error."""
    entry = files.manifest.shards[index]
    try:
        with files.open(index) as source:
            reader = pa.ipc.open_file(source)
            if reader.num_record_batches != len(entry.batch_rows):
                raise UserError(f"bad shard {entry.file}: {reader.num_record_batches} record batches, the manifest says "
                                f"{len(entry.batch_rows)}; run `taid-cache verify`")
            yield reader
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"bad shard {entry.file}: cannot read it ({first_line(exc)}); run `taid-cache verify`") from None


def checked_batch(reader: pa.ipc.RecordBatchFileReader, shard: ShardEntry, b: int) -> pa.RecordBatch:
    batch = reader.get_batch(b)
    check_batch(batch, shard.batch_rows[b], shard.batch_crc32[b], f"{shard.file} (record batch {b})")
    return batch


def iter_shard(files: ShardFiles, index: int) -> Iterator[CacheRecord]:
    """Decode every sequence of one shard, each record batch checked against the manifest first."""
    entry = files.manifest.shards[index]
    with open_shard(files, index) as reader:
        for b in range(reader.num_record_batches):
            yield from decode_batch(checked_batch(reader, entry, b), files.manifest.settings, f"{entry.file} (record batch {b})")


class RandomAccess:
    """Sequences by (shard number, row) for a reader that visits rows nearly in order (a shuffle buffer):
    decoded record batches are kept in a small LRU cache."""

    def __init__(self, files: ShardFiles, capacity: int = 16) -> None:
        self.files, self.capacity = files, capacity
        self._starts = files.manifest.batch_starts()
        self._decoded: OrderedDict[tuple[int, int], list[CacheRecord]] = OrderedDict()

    def get(self, shard: int, row: int) -> CacheRecord:
        b = int(np.searchsorted(self._starts[shard], row, side="right")) - 1
        key = (shard, b)
        if key not in self._decoded:
            entry = self.files.manifest.shards[shard]
            with open_shard(self.files, shard) as reader:
                self._decoded[key] = list(decode_batch(checked_batch(reader, entry, b), self.files.manifest.settings,
                                                       f"{entry.file} (record batch {b})"))
            if len(self._decoded) > self.capacity:
                self._decoded.popitem(last=False)
        self._decoded.move_to_end(key)
        return self._decoded[key][row - int(self._starts[shard][b])]


def read_cache(location: str | Path) -> Iterator[CacheRecord]:
    """Every sequence of a finished cache (a folder or a URI such as s3://bucket/cache), in dataset order across
    all workers' shards, as `CacheRecord`s (shards/contract.py)."""
    cache = open_store(str(location))
    manifest = load_manifest(cache)
    files = ShardFiles(cache, manifest, read_ahead=1)
    try:
        for index in range(len(manifest.shards)):
            yield from iter_shard(files, index)
    finally:
        files.close()
