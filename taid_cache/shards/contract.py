"""The cache contract: every record a cache is made of, typed, each with its own check when read from JSON.

- `CacheSettings`: what a dump was made with (the teacher, its tokenizer, the head and tail, the data and its
  `Lineage`: the model that produced the token sequences);
- `Cursor`: where a worker stands in its slice of the dataset (the resume point);
- `ShardEntry`: one committed shard file, its checksums and counts;
- `WorkerPart`: one worker's progress (its part file);
- `Manifest`: the finished cache, every shard in reading order;
- `CacheRecord`: one decoded sequence, the read-side twin of `record.TeacherRecord`.

`from_json` checks the format version, every field's type and range, and refuses anything else in one line
naming the file; `to_json` writes what `from_json` reads. Nothing outside this module reads these records by
string key. The settings record and the shard names are built here too, so the format owns its own layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..errors import UserError
from .codec import LOGPROB_STEP, PRECISIONS, id_dtype

# 2: per-batch crc32 in the manifest. 3: the exact tail mass of every position. 4: the settings' lineage
# (a cache of format 3 reads as one whose sequences came from its dataset). 5: the settings' `target_logprobs`
# (--target-logprobs: a `target_logprob` column; a cache of format 3 or 4 reads as one without it). A release
# reading format 4 would drop that setting unseen (then refuse every such shard in `verify`, and add shards
# without the column to it on a resume), so format 5 is refused there in one line instead.
FORMAT_VERSION = 5
READABLE_VERSIONS = (3, 4, 5)
# The shard files' own layout (their Arrow schema's metadata), unchanged since format 3: the optional columns
# (the sampled tail, the target log-prob) are flagged by their own metadata keys.
SHARD_LAYOUT_VERSION = 3
# The first format whose settings record whether the cache holds the target log-probs.
TARGET_LOGPROBS_SINCE = 5
LINEAGE_KINDS = ("dataset", "student")


def _fail(where: str, what: str) -> UserError:
    return UserError(f"{where} is corrupt: {what}")


def _decode(hint: Any, value: Any, where: str, name: str) -> Any:
    """A JSON value as the declared type, or a one-line error naming the field (an int is never a bool)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _decode(next(a for a in args if a is not type(None)), value, where, name)
    if dataclasses.is_dataclass(hint):
        return hint.from_json(value, f"{where} ({name})")
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise _fail(where, f"{name!r} is not a list")
        items = [_decode(args[0], v, where, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _fail(where, f"{name!r} is not a mapping")
        return {k: _decode(args[1], v, where, f"{name}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, hint) and not (isinstance(value, bool) and hint is not bool):
        return value
    raise _fail(where, f"{name!r} is {_shown(value)}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _at_least(low: float) -> dict[str, float]:
    return {"min": low}


class JsonRecord:
    """from_json / to_json for a dataclass whose fields are JSON values, lists, mappings or such records."""

    @classmethod
    def from_json(cls, value: Any, where: str) -> Any:
        if not isinstance(value, dict):
            raise _fail(where, f"not a taid-cache {cls.__name__} record")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.metadata.get("derived"):
                continue
            if f.name not in value:
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                    continue
                raise _fail(where, f"it has no {f.name!r}")
            decoded = _decode(hints[f.name], value[f.name], where, f.name)
            low = f.metadata.get("min")
            if low is not None and decoded is not None and not decoded >= low:
                raise _fail(where, f"{f.name!r} is {_shown(decoded)}, below {low:g}")
            choices = f.metadata.get("choices")
            if choices and decoded not in choices:
                raise _fail(where, f"{f.name!r} is {_shown(decoded)}, not one of {', '.join(map(str, choices))}")
            kwargs[f.name] = decoded
        record = cls(**kwargs)
        record.check(where)
        return record

    def check(self, where: str) -> None:
        """Constraints between fields (a subclass adds its own)."""

    def to_json(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            if isinstance(v, JsonRecord):
                return v.to_json()
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self) if not f.metadata.get("derived")}


@dataclass(frozen=True)
class Lineage(JsonRecord):
    """The model whose outputs the cache's token sequences are: the dataset itself (`dataset`, its names and
    content fingerprint), or a student checkpoint that generated them (`student`, its path and model hash)."""

    kind: str = field(metadata={"choices": LINEAGE_KINDS})
    name: str
    fingerprint: str


@dataclass(frozen=True)
class CacheSettings(JsonRecord):
    """What a dump was made with; a resumed or extended dump must agree with it field for field."""

    format_version: int
    teacher: str
    teacher_hash: str
    tokenizer_hash: str
    vocab_size: int = field(metadata=_at_least(1))
    tokenizer_size: int = field(metadata=_at_least(1))
    top_k: int = field(metadata=_at_least(0))
    top_p: Optional[float]
    tail_samples: int = field(metadata=_at_least(0))
    seed: int
    precision: str = field(metadata={"choices": PRECISIONS})
    logprob_step: Optional[float]
    id_dtype: str
    dataset: list[str]
    split: str
    dataset_fingerprint: str
    dataset_rows: int = field(metadata=_at_least(0))
    input_kind: str
    max_length: int = field(metadata=_at_least(2))
    overlong: str
    engine: str
    dtype: str
    engine_args: dict[str, Any]
    num_workers: int = field(metadata=_at_least(1))
    lineage: Lineage
    # The teacher's exact log-prob of each position's actual next token (a `target_logprob` column); a cache of
    # format 3 or 4 has none (the key is absent there, and stays absent in its to_json).
    target_logprobs: bool = False

    @classmethod
    def from_json(cls, value: Any, where: str) -> CacheSettings:
        if isinstance(value, dict) and value.get("format_version") == 3 and "lineage" not in value:
            # Format 3 had no lineage: its sequences were its dataset's.
            value = {**value, "lineage": dataset_lineage(value.get("dataset"), value.get("dataset_fingerprint")).to_json()}
        if (isinstance(value, dict) and isinstance(value.get("format_version"), int)
                and value["format_version"] >= TARGET_LOGPROBS_SINCE and "target_logprobs" not in value):
            raise _fail(where, "it has no 'target_logprobs'")
        return super().from_json(value, where)

    def check(self, where: str) -> None:
        if self.format_version not in READABLE_VERSIONS:
            raise UserError(format_refusal(where, self.format_version))
        if self.target_logprobs and self.format_version < TARGET_LOGPROBS_SINCE:
            raise _fail(where, f"format {self.format_version} has no target log-probs, yet 'target_logprobs' is true")
        if self.top_k > self.vocab_size:
            raise _fail(where, f"top_k {self.top_k} is above the vocabulary of {self.vocab_size}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise _fail(where, f"top_p is {self.top_p}")

    @property
    def sampled(self) -> bool:
        """A head + sampled tail cache (`--tail-samples`)."""
        return self.tail_samples > 0

    def to_json(self) -> dict[str, Any]:
        values = super().to_json()
        if self.format_version < TARGET_LOGPROBS_SINCE:  # what a format 3 or 4 file holds, and so its identity
            del values["target_logprobs"]
        return values


def json_identity(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def dataset_lineage(dataset: Any, fingerprint: Any) -> Lineage:
    names = ",".join(dataset) if isinstance(dataset, list) and all(isinstance(d, str) for d in dataset) else str(dataset)
    return Lineage("dataset", names, fingerprint if isinstance(fingerprint, str) else "")


def build_settings(*, teacher: str, teacher_hash: str, tokenizer_hash: str, vocab_size: int, tokenizer_size: int, top_k: int,
                   top_p: float | None, tail_samples: int, seed: int, precision: str, dataset: list[str], split: str,
                   dataset_fingerprint: str, dataset_rows: int, input_kind: str, max_length: int, overlong: str, engine: str,
                   dtype: str, engine_args: dict[str, Any], num_workers: int, lineage: Lineage | None = None,
                   target_logprobs: bool = False) -> CacheSettings:
    """The settings record of a new dump: the derived fields (format version, the id type, the log-prob grid) and,
    unless a generation stage says otherwise, the dataset as the sequences' lineage."""
    return CacheSettings(
        format_version=FORMAT_VERSION, teacher=teacher, teacher_hash=teacher_hash, tokenizer_hash=tokenizer_hash,
        vocab_size=vocab_size, tokenizer_size=tokenizer_size, top_k=top_k, top_p=top_p, tail_samples=tail_samples, seed=seed,
        precision=precision, logprob_step=LOGPROB_STEP if precision == "compact" else None, id_dtype=id_dtype(vocab_size).name,
        dataset=list(dataset), split=split, dataset_fingerprint=dataset_fingerprint, dataset_rows=dataset_rows,
        input_kind=input_kind, max_length=max_length, overlong=overlong, engine=engine, dtype=dtype,
        engine_args=dict(engine_args), num_workers=num_workers,
        lineage=lineage or dataset_lineage(list(dataset), dataset_fingerprint), target_logprobs=target_logprobs)


def format_refusal(where: str, version: Any) -> str:
    readable = ", ".join(str(v) for v in READABLE_VERSIONS[:-1]) + f" and {READABLE_VERSIONS[-1]}"
    return (f"{where} is in cache format {_shown(version)}; this taid-cache reads formats {readable}: "
            "dump the teacher again with this version")


@dataclass(frozen=True)
class Cursor(JsonRecord):
    """Where a worker stands in its slice: the next source row, and the rows dropped and truncated so far."""

    next_row: int = field(metadata=_at_least(0))
    dropped: int = field(default=0, metadata=_at_least(0))
    truncated: int = field(default=0, metadata=_at_least(0))

    def after(self, row: int, change: str | None) -> Cursor:
        """The cursor once source row `row` is consumed; `change`: "dropped" or "truncated" when the row was."""
        return Cursor(row + 1, self.dropped + (change == "dropped"), self.truncated + (change == "truncated"))


@dataclass(frozen=True)
class ShardEntry(JsonRecord):
    """One committed shard file of a worker."""

    file: str
    records: int = field(metadata=_at_least(0))
    tokens: int = field(metadata=_at_least(0))
    entries: int = field(metadata=_at_least(0))
    bytes: int = field(metadata=_at_least(0))
    sha256: str
    batch_rows: tuple[int, ...]  # records per Arrow record batch: random access without decompressing the shard
    batch_crc32: tuple[int, ...]  # per record batch, over its decoded contents: checked by every reader
    fidelity: dict[str, float]  # sums over the shard's loss positions (shards/fidelity.py)
    cursor: Cursor  # the worker's position once this shard is in: where a resumed run starts

    def check(self, where: str) -> None:
        if len(self.batch_rows) != len(self.batch_crc32):
            raise _fail(where, "its batch_rows and batch_crc32 are not lists of as many integers")
        if sum(self.batch_rows) != self.records:
            raise _fail(where, f"its record batches hold {sum(self.batch_rows)} records, not {self.records}")


@dataclass
class WorkerPart(JsonRecord):
    """One worker's share of a dump (its part file): its slice, its committed shards and where it stands."""

    settings: CacheSettings
    worker_index: int = field(metadata=_at_least(0))
    num_workers: int = field(metadata=_at_least(1))
    row_start: int = field(metadata=_at_least(0))
    row_end: int = field(metadata=_at_least(0))
    cursor: Cursor
    shards: list[ShardEntry] = field(default_factory=list)
    done: bool = False

    def check(self, where: str) -> None:
        if self.worker_index >= self.num_workers or not self.row_start <= self.cursor.next_row <= self.row_end:
            raise _fail(where, f"worker {self.worker_index} of {self.num_workers} stands at row {self.cursor.next_row} "
                        f"outside its slice [{self.row_start}, {self.row_end})")

    @property
    def records(self) -> int:
        return sum(s.records for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)


@dataclass(frozen=True)
class Manifest(JsonRecord):
    """A finished cache: its settings, totals, fidelity report and every shard in reading order."""

    format_version: int
    settings: CacheSettings
    num_workers: int = field(metadata=_at_least(1))
    records: int = field(metadata=_at_least(0))
    tokens: int = field(metadata=_at_least(0))
    entries: int = field(metadata=_at_least(0))
    bytes: int = field(metadata=_at_least(0))
    dropped: int = field(metadata=_at_least(0))
    truncated: int = field(metadata=_at_least(0))
    fidelity: dict[str, Optional[float]]
    shards: tuple[ShardEntry, ...]
    # The hash of the JSON as stored (not a field of it): a cache of an older format keeps its identity.
    stored_identity: str = field(default="", compare=False, repr=False, metadata={"derived": True})

    @classmethod
    def from_json(cls, value: Any, where: str) -> Manifest:
        if not isinstance(value, dict) or "settings" not in value or "shards" not in value:
            raise _fail(where, "not a taid-cache manifest")
        if value.get("format_version") not in READABLE_VERSIONS:
            raise UserError(format_refusal(where, value.get("format_version")))
        return dataclasses.replace(super().from_json(value, where), stored_identity=json_identity(value))

    def check(self, where: str) -> None:
        totals = {name: sum(getattr(s, name) for s in self.shards) for name in ("records", "tokens", "entries", "bytes")}
        for name, total in totals.items():
            if getattr(self, name) != total:
                raise _fail(where, f"{name} is {getattr(self, name)}, its shards add up to {total}")

    @property
    def identity(self) -> str:
        """What the cache holds, named: the hash of its manifest, which lists every shard's sha256, so equal
        identities mean equal data (wherever the folder now lives). As stored, for a manifest that was read."""
        return self.stored_identity or json_identity(self.to_json())

    def batch_starts(self) -> list[np.ndarray]:
        """Per shard, the first row of each record batch (and one past the last)."""
        return [np.cumsum([0, *s.batch_rows]) for s in self.shards]


@dataclass(frozen=True)
class CacheRecord:
    """One decoded sequence. Row j of the per-position arrays is the teacher's distribution of token j+1.

    `topk_ids` [T-1, k] int64 and `topk_logprobs` [T-1, k] float32 hold the stored head (id -1, log-prob -inf
    past what --top-p kept); `tail_logmass` [T-1] float32 is the log of the teacher's mass off them. A
    `--tail-samples N` cache adds `sample_ids`, `sample_draws`, `sample_logprobs` [T-1, N]: each position's
    distinct draws off the head, how often each was drawn (summing to N), and its log-prob (-1, 0, -inf unused);
    they are None for a top-k cache. A `--target-logprobs` cache adds `target_logprob` [T-1] float32: the
    teacher's exact log-prob of the actual next token `input_ids[j+1]` (None without the option)."""

    sample_id: str
    input_ids: np.ndarray  # [T] int64
    loss_mask: np.ndarray  # [T] bool: True where token j is a training target
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail_logmass: np.ndarray
    sample_ids: np.ndarray | None = None
    sample_draws: np.ndarray | None = None
    sample_logprobs: np.ndarray | None = None
    target_logprob: np.ndarray | None = None

    @property
    def sampled(self) -> bool:
        return self.sample_ids is not None

    def as_dict(self) -> dict[str, Any]:
        """The record as a mapping of its present fields (what `datasets` and other dict-based tools take)."""
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}

    @classmethod
    def empty(cls, settings: CacheSettings) -> CacheRecord:
        """A two-token sequence with no target: a forward that contributes nothing (ranks pad with it)."""
        return cls.unscored(settings, np.zeros(2, np.int64), np.zeros(2, bool))

    @classmethod
    def unscored(cls, settings: CacheSettings, input_ids: np.ndarray, loss_mask: np.ndarray, sample_id: str = "") -> CacheRecord:
        """A sequence without teacher values, shaped like the cache's records (a teacher run online scores it)."""
        positions = len(input_ids) - 1

        def unused(width: int) -> tuple[np.ndarray, np.ndarray]:
            return np.full((positions, width), -1, np.int64), np.full((positions, width), -np.inf, np.float32)

        head_ids, head_lps = unused(settings.top_k)
        drawn_ids, drawn_lps = unused(settings.tail_samples)
        sampled = settings.sampled
        return cls(sample_id, input_ids, loss_mask, head_ids, head_lps, np.zeros(positions, np.float32),
                   drawn_ids if sampled else None, np.zeros_like(drawn_ids) if sampled else None, drawn_lps if sampled else None,
                   np.zeros(positions, np.float32) if settings.target_logprobs else None)


def worker_stem(worker_index: int) -> str:
    """The prefix of every file a worker writes into the cache folder (its shards and their temporaries)."""
    return f"shard-w{worker_index:05d}"


def shard_file_name(worker_index: int, index: int, attempt: str) -> str:
    """A shard's name: its worker, its number in the worker's order, and the attempt that wrote it, so a shard
    a killed attempt left half-uploaded is never the name a later attempt commits."""
    return f"{worker_stem(worker_index)}-{index:05d}-{attempt}.arrow"


def part_file_name(worker_index: int, num_workers: int) -> str:
    return f"worker-{worker_index:05d}-of-{num_workers:05d}.json"


def lease_name(worker_index: int) -> str:
    """The lease a worker holds for its whole run (any worker count): held means that worker is alive."""
    return f"worker-{worker_index:05d}.lock"
