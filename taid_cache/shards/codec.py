"""How top-k entries are encoded for storage, and decoded back.

Ids use the narrowest unsigned integer type the vocabulary allows. Log-probs are either stored exactly
(`fp32`) or, by default (`compact`), quantised on a uniform grid of LOGPROB_STEP nats (error at most half a
step) and delta-coded along each position's list, which is sorted by descending log-prob, so the stored
codes are small non-negative integers that zstd packs tightly.
"""

from __future__ import annotations

import numpy as np

PRECISIONS = ("compact", "fp32")
# 1/64 nat grid: a power of two, so -code * step is exact in float32; the bound is step / 2 = 0.0078 nats.
LOGPROB_STEP = 1.0 / 64.0
MAX_CODE = np.iinfo(np.uint16).max  # log-probs below -MAX_CODE * step (-1024 nats) are clamped there


def id_dtype(vocab_size: int) -> np.dtype:
    """Narrowest unsigned integer type that holds every token id of the vocabulary."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"vocabulary of {vocab_size} tokens does not fit 32-bit ids")


def logprob_storage_dtype(precision: str) -> np.dtype:
    return np.dtype(np.uint16) if precision == "compact" else np.dtype(np.float32)


def max_logprob_error(precision: str) -> float:
    """The largest difference between a stored and a true log-prob (above the clamp at -1024 nats)."""
    return LOGPROB_STEP / 2 if precision == "compact" else 0.0


def _segment_starts(counts: np.ndarray) -> np.ndarray:
    """Boolean mask over the flat entries: True at the first entry of each position."""
    first = np.zeros(int(counts.sum()), dtype=bool)
    offsets = np.concatenate(([0], np.cumsum(counts)[:-1]))
    first[offsets[counts > 0]] = True
    return first


def encode_logprobs(flat: np.ndarray, counts: np.ndarray, precision: str) -> np.ndarray:
    """Flat log-probs (each position's run sorted descending) -> stored values."""
    if precision == "fp32":
        return flat.astype(np.float32, copy=False)
    codes = np.clip(np.rint(-flat.astype(np.float64) / LOGPROB_STEP), 0, MAX_CODE).astype(np.int64)
    deltas = np.diff(codes, prepend=0)
    first = _segment_starts(counts)
    deltas[first] = codes[first]
    if (deltas < 0).any():
        raise ValueError("top-k log-probs must be sorted in descending order within each position")
    return deltas.astype(np.uint16)


def decode_logprobs(stored: np.ndarray, counts: np.ndarray, precision: str) -> np.ndarray:
    """Stored values -> flat float32 log-probs."""
    if precision == "fp32":
        return stored.astype(np.float32, copy=False)
    # Undo the running sum at every position boundary: subtract what the previous positions added. `running`
    # starts with a 0 so that a position after only empty ones (count 0) reads base 0, not a wrapped index.
    running = np.concatenate(([0], np.cumsum(stored, dtype=np.int64)))
    starts = np.cumsum(counts) - counts
    codes = running[1:] - np.repeat(running[starts], counts)
    return (-codes * LOGPROB_STEP).astype(np.float32)


def pack_ragged(ids: np.ndarray, logprobs: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[P, k] arrays and per-row counts -> the flat concatenation of each row's first counts[i] entries."""
    keep = np.arange(ids.shape[1])[None, :] < counts[:, None]
    return ids[keep], logprobs[keep]


def ragged_grid(flat: np.ndarray, counts: np.ndarray, width: int, fill: float | int) -> np.ndarray:
    """Each row's counts[i] flat entries laid into a [rows, width] grid, `fill` in the unused slots."""
    keep = np.arange(width)[None, :] < counts[:, None]
    grid = np.full((len(counts), width), fill, dtype=flat.dtype)
    grid[keep] = flat
    return grid


def unpack_ragged(flat_ids: np.ndarray, flat_logprobs: np.ndarray, counts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of pack_ragged: unused slots hold id -1 and log-prob -inf."""
    return ragged_grid(flat_ids.astype(np.int64), counts, k, -1), ragged_grid(flat_logprobs.astype(np.float32), counts, k, -np.inf)
