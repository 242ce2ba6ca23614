"""A cache whose checksums pass yet whose contents or coverage are wrong is refused: `verify`, `export` and
training say one line naming the shard, the record batch and the record (or the shard entry) and what is broken.

Every attack is a transformation of a finished cache folder done here, on its manifest as JSON and its shards as
Arrow files, with `batch_crc32`, `sha256` and `bytes` recomputed (the crc32 as integrity.batch_crc32 computes it,
written out here), and every command runs as a process of the console entry point: so the same tests run
against a release that wrote another cache format (PYTHONPATH and the working directory name its tree)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pytest

ROOT = Path(__file__).resolve().parents[1]
Columns = dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (flat values, offsets from 0), the values writable


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "taid_cache.cli", *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=ROOT)


def refused(result: subprocess.CompletedProcess, *words: str) -> None:
    """Exit status 2 and one line, `error: ...`, naming every word."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (result.returncode, result.stderr[-3000:])
    for word in words:
        assert word in lines[0], lines[0]


def crc32(batch: pa.RecordBatch) -> int:
    """integrity.batch_crc32: per column, list offsets from 0 then the used values (a string column: joined by NUL)."""
    crc = 0
    for column in batch.columns:
        if isinstance(column, pa.ListArray):
            offsets, data = column.offsets.to_numpy(), column.values.to_numpy(zero_copy_only=False)
            parts = [offsets - offsets[0], data[offsets[0] : offsets[-1]]]
        else:
            parts = [np.frombuffer("\0".join(column.to_pylist()).encode(), dtype=np.uint8)]
        for values in parts:
            crc = zlib.crc32(np.ascontiguousarray(values).view(np.uint8), crc)
    return crc


def read_manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def write_manifest(cache: Path, manifest: dict) -> None:
    for name in ("records", "tokens", "entries", "bytes"):
        manifest[name] = sum(s[name] for s in manifest["shards"])
    (cache / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def rewrite_shards(cache: Path, change: Callable[[Columns, dict], None], shards: slice = slice(None), batches: slice = slice(0, 1)) -> None:
    """Apply `change` to the columns of the chosen record batches of the chosen shards, then recompute every
    checksum the manifest holds of them."""
    manifest = read_manifest(cache)
    settings = manifest["settings"]
    for entry in manifest["shards"][shards]:
        path = cache / entry["file"]
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_file(source)
            schema, old = reader.schema, [reader.get_batch(b) for b in range(reader.num_record_batches)]
        chosen = set(range(len(old))[batches])
        new = []
        for b, batch in enumerate(old):
            if b in chosen:
                cols = {}
                for name in batch.schema.names:
                    column = batch.column(name)
                    if isinstance(column, pa.ListArray):
                        offsets = column.offsets.to_numpy()
                        values = column.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]].copy()
                        cols[name] = (values, offsets - offsets[0])
                change(cols, settings)
                arrays = [pa.ListArray.from_arrays(pa.array(cols[f.name][1], pa.int32()), pa.array(cols[f.name][0], f.type.value_type))
                          if f.name in cols else batch.column(f.name) for f in schema]
                batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
            new.append(batch)
        with pa.OSFile(str(path), "wb") as sink:
            with pa.ipc.new_file(sink, schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
                for batch in new:
                    writer.write_batch(batch)
        data = path.read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), batch_crc32=[crc32(b) for b in new])
    write_manifest(cache, manifest)


def run_starts(counts: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(counts.astype(np.int64))[:-1]))


# The attacks on meaning, each on the first record batch of the first shard.
def id_beyond_vocabulary(cols: Columns, settings: dict) -> None:
    cols["topk_ids"][0][0] = settings["vocab_size"]


def all_ids_equal(cols: Columns, settings: dict) -> None:
    counts, ids = cols["topk_counts"][0].astype(np.int64), cols["topk_ids"][0]
    ids[:] = np.repeat(ids[run_starts(counts)], counts)


def logprobs_ascending(cols: Columns, settings: dict) -> None:
    lps = cols["topk_logprobs"][0]  # an fp32 cache: the compact codec cannot store an ascending list
    first = int(np.flatnonzero(np.diff(lps) < -0.01)[0])
    lps[first], lps[first + 1] = lps[first + 1], lps[first]


def tail_mass_twenty(cols: Columns, settings: dict) -> None:
    cols["tail_logmass"][0][0] = 3.0


def draws_not_n(cols: Columns, settings: dict) -> None:
    cols["sample_draws"][0][0] += 1


def tail_mass_lost(cols: Columns, settings: dict) -> None:
    """The largest tail of the first record made negligible: its mass is gone from the sum (still at most 0)."""
    tails, rows = cols["tail_logmass"]
    tails[int(np.argmax(tails[: rows[1]]))] = -30.0


@pytest.fixture(scope="module")
def sound(teacher_dir, data_dir, tmp_path_factory) -> Path:
    """A cache with every optional column a release can write: fp32 head of 8, 8 draws off it; one row a
    shard (so an entry can stand in for another)."""
    out = tmp_path_factory.mktemp("invariants") / "cache"
    result = cli("dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "tokens.jsonl"), "--output", str(out),
                 "--engine", "hf", "--no-progress", "--top-k", "8", "--tail-samples", "8", "--precision", "fp32",
                 "--batch-tokens", "8", "--shard-size-mb", "0.000001")
    assert result.returncode == 0, result.stderr[-3000:]
    assert cli("verify", str(out)).returncode == 0
    assert len(read_manifest(out)["shards"]) >= 3
    return out


def attacked(sound: Path, tmp_path: Path, change: Callable[[Columns, dict], None], **where) -> Path:
    cache = tmp_path / "cache"
    shutil.copytree(sound, cache)
    rewrite_shards(cache, change, **where)
    return cache


@pytest.mark.parametrize("change, words", [
    (id_beyond_vocabulary, ["outside the vocabulary"]),
    (all_ids_equal, ["repeated"]),
    (logprobs_ascending, ["descending"]),
    (tail_mass_twenty, ["tail_logmass 3"]),
    (draws_not_n, ["draw counts sum to 9, not 8"]),
    (tail_mass_lost, ["head and tail mass sum to"]),
])
def test_a_broken_invariant_is_one_line_from_verify_and_export(sound, tmp_path, change, words):
    cache = attacked(sound, tmp_path, change)
    first = read_manifest(cache)["shards"][0]["file"]
    refused(cli("verify", str(cache)), first, "record batch 0", "record 0", *words)
    refused(cli("export", str(cache), str(tmp_path / "out.parquet")), first, "record batch 0", *words)
    assert not (tmp_path / "out.parquet").exists()


def test_training_refuses_a_cache_whose_ids_repeat(sound, student_dir, tmp_path):
    """The release before trained fkl on it to negative losses and exited 0."""
    cache = attacked(sound, tmp_path, all_ids_equal, batches=slice(None))
    refused(cli("train-student", "--student", str(student_dir), "--cache", str(cache), "--output", str(tmp_path / "run"),
                "--no-progress", "--loss", "fkl", "--max-steps", "2", "--batch-size", "2", "--max-length", "64"),
            "record batch 0", "repeated")


def test_a_shard_listed_in_place_of_another_is_refused(sound, tmp_path):
    """One entry twice, another gone, the totals and dataset_rows adjusted so every count agrees."""
    cache = tmp_path / "cache"
    shutil.copytree(sound, cache)
    manifest = read_manifest(cache)
    gone = manifest["shards"][1]
    manifest["shards"][1] = manifest["shards"][0]
    manifest["settings"]["dataset_rows"] += manifest["shards"][0]["records"] - gone["records"]
    write_manifest(cache, manifest)
    (cache / gone["file"]).unlink()
    refused(cli("verify", str(cache)), "does not cover its dataset", manifest["shards"][0]["file"], "listed twice")


def test_reordered_shard_entries_are_refused(sound, tmp_path):
    """The reading order is the cache's (and its identity's): another order is refused, not re-sorted."""
    cache = tmp_path / "cache"
    shutil.copytree(sound, cache)
    manifest = read_manifest(cache)
    manifest["shards"][0], manifest["shards"][1] = manifest["shards"][1], manifest["shards"][0]
    write_manifest(cache, manifest)
    refused(cli("verify", str(cache)), "does not cover its dataset", manifest["shards"][0]["file"], "out of order")


def test_an_entry_whose_cursor_skips_rows_is_refused(sound, tmp_path):
    """A shard entry removed, its rows counted as dropped so every total agrees: its rows are not in the cache."""
    cache = tmp_path / "cache"
    shutil.copytree(sound, cache)
    manifest = read_manifest(cache)
    gone = manifest["shards"].pop(1)
    manifest["dropped"] += gone["records"]
    write_manifest(cache, manifest)
    refused(cli("verify", str(cache)), "does not cover its dataset", manifest["shards"][1]["file"], "records for rows")


def test_the_sound_cache_reads_in_full(sound, tmp_path):
    """What every check passes: the cache the attacks start from exports and verifies."""
    assert cli("verify", str(sound)).returncode == 0
    assert cli("export", str(sound), str(tmp_path / "out.parquet")).returncode == 0
