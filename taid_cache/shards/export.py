"""`taid-cache export`: a finished cache decoded into Parquet files other tools read as they are.

- `parquet`: this project's columns, decoded (docs/FORMAT.md, "Exported caches"): per sequence its token ids and
  loss mask, and per position the stored ids and float log-probs (only the entries kept), the exact tail mass,
  for a sampled tail the distinct draws, how often each was drawn and their log-probs, and for a
  --target-logprobs cache the exact log-prob of each actual next token.
- `axolotl`: the columns axolotl's knowledge-distillation trainer reads, aligned as its docs say: row j of
  `target_token_ids` / `target_logprobs` is the distribution of `input_ids[j + 1]`, `target_mask[j]` is 0 where
  `labels[j + 1]` is -100, and the last row (and unused slots) are padding with mask 0. It has no tail mass:
  axolotl renormalises the top-k.

One Parquet file per shard, in the cache's reading order, written into a folder that appears complete or not at
all (storage/folders.py: on an object store, complete once its `_SUCCESS` object is there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError
from ..storage import open_store
from ..storage.folders import new_folder
from .contract import CacheRecord
from .manifest import load_manifest
from .reader import ShardFiles, iter_shard

FORMATS = ("parquet", "axolotl")
PAD_LOGPROB = -1e9  # axolotl's padding: a large negative log-prob, masked out


def nested(rows: list[list[np.ndarray]], value_type: pa.DataType) -> pa.ListArray:
    """list<list<value>> from, per sequence, one array per position."""
    inner_lengths = [len(v) for seq in rows for v in seq]
    inner_offsets = np.concatenate(([0], np.cumsum(inner_lengths, dtype=np.int64))).astype(np.int32)
    flat = np.concatenate([v for seq in rows for v in seq]) if inner_lengths else np.zeros(0)
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), pa.array(flat.astype(value_type.to_pandas_dtype()), value_type))
    outer_offsets = np.concatenate(([0], np.cumsum([len(seq) for seq in rows], dtype=np.int64))).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(outer_offsets), inner)


def flat(rows: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    offsets = np.concatenate(([0], np.cumsum([len(r) for r in rows], dtype=np.int64))).astype(np.int32)
    values = np.concatenate(rows) if rows else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(value_type.to_pandas_dtype()), value_type))


def kept(ids: np.ndarray, values: np.ndarray) -> list[np.ndarray]:
    """Each position's used entries (id >= 0) of a [T-1, k] grid."""
    return [row[mask] for row, mask in zip(values, ids >= 0)]


def decoded_table(records: list[CacheRecord]) -> pa.Table:
    columns: dict[str, pa.Array] = {
        "sample_id": pa.array([r.sample_id for r in records], pa.string()),
        "input_ids": flat([r.input_ids for r in records], pa.int32()),
        "loss_mask": flat([r.loss_mask for r in records], pa.bool_()),
        "topk_ids": nested([kept(r.topk_ids, r.topk_ids) for r in records], pa.int32()),
        "topk_logprobs": nested([kept(r.topk_ids, r.topk_logprobs) for r in records], pa.float32()),
        "tail_logmass": flat([r.tail_logmass for r in records], pa.float32()),
    }
    if records and records[0].target_logprob is not None:  # --target-logprobs caches only
        columns["target_logprob"] = flat([r.target_logprob for r in records], pa.float32())
    if records and records[0].sampled:
        columns["sample_ids"] = nested([kept(r.sample_ids, r.sample_ids) for r in records], pa.int32())
        columns["sample_draws"] = nested([kept(r.sample_ids, r.sample_draws) for r in records], pa.int32())
        columns["sample_logprobs"] = nested([kept(r.sample_ids, r.sample_logprobs) for r in records], pa.float32())
    return pa.table(columns)


def axolotl_table(records: list[CacheRecord], k: int) -> pa.Table:
    ids_rows, lp_rows, mask_rows, labels = [], [], [], []
    for r in records:
        grid_ids = np.where(r.topk_ids >= 0, r.topk_ids, 0)
        grid_lps = np.where(r.topk_ids >= 0, r.topk_logprobs, PAD_LOGPROB)
        target = r.loss_mask[1:, None] & (r.topk_ids >= 0)  # position j predicts token j+1
        pad = np.zeros((1, k))
        ids_rows.append(list(np.vstack([grid_ids, pad.astype(np.int64)])))
        lp_rows.append(list(np.vstack([grid_lps, pad + PAD_LOGPROB])))
        mask_rows.append(list(np.vstack([target, pad.astype(bool)]).astype(np.int8)))
        labels.append(np.where(r.loss_mask, r.input_ids, -100))
    return pa.table({
        "input_ids": flat([r.input_ids for r in records], pa.int32()),
        "attention_mask": flat([np.ones(len(r.input_ids), np.int8) for r in records], pa.int8()),
        "labels": flat(labels, pa.int32()),
        "target_token_ids": nested(ids_rows, pa.int32()),
        "target_logprobs": nested(lp_rows, pa.float32()),
        "target_mask": nested(mask_rows, pa.int8()),
    })


def shard_tables(files: ShardFiles, fmt: str) -> Iterator[pa.Table]:
    settings = files.manifest.settings
    for index in range(len(files.manifest.shards)):
        records = list(iter_shard(files, index))
        yield axolotl_table(records, settings.top_k) if fmt == "axolotl" else decoded_table(records)


def export_cache(cache: str | Path, out: str | Path, fmt: str) -> int:
    """Write `out` (a new folder, or a new prefix of an object store) with the cache in `fmt`; returns the number
    of sequences written."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    source = open_store(str(cache))
    manifest = load_manifest(source)
    if fmt == "axolotl" and manifest.settings.top_k == 0:
        raise UserError("--format axolotl needs a top-k head: this cache stores only draws (--top-k 0)")
    target = open_store(str(out))
    written = 0
    files = ShardFiles(source, manifest, read_ahead=1)
    try:
        with new_folder(target, "export into a new one") as folder:
            for i, table in enumerate(shard_tables(files, fmt)):
                with folder.open_output(f"data-{i:05d}.parquet") as sink:
                    pq.write_table(table, sink, compression="zstd")
                written += table.num_rows
    finally:
        files.close()
    return written
