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


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor | None  # [B, T] when padded; None when packed (position_ids separate documents)
    position_ids: torch.Tensor | None  # [B, T] when packed: restarting at 0 for each document
    targets: torch.Tensor  # [B, T-1] bool: position j predicts a loss-mask token j+1 of the same document
    labels: torch.Tensor  # [B, T-1]: token j+1
    topk_ids: torch.Tensor  # [B, T-1, k], −1 where unused
    topk_logprobs: torch.Tensor  # [B, T-1, k], −inf where unused
    tokens: int  # real (unpadded) tokens

    def model_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Keyword arguments for the decoder. Packed rows pass position ids and no attention mask, from which
        transformers builds a block-diagonal causal mask (SDPA, eager) or variable-length flash attention; it only
        does so without a KV cache, which training has no use for anyway."""
        if self.position_ids is not None:
            return {"input_ids": self.input_ids.to(device), "position_ids": self.position_ids.to(device), "use_cache": False}
        return {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device), "use_cache": False}


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of the sequences in each row of at most `capacity` tokens (stable on ties)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def collate(records: list[dict[str, Any]], max_length: int, pack: bool = False) -> MicroBatch:
    """Sequences (cut to max_length tokens) laid into rows: one per row, right-padded to the longest, or packed
    several to a row of at most max_length tokens. Either way each position sees only its own document, and the
    selected targets are the same positions, so the loss is the same."""
    lengths = [min(len(r["input_ids"]), max_length) for r in records]
    rows = pack_rows(lengths, max_length) if pack else [[i] for i in range(len(records))]
    width, k = max(sum(lengths[i] for i in row) for row in rows), records[0]["topk_ids"].shape[1]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    real = torch.zeros(len(rows), width, dtype=torch.bool)
    targets = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    topk_ids = torch.full((len(rows), width - 1, k), -1, dtype=torch.long)
    topk_lp = torch.full((len(rows), width - 1, k), -float("inf"))
    for b, row in enumerate(rows):
        at = 0
        for i in row:
            r, n = records[i], lengths[i]
            ids[b, at : at + n] = torch.from_numpy(r["input_ids"][:n])
            positions[b, at : at + n] = torch.arange(n)
            real[b, at : at + n] = True
            # Position at+j predicts token j+1 of the same document; the document's last position predicts nothing.
            targets[b, at : at + n - 1] = torch.from_numpy(r["loss_mask"][1:n])
            topk_ids[b, at : at + n - 1] = torch.from_numpy(r["topk_ids"][: n - 1])
            topk_lp[b, at : at + n - 1] = torch.from_numpy(r["topk_logprobs"][: n - 1])
            at += n
        positions[b, at:] = torch.arange(width - at)  # the padding tail is a document of its own
    attention, position_ids = (None, positions) if pack else (real.long(), None)
    return MicroBatch(ids, attention, position_ids, targets, ids[:, 1:], topk_ids, topk_lp, sum(lengths))


class CacheStream(IterableDataset):
    """This rank's micro-batches, from global item `start` on (endless unless `limit` items are given)."""

    def __init__(self, cache: Path, batch_size: int, rank: int, world: int, max_length: int, seed: int,
                 buffer: int, shuffle: bool, start: int = 0, limit: int | None = None, pack: bool = False) -> None:
        self.cache, self.batch_size, self.rank, self.world = cache, batch_size, rank, world
        self.max_length, self.seed, self.buffer, self.shuffle, self.start, self.limit = max_length, seed, buffer, shuffle, start, limit
        self.pack = pack

    def __iter__(self) -> Iterator[MicroBatch]:
        manifest = load_manifest(self.cache)
        rows = [s["records"] for s in manifest["shards"]]
        reader = RandomAccess(self.cache, manifest)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        refs = itertools.islice(stream(rows, self.seed, self.buffer, self.shuffle), self.start, None if self.limit is None else self.start + self.limit)
        mine = itertools.islice(refs, self.rank, None, self.world)
        for m, chunk in enumerate(iter(lambda: list(itertools.islice(mine, self.batch_size)), [])):
            if m % workers == worker:
                yield collate([reader.get(s, r) for s, r in chunk], self.max_length, self.pack)


def loader(dataset: CacheStream, workers: int) -> DataLoader:
    """Micro-batches in order: the DataLoader takes workers' outputs round-robin, matching m mod W."""
    return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False)
