"""The Arrow schema of a shard: one row per sequence, flat lists for the ragged top-k entries."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .codec import id_dtype, logprob_storage_dtype
from .contract import SHARD_LAYOUT_VERSION


def shard_schema(vocab_size: int, top_k: int, precision: str, tail_samples: int = 0, target_logprobs: bool = False) -> pa.Schema:
    ids = pa.from_numpy_dtype(id_dtype(vocab_size))
    draws = pa.from_numpy_dtype(id_dtype(tail_samples + 1))
    logprobs = pa.from_numpy_dtype(logprob_storage_dtype(precision))
    # --tail-samples N: per position, the distinct ids drawn off the head, their counts and exact log-probs.
    sampled = [
        pa.field("sample_counts", pa.list_(draws), nullable=False),  # T-1 entries: distinct ids at each position
        pa.field("sample_ids", pa.list_(ids), nullable=False),
        pa.field("sample_draws", pa.list_(draws), nullable=False),
        pa.field("sample_logprobs", pa.list_(logprobs), nullable=False),  # descending within each position
    ] if tail_samples else []
    # --target-logprobs: T-1 entries, the exact float32 log-prob of each position's actual next token.
    target = [pa.field("target_logprob", pa.list_(pa.float32()), nullable=False)] if target_logprobs else []
    return pa.schema(
        [
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("input_ids", pa.list_(ids), nullable=False),
            pa.field("loss_mask", pa.list_(pa.bool_()), nullable=False),
            # Entries kept at each of the T-1 positions: k, or fewer with --top-p.
            pa.field("topk_counts", pa.list_(pa.from_numpy_dtype(id_dtype(top_k + 1))), nullable=False),
            pa.field("topk_ids", pa.list_(ids), nullable=False),
            pa.field("topk_logprobs", pa.list_(logprobs), nullable=False),
            # T-1 entries: log of the teacher's mass off the stored entries, from the engine's un-quantised values.
            pa.field("tail_logmass", pa.list_(pa.float32()), nullable=False),
            *target,
            *sampled,
        ],
        metadata={
            "taid_cache.format_version": str(SHARD_LAYOUT_VERSION),
            "taid_cache.vocab_size": str(vocab_size),
            "taid_cache.top_k": str(top_k),
            "taid_cache.precision": precision,
            **({"taid_cache.tail_samples": str(tail_samples)} if tail_samples else {}),
            **({"taid_cache.target_logprobs": "true"} if target_logprobs else {}),
        },
    )


def list_array(values: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    """One Arrow list per numpy array, built from a single concatenated buffer (no per-element Python)."""
    lengths = np.fromiter((len(v) for v in values), dtype=np.int32, count=len(values))
    offsets = np.concatenate(([0], np.cumsum(lengths, dtype=np.int32)))
    flat = np.concatenate(values) if values else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat.astype(value_type.to_pandas_dtype(), copy=False), value_type))
