"""Streaming a cache into micro-batches for every rank and dataloader worker.

The order is decided on references, not data: each epoch permutes the shards (seeded), walks their rows in
order through a seeded shuffle buffer of (shard, row) pairs, and the resulting stream is endless across
epochs. Optimizer step s takes the global items [s·G, (s+1)·G), G = batch size × grad accumulation × ranks;
item j of a step goes to rank j mod R, then in order into that rank's micro-batches; dataloader worker w
builds the micro-batches m with m mod W = w. So no item is lost or duplicated, the partition does not change
what a step contains, and resuming skips integers instead of reading data.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import UserError
from ..packing import lay_out
from ..shards.contract import CacheRecord, Manifest
from ..shards.manifest import load_manifest
from ..shards.reader import RandomAccess, ShardFiles
from ..storage import open_store


def epoch_order(shard_rows: list[int], seed: int, epoch: int, buffer: int) -> Iterator[tuple[int, int]]:
    """One epoch of (shard, row) references: shards permuted, rows through a shuffle buffer."""
    rng = np.random.default_rng([seed, epoch])
    pool: list[tuple[int, int]] = []
    for shard in rng.permutation(len(shard_rows)):
        for row in range(shard_rows[shard]):
            if len(pool) < buffer:
                pool.append((int(shard), row))
                continue
            j = int(rng.integers(len(pool)))
            yield pool[j]
            pool[j] = (int(shard), row)
    rng.shuffle(pool)
    yield from pool


def shard_sequence(shard_rows: list[int], seed: int, shuffle: bool, start: int = 0) -> Iterator[int]:
    """Endless shard numbers in the order the epochs first reach them (`epoch_order`'s permutation), from the
    shard that global item `start` falls in: what a remote cache's reader fetches ahead."""
    total = sum(shard_rows)
    first_epoch, offset = divmod(start, total) if total else (0, 0)
    for epoch in itertools.count(first_epoch):
        order = [int(s) for s in np.random.default_rng([seed, epoch]).permutation(len(shard_rows))] if shuffle else range(len(shard_rows))
        for s in order:
            if offset >= shard_rows[s]:  # wholly before `start` (in the resumed epoch only)
                offset -= shard_rows[s]
                continue
            offset = 0
            yield s


def stream(shard_rows: list[int], seed: int, buffer: int, shuffle: bool) -> Iterator[tuple[int, int]]:
    """Endless references; without shuffle, the cache's own order, epoch after epoch."""
    for epoch in itertools.count():
        if shuffle:
            yield from epoch_order(shard_rows, seed, epoch, buffer)
        else:
            yield from ((s, r) for s, n in enumerate(shard_rows) for r in range(n))


def partition(refs: Iterator[tuple[int, int]], start: int, limit: int | None, rank: int, world: int, batch_size: int,
              worker: int, workers: int) -> Iterator[list[tuple[int, int]]]:
    """The micro-batches (lists of references) of one rank's loader worker: global items from `start` (`limit`
    of them, or endless), item j to rank j mod `world`, that rank's items in runs of `batch_size`, run m to
    worker m mod `workers`."""
    window = itertools.islice(refs, start, None if limit is None else start + limit)
    mine = itertools.islice(window, rank, None, world)
    for m, chunk in enumerate(iter(lambda: list(itertools.islice(mine, batch_size)), [])):
        if m % workers == worker:
            yield chunk


@dataclass
class MicroBatch:
    inputs: dict[str, torch.Tensor]  # the decoder's keyword arguments (`RowLayout.model_inputs`), [rows, T] each
    targets: torch.Tensor  # [rows, T-1] bool: position j predicts a loss-mask token j+1 of the same sequence
    labels: torch.Tensor  # [rows, T-1]: token j+1
    topk_ids: torch.Tensor  # [rows, T-1, k], −1 where unused
    topk_logprobs: torch.Tensor  # [rows, T-1, k], −inf where unused
    tail_logmass: torch.Tensor  # [rows, T-1]: log of the teacher's mass off the stored entries (0 where unused)
    tokens: int  # real (unpadded) tokens
    # A --tail-samples cache: sample_ids, sample_draws, sample_logprobs, [rows, T-1, N] each (reader.py).
    samples: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def model_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        # No KV cache: training has no use for one, and transformers only builds the packed mask without it.
        return {**{k: v.to(device) for k, v in self.inputs.items()}, "use_cache": False}


def collate(records: list[CacheRecord], max_length: int, pack: bool = False) -> MicroBatch:
    """Sequences (cut to max_length tokens) laid into rows: one per row, right-padded to the longest, or packed
    several to a row of at most max_length tokens. Either way each position sees only its own sequence, and the
    selected targets are the same positions, so the loss is the same."""
    lengths = [min(len(r.input_ids), max_length) for r in records]
    layout = lay_out(lengths, max_length, pack)
    ids = layout.grid([r.input_ids[:n].astype(np.int64) for r, n in zip(records, lengths)], 0)

    def per_prediction(values: list[np.ndarray], fill: float | int, dtype: type, shift: int = 0) -> torch.Tensor:
        """One value per position j < n−1 of each sequence (position j predicts token j+1 of the same sequence;
        each sequence's last position predicts nothing), on the grid minus its last column. `shift` 1 takes
        the value at token j+1."""
        cut = [v[shift : n - 1 + shift].astype(dtype) for v, n in zip(values, lengths)]
        return layout.grid(cut, fill, drop_last=True)[:, :-1]

    samples = (per_prediction([r.sample_ids for r in records], -1, np.int64),
               per_prediction([r.sample_draws for r in records], 0, np.int64),
               per_prediction([r.sample_logprobs for r in records], -float("inf"), np.float32)) if records[0].sampled else None
    return MicroBatch(layout.model_inputs(ids), per_prediction([r.loss_mask for r in records], False, np.bool_, shift=1), ids[:, 1:],
                      per_prediction([r.topk_ids for r in records], -1, np.int64),
                      per_prediction([r.topk_logprobs for r in records], -float("inf"), np.float32),
                      per_prediction([r.tail_logmass for r in records], 0.0, np.float32), sum(lengths), samples)


@dataclass(frozen=True)
class StreamOrder:
    """Which records of a cache a reader takes, in which order: the seeded shuffle, the global items from `start`
    (`limit` of them, or endless), and this rank's share of them in runs of `batch_size`."""

    seed: int = 0
    buffer: int = 1024
    shuffle: bool = True
    start: int = 0
    limit: int | None = None
    rank: int = 0
    world: int = 1
    batch_size: int = 1


class CacheRows:
    """One cache's records in a `StreamOrder`: the one reading path of train-student's stream, its held-out
    evaluation and the Hugging Face `CacheDataset`. A remote cache's shards are fetched `read_ahead` shards ahead
    of need (and kept in `local_dir` when given)."""

    def __init__(self, location: str, read_ahead: int = 2, local_dir: str | None = None, manifest: Manifest | None = None) -> None:
        self.location, self.read_ahead, self.local_dir = location, read_ahead, local_dir
        self.manifest = manifest or load_manifest(location)  # a one-line error now, not in a loader worker

    def runs(self, order: StreamOrder) -> Iterator[list[CacheRecord]]:
        """This rank's (and this loader worker's) runs of `order.batch_size` records."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        shards = self.manifest.shards
        rows = [s.records for s in shards]
        files = ShardFiles(open_store(self.location), self.manifest, shard_sequence(rows, order.seed, order.shuffle, order.start),
                           self.read_ahead, Path(self.local_dir) if self.local_dir else None, order.buffer)
        reader = RandomAccess(files)
        refs = stream(rows, order.seed, order.buffer, order.shuffle)
        try:
            for chunk in partition(refs, order.start, order.limit, order.rank, order.world, order.batch_size, worker, workers):
                yield [reader.get(s, r) for s, r in chunk]
        finally:
            files.close()


class CacheStream(IterableDataset):
    """This rank's micro-batches of a cache, in `order`."""

    def __init__(self, rows: CacheRows, order: StreamOrder, max_length: int, pack: bool = False) -> None:
        self.rows, self.order, self.max_length, self.pack = rows, order, max_length, pack

    def __iter__(self) -> Iterator[MicroBatch | UserError]:
        try:
            for run in self.rows.runs(self.order):
                yield collate(run, self.max_length, self.pack)
        except UserError as exc:
            if get_worker_info() is None:
                raise
            yield exc  # in a loader worker: hand it over as an item (see `micro_batches`)


def micro_batches(dataset: CacheStream, workers: int) -> Iterator[MicroBatch]:
    """The dataset's micro-batches in order, through `workers` loader processes (0: in this one). The loader
    takes workers' outputs round-robin, matching m mod W.

    Workers start as fresh interpreters ("spawn"), not forks: by the time the loader starts, the trainer's
    process runs threads (the process group's, Arrow's and torch's pools, progress monitors), and a fork taken
    while one of them holds a lock can leave the worker waiting on it forever (seen in CI: a worker that never
    sent its first batch). The stream is built once per run, so the start-up is paid once.
    A worker's user error (a shard damaged since the run's start) arrives as an item and is raised here as
    itself: raised inside the worker, the loader would re-raise it with the worker's traceback as its message."""
    for item in DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False,
                           multiprocessing_context="spawn" if workers > 0 else None):
        if isinstance(item, UserError):
            raise item
        yield item
