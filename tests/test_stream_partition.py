"""The training stream's order and partition, on references alone (no cache, no model): every item exactly
once per epoch whatever the ranks, loader workers and micro-batch size, and a resumed stream equal to the
uninterrupted one (module docstring of taid_cache/training/data.py)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from taid_cache.training.data import epoch_order, partition, stream

SHARDS = [7, 1, 12, 5, 9]  # rows per shard: uneven, one shard of a single row
ITEMS = sum(SHARDS)
EVERY = Counter((s, r) for s, n in enumerate(SHARDS) for r in range(n))


@pytest.mark.parametrize("buffer", [1, 4, 1000])
def test_each_epoch_holds_every_row_once_and_epochs_differ(buffer: int) -> None:
    epochs = [list(epoch_order(SHARDS, seed=3, epoch=e, buffer=buffer)) for e in range(3)]
    for order in epochs:
        assert Counter(order) == EVERY
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] == list(epoch_order(SHARDS, seed=3, epoch=0, buffer=buffer))  # seeded


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("world,workers,batch", [(1, 1, 4), (2, 1, 3), (2, 3, 2), (3, 2, 5), (4, 4, 1)])
def test_ranks_and_workers_split_the_stream_without_loss_or_repeat(world: int, workers: int, batch: int, shuffle: bool) -> None:
    epochs = 3
    total = epochs * ITEMS
    got: list[tuple[int, int]] = []
    per_rank: dict[int, list[tuple[int, int]]] = {}
    for rank in range(world):
        runs = {w: list(partition(stream(SHARDS, 5, 6, shuffle), 0, total, rank, world, batch, w, workers)) for w in range(workers)}
        # The loader takes the workers' runs round-robin (m mod W): rebuild the rank's own order.
        ordered = [run for group in itertools.zip_longest(*runs.values()) for run in group if run is not None]
        assert all(len(run) == batch for run in ordered[:-1])  # only a rank's last run may be short
        per_rank[rank] = [ref for run in ordered for ref in run]
        got += per_rank[rank]
    assert Counter(got) == Counter({ref: epochs * n for ref, n in EVERY.items()})
    # Item j of the global stream is on rank j mod world, in order.
    global_items = list(itertools.islice(stream(SHARDS, 5, 6, shuffle), total))
    for rank in range(world):
        assert per_rank[rank] == global_items[rank::world]


def test_resuming_at_a_step_continues_the_same_stream() -> None:
    world, batch, steps_done = 2, 3, 7
    items_per_step = world * batch
    whole = {rank: list(partition(stream(SHARDS, 1, 8, True), 0, 20 * items_per_step, rank, world, batch, 0, 1)) for rank in range(world)}
    for rank in range(world):
        resumed = list(partition(stream(SHARDS, 1, 8, True), steps_done * items_per_step, 13 * items_per_step, rank, world, batch, 0, 1))
        assert resumed == whole[rank][steps_done:]
