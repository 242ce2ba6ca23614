"""Writing shards: encode records, append them to an Arrow IPC file, and commit it atomically when full.

A shard becomes part of the cache only when it is complete: it is streamed into the store under a name of its
own attempt, hashed on the way, and only once stored announced to the caller (which records it in the worker's
part file). A shard still being written when the process dies is named by no part file: the resumed run
removes it and redoes its rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
import uuid
from typing import Callable, Protocol

import numpy as np
import pyarrow as pa

from ..errors import UserError
from ..storage import Store
from . import fidelity
from .codec import decode_logprobs, encode_logprobs, id_dtype, pack_ragged, unpack_ragged
from .contract import Cursor, ShardEntry, shard_file_name
from .integrity import batch_crc32
from .record import TeacherRecord
from .schema import list_array, shard_schema


class HashingSink:
    """A write-only file that hashes what passes through it (sha256 and size, without reading the shard back)."""

    def __init__(self, target) -> None:
        self.target, self.digest, self.size = target, hashlib.sha256(), 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += view.nbytes
        self.target.write(view)
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.target.flush()

    def close(self) -> None:
        self.closed = True  # the store's own context closes the target


class ShardWriter:
    """Appends encoded records to the current shard and rolls to a new one past `shard_bytes`.

    Each shard is written under a name of its own attempt (`contract.shard_file_name`), and is announced to
    `on_commit` once complete and stored; the caller makes it part of the cache by recording it."""

    def __init__(
        self,
        cache: Store,
        worker_index: int,
        first_index: int,
        vocab_size: int,
        top_k: int,
        precision: str,
        shard_bytes: int,
        zstd_level: int,
        on_commit: Callable[[ShardEntry], None],
        tail_samples: int = 0,
        target_logprobs: bool = False,
    ) -> None:
        self.cache = cache
        self.worker_index = worker_index
        self.next_index = first_index
        self.attempt = uuid.uuid4().hex[:8]
        self.schema = shard_schema(vocab_size, top_k, precision, tail_samples, target_logprobs)
        self.precision = precision
        self.shard_bytes = shard_bytes
        self.options = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=zstd_level))
        self.on_commit = on_commit
        self.vocab_size = vocab_size
        self.sampled = tail_samples > 0
        self.target_logprobs = target_logprobs
        self._ids = id_dtype(vocab_size)
        self._open: tuple[str, contextlib.ExitStack, HashingSink, pa.ipc.RecordBatchFileWriter] | None = None
        self._stats = {"records": 0, "tokens": 0, "entries": 0}
        self._fidelity = fidelity.empty()
        self._batch_rows: list[int] = []
        self._batch_crcs: list[int] = []
        self._cursor: Cursor | None = None

    def _batch(self, records: list[TeacherRecord]) -> pa.RecordBatch:
        counts, ids, stored, tails, targets = [], [], [], [], []
        sampled: dict[str, list[np.ndarray]] = {"sample_counts": [], "sample_ids": [], "sample_draws": [], "sample_logprobs": []}
        for rec in records:
            samples = rec.samples
            used = rec.topk_ids >= 0  # --top-p leaves id −1, log-prob −inf past what it keeps
            if (not np.isfinite(rec.topk_logprobs[used]).all() or np.isnan(rec.tail_logmass).any() or np.isposinf(rec.tail_logmass).any()
                    or (samples is not None and not np.isfinite(samples.logprobs).all())):
                raise UserError(f"the teacher gave non-finite log-probs (NaN or ±inf) for {rec.sample_id}: nothing of it was "
                                "stored; check the model's weights, or try --dtype float32")
            if self.target_logprobs:  # −inf is a value (a next token the teacher rules out); NaN and +inf are not
                target = rec.target_logprob
                if target is None or target.shape != rec.tail_logmass.shape:
                    raise ValueError(f"{rec.sample_id}: the target log-probs must be {rec.tail_logmass.shape[0]} values")
                if np.isnan(target).any() or np.isposinf(target).any():
                    raise UserError(f"the teacher gave a non-finite log-prob (NaN or +inf) of a next token of {rec.sample_id}: "
                                    "nothing of it was stored; check the model's weights, or try --dtype float32")
                targets.append(target.astype(np.float32, copy=False))  # exact: the head path's float32 value
            n = used.sum(axis=1)
            flat_ids, flat_lps = pack_ragged(rec.topk_ids, rec.topk_logprobs, n)
            counts.append(n)
            ids.append(flat_ids.astype(self._ids))
            stored.append(encode_logprobs(flat_lps, n, self.precision))
            tails.append(np.minimum(rec.tail_logmass, 0.0))  # a mass is at most 1, whatever the float sum gave
            if self.sampled:
                sampled["sample_counts"].append(samples.counts)
                sampled["sample_ids"].append(samples.ids.astype(self._ids))
                sampled["sample_draws"].append(samples.draws)
                sampled["sample_logprobs"].append(encode_logprobs(samples.logprobs, samples.counts, self.precision))
            kept_ids, decoded = unpack_ragged(flat_ids, decode_logprobs(stored[-1], n, self.precision), n, rec.topk_ids.shape[1])
            self._fidelity = fidelity.add(self._fidelity, fidelity.record_sums(
                rec.input_ids, rec.loss_mask, kept_ids, rec.topk_logprobs, decoded, tails[-1], rec.entropy, self.vocab_size))
        fields = {f.name: f.type.value_type for f in self.schema if pa.types.is_list(f.type)}
        columns = [
            pa.array([r.sample_id for r in records], pa.string()),
            list_array([r.input_ids for r in records], fields["input_ids"]),
            list_array([r.loss_mask for r in records], fields["loss_mask"]),
            list_array(counts, fields["topk_counts"]),
            list_array(ids, fields["topk_ids"]),
            list_array(stored, fields["topk_logprobs"]),
            list_array(tails, fields["tail_logmass"]),
            *([list_array(targets, fields["target_logprob"])] if self.target_logprobs else []),
            *(list_array(values, fields[name]) for name, values in sampled.items() if self.sampled),
        ]
        self._stats["records"] += len(records)
        self._stats["tokens"] += sum(len(r.input_ids) for r in records)
        self._stats["entries"] += sum(len(i) for i in ids)
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)

    def write(self, records: list[TeacherRecord], cursor: Cursor) -> None:
        """Append records; `cursor` says where the source stands once they (and rows dropped before them) are in."""
        if records:
            batch = self._batch(records)  # before opening a file: a refused batch leaves nothing behind
            if self._open is None:
                name = shard_file_name(self.worker_index, self.next_index, self.attempt)
                held = contextlib.ExitStack()
                sink = HashingSink(held.enter_context(self.cache.open_output(name)))
                self._open = (name, held, sink, pa.ipc.new_file(pa.PythonFile(sink, mode="w"), self.schema, options=self.options))
            self._open[3].write_batch(batch)
            self._batch_rows.append(len(records))
            self._batch_crcs.append(batch_crc32(batch))
        self._cursor = cursor
        if self._open is not None and self._open[2].tell() >= self.shard_bytes:
            self.commit()

    def commit(self) -> None:
        """Close the current shard, store it and announce it."""
        if self._open is None:
            return
        name, held, sink, writer = self._open
        writer.close()
        held.close()  # the store's commit: the whole object is there once this returns
        entry = ShardEntry(file=name, bytes=sink.size, sha256=sink.digest.hexdigest(), batch_rows=tuple(self._batch_rows),
                           batch_crc32=tuple(self._batch_crcs), fidelity=self._fidelity, cursor=self._cursor, **self._stats)
        self._open = None
        self._stats = {"records": 0, "tokens": 0, "entries": 0}
        self._fidelity = fidelity.empty()
        self._batch_rows, self._batch_crcs = [], []
        self.next_index += 1
        self.on_commit(entry)

    def abort(self) -> None:
        """Give up the shard being written: the store keeps nothing of it (a local temporary is removed, an
        unfinished upload is never completed)."""
        if self._open is not None:
            held = self._open[1]
            self._open = None
            held.__exit__(RuntimeError, RuntimeError("shard abandoned"), None)


class PendingBatch(Protocol):
    """One batch of teacher output, turned into records off the engine's critical path."""

    def materialize(self) -> list[TeacherRecord]: ...


class BackgroundWriter:
    """Runs top-k transfer, encoding, compression and writing in a thread, so the engine keeps computing.

    The queue is bounded, so a slow disk applies back-pressure instead of filling memory.
    """

    def __init__(self, writer: ShardWriter, on_written: Callable[[list[TeacherRecord]], None], depth: int = 4) -> None:
        self.writer = writer
        self.on_written = on_written
        self._queue: queue.Queue[tuple[PendingBatch, Cursor] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="taid-cache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain after a failure so the producer never blocks
            try:
                pending, cursor = item
                records = pending.materialize()
                self.writer.write(records, cursor)
                self.on_written(records)
            except BaseException as exc:  # re-raised in the producer's thread
                self._error = exc

    def put(self, pending: PendingBatch, cursor: Cursor) -> None:
        """Queue a batch; `cursor` says where the source stands once it is written (the writer's resume point)."""
        self._raise_if_failed()
        self._queue.put((pending, cursor))

    def close(self) -> None:
        """Wait for every queued batch, then commit the last shard."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            self.writer.abort()
            raise self._error
        self.writer.commit()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
