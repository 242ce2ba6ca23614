"""train-student's per-step numbers against a trace stored from the release before the one-trainer refactor
(tests/data/train_trace.json): every loss, the same seed, cache and initialisation. Steps, token counts and the
learning rate must match exactly; the losses, gradient norms, TAID's t, ctkd's learned temperature and held-out scores
to float32 rounding (a relative 1e-5), because the CPU's kernels set their seventh digit: AVX2 and AVX-512 builds of MKL and
ATen sum in different orders, and CI's machines are not all one kind. A change to the loop, the losses' structure
or the checkpoint state moves them by far more. `TAID_CACHE_WRITE_TRACE=1` rewrites the trace (only on purpose)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import CACHE_LOSSES
from taid_cache.config import TrainConfig
from taid_cache.pipelines.train_student import train_student
from taid_cache.training.metrics import read_metrics

TRACE = Path(__file__).parent / "data" / "train_trace.json"
EXACT = ("step", "lr", "tokens")
# TAID's t moves with the loss where its adaptive update wins; ctkd's temperature is learned.
ROUNDED = ("loss", "grad_norm", "t", "temperature", "eval_ce", "eval_kl_cache", "eval_top1")
KEYS = EXACT + ROUNDED


def trace_of(student_dir, caches, out: Path, loss: str) -> list[dict]:
    train_student(TrainConfig(student=str(student_dir), cache=str(caches["top16"]), output=str(out), loss=loss, max_steps=4,
                              batch_size=3, grad_accum=2, lr=3e-3, max_length=128, warmup_steps=1, taid_alpha=0.3,
                              eval_cache=str(caches["top16"]), eval_every=2, progress=False))
    return [{k: m[k] for k in KEYS if k in m} for m in read_metrics(out)]


@pytest.mark.slow
def test_every_loss_takes_the_stored_steps(student_dir, caches, tmp_path) -> None:
    got = {loss: trace_of(student_dir, caches, tmp_path / loss, loss) for loss in CACHE_LOSSES}
    if os.environ.get("TAID_CACHE_WRITE_TRACE") == "1":
        TRACE.write_text(json.dumps(got, indent=1) + "\n")
    stored = json.loads(TRACE.read_text())
    assert got.keys() == stored.keys()
    for loss in CACHE_LOSSES:
        assert [row.keys() for row in got[loss]] == [row.keys() for row in stored[loss]], loss
        for mine, theirs in zip(got[loss], stored[loss]):
            assert {k: mine[k] for k in EXACT if k in mine} == {k: theirs[k] for k in EXACT if k in theirs}, (loss, mine)
            assert {k: mine[k] for k in ROUNDED if k in mine} == pytest.approx(
                {k: theirs[k] for k in ROUNDED if k in theirs}, rel=1e-5, abs=1e-7), (loss, mine)
