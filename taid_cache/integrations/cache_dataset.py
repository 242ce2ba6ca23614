"""A finished cache as a `torch` iterable of sequence records, in the order train-student reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from torch.utils.data import IterableDataset, get_worker_info

from ..shards.manifest import load_manifest
from ..shards.reader import RandomAccess
from ..training.data import partition, stream


class CacheDataset(IterableDataset):
    """The records of a cache (dicts of numpy arrays, as `read_cache` gives them), shards and rows shuffled by
    `seed` through a buffer of `shuffle_buffer` sequences, epoch after epoch: endless unless `limit` items.

    - `rank`, `world`: global item j goes to rank j mod world, train-student's partition. Under a Hugging Face
      Trainer keep 0 and 1: its loader shards the one stream over the processes itself, and a step then holds
      the same sequences as train-student's step of the same global batch.
    - `batch_size`: the loader's batch size, so that with loader workers each worker yields whole runs of
      consecutive items (run m to worker m mod workers) and batches are train-student's micro-batches.
    - `start`: global items to skip, as a resumed run does (integers, no data read).
    """

    def __init__(self, cache: str | Path, seed: int = 0, shuffle_buffer: int = 1024, shuffle: bool = True, rank: int = 0,
                 world: int = 1, batch_size: int = 1, start: int = 0, limit: int | None = None) -> None:
        self.cache = Path(cache)
        self.manifest = load_manifest(self.cache)  # a one-line error now, not in a loader worker
        self.seed, self.shuffle_buffer, self.shuffle = seed, shuffle_buffer, shuffle
        self.rank, self.world, self.batch_size, self.start, self.limit = rank, world, batch_size, start, limit

    @property
    def settings(self) -> dict[str, Any]:
        """The cache's dump settings (vocabulary, top-k, tail samples, the teacher's identity)."""
        return self.manifest["settings"]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader = RandomAccess(self.cache, self.manifest)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        refs = stream([s["records"] for s in self.manifest["shards"]], self.seed, self.shuffle_buffer, self.shuffle)
        for run in partition(refs, self.start, self.limit, self.rank, self.world, self.batch_size, worker, workers):
            for shard, row in run:
                yield reader.get(shard, row)

    def as_hf_dataset(self):
        """The same stream as a `datasets.IterableDataset` (lists of numbers per column)."""
        import datasets

        return datasets.IterableDataset.from_generator(lambda: iter(self))
