"""Crash safety and scale-out: kill -9 then resume equals a clean run; N workers' union equals one worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, assert_same_up_to_ties, run_cli, write_jsonl
from taid_cache.shards import read_cache
from taid_cache.shards.manifest import load_parts
from taid_cache.storage import open_store


@pytest.fixture(scope="module")
def many_rows(data_dir, texts) -> Path:
    rows = [{"text": t[i : i + 300]} for t in texts[:20] for i in range(0, 3000, 300) if len(t[i : i + 300]) > 50]
    return write_jsonl(data_dir / "many.jsonl", rows[:160])


def dump_args(teacher_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    # Small batches and tiny shards: a shard is committed after every batch, so kills land between many commits.
    return ["dump-teacher", "--model", str(teacher_dir), "--data", str(data), "--output", str(out), "--engine", "hf",
            "--top-k", "8", "--max-length", "128", "--batch-tokens", "400", "--shard-size-mb", "0.001", "--no-progress", *extra]


def committed_shards(out: Path) -> int:
    try:
        return sum(len(p.shards) for p in load_parts(open_store(str(out))))
    except (json.JSONDecodeError, FileNotFoundError):
        return 0


def kill_when(args: list[str], out: Path, shards: int | None, delay: float = 0.0) -> None:
    """Start a dump and SIGKILL it once `shards` shards are committed (or after `delay` s if shards is None)."""
    proc = subprocess.Popen([sys.executable, "-m", "taid_cache.cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if (shards is None and time.monotonic() > deadline - 120 + delay) or (shards is not None and committed_shards(out) >= shards):
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def records(out: Path) -> list[dict]:
    return list(read_cache(out))


def assert_same_records(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.sample_id == y.sample_id
        mine, theirs = x.as_dict(), y.as_dict()
        assert mine.keys() == theirs.keys()
        for key in mine.keys() - {"sample_id"}:
            np.testing.assert_array_equal(mine[key], theirs[key])


@pytest.mark.slow
def test_kill_9_then_resume_equals_a_clean_run(teacher_dir, many_rows, tmp_path) -> None:
    """With a sampled tail too: the draws depend on the seed and the sample only, so a resumed run redraws them."""
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    args = lambda out: dump_args(teacher_dir, many_rows, out, "--tail-samples", "16")  # noqa: E731
    run_cli(*args(clean))
    kill_when(args(crashed), crashed, shards=None, delay=2.0)  # during start-up
    kill_when(args(crashed), crashed, shards=3)
    kill_when(args(crashed), crashed, shards=9)
    assert 3 <= committed_shards(crashed) < committed_shards(clean)
    assert not (crashed / "manifest.json").exists()  # nothing that looks finished
    with pytest.raises(Exception, match="incomplete"):
        records(crashed)
    proc = run_cli(*args(crashed))
    assert "resumed" in proc.stderr
    assert_same_records(records(crashed), records(clean))
    assert not list(crashed.glob(".*tmp*"))
    again = run_cli(*args(crashed))
    assert "nothing to do" in again.stderr


def test_workers_union_is_the_whole_cache(teacher_dir, many_rows, tmp_path) -> None:
    single, multi = tmp_path / "single", tmp_path / "multi"
    run_cli(*dump_args(teacher_dir, many_rows, single, "--precision", "fp32"))
    # Worker 2 first: the cache is not complete until every worker has finished.
    run_cli(*dump_args(teacher_dir, many_rows, multi, "--precision", "fp32", "--num-workers", "3", "--worker-index", "2"))
    proc = run_cli("verify", str(multi), check=False)
    assert proc.returncode != 0 and "incomplete" in proc.stderr and "1 of 3" in proc.stderr
    procs = [subprocess.Popen([sys.executable, "-m", "taid_cache.cli", *dump_args(teacher_dir, many_rows, multi, "--precision", "fp32",
                                                                                  "--num-workers", "3", "--worker-index", str(i))],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    assert run_cli("verify", str(multi)).returncode == 0
    a, b = records(multi), records(single)
    assert [r.sample_id for r in a] == [r.sample_id for r in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        # Different batch neighbours change float rounding: values agree within float noise, ids up to ties.
        assert_same_up_to_ties(x.topk_ids, x.topk_logprobs, y.topk_ids, y.topk_logprobs, atol=1e-4)
    manifest = json.loads((multi / "manifest.json").read_text())
    assert manifest["num_workers"] == 3 and manifest["records"] == len(b)
