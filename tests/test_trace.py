"""train-student's per-step numbers, bit for bit, against a trace stored from the release before the one-trainer
refactor (tests/data/train_trace.json): every loss, the same seed, cache and initialisation. A change to the
loop, the losses' structure or the checkpoint state that changes one bit of a step's loss, gradient norm, t,
learning rate or held-out score fails here. `TAID_CACHE_WRITE_TRACE=1` rewrites the trace (only on purpose)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from taid_cache.config import LOSSES, TrainConfig
from taid_cache.pipelines.train_student import train_student
from taid_cache.training.metrics import read_metrics

TRACE = Path(__file__).parent / "data" / "train_trace.json"
KEYS = ("step", "loss", "grad_norm", "lr", "t", "tokens", "temperature", "eval_ce", "eval_kl_cache", "eval_top1")


def trace_of(student_dir, caches, out: Path, loss: str) -> list[dict]:
    train_student(TrainConfig(student=str(student_dir), cache=str(caches["top16"]), output=str(out), loss=loss, max_steps=4,
                              batch_size=3, grad_accum=2, lr=3e-3, max_length=128, warmup_steps=1, taid_alpha=0.3,
                              eval_cache=str(caches["top16"]), eval_every=2, progress=False))
    return [{k: m[k] for k in KEYS if k in m} for m in read_metrics(out)]


@pytest.mark.slow
def test_every_loss_takes_the_stored_steps_bit_for_bit(student_dir, caches, tmp_path) -> None:
    got = {loss: trace_of(student_dir, caches, tmp_path / loss, loss) for loss in LOSSES}
    if os.environ.get("TAID_CACHE_WRITE_TRACE") == "1":
        TRACE.write_text(json.dumps(got, indent=1) + "\n")
    stored = json.loads(TRACE.read_text())
    assert got.keys() == stored.keys()
    for loss in LOSSES:
        assert got[loss] == stored[loss], loss
