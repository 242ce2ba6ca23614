"""The Python API for people who keep their own trainer: the cache as a stream in train-student's order, the
collator, and Hugging Face's Trainer distilling from a cache step for step like train-student."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from conftest import CACHE_LOSSES, ROOT, run_cli
from taid_cache.integrations import CacheDataset, CacheDistillationConfig, CacheDistillationTrainer, DistillationCollator
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


def hf_args(out, **kw) -> CacheDistillationConfig:
    return CacheDistillationConfig(**{"output_dir": str(out), "max_steps": STEPS, "per_device_train_batch_size": BATCH,
                                      "learning_rate": LR, "lr_scheduler_type": "cosine", "warmup_steps": 0, "weight_decay": 0.0,
                                      "max_grad_norm": 1.0, "logging_steps": 1, "seed": 0, "report_to": [], "save_strategy": "no",
                                      "dataloader_num_workers": 0, "use_cpu": True, "max_length": 256, **kw})


def hf_trainer(student_dir, cache, args, **kw) -> CacheDistillationTrainer:
    return CacheDistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir), args=args, train_dataset=str(cache),
                                    processing_class=AutoTokenizer.from_pretrained(student_dir), **kw)


FAST = ("taid", "fkl")


@pytest.mark.parametrize("loss", [loss if loss in FAST else pytest.param(loss, marks=pytest.mark.slow) for loss in CACHE_LOSSES])
def test_trainer_takes_train_students_steps(student_dir, caches, tmp_path, loss: str) -> None:
    """10 steps of transformers.Trainer on a cache: the same per-step losses (and TAID's t) as train-student on the
    same data order and initialisation, within float tolerance, for every loss the cache serves."""
    run_cli("train-student", "--student", str(student_dir), "--cache", str(caches["top16"]), "--output", str(tmp_path / "cli"),
            "--loss", loss, "--max-steps", str(STEPS), "--batch-size", str(BATCH), "--lr", str(LR), "--max-length", "256",
            "--no-progress")
    cli = [m for m in read_metrics(tmp_path / "cli") if "loss" in m]
    trainer = hf_trainer(student_dir, caches["top16"], hf_args(tmp_path / "hf", loss=loss))
    trainer.train()
    steps = trainer.steps.history
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([s["loss"] for s in steps], [m["loss"] for m in cli], rtol=2e-5)
    logged = [h for h in trainer.state.log_history if "loss" in h]  # the Trainer's own log, rounded to 4 places
    np.testing.assert_allclose([h["loss"] for h in logged], [m["loss"] for m in cli], atol=1e-4)
    if loss == "taid":
        np.testing.assert_allclose([s["t"] for s in steps], [m["t"] for m in cli], rtol=1e-6)
        assert [h["t"] for h in logged] == [s["t"] for s in steps] and steps[-1]["t"] > steps[0]["t"]
    if loss == "ctkd":
        np.testing.assert_allclose([h["temperature"] for h in logged], [m["temperature"] for m in cli], rtol=1e-5)
    # The student it saves is a plain Hugging Face folder.
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    for name, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, trainer.model.student.state_dict()[name])


class Recorder(TrainerCallback):
    """What every report_to backend is handed: the logs of each `on_log`."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.mark.parametrize("loss", ["taid", "ctkd"])
def test_a_resumed_trainer_takes_the_uninterrupted_steps(student_dir, caches, tmp_path, loss: str) -> None:
    """save_steps 5, then a new trainer resumed from checkpoint-5: steps 6-10 as the uninterrupted run's (loss, t,
    ctkd's temperature) and the same final weights."""
    whole = hf_trainer(student_dir, caches["top16"], hf_args(tmp_path / "whole", loss=loss))
    whole.train()
    first = hf_trainer(student_dir, caches["top16"], hf_args(tmp_path / "cut", loss=loss, save_strategy="steps", save_steps=5,
                                                              max_steps=STEPS))
    first.train()
    resumed = hf_trainer(student_dir, caches["top16"], hf_args(tmp_path / "cut", loss=loss))
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-5"))
    assert [s["step"] for s in resumed.steps.history] == list(range(6, STEPS + 1))
    np.testing.assert_allclose([s["loss"] for s in resumed.steps.history], [s["loss"] for s in whole.steps.history[5:]], rtol=1e-5)
    assert [s["t"] for s in resumed.steps.history] == pytest.approx([s["t"] for s in whole.steps.history[5:]], rel=1e-9)
    assert resumed.policy.t == pytest.approx(whole.policy.t, rel=1e-9)
    ours, theirs = resumed.model.state_dict(), whole.model.state_dict()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


def test_evaluation_logs_loss_kl_and_top1_t_reaches_every_backend_and_epochs_count_the_cache(student_dir, caches, tmp_path) -> None:
    recorder = Recorder()
    args = hf_args(tmp_path / "hf", max_steps=4, per_device_train_batch_size=8, eval_strategy="steps", eval_steps=2,
                   per_device_eval_batch_size=8, report_to=["tensorboard"])
    trainer = hf_trainer(student_dir, caches["top16"], args, eval_dataset=str(caches["top16"]), callbacks=[recorder])
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]
    for h in evals:
        assert {"eval_loss", "eval_kl_cache", "eval_top1", "eval_ce"} <= h.keys() and 0 <= h["eval_top1"] <= 1 and h["eval_kl_cache"] > 0
    records = len(list(read_cache(caches["top16"])))
    trained = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["epoch"] for h in trained] == pytest.approx([step * 8 / records for step in range(1, 5)])  # 4 steps x 8 of 24
    assert all("t" in logs for logs in recorder.logs if "loss" in logs) and len(trained) == 4
    tags = event_tags(tmp_path / "hf")
    assert {"train/t", "train/loss", "eval/loss", "eval/kl_cache", "eval/top1"} <= tags, tags
    # The held-out scores are train-student's own evaluation of the same student.
    from taid_cache.training.distributed import Dist
    from taid_cache.training.evaluate import evaluate

    direct = evaluate(trainer.model.loss_model, CacheRows(str(caches["top16"])), Dist(), 8, 256, False, "student",
                      trainer.policy.loss, trainer.policy.t)
    assert direct["eval_kl_cache"] == pytest.approx(evals[-1]["eval_kl_cache"], rel=1e-6)


def event_tags(folder) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags().get("scalars", []))
    return tags


def test_the_cache_is_checked_on_the_hugging_face_path_too(student_dir, caches, tmp_path, texts) -> None:
    """Another tokenizer with the same LM-head rows, fewer rows, a loss the cache cannot serve: one line each."""
    from taid_cache.errors import UserError
    from taid_cache.reproduce.tokenizer import train_tokenizer

    other = train_tokenizer(texts[:10] + ["something else entirely"], 512, tmp_path / "other")
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    with pytest.raises(UserError, match="tokenizer differs from the one the cache was made with"):
        CacheDistillationTrainer(model=student, args=hf_args(tmp_path / "a"), train_dataset=str(caches["top16"]), processing_class=other)
    small = AutoModelForCausalLM.from_pretrained(student_dir)
    small.resize_token_embeddings(100)
    with pytest.raises(UserError, match="has 100 vocabulary rows, fewer than the tokenizer's"):
        CacheDistillationTrainer(model=small, args=hf_args(tmp_path / "b"), train_dataset=str(caches["top16"]),
                                 processing_class=AutoTokenizer.from_pretrained(student_dir))
    with pytest.raises(UserError, match="does not read it"):
        hf_args(tmp_path / "c", loss="fkl", js_beta=0.3)


@pytest.mark.slow
@pytest.mark.distributed
def test_under_torchrun_the_trainer_takes_train_students_two_rank_steps(student_dir, caches, tmp_path) -> None:
    """Two processes (DDP over gloo, each reading its share of the stream) against train-student's two FSDP2 ranks,
    for every loss the cache serves: a step holds the same sequences and the loss is over the step's tokens on both
    ranks, so the losses agree. One torchrun start per front-end, every loss in turn inside it."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    losses = ",".join(CACHE_LOSSES)
    config = {"student": str(student_dir), "cache": str(caches["top16"]), "output": str(tmp_path / "cli"), "max_steps": 6,
              "batch_size": 2, "lr": LR, "max_length": 256, "progress": False}
    (tmp_path / "cli.json").write_text(json.dumps(config))
    for script, *args in ((["train_student_ranks.py", str(tmp_path / "cli.json"), losses]),
                          (["hf_trainer_ranks.py", str(student_dir), str(caches["top16"]), str(tmp_path / "hf"), "6", "2", str(LR), losses])):
        (tmp_path / "hf").mkdir(exist_ok=True)
        ran = subprocess.run([*torchrun, str(ROOT / "tests" / script), *args], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert ran.returncode == 0, f"{script}: exit {ran.returncode}\n{ran.stderr[-8000:]}"
    for loss in CACHE_LOSSES:
        history = json.loads((tmp_path / "hf" / f"{loss}.json").read_text())
        cli = [m for m in read_metrics(tmp_path / "cli" / loss) if "loss" in m]
        np.testing.assert_allclose([h["loss"] for h in history], [m["loss"] for m in cli], rtol=2e-5, err_msg=loss)
        if loss == "taid":
            np.testing.assert_allclose([h["t"] for h in history], [m["t"] for m in cli], rtol=1e-6)


def test_the_api_pages_snippet_runs_as_written_on_cpu(student_dir, caches, tmp_path, monkeypatch) -> None:
    """docs/API.md's Hugging Face Trainer snippet, executed as it stands, in a folder holding what it names."""
    text = (ROOT / "docs" / "API.md").read_text()
    section = text[text.index("## Hugging Face Trainer"):]
    code = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 3)]
    for name, target in (("student", student_dir), ("cache", caches["top16"]), ("heldout-cache", caches["top16"])):
        (tmp_path / name).symlink_to(target)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "API.md", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.state.global_step == 20 and (tmp_path / "distilled" / "config.json").is_file()
    assert [h["step"] for h in trainer.state.log_history if "eval_loss" in h] == [10, 20]
