"""`dump-teacher --target-logprobs`: the teacher's exact log-prob of each position's actual next token (the
`target_logprob` column an on-policy loss needs), in the head or not, against an independent forward pass; its
place in the settings, the shard schema, `verify`, the reader and the Parquet export; caches without it as before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_cli
from taid_cache.engines.head_path import HeadSettings, apply_head
from taid_cache.errors import UserError
from taid_cache.heads import LmHead, LogitMap
from taid_cache.inputs import Sequence
from taid_cache.shards import load_manifest, read_cache
from taid_cache.shards.contract import FORMAT_VERSION, CacheSettings, Manifest
from taid_cache.shards.integrity import file_sha256
from test_dump_teacher import reference_logprobs

K = 4  # a small head: most actual next tokens lie outside it


def dump(teacher_dir: Path, data: Path, out: Path, *options: str) -> Path:
    run_cli("dump-teacher", "--model", str(teacher_dir), "--data", str(data), "--output", str(out), "--engine", "hf",
            "--top-k", str(K), "--max-length", "256", "--batch-tokens", "1500", "--no-progress", *options)
    return out


@pytest.fixture(scope="module")
def caches(teacher_dir, data_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("target-logprobs")
    return {
        "chat": dump(teacher_dir, data_dir / "chat.jsonl", root / "chat", "--target-logprobs"),
        "tokens": dump(teacher_dir, data_dir / "tokens.jsonl", root / "tokens", "--target-logprobs"),
        "sampled": dump(teacher_dir, data_dir / "chat.jsonl", root / "sampled", "--target-logprobs", "--tail-samples", "8"),
        "plain": dump(teacher_dir, data_dir / "chat.jsonl", root / "plain"),
    }


@pytest.mark.parametrize("which", ["chat", "tokens", "sampled"])
def test_the_stored_value_is_the_log_softmax_at_the_next_token(caches, teacher_dir, which) -> None:
    """At every position, to float32 precision, whether the next token is in the stored head or not."""
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    records = list(read_cache(caches[which]))
    assert records and load_manifest(str(caches[which])).settings.target_logprobs
    outside, positions, worst = 0, 0, 0.0
    for rec in records:
        ref = reference_logprobs(teacher_dir, rec.input_ids, model)[:-1]  # row j: the distribution of token j+1
        following = rec.input_ids[1:]
        assert rec.target_logprob.dtype == np.float32 and rec.target_logprob.shape == (len(rec.input_ids) - 1,)
        worst = max(worst, float(np.abs(rec.target_logprob - ref[np.arange(len(following)), following]).max()))
        outside += int((rec.topk_ids != following[:, None]).all(axis=1).sum())
        positions += len(following)
    assert worst <= 1e-5
    assert outside / positions > 0.5  # most of them were checked off the head
    if which == "sampled":
        assert all(rec.sampled for rec in records)


def test_a_cache_without_the_option_has_no_column(caches) -> None:
    plain = caches["plain"]
    settings = load_manifest(str(plain)).settings
    assert not settings.target_logprobs and settings.format_version == FORMAT_VERSION
    for shard in plain.glob("*.arrow"):
        schema = pa.ipc.open_file(pa.memory_map(str(shard))).schema
        assert "target_logprob" not in schema.names and b"taid_cache.target_logprobs" not in schema.metadata
    records = list(read_cache(plain))
    assert all(rec.target_logprob is None and "target_logprob" not in rec.as_dict() for rec in records)
    # The option changes nothing else: the same head and tail, value for value.
    for a, b in zip(records, read_cache(caches["chat"]), strict=True):
        assert a.sample_id == b.sample_id and np.array_equal(a.topk_ids, b.topk_ids)
        assert np.array_equal(a.topk_logprobs, b.topk_logprobs) and np.array_equal(a.tail_logmass, b.tail_logmass)
        assert np.array_equal(b.as_dict()["target_logprob"], b.target_logprob)


def test_the_column_is_in_the_schema_and_verify_checks_it(caches, tmp_path) -> None:
    cache = caches["chat"]
    shard = sorted(cache.glob("*.arrow"))[0]
    schema = pa.ipc.open_file(pa.memory_map(str(shard))).schema
    assert schema.field("target_logprob").type == pa.list_(pa.float32())
    assert schema.metadata[b"taid_cache.target_logprobs"] == b"true"
    assert run_cli("verify", str(cache)).stdout.startswith("ok:")
    # One shard rewritten without the column, its checksum and size updated in the manifest: the schema differs.
    copy = tmp_path / "dropped"
    shutil.copytree(cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = manifest["shards"][-1]
    path = copy / entry["file"]
    reader = pa.ipc.open_file(pa.memory_map(str(path)))
    batches = [reader.get_batch(b) for b in range(reader.num_record_batches)]
    narrower = pa.schema([f for f in reader.schema if f.name != "target_logprob"], metadata=reader.schema.metadata)
    with pa.OSFile(str(path) + ".new", "wb") as sink, pa.ipc.new_file(sink, narrower) as writer:
        for batch in batches:
            writer.write_batch(pa.RecordBatch.from_arrays([batch.column(n) for n in narrower.names], schema=narrower))
    del reader, batches
    Path(str(path) + ".new").replace(path)
    entry["sha256"], entry["bytes"] = file_sha256(path), path.stat().st_size
    manifest["bytes"] = sum(s["bytes"] for s in manifest["shards"])
    (copy / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("verify", str(copy), check=False)
    assert proc.returncode != 0 and entry["file"] in proc.stderr and "schema differs" in proc.stderr
    assert "Traceback" not in proc.stderr
    with pytest.raises(UserError):
        list(read_cache(copy))


def test_the_parquet_export_carries_the_column(caches, tmp_path) -> None:
    for which in ("sampled", "plain"):
        run_cli("export", str(caches[which]), str(tmp_path / which), "--format", "parquet")
        table = pq.read_table(tmp_path / which)
        records = list(read_cache(caches[which]))
        if which == "plain":
            assert "target_logprob" not in table.column_names
            continue
        assert table.schema.field("target_logprob").type == pa.list_(pa.float32())
        rows = table.column("target_logprob").to_pylist()
        assert len(rows) == len(records)
        for row, rec in zip(rows, records):
            assert np.array_equal(np.asarray(row, np.float32), rec.target_logprob)


def as_format_4(cache: Path, out: Path) -> dict:
    """The cache as the previous release wrote it: format 4, no `target_logprobs` in its settings."""
    shutil.copytree(cache, out)
    files = [out / "manifest.json", *(out / "parts").glob("worker-*.json")]
    for file in files:
        record = json.loads(file.read_text())
        if "format_version" in record:
            record["format_version"] = 4
        record["settings"]["format_version"] = 4
        del record["settings"]["target_logprobs"]
        file.write_text(json.dumps(record))
    return json.loads((out / "manifest.json").read_text())


def test_a_cache_of_format_4_reads_as_one_without_the_column(caches, tmp_path) -> None:
    written = as_format_4(caches["plain"], tmp_path / "v4")
    manifest = load_manifest(str(tmp_path / "v4"))
    assert manifest.format_version == 4 and manifest.settings.format_version == 4
    assert not manifest.settings.target_logprobs
    assert manifest.to_json() == written  # nothing added on the way: its identity is what it was
    for x, y in zip(read_cache(tmp_path / "v4"), read_cache(caches["plain"]), strict=True):
        assert x.sample_id == y.sample_id and x.target_logprob is None
        assert np.array_equal(x.topk_logprobs, y.topk_logprobs) and np.array_equal(x.tail_logmass, y.tail_logmass)
    assert run_cli("verify", str(tmp_path / "v4")).stdout.startswith("ok:")


def test_the_setting_is_checked_against_the_format(caches) -> None:
    values = json.loads((caches["chat"] / "manifest.json").read_text())
    settings = values["settings"]
    assert settings["target_logprobs"] is True and values["format_version"] == FORMAT_VERSION == 5
    with pytest.raises(UserError, match="format 4 has no target log-probs"):
        CacheSettings.from_json({**settings, "format_version": 4}, "s")
    without = {k: v for k, v in settings.items() if k != "target_logprobs"}
    with pytest.raises(UserError, match="it has no 'target_logprobs'"):
        CacheSettings.from_json(without, "s")
    with pytest.raises(UserError, match="'target_logprobs' is 1"):
        CacheSettings.from_json({**settings, "target_logprobs": 1}, "s")
    assert Manifest.from_json(values, "m").settings.target_logprobs


def test_apply_head_gathers_the_next_token_and_changes_nothing_else() -> None:
    """Against a dense float64 reference, chunks straddling the sequences; every other output bit-identical."""
    gen = torch.Generator().manual_seed(7)
    vocab, width = 300, 16
    head = LmHead(torch.randn(vocab, width, generator=gen) * 2.5, torch.randn(vocab, generator=gen), LogitMap(0.5, 30.0))
    lengths = [9, 2, 14]
    sequences = [Sequence(f"s{i}", (np.arange(n) * 37 + i) % vocab, np.arange(n) % 3 != 0) for i, n in enumerate(lengths)]
    hidden = torch.randn(sum(n - 1 for n in lengths), width, generator=gen)
    for draws in (0, 8):
        with_target = apply_head(head, hidden, sequences, HeadSettings(3, None, draws, seed=1, chunk=5, target_logprobs=True))
        without = apply_head(head, hidden, sequences, HeadSettings(3, None, draws, seed=1, chunk=5))
        assert without.target_logprob is None
        for name in ("ids", "logprobs", "tail_logmass", "entropy", "sample_ids", "sample_logprobs"):
            np.testing.assert_array_equal(getattr(with_target, name).numpy(), getattr(without, name).numpy(), err_msg=name)  # NaN = NaN
        z = hidden.double() @ head.weight.double().T + head.bias.double()
        reference = torch.log_softmax(30.0 * torch.tanh(0.5 * z / 30.0), -1)
        following = torch.from_numpy(np.concatenate([s.input_ids[1:] for s in sequences]))
        expected = reference.gather(1, following[:, None]).squeeze(1)
        assert with_target.target_logprob.dtype == torch.float32
        torch.testing.assert_close(with_target.target_logprob.double(), expected, atol=1e-5, rtol=0)
        records = with_target.materialize()
        at = 0
        for rec, seq in zip(records, sequences):
            n = len(seq.input_ids) - 1
            np.testing.assert_array_equal(rec.target_logprob, with_target.target_logprob[at : at + n].numpy())
            at += n
        assert all(r.target_logprob is None for r in without.materialize())
