"""A finished cache as a `torch` iterable of sequence records, in the order train-student reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from torch.utils.data import IterableDataset

from ..errors import UserError
from ..shards.contract import CacheRecord, CacheSettings, Manifest
from ..training.data import CacheMixture, CacheRows, MixSchedule, StreamOrder, weights_or_default


class CacheDataset(IterableDataset):
    """The records of a cache (`CacheRecord`s, as `read_cache` gives them; a folder or a URI such as
    s3://bucket/cache), shards and rows shuffled by `seed` through a buffer of `shuffle_buffer` sequences, epoch
    after epoch: endless unless `limit` items.

    - `rank`, `world`: global item j goes to rank j mod world, train-student's partition. Under a Hugging Face
      Trainer keep 0 and 1: its loader shards the one stream over the processes itself, and a step then holds
      the same sequences as train-student's step of the same global batch.
    - `batch_size`: the loader's batch size, so that with loader workers each worker yields whole runs of
      consecutive items (run m to worker m mod workers) and batches are train-student's micro-batches.
    - `start`: global items to skip, as a resumed run does (integers, no data read).
    - `read_ahead`, `local_dir`: for a remote cache, shards fetched ahead of need, and a local folder to keep them.
    - `mix`, `mix_weights`: more caches of the same teacher, tokenizer and head, mixed with `cache` as
      train-student's --mix and --mix-weights mix them (weights for `cache` then each of `mix`; by default by
      their sequences).
    """

    def __init__(self, cache: str | Path, seed: int = 0, shuffle_buffer: int = 1024, shuffle: bool = True, rank: int = 0,
                 world: int = 1, batch_size: int = 1, start: int = 0, limit: int | None = None, read_ahead: int = 2,
                 local_dir: str | None = None, mix: tuple[str | Path, ...] | list[str | Path] = (),
                 mix_weights: tuple[float, ...] | list[float] = ()) -> None:
        if mix_weights and not mix:
            raise UserError("mix_weights weighs the cache against the mix caches, and no mix is given")
        sources = [CacheRows(str(location), read_ahead, local_dir) for location in (cache, *mix)]
        # The weights over the run (a resumed Trainer grows them when caches joined: `schedule`); one cache's is its own.
        self.schedule = MixSchedule.of(weights_or_default(mix_weights, [s.manifest for s in sources]))
        self.rows: CacheRows | CacheMixture = CacheMixture(sources, self.schedule) if mix else sources[0]
        self.order = StreamOrder(seed, shuffle_buffer, shuffle, start, limit, rank, world, batch_size)

    @property
    def manifest(self) -> Manifest:
        return self.rows.manifest

    @property
    def identities(self) -> list[str]:
        """The identities of the cache and of each mixed cache, in order."""
        sources = self.rows.sources if isinstance(self.rows, CacheMixture) else [self.rows]
        return [s.manifest.identity for s in sources]

    @property
    def records(self) -> int:
        """The sequences of the cache (of all the mixed caches)."""
        return self.rows.records

    @property
    def settings(self) -> CacheSettings:
        """The cache's dump settings (vocabulary, top-k, tail samples, the teacher's identity)."""
        return self.rows.manifest.settings

    def __iter__(self) -> Iterator[CacheRecord]:
        for run in self.rows.runs(self.order):
            yield from run

    def as_hf_dataset(self):
        """The same stream as a `datasets.IterableDataset` (lists of numbers per column)."""
        import datasets

        return datasets.IterableDataset.from_generator(lambda: (record.as_dict() for record in self))
