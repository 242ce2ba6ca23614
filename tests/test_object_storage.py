"""Caches and runs on object storage, against a real S3 API: moto's server on loopback (tests/conftest.py's
`s3_server`), reached the way every S3 client is, through AWS_ENDPOINT_URL and the credentials in the environment.
Each result is compared with the same command on local disk: record for record, byte for byte."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import ROOT, assert_one_line, kill_group, run_cli, write_jsonl
from taid_cache.shards import load_manifest, read_cache
from taid_cache.shards.manifest import load_parts
from taid_cache.storage import open_store
from taid_cache.training.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("s3_server")
DUMP = ["--engine", "hf", "--max-length", "256", "--top-k", "16", "--no-progress"]
TRAIN = ["--batch-size", "4", "--max-length", "128", "--max-steps", "6", "--save-every", "2", "--lr", "3e-3", "--no-progress"]


def s3() -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)


def objects(url: str) -> list[str]:
    """Every object under `url`, as names relative to it."""
    root = url.removeprefix("s3://").rstrip("/")
    return sorted(p[len(root) + 1:] for p in s3().find(root))


def same_records(a: str | Path, b: str | Path) -> None:
    for x, y in zip(read_cache(a), read_cache(b), strict=True):
        mine, theirs = x.as_dict(), y.as_dict()
        assert mine.keys() == theirs.keys()
        for key in mine:
            np.testing.assert_array_equal(mine[key], theirs[key], err_msg=key)


def dump_two_workers(teacher: Path, data: Path, out: str) -> None:
    for index in (0, 1):
        run_cli("dump-teacher", "--model", str(teacher), "--data", str(data), "--output", out, *DUMP,
                "--num-workers", "2", "--worker-index", str(index))


def pending(bucket: str, start: str | None = None) -> list[str]:
    """The bucket's unfinished multipart uploads (after starting one at key `start`)."""
    import boto3

    client, name = boto3.client("s3"), bucket.removeprefix("s3://")
    if start is not None:
        client.create_multipart_upload(Bucket=name, Key=start)
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=name).get("Uploads", [])]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.slow
def test_dump_verify_inspect_train_export_on_s3_equal_local_disk(teacher_dir, student_dir, data_dir, s3_bucket, tmp_path) -> None:
    data = data_dir / "chat.jsonl"
    local, remote = tmp_path / "cache", f"{s3_bucket}/cache"
    dump_two_workers(teacher_dir, data, str(local))
    dump_two_workers(teacher_dir, data, remote)
    assert not Path("s3:").exists() and not (ROOT / "s3:").exists()  # never a local folder named after the URI
    same_records(local, remote)
    # The same bytes in every shard (names differ only by their attempt), and nothing else stored.
    here, there = load_manifest(str(local)), load_manifest(remote)
    assert [s.sha256 for s in here.shards] == [s.sha256 for s in there.shards] and here.settings == there.settings
    listed = {s.file for s in there.shards} | {"manifest.json"} | {f"parts/{p}" for p in open_store(f"{remote}/parts").list("*.json")}
    assert set(objects(remote)) == listed
    assert run_cli("verify", remote).stdout.startswith(f"ok: {len(there.shards)} shards")
    assert run_cli("inspect", "--json", remote).stdout == run_cli("inspect", "--json", str(local)).stdout

    # Train from and to S3: the same steps and the same student as from and to local disk.
    run_cli("train-student", "--student", str(student_dir), "--cache", str(local), "--output", str(tmp_path / "run"), *TRAIN)
    run_cli("train-student", "--student", str(student_dir), "--cache", remote, "--output", f"{s3_bucket}/run", *TRAIN)
    run = open_store(f"{s3_bucket}/run")
    steps = [{k: m.get(k) for k in ("step", "loss", "t", "tokens", "eval_kl_cache")} for m in read_metrics(tmp_path / "run")]
    assert [{k: m.get(k) for k in ("step", "loss", "t", "tokens", "eval_kl_cache")} for m in read_metrics(f"{s3_bucket}/run")] == steps
    assert sha(run.read_bytes("model.safetensors")) == sha((tmp_path / "run" / "model.safetensors").read_bytes())
    assert {n for n in run.list()} >= {"config.json", "model.safetensors", "checkpoints", "metrics.jsonl"}
    assert run.child("checkpoints").list("step-*") == sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))

    # Export from S3 to S3: the Parquet files of a local export, byte for byte, and the _SUCCESS marker.
    run_cli("export", str(local), str(tmp_path / "export"))
    run_cli("export", remote, f"{s3_bucket}/export")
    exported = open_store(f"{s3_bucket}/export")
    assert exported.list() == sorted([p.name for p in (tmp_path / "export").iterdir()] + ["_SUCCESS"])
    for part in (tmp_path / "export").iterdir():
        assert exported.read_bytes(part.name) == part.read_bytes()


def test_a_flipped_byte_in_an_object_is_refused_as_on_disk(teacher_dir, data_dir, s3_bucket) -> None:
    remote = f"{s3_bucket}/cache"
    run_cli("dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--output", remote, *DUMP)
    shard = load_manifest(remote).shards[0].file
    store = open_store(remote)
    data = bytearray(store.read_bytes(shard))
    data[len(data) // 2] ^= 0x01
    store.write_bytes(shard, bytes(data))
    result = run_cli("verify", remote, check=False)
    assert result.returncode == 2 and f"bad shard {shard}: checksum does not match" in result.stderr


@pytest.mark.parametrize("fault", ["missing bucket", "unreachable endpoint"])
@pytest.mark.parametrize("command", ["dump-teacher", "train-student", "train-student --cache", "verify"])
def test_a_bad_uri_is_one_line_before_any_write(fault, command, teacher_dir, student_dir, caches, data_dir, s3_bucket, tmp_path,
                                                monkeypatch) -> None:
    bucket = f"{s3_bucket}-absent" if fault == "missing bucket" else s3_bucket
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if fault == "unreachable endpoint":
        env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # the discard port: nothing listens there
    uri = f"{bucket}/x"
    args = {"dump-teacher": ["--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--output", uri, *DUMP],
            "train-student": ["--student", str(student_dir), "--cache", str(caches["top16"]), "--output", uri, *TRAIN],
            "train-student --cache": ["--student", str(student_dir), "--cache", uri, "--output", str(tmp_path / "run"), *TRAIN],
            "verify": [uri]}[command]
    result = subprocess.run([sys.executable, "-m", "taid_cache.cli", command.split()[0], *args], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env=env)
    assert_one_line(result, uri)
    assert not any(tmp_path.iterdir())  # nothing local, no folder named after the URI
    if fault == "missing bucket" or command in ("verify", "train-student --cache"):
        return
    assert objects(s3_bucket) == []  # nothing written before the failure either


@pytest.mark.slow
def test_kill_9_mid_dump_then_resume_is_identical_and_nothing_half_visible(teacher_dir, data_dir, s3_bucket, tmp_path) -> None:
    # Four copies of the rows: some 24 shards, so that a kill once the first is recorded lands with most of the
    # dump still to write, however fast the rest would go.
    rows = write_jsonl(tmp_path / "rows.jsonl", [json.loads(line) for line in (data_dir / "chat.jsonl").read_text().splitlines()] * 4)
    args = ["dump-teacher", "--model", str(teacher_dir), "--data", str(rows), *DUMP, "--batch-tokens", "300", "--shard-size-mb", "0.02"]
    run_cli(*args, "--output", str(tmp_path / "clean"))
    remote = f"{s3_bucket}/cache"
    proc = subprocess.Popen([sys.executable, "-m", "taid_cache.cli", *args, "--output", remote], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            parts = load_parts(open_store(remote)) if open_store(f"{remote}/parts").list("*.json") else []
            if parts and parts[0].shards:
                break
            time.sleep(0.05)
    finally:
        kill_group(proc, signal.SIGKILL)
        proc.wait()
    assert not open_store(remote).is_file("manifest.json")
    pending(s3_bucket, "cache/shard-w00000-00099-killed.arrow")  # what a kill mid-upload of a large shard leaves
    run_cli(*args, "--output", remote)  # the same command resumes
    assert pending(s3_bucket) == []  # aborted: nothing stored that no manifest names
    same_records(tmp_path / "clean", remote)
    manifest = load_manifest(remote)
    # What the killed attempt left of a shard it never recorded is gone: every object is named by the manifest.
    listed = {s.file for s in manifest.shards} | {"manifest.json", "parts/worker-00000-of-00001.json"}
    assert set(objects(remote)) == listed


@pytest.mark.slow
def test_kill_9_mid_training_then_resume_from_s3_equals_uninterrupted(student_dir, caches, s3_bucket, tmp_path) -> None:
    args = ["train-student", "--student", str(student_dir), "--cache", str(caches["top16"]), "--batch-size", "2",
            "--max-length", "256", "--max-steps", "12", "--save-every", "4", "--lr", "3e-3", "--no-progress"]
    run_cli(*args, "--output", str(tmp_path / "clean"))
    remote = f"{s3_bucket}/run"
    proc = subprocess.Popen([sys.executable, "-m", "taid_cache.cli", *args, "--output", remote], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0)
    try:
        deadline = time.monotonic() + 300
        checkpoints = open_store(f"{remote}/checkpoints")
        while proc.poll() is None and time.monotonic() < deadline and not checkpoints.is_file("step-00000004/meta.json"):
            time.sleep(0.05)
    finally:
        kill_group(proc, signal.SIGKILL)
        proc.wait()
    run = open_store(remote)
    assert not run.is_file("config.json")  # nothing that looks finished
    pending(s3_bucket, "run/checkpoints/step-00000008/__0_0.distcp")  # a kill mid-upload of a large checkpoint file
    run_cli(*args, "--output", remote, "--resume")
    assert pending(s3_bucket) == []
    clean = load_file(tmp_path / "clean" / "model.safetensors")
    with open_store(remote).open_input("model.safetensors") as f:
        (tmp_path / "resumed.safetensors").write_bytes(f.read())
    resumed = load_file(tmp_path / "resumed.safetensors")
    assert clean.keys() == resumed.keys()
    for name in clean:
        assert (clean[name] == resumed[name]).all(), name


def run_fresh(command: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taid_cache.cli", command, *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})


@pytest.mark.parametrize("uri,words", [("nosuch://b/c", ["unknown storage scheme 'nosuch://'", "nosuch://b/c"]),
                                       ("gs://b/c", ["storage scheme 'gs://' in gs://b/c needs a package that is not installed",
                                                     "gcsfs"])])
def test_an_unknown_scheme_or_a_missing_package_is_one_line(uri, words, teacher_dir, student_dir, caches, data_dir, tmp_path) -> None:
    pytest.importorskip("s3fs")
    if uri.startswith("gs://") and importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    dump = run_fresh("dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--output", uri, *DUMP,
                     cwd=tmp_path)
    assert_one_line(dump, *words)
    train = run_fresh("train-student", "--student", str(student_dir), "--cache", uri, "--output", str(tmp_path / "run"), *TRAIN,
                      cwd=tmp_path)
    assert_one_line(train, *words)
    assert not any(tmp_path.iterdir())


def test_a_uri_holding_a_cache_of_other_settings_is_refused_and_a_second_worker_of_one_index_too(teacher_dir, data_dir, s3_bucket) -> None:
    remote = f"{s3_bucket}/cache"
    common = ["dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--output", remote]
    run_cli(*common, *DUMP)
    before = {name: open_store(remote).read_bytes(name) for name in objects(remote)}
    other = run_cli(*common, *DUMP[:-3], "--top-k", "8", "--no-progress", check=False)
    assert other.returncode == 2 and "holds a cache made with other settings: top_k (16 there, 8 now)" in other.stderr
    assert {name: open_store(remote).read_bytes(name) for name in objects(remote)} == before  # nothing touched

    # A live worker 0 of another dump into a new prefix holds its lease: a second worker 0 is refused at once.
    second = f"{s3_bucket}/second"
    with open_store(f"{second}/parts").lease("worker-00000.lock", "worker 0 of 1"):
        result = run_cli("dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--output", second,
                         *DUMP, check=False)
    assert result.returncode == 2 and "another process is already writing worker 0 of 1" in result.stderr
    assert not open_store(second).is_file("manifest.json") and not open_store(f"{second}/parts").list("*.json")


def test_evaluate_reads_students_data_and_teacher_from_uris(teacher_dir, student_dir, data_dir, s3_bucket, tmp_path) -> None:
    store = open_store(s3_bucket)
    store.upload(student_dir, "student")
    store.upload(teacher_dir, "teacher")
    store.upload(data_dir / "chat.jsonl", "data/heldout.jsonl")
    args = ["--prompts", "3", "--max-new-tokens", "4", "--max-length", "128"]
    local = run_cli("evaluate", str(student_dir), "--data", str(data_dir / "chat.jsonl"), "--teacher", str(teacher_dir), *args,
                    "--json", str(tmp_path / "local.json"))
    remote = run_cli("evaluate", f"{s3_bucket}/student", "--data", f"{s3_bucket}/data/heldout.jsonl", "--teacher",
                     f"{s3_bucket}/teacher", *args, "--json", str(tmp_path / "remote.json"))
    assert local.returncode == remote.returncode == 0
    here, there = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "remote"))
    assert here.pop(str(student_dir)) == there.pop(f"{s3_bucket}/student") and here == there


def test_training_keeps_the_fetched_shards_in_the_local_cache_folder(student_dir, caches, s3_bucket, tmp_path) -> None:
    remote = f"{s3_bucket}/cache"
    open_store(s3_bucket).upload(caches["top16"], "cache")
    kept = tmp_path / "kept"
    run_cli("train-student", "--student", str(student_dir), "--cache", remote, "--output", str(tmp_path / "run"), *TRAIN,
            "--local-cache", str(kept), "--read-ahead", "1")
    manifest = load_manifest(remote)
    assert sorted(p.name for p in kept.iterdir()) == sorted(f"{s.sha256}.arrow" for s in manifest.shards)
    for shard in manifest.shards:
        assert sha((kept / f"{shard.sha256}.arrow").read_bytes()) == shard.sha256
    run_cli("train-student", "--student", str(student_dir), "--cache", str(caches["top16"]), "--output", str(tmp_path / "local"), *TRAIN)
    assert sha((tmp_path / "run" / "model.safetensors").read_bytes()) == sha((tmp_path / "local" / "model.safetensors").read_bytes())
