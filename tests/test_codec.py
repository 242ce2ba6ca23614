"""The storage codec against independent expectations: error bounds and round trips."""

from __future__ import annotations

import numpy as np
import pytest

from taid_cache.shards.codec import (
    LOGPROB_STEP, MAX_CODE, decode_logprobs, encode_logprobs, id_dtype, max_logprob_error, pack_ragged, unpack_ragged,
)


def sorted_logprobs(rng: np.random.Generator, positions: int, k: int, vocab: int = 1000) -> np.ndarray:
    logits = rng.normal(scale=rng.uniform(0.5, 8.0), size=(positions, vocab))
    lp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    return -np.sort(-lp, axis=1)[:, :k].astype(np.float32)


@pytest.mark.parametrize("precision", ["compact", "fp32"])
def test_logprob_round_trip_within_documented_bound(precision: str) -> None:
    rng = np.random.default_rng(0)
    lp = sorted_logprobs(rng, 300, 32)
    counts = rng.integers(1, 33, size=300)
    _, flat = pack_ragged(np.zeros_like(lp, dtype=np.int64), lp, counts)
    decoded = decode_logprobs(encode_logprobs(flat, counts, precision), counts, precision)
    err = np.abs(decoded.astype(np.float64) - flat.astype(np.float64)).max()
    assert err <= max_logprob_error(precision) + 1e-7
    if precision == "compact":
        assert max_logprob_error(precision) == LOGPROB_STEP / 2 < 0.01
        assert err > LOGPROB_STEP / 4  # the grid is really used, not a lossless copy
    else:
        assert err == 0.0


def test_compact_codes_are_small_deltas() -> None:
    lp = np.array([[-0.5, -1.0, -1.0, -3.0]], dtype=np.float32)
    counts = np.array([4])
    codes = encode_logprobs(lp.ravel(), counts, "compact")
    assert codes.tolist() == [32, 32, 0, 128]  # -0.5 nats = 32 steps, then gaps of 32, 0 and 128 steps


@pytest.mark.parametrize("precision", ["compact", "fp32"])
def test_empty_positions_anywhere_and_an_empty_batch(precision: str) -> None:
    """Positions with no entries (a top-p row cut to nothing never happens, but a k = 0 head does) at the start,
    in runs and at the end leave the others' bases intact; a batch with no entries at all round-trips too."""
    counts = np.array([0, 3, 0, 0, 2, 0, 1, 0])
    flat = np.array([-0.25, -0.5, -4.0, -0.125, -9.0, -2.0], dtype=np.float32)
    decoded = decode_logprobs(encode_logprobs(flat, counts, precision), counts, precision)
    np.testing.assert_array_equal(decoded, flat)  # these values lie on the 1/64 grid: exact in both precisions
    none = np.zeros(4, dtype=np.int64)
    assert decode_logprobs(encode_logprobs(np.zeros(0, np.float32), none, precision), none, precision).shape == (0,)


def test_compact_clamps_far_below_the_grid_and_keeps_ties() -> None:
    """Below −MAX_CODE·step (−1024 nats) the compact codec stores the clamp, as documented; equal log-probs
    (ties, and a log-prob of exactly 0) give zero deltas and decode equal."""
    counts = np.array([4, 2])
    flat = np.array([0.0, -1.5, -1.5, -5000.0, -1023.0, -1e9], dtype=np.float32)
    stored = encode_logprobs(flat, counts, "compact")
    assert stored.tolist() == [0, 96, 0, MAX_CODE - 96, 1023 * 64, MAX_CODE - 1023 * 64]
    decoded = decode_logprobs(stored, counts, "compact")
    np.testing.assert_array_equal(decoded, np.array([0.0, -1.5, -1.5, -MAX_CODE * LOGPROB_STEP, -1023.0, -MAX_CODE * LOGPROB_STEP], np.float32))


def test_unsorted_logprobs_are_rejected() -> None:
    with pytest.raises(ValueError):
        encode_logprobs(np.array([-2.0, -1.0], dtype=np.float32), np.array([2]), "compact")


@pytest.mark.parametrize("vocab,expected", [(2, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.uint32), (151936, np.uint32)])
def test_id_dtype_is_narrowest(vocab: int, expected) -> None:
    assert id_dtype(vocab) == np.dtype(expected)


def test_ragged_pack_unpack_round_trip() -> None:
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 500, size=(50, 8))
    lp = sorted_logprobs(rng, 50, 8)
    counts = rng.integers(1, 9, size=50)
    flat_ids, flat_lp = pack_ragged(ids, lp, counts)
    assert len(flat_ids) == counts.sum()
    back_ids, back_lp = unpack_ragged(flat_ids, flat_lp, counts, 8)
    for i, n in enumerate(counts):
        assert (back_ids[i, :n] == ids[i, :n]).all() and (back_lp[i, :n] == lp[i, :n]).all()
        assert (back_ids[i, n:] == -1).all() and np.isneginf(back_lp[i, n:]).all()
