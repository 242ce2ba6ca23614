"""Checksums that let every reader trust what it decodes: sha256 per shard file (checked by `verify` and once at
the start of a run) and crc32 per record batch, over the decoded column contents (checked by every reader
before it decodes a batch, so a byte flipped after the start of a run, or a batch from another cache, is
caught where it is read)."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import UserError


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def column_buffers(column: pa.Array) -> list[np.ndarray]:
    """What a column holds, independent of how Arrow laid it out: list offsets from 0, then the used values."""
    if isinstance(column, pa.ListArray):
        offsets, data = column.offsets.to_numpy(), column.values.to_numpy(zero_copy_only=False)
        return [offsets - offsets[0], data[offsets[0] : offsets[-1]]]
    # Strings (sample ids): small, so their Python form is cheap enough.
    return [np.frombuffer("\0".join(column.to_pylist()).encode(), dtype=np.uint8)]


def batch_crc32(batch: pa.RecordBatch) -> int:
    crc = 0
    for column in batch.columns:
        for values in column_buffers(column):
            crc = zlib.crc32(np.ascontiguousarray(values).view(np.uint8), crc)
    return crc


def check_batch(batch: pa.RecordBatch, expected_rows: int, expected_crc: int, where: str) -> None:
    """Raise a one-line error unless the batch is the one the manifest recorded."""
    if batch.num_rows != expected_rows or batch_crc32(batch) != expected_crc:
        raise UserError(f"bad shard {where}: contents do not match the manifest's checksum (corrupt, or from another cache); run `taid-cache verify`")


# What a sound cache holds beyond its checksums (`check_invariants`), with tolerances no honest dump exceeds:
# float32 log-probs may sit this far above 0, or above their predecessor (float noise of a log-softmax; the
# compact codec stores non-positive, non-increasing values by construction); a mass near 1 rounds this far.
LOGPROB_SLACK = 1e-4
TAIL_SLACK = 1e-5
# The head's mass plus the tail's is 1 up to the codec (each stored log-prob within `max_logprob_error` of the
# engine's, so the head's mass within a factor exp(±error)) and the engine's float32 sums over the vocabulary.
MASS_SLACK = 1e-3


def _flat(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (its used flat values, row offsets from 0)."""
    column = batch.column(name)
    offsets = column.offsets.to_numpy()
    return column.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]], offsets - offsets[0]


class InvariantBroken(Exception):
    """A batch breaks an invariant: at flat position `position` (of the per-position columns) or row `row`."""

    def __init__(self, what: str, position: int | None = None, row: int | None = None) -> None:
        super().__init__(what)
        self.what, self.position, self.row = what, position, row


def _first(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad)[0])


def _require(ok: np.ndarray | bool, what: str, *, positions: bool = False, rows: bool = False) -> None:
    """Raise InvariantBroken unless every entry of `ok` holds (per position or per row, to name the record)."""
    if np.all(ok):
        return
    index = _first(~np.asarray(ok)) if (positions or rows) else None
    raise InvariantBroken(what, position=index if positions else None, row=index if rows else None)


def _runs(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For flat entries laid out `counts[p]` per position: each entry's position and whether it starts one."""
    position = np.repeat(np.arange(len(counts)), counts)
    first = np.ones(len(position), bool)
    first[1:] = position[1:] != position[:-1]
    return position, first


def _check_logprobs(values: np.ndarray, first: np.ndarray, what: str, position: np.ndarray, exact: bool) -> None:
    if exact:  # the compact codec: non-negative codes, non-negative deltas
        return
    bad = ~(values <= LOGPROB_SLACK)  # NaN too
    if bad.any():
        raise InvariantBroken(f"{what} log-prob {float(values[_first(bad)]):g} above 0", position=int(position[_first(bad)]))
    rising = np.zeros(len(values), bool)
    rising[1:] = values[1:] > values[:-1] + LOGPROB_SLACK
    rising &= ~first
    if rising.any():
        raise InvariantBroken(f"{what} log-probs not in descending order", position=int(position[_first(rising)]))


def check_invariants(batch: pa.RecordBatch, settings) -> tuple[np.ndarray, np.ndarray | None]:
    """What every record of a decoded batch must hold, vectorised over the flat columns; raise InvariantBroken
    naming the first broken one, else return the batch's flat decoded head and draw log-probs. Per position p of every sequence (T tokens, T-1 positions):

    - the per-position columns hold T-1 entries, the flat ones as many as the counts say;
    - input ids, head ids and drawn ids lie in [0, vocab_size); the head keeps at most top_k entries;
    - the head's ids are distinct, the draws' ids are distinct and none is in the head;
    - stored log-probs are at most 0 and non-increasing within a position (up to LOGPROB_SLACK in fp32);
    - tail_logmass <= 0 (up to TAIL_SLACK), and exp(head) summed plus exp(tail) is 1 within
      expm1(max_logprob_error) + MASS_SLACK;
    - a --tail-samples N cache: at most N distinct draws, each drawn at least once, N draws in all where the tail
      holds mass and none where it holds none (tail -inf);
    - a --target-logprobs cache: the target log-prob is at most 0 (or -inf)."""
    from .codec import decode_logprobs, max_logprob_error

    vocab, k, n, precision = settings.vocab_size, settings.top_k, settings.tail_samples, settings.precision
    exact = precision == "compact"
    input_ids, tokens = _flat(batch, "input_ids")
    lengths = np.diff(tokens)
    positions = np.maximum(lengths - 1, 0)
    _require(lengths >= 2, "a sequence of fewer than 2 tokens", rows=True)
    per_position = ["topk_counts", "tail_logmass"] + (["sample_counts"] if n else []) + (["target_logprob"] if settings.target_logprobs else [])
    flat = {name: _flat(batch, name) for name in per_position}
    _require(np.diff(_flat(batch, "loss_mask")[1]) == lengths, "loss_mask is not one entry per token", rows=True)
    for name in per_position:
        _require(np.diff(flat[name][1]) == positions, f"{name} is not one entry per position", rows=True)
    if len(input_ids) and not (0 <= input_ids.min() and input_ids.max() < vocab):
        raise InvariantBroken(f"an input id outside the vocabulary of {vocab}", row=int(np.searchsorted(tokens, _first((input_ids < 0) | (input_ids >= vocab)), side="right")) - 1)
    row_starts = flat["topk_counts"][1]

    def entries(count_name: str, ids_name: str, lp_name: str, width: int, label: str):
        counts = flat[count_name][0].astype(np.int64)
        if len(counts) and counts.max() > width:
            raise InvariantBroken(f"{label}: {int(counts.max())} entries at a position, above {width}", position=_first(counts > width))
        ids, id_rows = _flat(batch, ids_name)
        stored, lp_rows = _flat(batch, lp_name)
        summed = np.concatenate(([0], np.cumsum(counts)))[row_starts]
        _require((id_rows == summed) & (lp_rows == summed), f"{label}: entries do not match the counts", rows=True)
        position, first = _runs(counts)
        if len(ids) and not (0 <= ids.min() and ids.max() < vocab):
            bad = (ids < 0) | (ids >= vocab)
            raise InvariantBroken(f"{label}: id {int(ids[_first(bad)])} outside the vocabulary of {vocab}", position=int(position[_first(bad)]))
        return counts, ids.astype(np.int64), stored, position, first

    counts, ids, stored, position, first = entries("topk_counts", "topk_ids", "topk_logprobs", k, "head")
    logprobs = decode_logprobs(stored, counts, precision)
    _check_logprobs(logprobs, first, "head", position, exact)
    tails = flat["tail_logmass"][0]
    if not (tails <= TAIL_SLACK).all():
        p = _first(~(tails <= TAIL_SLACK))
        raise InvariantBroken(f"tail_logmass {float(tails[p]):g} above 0 (a mass above 1)", position=p)
    keys, drawn_logprobs = [position * vocab + ids], None
    if n:
        drawn, d_ids, d_stored, d_position, d_first = entries("sample_counts", "sample_ids", "sample_logprobs", n, "draws")
        draws, draw_rows = _flat(batch, "sample_draws")
        _require(draw_rows == np.concatenate(([0], np.cumsum(drawn)))[row_starts], "draws: entries do not match the counts", rows=True)
        if len(draws) and not (draws >= 1).all():
            raise InvariantBroken("draws: an id drawn 0 times", position=int(d_position[_first(draws < 1)]))
        total = np.bincount(d_position, weights=draws, minlength=len(drawn)).astype(np.int64)
        expected = np.where(np.isneginf(tails), 0, n)
        if not (total == expected).all():
            p = _first(total != expected)
            raise InvariantBroken(f"draw counts sum to {int(total[p])}, not {int(expected[p])}", position=p)
        drawn_logprobs = decode_logprobs(d_stored, drawn, precision)
        _check_logprobs(drawn_logprobs, d_first, "drawn", d_position, exact)
        keys.append(d_position * vocab + d_ids)
    every = np.concatenate(keys) if len(keys) > 1 else keys[0]
    order = np.sort(every)
    repeated = order[1:] == order[:-1]
    if repeated.any():
        p = int(order[1:][repeated][0] // vocab)
        raise InvariantBroken("an id repeated at a position (in the head, among the draws, or in both)", position=p)
    head = np.bincount(position, weights=np.exp(logprobs.astype(np.float64)), minlength=len(tails))
    mass = head + np.exp(tails.astype(np.float64))
    bound = float(np.expm1(max_logprob_error(precision))) + MASS_SLACK
    off = ~(np.abs(mass - 1) <= bound)
    if off.any():
        p = _first(off)
        raise InvariantBroken(f"head and tail mass sum to {float(mass[p]):.6g}, not 1 (within {bound:.2g})", position=p)
    if settings.target_logprobs:
        target = flat["target_logprob"][0]
        if not (target <= LOGPROB_SLACK).all():
            p = _first(~(target <= LOGPROB_SLACK))
            raise InvariantBroken(f"target log-prob {float(target[p]):g} above 0", position=p)
    return logprobs, drawn_logprobs


def invariant_error(batch: pa.RecordBatch, broken: InvariantBroken, where: str) -> UserError:
    """The one-line error of a broken invariant, naming the shard, record batch and record."""
    row = broken.row
    if row is None and broken.position is not None:
        starts = _flat(batch, "topk_counts")[1]
        row = int(np.searchsorted(starts, broken.position, side="right")) - 1
    record = ""
    if row is not None and 0 <= row < batch.num_rows:
        record = f", record {row} ({batch.column('sample_id')[row].as_py()})"
        if broken.position is not None:
            record += f" position {broken.position - int(_flat(batch, 'topk_counts')[1][row])}"
    return UserError(f"bad shard {where}{record}: {broken.what}; run `taid-cache verify`")
