"""The cache contract (shards/contract.py): each record's check on the way in from JSON, a cache of the previous
format read as it is, and the round trip of every record through its JSON."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from conftest import run_cli
from taid_cache.errors import UserError
from taid_cache.shards import load_manifest, read_cache
from taid_cache.shards.contract import FORMAT_VERSION, CacheSettings, Cursor, Lineage, Manifest, ShardEntry, WorkerPart
from taid_cache.shards.manifest import load_parts
from taid_cache.storage import open_store


@pytest.fixture(scope="module")
def cache(caches):
    return caches["top16"]


def test_every_record_round_trips_through_its_json(cache) -> None:
    manifest = load_manifest(str(cache))
    assert manifest.format_version == FORMAT_VERSION
    assert Manifest.from_json(json.loads(json.dumps(manifest.to_json())), "m") == manifest
    for part in load_parts(open_store(str(cache))):
        assert WorkerPart.from_json(part.to_json(), "p") == part
    # What the file holds is what to_json writes: nothing is added or lost on the way.
    assert json.loads((cache / "manifest.json").read_text()) == manifest.to_json()
    assert manifest.settings.lineage == Lineage("dataset", ",".join(manifest.settings.dataset), manifest.settings.dataset_fingerprint)


def test_a_cache_of_format_3_opens_as_it_is(cache, tmp_path) -> None:
    """What the previous release wrote: format 3, no lineage, shards named without an attempt. It reads record for
    record as it did, its lineage taken to be its dataset, and trains."""
    old = tmp_path / "v3"
    shutil.copytree(cache, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for i, shard in enumerate(manifest["shards"]):  # the previous release's names
        name = f"shard-w00000-{i:05d}.arrow"
        (old / shard["file"]).rename(old / name)
        shard["file"] = name
    manifest["format_version"] = manifest["settings"]["format_version"] = 3
    del manifest["settings"]["lineage"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    settings = load_manifest(str(old)).settings
    assert settings.format_version == 3 and settings.lineage.kind == "dataset"
    # Its identity is the previous release's (the hash of the manifest as stored), so a run it started resumes.
    stored = json.loads((old / "manifest.json").read_text())
    assert load_manifest(str(old)).identity == hashlib.sha256(json.dumps(stored, sort_keys=True).encode()).hexdigest()
    assert settings.lineage.fingerprint == manifest["settings"]["dataset_fingerprint"]
    for x, y in zip(read_cache(old), read_cache(cache), strict=True):
        assert x.sample_id == y.sample_id and np.array_equal(x.topk_logprobs, y.topk_logprobs)
    assert run_cli("verify", str(old)).stdout.startswith("ok:")


def settings_json(cache) -> dict:
    return json.loads((cache / "manifest.json").read_text())["settings"]


@pytest.mark.parametrize("change,words", [
    ({"top_k": -1}, ["'top_k' is -1, below 0"]),
    ({"top_k": True}, ["'top_k' is True"]),
    ({"vocab_size": "512"}, ["'vocab_size' is '512'"]),
    ({"precision": "fp8"}, ["'precision' is 'fp8', not one of compact, fp32"]),
    ({"top_p": 1.5}, ["top_p is 1.5"]),
    ({"lineage": {"kind": "teacher", "name": "x", "fingerprint": ""}}, ["'kind' is 'teacher'"]),
    ({"num_workers": 0}, ["'num_workers' is 0, below 1"]),
    ({"dataset": "a.jsonl"}, ["'dataset' is not a list"]),
])
def test_a_settings_field_of_the_wrong_type_or_range_is_refused(cache, change, words) -> None:
    with pytest.raises(UserError) as error:
        CacheSettings.from_json({**settings_json(cache), **change}, "the settings")
    for word in words:
        assert word in str(error.value) and str(error.value).startswith("the settings")


def test_a_missing_field_and_a_value_that_would_flood_the_message(cache) -> None:
    values = settings_json(cache)
    del values["teacher_hash"]
    with pytest.raises(UserError, match="it has no 'teacher_hash'"):
        CacheSettings.from_json(values, "s")
    with pytest.raises(UserError) as error:
        CacheSettings.from_json({**settings_json(cache), "teacher": ["x"] * 10_000}, "s")
    assert len(str(error.value)) < 200


def test_totals_must_add_up_and_shard_entries_agree_with_themselves(cache) -> None:
    manifest = json.loads((cache / "manifest.json").read_text())
    with pytest.raises(UserError, match="records is 1, its shards add up to"):
        Manifest.from_json({**manifest, "records": 1}, "m")
    shard = manifest["shards"][0]
    with pytest.raises(UserError, match="not lists of as many integers"):
        ShardEntry.from_json({**shard, "batch_crc32": shard["batch_crc32"] + [1]}, "s")
    with pytest.raises(UserError, match="record batches hold"):
        ShardEntry.from_json({**shard, "batch_rows": [shard["batch_rows"][0] + 1, *shard["batch_rows"][1:]]}, "s")
    with pytest.raises(UserError, match="'next_row' is -1, below 0"):
        Cursor.from_json({"next_row": -1}, "c")


@pytest.mark.parametrize("version", [2, 6, "5", None])
def test_another_format_version_is_refused_naming_it(cache, version) -> None:
    manifest = json.loads((cache / "manifest.json").read_text())
    with pytest.raises(UserError) as error:
        Manifest.from_json({**manifest, "format_version": version}, "the manifest")
    assert f"cache format {version!r}" in str(error.value) and "reads formats 3, 4 and 5" in str(error.value)
