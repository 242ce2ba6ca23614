"""`dump-teacher --launcher ray`: the N workers of one dump as Ray tasks on a local cluster, writing one cache on
an object store (the moto S3 server), equal record for record to a single local worker's."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from taid_cache.shards import read_cache

FIELDS = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "tail_logmass")


def dump_args(teacher_dir: Path, data_dir: Path, out: str, *extra: str) -> list[str]:
    # --batch-tokens 1: every sequence runs alone, so a worker's slice computes exactly what one worker does.
    return ["dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--output", out, "--engine", "hf",
            "--top-k", "8", "--max-length", "128", "--batch-tokens", "1", "--no-progress", *extra]


@pytest.mark.slow
@pytest.mark.distributed
def test_ray_workers_write_one_s3_cache_equal_to_one_local_worker(teacher_dir, data_dir, s3_bucket, tmp_path) -> None:
    ray = pytest.importorskip("ray")
    assert os.environ["AWS_ENDPOINT_URL"]  # set by the fixture before ray.init: the workers inherit it
    remote, single = f"{s3_bucket}/cache", tmp_path / "single"
    run_cli(*dump_args(teacher_dir, data_dir, str(single)))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        proc = run_cli(*dump_args(teacher_dir, data_dir, remote, "--launcher", "ray", "--num-workers", "2"))
    finally:
        ray.shutdown()
    assert "worker 0 of 2" in proc.stderr and "worker 1 of 2" in proc.stderr and "cache complete" in proc.stderr
    assert run_cli("verify", remote).stdout.startswith("ok: ")
    a, b = list(read_cache(remote)), list(read_cache(single))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.sample_id == y.sample_id
        for name in FIELDS:
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=f"{x.sample_id} {name}")


def test_ray_with_a_worker_index_is_refused_before_anything_is_written(teacher_dir, data_dir, tmp_path) -> None:
    out = tmp_path / "cache"
    proc = run_cli(*dump_args(teacher_dir, data_dir, str(out), "--launcher", "ray", "--num-workers", "2", "--worker-index", "1"),
                   check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --launcher ray runs all 2 workers itself: drop --worker-index 1"
    assert not out.exists()
