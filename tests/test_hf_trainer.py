"""The Python API for people who keep their own trainer: the cache as a stream in train-student's order, the
collator, and Hugging Face's Trainer distilling from a cache step for step like train-student."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from conftest import ROOT, run_cli
from taid_cache.integrations import CacheDataset, DistillationCollator, DistillationTrainer
from taid_cache.losses import LossConfig, TaidSchedule
from taid_cache.shards import read_cache
from taid_cache.training.data import CacheRows, CacheStream, StreamOrder
from taid_cache.training.metrics import read_metrics

STEPS, BATCH, LR = 10, 4, 1e-3


def test_the_dataset_streams_train_students_order(caches) -> None:
    """Item for item what train-student's stream holds, micro-batch by micro-batch, with loader workers too."""
    ours = CacheStream(CacheRows(str(caches["top16"])), StreamOrder(7, 16, True, limit=12 * BATCH, batch_size=BATCH), 256)
    expected = [torch.where(mb.targets, mb.labels, -100) for mb in ours]
    dataset = CacheDataset(caches["top16"], seed=7, shuffle_buffer=16, batch_size=BATCH, limit=12 * BATCH)
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=workers,
                                             collate_fn=DistillationCollator(256), multiprocessing_context="spawn" if workers else None)
        got = [b["shift_labels"] for b in loader]
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)
    # A rank's share is every world-th item; a resumed stream skips what was read.
    whole = [r.sample_id for r in CacheDataset(caches["top16"], seed=7, limit=20)]
    assert [r.sample_id for r in CacheDataset(caches["top16"], seed=7, rank=1, world=2, limit=20)] == whole[1::2]
    assert [r.sample_id for r in CacheDataset(caches["top16"], seed=7, start=5, limit=15)] == whole[5:]
    every = sorted(r.sample_id for r in read_cache(caches["top16"]))
    assert sorted(r.sample_id for r in CacheDataset(caches["top16"], seed=7, limit=len(every))) == every  # an epoch: each once


@pytest.mark.parametrize("loss", ["taid", "fkl"])
def test_trainer_takes_train_students_steps(student_dir, caches, tmp_path, loss: str) -> None:
    """10 steps of transformers.Trainer on a cache: the same per-step losses (and TAID's t) as train-student on the
    same data order and initialisation, within float tolerance."""
    run_cli("train-student", "--student", str(student_dir), "--cache", str(caches["top16"]), "--output", str(tmp_path / "cli"),
            "--loss", loss, "--max-steps", str(STEPS), "--batch-size", str(BATCH), "--lr", str(LR), "--max-length", "256",
            "--no-progress")
    cli = [m for m in read_metrics(tmp_path / "cli") if "loss" in m]
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=LR,
                             lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
                             seed=0, report_to=[], save_strategy="no", dataloader_num_workers=0, use_cpu=True)
    trainer = DistillationTrainer(student, caches["top16"], args, LossConfig(loss), TaidSchedule(), max_length=256,
                                  tokenizer=AutoTokenizer.from_pretrained(student_dir))
    trainer.train()
    steps = trainer.taid.history
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([s["loss"] for s in steps], [m["loss"] for m in cli], rtol=2e-5)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]  # the Trainer's own log, rounded to 4 places
    np.testing.assert_allclose(logged, [m["loss"] for m in cli], atol=1e-4)
    if loss == "taid":
        np.testing.assert_allclose([s["t"] for s in steps], [m["t"] for m in cli], rtol=1e-6)
        assert steps[-1]["t"] > steps[0]["t"]
    # The student it saves is a plain Hugging Face folder.
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    for name, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, trainer.model.student.state_dict()[name])


@pytest.mark.slow
@pytest.mark.distributed
def test_under_torchrun_the_trainer_takes_train_students_two_rank_steps(student_dir, caches, tmp_path) -> None:
    """Two processes (DDP over gloo, each reading its share of the stream) against train-student's two FSDP2 ranks:
    a step holds the same sequences and the loss is over the step's tokens on both ranks, so the losses agree."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    common = ["--max-steps", "6", "--batch-size", "2", "--lr", str(LR), "--max-length", "256", "--no-progress"]
    subprocess.run([*torchrun, "-m", "taid_cache.cli", "train-student", "--student", str(student_dir), "--cache", str(caches["top16"]),
                    "--output", str(tmp_path / "cli"), "--loss", "taid", *common], check=True, cwd=ROOT, capture_output=True)
    (tmp_path / "hf").mkdir()
    subprocess.run([*torchrun, str(ROOT / "tests" / "hf_trainer_ranks.py"), str(student_dir), str(caches["top16"]), str(tmp_path / "hf"),
                    "6", "2", str(LR)], check=True, cwd=ROOT, capture_output=True)
    history = json.loads((tmp_path / "hf" / "history.json").read_text())
    cli = [m for m in read_metrics(tmp_path / "cli") if "loss" in m]
    np.testing.assert_allclose([h["loss"] for h in history], [m["loss"] for m in cli], rtol=2e-5)
    np.testing.assert_allclose([h["t"] for h in history], [m["t"] for m in cli], rtol=1e-6)
