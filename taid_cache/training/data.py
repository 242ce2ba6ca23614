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
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import UserError
from ..packing import lay_out
from ..shards.manifest import load_manifest
from ..shards.reader import RandomAccess


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


def collate(records: list[dict[str, Any]], max_length: int, pack: bool = False) -> MicroBatch:
    """Sequences (cut to max_length tokens) laid into rows: one per row, right-padded to the longest, or packed
    several to a row of at most max_length tokens. Either way each position sees only its own sequence, and the
    selected targets are the same positions, so the loss is the same."""
    lengths = [min(len(r["input_ids"]), max_length) for r in records]
    layout = lay_out(lengths, max_length, pack)
    ids = layout.grid([r["input_ids"][:n].astype(np.int64) for r, n in zip(records, lengths)], 0)

    def per_prediction(key: str, fill: float | int, dtype: type, shift: int = 0) -> torch.Tensor:
        """One value per position j < n−1 of each sequence (position j predicts token j+1 of the same sequence;
        each sequence's last position predicts nothing), on the grid minus its last column. `shift` 1 takes
        the value at token j+1."""
        values = [r[key][shift : n - 1 + shift].astype(dtype) for r, n in zip(records, lengths)]
        return layout.grid(values, fill, drop_last=True)[:, :-1]

    samples = (per_prediction("sample_ids", -1, np.int64), per_prediction("sample_draws", 0, np.int64),
               per_prediction("sample_logprobs", -float("inf"), np.float32)) if "sample_ids" in records[0] else None
    return MicroBatch(layout.model_inputs(ids), per_prediction("loss_mask", False, np.bool_, shift=1), ids[:, 1:],
                      per_prediction("topk_ids", -1, np.int64), per_prediction("topk_logprobs", -float("inf"), np.float32),
                      per_prediction("tail_logmass", 0.0, np.float32), sum(lengths), samples)


class CacheStream(IterableDataset):
    """This rank's micro-batches, from global item `start` on (endless unless `limit` items are given)."""

    def __init__(self, cache: Path, batch_size: int, rank: int, world: int, max_length: int, seed: int,
                 buffer: int, shuffle: bool, start: int = 0, limit: int | None = None, pack: bool = False) -> None:
        self.cache, self.batch_size, self.rank, self.world = cache, batch_size, rank, world
        self.max_length, self.seed, self.buffer, self.shuffle, self.start, self.limit = max_length, seed, buffer, shuffle, start, limit
        self.pack = pack

    def __iter__(self) -> Iterator[MicroBatch | UserError]:
        try:
            yield from self.micro_batches()
        except UserError as exc:
            if get_worker_info() is None:
                raise
            yield exc  # in a loader worker: hand it over as an item (see `micro_batches`)

    def micro_batches(self) -> Iterator[MicroBatch]:
        manifest = load_manifest(self.cache)
        reader = RandomAccess(self.cache, manifest)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        refs = stream([s["records"] for s in manifest["shards"]], self.seed, self.buffer, self.shuffle)
        for chunk in partition(refs, self.start, self.limit, self.rank, self.world, self.batch_size, worker, workers):
            yield collate([reader.get(s, r) for s, r in chunk], self.max_length, self.pack)


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
