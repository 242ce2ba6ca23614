"""Streaming a cache into micro-batches for every rank and dataloader worker.

The order is decided on references, not data: each epoch permutes the shards (seeded), walks their rows in
order through a seeded shuffle buffer of (shard, row) pairs, and the resulting stream is endless across
epochs. Optimizer step s takes the global items [s·G, (s+1)·G), G = batch size × grad accumulation × ranks;
item j of a step goes to rank j mod R, then in order into that rank's micro-batches; dataloader worker w
builds the micro-batches m with m mod W = w. So no item is lost or duplicated, the partition does not change
what a step contains, and resuming skips integers instead of reading data.

Several caches of one teacher mix by weight (`CacheMixture`): global item j comes from a source drawn by a
seeded function of (seed, j's block) alone, and a source's k-th item is item k of its own stream, so a resumed
run counts each source's items before `start` without reading, and the partition above is unchanged. One
cache is the mixture of one, in the order above. A mixture may grow (`MixSchedule`: caches joined and new
weights from a resumed step on): the items before the step keep their sources, and each draw is the same
uniform number read against the weights of its item's phase.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import UserError
from ..packing import lay_out
from ..settings import describe_differences
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


Ref = TypeVar("Ref")


def partition(refs: Iterator[Ref], start: int, limit: int | None, rank: int, world: int, batch_size: int,
              worker: int, workers: int) -> Iterator[list[Ref]]:
    """The micro-batches (lists of references) of one rank's loader worker: global items from `start` (`limit`
    of them, or endless), item j to rank j mod `world`, that rank's items in runs of `batch_size`, run m to
    worker m mod `workers`."""
    window = itertools.islice(refs, start, None if limit is None else start + limit)
    mine = itertools.islice(window, rank, None, world)
    for m, chunk in enumerate(iter(lambda: list(itertools.islice(mine, batch_size)), [])):
        if m % workers == worker:
            yield chunk


MIX_BLOCK = 4096  # global items whose sources one seeded draw decides
# In the draws' seed [seed, _MIX_KEY, block] and the sources' [seed, _SOURCE_KEY, i]: nonzero (numpy's seeding
# reads trailing zeros as absent) and far past any epoch, so they share no seed with an epoch's [seed, epoch].
_MIX_KEY, _SOURCE_KEY = 0x6D6978, 0x737263


def source_seed(seed: int, source: int) -> int:
    """The seed of a mixture source's own shuffle. Source 0 keeps the run's (one cache is the mixture of one,
    and a first cache keeps its order when others join it); the others' are derived, so that caches of equal
    shards do not move in lockstep."""
    return seed if source == 0 else int(np.random.SeedSequence([seed, _SOURCE_KEY, source]).generate_state(1, np.uint64)[0])


@dataclass
class MixSchedule:
    """A mixture's weights over the run: phase i's weights (one per source, the sources a prefix of the run's)
    hold for the global items from its start to the next phase's. A run resumed with caches joined or new weights
    grows it at the step it resumes from (`grow`), so every item before that step keeps the source it was drawn
    from: the schedule is part of the run's checkpointed state."""

    phases: list[tuple[int, list[float]]]

    @classmethod
    def of(cls, weights: list[float]) -> MixSchedule:
        """Weights that hold from the first item on."""
        return cls([(0, [float(w) for w in weights])])

    @property
    def weights(self) -> list[float]:
        """The weights that hold now (the last phase's): one per source."""
        return self.phases[-1][1]

    def __post_init__(self) -> None:
        check_phases(self.phases)

    def grow(self, start: int, weights: list[float]) -> None:
        """`weights` from global item `start` on, in place of the phases from `start` on (nothing new when the phase
        that then holds has them)."""
        kept = [p for p in self.phases if p[0] < start]
        weights = [float(w) for w in weights]
        self.phases = check_phases(kept if kept and kept[-1][1] == weights else [*kept, (start, weights)])

    def state_dict(self) -> dict[str, list]:
        return {"phases": [[start, list(weights)] for start, weights in self.phases]}

    def load_state_dict(self, state: dict[str, list]) -> None:
        self.phases = check_phases([(int(start), [float(w) for w in weights]) for start, weights in state["phases"]])


def joins(then: list[str], now: list[str]) -> bool:
    """Whether the caches `now` (by identity) are those of `then` with more added after them: the one way a resumed
    run may change its mixture's caches (train-student's --resume and the Hugging Face Trainer's alike)."""
    return len(now) > len(then) and now[: len(then)] == then


def check_phases(phases: list[tuple[int, list[float]]]) -> list[tuple[int, list[float]]]:
    """`phases` when a run can hold them: from item 0, in increasing order, each with the caches of the one before
    and perhaps more (a resumed run may add caches, never drop one)."""
    starts, widths = [start for start, _ in phases], [len(weights) for _, weights in phases]
    if not starts or starts[0] != 0 or starts != sorted(set(starts)) or widths[0] == 0 or widths != sorted(widths):
        raise UserError(f"a mixture's phases must start at item 0, in increasing order, and never drop a cache: got "
                        f"phases from items {starts} of {widths} caches")
    return phases


def block_sources(schedule: MixSchedule, seed: int, block: int) -> np.ndarray:
    """The source of each global item of `block` (items [block·MIX_BLOCK, (block+1)·MIX_BLOCK)): source i with
    probability weights[i] / sum(weights) under the weights of the item's phase, a function of (seed, block)."""
    draws = np.random.default_rng([seed, _MIX_KEY, block]).random(MIX_BLOCK)
    items = block * MIX_BLOCK + np.arange(MIX_BLOCK)
    sources = np.zeros(MIX_BLOCK, np.int64)
    ends = [start for start, _ in schedule.phases[1:]] + [items[-1] + 1]
    for (start, weights), end in zip(schedule.phases, ends):
        take = (items >= start) & (items < end)
        bounds = np.cumsum(weights) / math.fsum(weights)
        sources[take] = np.minimum(np.searchsorted(bounds, draws[take], side="right"), len(weights) - 1)  # a last bound rounded below 1
    return sources


def source_counts(schedule: MixSchedule, seed: int, stop: int) -> np.ndarray:
    """How many of the global items [0, stop) each source gives: where each source's stream stands at `stop`."""
    counts = np.zeros(len(schedule.weights), np.int64)
    for block in range(math.ceil(stop / MIX_BLOCK)):
        sources = block_sources(schedule, seed, block)[: stop - block * MIX_BLOCK]
        counts += np.bincount(sources, minlength=len(counts))
    return counts


def mixed_stream(streams: list[Iterator[Ref]], schedule: MixSchedule, seed: int) -> Iterator[tuple[int, Ref]]:
    """Endless (source, reference): global item j is the next reference of the source `block_sources` gives it."""
    for block in itertools.count():
        for source in block_sources(schedule, seed, block).tolist():
            yield source, next(streams[source])


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
    # Each sequence's prompt: its tokens before its last run of loss-mask tokens (what on-policy training answers).
    prompts: list[np.ndarray] = field(default_factory=list)
    # A --target-logprobs cache: the teacher's exact log-prob of each position's actual next token, [rows, T-1].
    target_logprob: torch.Tensor | None = None

    def model_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        # No KV cache: training has no use for one, and transformers only builds the packed mask without it.
        return {**{k: v.to(device) for k, v in self.inputs.items()}, "use_cache": False}


def prompt_ids(input_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """The tokens before the sequence's last run of loss-mask tokens: the prompt of its last answer (the chat
    template's assistant header included, as generation's prompt ends)."""
    marked = np.flatnonzero(loss_mask)
    if not len(marked):
        return input_ids
    gaps = np.flatnonzero(np.diff(marked) > 1)
    return input_ids[: marked[gaps[-1] + 1] if len(gaps) else marked[0]]


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
    # Row j of a record's target_logprob is already the log-prob of token j+1 (as its top-k's): no shift.
    target_logprob = (per_prediction([r.target_logprob for r in records], 0.0, np.float32)
                      if records[0].target_logprob is not None else None)
    return MicroBatch(layout.model_inputs(ids), per_prediction([r.loss_mask for r in records], False, np.bool_, shift=1), ids[:, 1:],
                      per_prediction([r.topk_ids for r in records], -1, np.int64),
                      per_prediction([r.topk_logprobs for r in records], -float("inf"), np.float32),
                      per_prediction([r.tail_logmass for r in records], 0.0, np.float32), sum(lengths), samples,
                      [prompt_ids(r.input_ids[:n], r.loss_mask[:n]) for r, n in zip(records, lengths)], target_logprob=target_logprob)


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

    @property
    def shard_rows(self) -> list[int]:
        return [s.records for s in self.manifest.shards]

    @property
    def records(self) -> int:
        return self.manifest.records

    def files(self, seed: int, order: StreamOrder, position: int) -> ShardFiles:
        """The cache's shard files; a remote one's fetched ahead in the order of its stream under `seed` from that
        stream's item `position` on (where it stands at `order.start`), so no shard it will not read is fetched."""
        return ShardFiles(open_store(self.location), self.manifest, shard_sequence(self.shard_rows, seed, order.shuffle, position),
                          self.read_ahead, Path(self.local_dir) if self.local_dir else None, order.buffer)

    def runs(self, order: StreamOrder) -> Iterator[list[CacheRecord]]:
        """This rank's (and this loader worker's) runs of `order.batch_size` records: the mixture of this cache alone."""
        return CacheMixture([self], MixSchedule.of([1.0])).runs(order)


# What the caches of a mixture must share: the teacher and tokenizer (one target distribution, one vocabulary
# the student is checked against), and what shapes a micro-batch or says what its teacher values are (the head's
# width and --top-p cut, the sampled tail, the target log-probs: which teacher type and losses a cache serves).
# The rest may differ: the data and its lineage (the point of a mixture), the dump's seed (the tail's draws),
# its workers, length limit and overlong rule (train-student cuts at its own --max-length), the teacher's path
# (its hash names it), its engine and dtype, the storage precision and format version (each source is decoded
# by its own settings into float32 values of the same distribution, within their rounding), and the input kind
# (an on-policy run must then find prompts in each cache).
MIX_AGREE = ("teacher_hash", "tokenizer_hash", "vocab_size", "tokenizer_size", "top_k", "top_p", "tail_samples", "target_logprobs")


def check_mixable(manifests: list[Manifest], names: list[str], weights: list[float]) -> None:
    """Refuse, in one line, caches that cannot be trained from as one stream, or weights that are not one
    positive finite number per cache; `names` are how the caches are named to the user."""
    if not manifests or len(weights) != len(manifests):
        raise UserError(f"{len(weights)} weights for {len(manifests)} caches: give one weight per cache")
    for name, manifest, weight in zip(names, manifests, weights):
        if not (math.isfinite(weight) and weight > 0):
            raise UserError(f"the weight of {name} is {weight!r}: a cache's weight must be positive and finite")
        if manifest.records == 0:
            raise UserError(f"the cache {name} holds no sequences")
    first = manifests[0].settings
    for name, manifest in zip(names[1:], manifests[1:]):
        diff = describe_differences({f: getattr(first, f) for f in MIX_AGREE}, {f: getattr(manifest.settings, f) for f in MIX_AGREE},
                                    f"in {names[0]}", f"in {name}")
        if diff:
            raise UserError(f"{name} cannot be mixed with {names[0]}: {diff}; mix caches of one teacher, tokenizer and "
                            "--top-k, --top-p, --tail-samples and --target-logprobs")


def weights_or_default(weights: list[float] | tuple[float, ...], manifests: list[Manifest]) -> list[float]:
    """The weights given, or else each cache's share by its sequences: the mixture then reads as one cache of them
    all (in expectation)."""
    return [float(w) for w in weights] if weights else [float(m.records) for m in manifests]


class CacheMixture:
    """Several caches' records as one stream in a `StreamOrder`: global item j from source i with probability
    weights[i] / sum(weights) (`block_sources`; weights, or a `MixSchedule` of them), source i's k-th item being
    item k of its own stream (seeded by `source_seed`), the whole partitioned as one cache's stream is."""

    def __init__(self, sources: list[CacheRows], weights: list[float] | MixSchedule) -> None:
        self.schedule = weights if isinstance(weights, MixSchedule) else MixSchedule.of(weights)
        check_mixable([s.manifest for s in sources], [s.location for s in sources], self.schedule.weights)
        self.sources = sources

    @property
    def manifest(self) -> Manifest:
        """The first cache's manifest: its teacher, tokenizer and head settings are every source's (`MIX_AGREE`)."""
        return self.sources[0].manifest

    @property
    def records(self) -> int:
        return sum(s.records for s in self.sources)

    def runs(self, order: StreamOrder) -> Iterator[list[CacheRecord]]:
        """This rank's (and this loader worker's) runs of `order.batch_size` records."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        seeds = [source_seed(order.seed, i) for i in range(len(self.sources))]
        before = source_counts(self.schedule, order.seed, order.start).tolist()
        with contextlib.ExitStack() as opened:
            readers = [RandomAccess(opened.enter_context(contextlib.closing(source.files(seed, order, position))))
                       for source, seed, position in zip(self.sources, seeds, before)]
            refs = mixed_stream([stream(s.shard_rows, seed, order.buffer, order.shuffle) for s, seed in zip(self.sources, seeds)],
                                self.schedule, order.seed)
            for chunk in partition(refs, order.start, order.limit, order.rank, order.world, order.batch_size, worker, workers):
                yield [readers[source].get(*ref) for source, ref in chunk]


class CacheStream(IterableDataset):
    """This rank's micro-batches of a cache (or a mixture of caches), in `order`."""

    def __init__(self, rows: CacheRows | CacheMixture, order: StreamOrder, max_length: int, pack: bool = False) -> None:
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
