"""The vLLM engine at tensor-parallel size 2 and the transformers engine give the same cache."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from conftest import run_cli, run_process
from taid_cache.shards import read_cache
from taid_cache.shards.codec import LOGPROB_STEP

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
              pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow]


def test_vllm_tp2_equals_transformers(teacher_dir, data_dir, tmp_path) -> None:
    common = ["--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--top-k", "16", "--max-length", "512", "--no-progress"]
    run_cli("dump-teacher", *common, "--output", str(tmp_path / "hf"), "--engine", "hf")
    proc = run_process("dump-teacher", *common, "--output", str(tmp_path / "vllm"), "--engine", "vllm", "--tensor-parallel-size", "2")
    assert "Worker_TP1" in proc.stdout + proc.stderr  # a second tensor-parallel rank really ran
    a, b = list(read_cache(tmp_path / "vllm")), list(read_cache(tmp_path / "hf"))
    assert [r["sample_id"] for r in a] == [r["sample_id"] for r in b] and len(a) == 24
    mismatched = total = 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
        np.testing.assert_array_equal(x["loss_mask"], y["loss_mask"])
        # Both are within half a step of the same true value, so codes differ by at most one step.
        assert np.abs(x["topk_logprobs"] - y["topk_logprobs"]).max() <= LOGPROB_STEP + 1e-6
        # vLLM's tail is 1 − Σ of its float32 top-k (floored at TAIL_FLOOR); hf sums it off the full distribution.
        assert np.abs(np.exp(x["tail_logmass"].astype(np.float64)) - np.exp(y["tail_logmass"].astype(np.float64))).max() <= 1e-5
        same = x["topk_ids"] == y["topk_ids"]
        mismatched += int((~same).sum())
        total += same.size
    # Ids differ only where two candidates are (near-)tied, which swaps neighbours: a tiny fraction.
    assert mismatched <= total * 1e-3
    # vLLM hands back no full distribution: its fidelity report has the captured mass and hits, not entropy or KL.
    report_vllm, report_hf = (json.loads((tmp_path / e / "manifest.json").read_text())["fidelity"] for e in ("vllm", "hf"))
    assert report_vllm["captured_mass_mean"] == pytest.approx(report_hf["captured_mass_mean"], abs=1e-5)
    assert abs(report_vllm["next_token_hit_rate"] - report_hf["next_token_hit_rate"]) <= 1e-3
    assert report_vllm["teacher_entropy_mean"] is None and report_vllm["kl_uniform_tail_mean"] is None
    assert report_hf["teacher_entropy_mean"] > 0
