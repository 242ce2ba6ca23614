"""Reading a remote cache: whole shards fetched ahead of need and kept while the shuffle buffer can still draw
from them (each shard fetched once an epoch, not once a visit), the order resumed where a run stopped, a failed
fetch retried rather than remembered, and a cache with no shard readable."""

from __future__ import annotations

import itertools

import pyarrow as pa
import pytest

from conftest import run_cli
from taid_cache.errors import UserError
from taid_cache.shards import load_manifest
from taid_cache.shards.reader import ShardFiles
from taid_cache.storage import open_store
from taid_cache.training.data import CacheRows, StreamOrder, epoch_order, shard_sequence


class CountingRemote:
    """A local folder that answers as a remote store does (whole reads), counting them; `fail` reads fail first."""

    is_local = False

    def __init__(self, folder, fail: int = 0) -> None:
        self.local, self.url, self.gets, self.fail = open_store(str(folder)), f"counted://{folder}", [], fail

    def read_bytes(self, name: str) -> bytes:
        self.gets.append(name)
        if self.fail:
            self.fail -= 1
            raise ConnectionError("the endpoint went away")
        return self.local.read_bytes(name)


@pytest.fixture(scope="module")
def many_shards(teacher_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("many") / "cache"
    run_cli("dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--output", str(out), "--engine", "hf",
            "--top-k", "4", "--max-length", "128", "--batch-tokens", "100", "--shard-size-mb", "0.008", "--no-progress")
    manifest = load_manifest(str(out))
    # More record batches than the reader keeps decoded (16): a shard the buffer returns to must still be held.
    assert len(manifest.shards) >= 6 and sum(len(s.batch_rows) for s in manifest.shards) > 16
    return out, manifest


@pytest.mark.parametrize("buffer", [1, 8, 64])
def test_each_shard_is_fetched_once_an_epoch_whatever_the_shuffle_buffer(many_shards, buffer, monkeypatch) -> None:
    folder, manifest = many_shards
    remote = CountingRemote(folder)
    monkeypatch.setattr("taid_cache.training.data.open_store", lambda location: remote)
    rows = CacheRows(str(folder), read_ahead=2, manifest=manifest)
    epochs = 2
    order = StreamOrder(seed=3, buffer=buffer, limit=epochs * manifest.records, batch_size=4)
    assert sum(len(run) for run in rows.runs(order)) == epochs * manifest.records
    assert len(remote.gets) <= epochs * len(manifest.shards) + 2, remote.gets  # + what was fetched ahead past the end


def test_the_fetch_order_starts_where_a_resumed_stream_stands(many_shards) -> None:
    _, manifest = many_shards
    counts = [s.records for s in manifest.shards]
    total = sum(counts)
    for start in (0, counts[0], total + 5, 2 * total - 1):
        refs = itertools.islice(itertools.chain.from_iterable(epoch_order(counts, 3, e, 1) for e in itertools.count()), start, None)
        first_shard = next(refs)[0]  # buffer 1: the stream's order is the shards' order
        assert next(shard_sequence(counts, 3, True, start)) == first_shard


def test_a_failed_fetch_is_said_in_one_line_and_retried(many_shards) -> None:
    folder, manifest = many_shards
    remote = CountingRemote(folder, fail=1)
    files = ShardFiles(remote, manifest, read_ahead=0)
    with pytest.raises(UserError, match="cannot reach the storage"):
        files.fetched(0)
    assert pa.ipc.open_file(pa.BufferReader(files.fetched(0))).num_record_batches == len(manifest.shards[0].batch_rows)
    files.close()


def test_a_remote_cache_without_shards_reads(many_shards) -> None:
    folder, manifest = many_shards
    empty = type(manifest)(**{**{f: getattr(manifest, f) for f in ("format_version", "settings", "num_workers", "dropped",
                                                                  "truncated", "fidelity")},
                              "records": 0, "tokens": 0, "entries": 0, "bytes": 0, "shards": ()})
    files = ShardFiles(CountingRemote(folder), empty, read_ahead=2)
    files.close()
