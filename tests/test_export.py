"""`taid-cache export`: the decoded Parquet read back by pyarrow, datasets and polars equals the cache, and the
axolotl layout follows axolotl's documented knowledge-distillation columns."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from taid_cache.shards import read_cache
from taid_cache.shards.export import PAD_LOGPROB


@pytest.fixture(scope="module")
def sampled_cache(teacher_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "sampled"
    run_cli("dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--output", str(out), "--engine", "hf",
            "--top-k", "4", "--top-p", "0.6", "--tail-samples", "0", "--max-length", "256", "--no-progress")
    return out


def rows_by_reader(folder):
    import datasets
    import polars as pl

    by_arrow = pq.read_table(folder).to_pylist()
    by_datasets = list(datasets.load_dataset("parquet", data_files=str(folder / "*.parquet"), split="train"))
    by_polars = pl.read_parquet(folder / "*.parquet").to_dicts()
    return {"pyarrow": by_arrow, "datasets": by_datasets, "polars": by_polars}


@pytest.mark.parametrize("which", ["top16", "sampled"])
def test_decoded_parquet_equals_the_cache_in_every_reader(caches, sampled_cache, tmp_path, which: str) -> None:
    cache = caches["top16"] if which == "top16" else sampled_cache
    run_cli("export", str(cache), str(tmp_path / "out"))
    expected = list(read_cache(cache))
    for reader, rows in rows_by_reader(tmp_path / "out").items():
        assert len(rows) == len(expected), reader
        for row, rec in zip(rows, expected):
            assert row["sample_id"] == rec.sample_id
            assert list(row["input_ids"]) == rec.input_ids.tolist() and list(row["loss_mask"]) == rec.loss_mask.tolist()
            used = rec.topk_ids >= 0
            assert [list(r) for r in row["topk_ids"]] == [ids[m].tolist() for ids, m in zip(rec.topk_ids, used)], reader
            for got, lps, m in zip(row["topk_logprobs"], rec.topk_logprobs, used):
                np.testing.assert_array_equal(np.asarray(got, np.float32), lps[m])
            np.testing.assert_array_equal(np.asarray(row["tail_logmass"], np.float32), rec.tail_logmass)
    if which == "sampled":  # top-p: the kept entries vary per position, and the export keeps exactly those
        assert len({len(r) for r in rows_by_reader(tmp_path / "out")["pyarrow"][0]["topk_ids"]}) > 1


def test_a_sampled_tail_exports_its_draws(teacher_dir, data_dir, tmp_path) -> None:
    run_cli("dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--output", str(tmp_path / "c"),
            "--engine", "hf", "--top-k", "2", "--tail-samples", "8", "--max-length", "256", "--no-progress")
    run_cli("export", str(tmp_path / "c"), str(tmp_path / "out"))
    for row, rec in zip(pq.read_table(tmp_path / "out").to_pylist(), read_cache(tmp_path / "c")):
        used = rec.sample_ids >= 0
        assert [list(r) for r in row["sample_ids"]] == [ids[m].tolist() for ids, m in zip(rec.sample_ids, used)]
        assert [sum(r) for r in row["sample_draws"]] == [8] * len(used)  # every position drew 8
        for got, lps, m in zip(row["sample_logprobs"], rec.sample_logprobs, used):
            np.testing.assert_array_equal(np.asarray(got, np.float32), lps[m])


def test_the_axolotl_layout_follows_its_documented_schema(caches, tmp_path) -> None:
    """axolotl's KD docs: target row j is the distribution over input_ids[j + 1]; target_mask[j] is 0 where
    labels[j + 1] == -100; the last row is padding (large negative log-prob, mask 0)."""
    run_cli("export", str(caches["top16"]), str(tmp_path / "ax"), "--format", "axolotl")
    table = pq.read_table(tmp_path / "ax")
    assert set(table.column_names) == {"input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs", "target_mask"}
    for row, rec in zip(table.to_pylist(), read_cache(caches["top16"])):
        n = len(row["input_ids"])
        assert n == len(row["labels"]) == len(row["attention_mask"]) == len(row["target_token_ids"]) == len(row["target_mask"])
        assert all(len(r) == 16 for r in row["target_token_ids"]) and all(len(r) == 16 for r in row["target_logprobs"])
        labels = np.asarray(row["labels"])
        np.testing.assert_array_equal(labels, np.where(rec.loss_mask, rec.input_ids, -100))
        mask = np.asarray(row["target_mask"])
        for j in range(n - 1):
            assert (mask[j] == 0).all() if labels[j + 1] == -100 else (mask[j] == 1).all()
        assert (mask[-1] == 0).all() and all(v == pytest.approx(PAD_LOGPROB) for v in row["target_logprobs"][-1])
        np.testing.assert_array_equal(np.asarray(row["target_token_ids"][:-1]), rec.topk_ids)
        np.testing.assert_array_equal(np.asarray(row["target_logprobs"][:-1], np.float32), rec.topk_logprobs)


def test_export_refuses_an_existing_folder_and_an_unknown_format(caches, tmp_path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    for args, words in ((["--format", "csv"], "--format must be one of"), ([], "not an empty folder")):
        proc = run_cli("export", str(caches["top16"]), str(tmp_path / "full"), *args, check=False)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr
