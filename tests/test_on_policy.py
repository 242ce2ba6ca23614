"""On-policy distillation online: the sampler's decisions against the original's rules (SakanaAI/TAID
src/sampler.py) on a fixed random stream and loss sequence; the student answering a micro-batch's prompts; a run
of each kind; kill-free resume equal to the uninterrupted run; bad input."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line, run_cli
from taid_cache.config import TrainConfig
from taid_cache.onpolicy.sampler import Answer, Choice, OnPolicySampler, SamplerConfig
from taid_cache.pipelines.train_student import train_student
from taid_cache.training.data import prompt_ids
from taid_cache.training.metrics import read_metrics


def original_choices(kind: str, uniforms: list[float], losses: dict[int, float], total: int, alpha: float, capacity: int,
                     batch: int, ratio: str) -> list[str]:
    """The original SampleGenerator's branches, written from its source, fed the same uniforms: per micro-batch
    (one per step here), with the buffer's length tracked and its update on the validation losses given by step."""
    threshold, prev, held = 0.0, None, 0
    out = []
    for step, r in enumerate(uniforms):
        if step in losses and kind == "adaptive":
            loss = losses[step]
            if prev is None:
                prev = loss
            elif loss >= prev:
                threshold = min(threshold + 0.1, 1.0)
                prev = loss
        samp = {"constant": threshold * 0.5, "increasing": threshold * step / total, "decreasing": threshold * (1 - step / total)}[ratio]
        if kind == "mixed" and r < alpha:
            held = min(held + batch, capacity)
            out.append("generate+replay")
        elif kind == "adaptive" and (r < samp or (r < threshold and held < capacity)):
            held = min(held + batch, capacity)
            out.append("generate")
        elif kind == "adaptive" and r < threshold:
            out.append("replay")
        else:
            out.append("data")
    return out


@pytest.mark.parametrize("kind,ratio", [("mixed", "decreasing"), ("adaptive", "decreasing"), ("adaptive", "constant"),
                                        ("adaptive", "increasing")])
def test_sampler_decides_as_the_original(kind: str, ratio: str) -> None:
    total, batch, capacity = 400, 4, 40
    sampler = OnPolicySampler(SamplerConfig(kind, 0.5, 0.0, 0.0, ratio, capacity), seed=3)
    # The same uniforms the sampler will draw, from a copy of its generator.
    uniforms = list(np.random.default_rng([3, 0x0B5]).uniform(size=total))
    # Validation losses every 20 steps that rise and fall: the threshold must climb only on the rises.
    losses = {s: 2.0 + 0.3 * np.sin(s / 37.0) for s in range(0, total, 20)}
    ours = []
    for step in range(total):
        if step in losses:
            sampler.update(losses[step])
        choice = sampler.decide(step, total)
        if choice in (Choice.GENERATE, Choice.GENERATE_REPLAY):
            sampler.buffer.add([Answer((1, 2, 3), 1)] * batch)
        ours.append(choice.value)
    assert ours == original_choices(kind, uniforms, losses, total, 0.5, capacity, batch, ratio)
    if kind == "adaptive":
        assert 0 < sampler.threshold <= 1.0  # the sine's rises raised it
        assert {"generate", "data"} <= set(ours)
    else:
        share = ours.count("generate+replay") / total
        assert abs(share - 0.5) < 4 * np.sqrt(0.25 / total)


def test_threshold_rises_only_when_the_loss_does_not_fall() -> None:
    sampler = OnPolicySampler(SamplerConfig("adaptive"), seed=0)
    for loss in (3.0, 2.5, 2.6, 2.4, 2.7, 2.7):
        sampler.update(loss)
    # 3.0 sets the reference; 2.5 falls (no rise, the reference stays 3.0: the original moves it only on a rise);
    # 2.6 < 3.0 no rise; 2.4 no; 2.7 no; 2.7 no — all below 3.0.
    assert sampler.threshold == 0.0
    sampler.update(3.0)  # not below 3.0: +0.1, reference 3.0
    sampler.update(3.05)  # +0.1
    assert sampler.threshold == pytest.approx(0.2) and sampler.prev_loss == 3.05
    for _ in range(20):
        sampler.update(10.0)
    assert sampler.threshold == 1.0


def test_replay_buffer_keeps_the_newest_and_draws_without_replacement() -> None:
    sampler = OnPolicySampler(SamplerConfig("mixed", capacity=5), seed=0)
    sampler.buffer.add([Answer((i,), 0) for i in range(8)])
    assert [a.ids[0] for a in sampler.buffer.items] == [3, 4, 5, 6, 7]
    drawn = sampler.buffer.draw(5, sampler.rng)
    assert sorted(a.ids[0] for a in drawn) == [3, 4, 5, 6, 7]
    state = sampler.state_dict()
    again = OnPolicySampler(SamplerConfig("mixed", capacity=5), seed=99)
    again.load_state_dict(state)
    assert [sampler.decide(0, 10) for _ in range(20)] == [again.decide(0, 10) for _ in range(20)]
    assert list(again.buffer.items) == list(sampler.buffer.items)


def test_prompt_is_what_precedes_the_last_answer() -> None:
    ids = np.arange(12)
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0], bool)
    assert prompt_ids(ids, mask).tolist() == list(range(7))
    assert prompt_ids(ids, np.zeros(12, bool)).tolist() == list(range(12))


def run(student_dir, teacher_dir, cache, out: Path, **kw) -> list[dict]:
    cfg = TrainConfig(student=str(student_dir), cache=str(cache), output=str(out), progress=False, teacher_model=str(teacher_dir),
                      **{"max_steps": 3, "batch_size": 2, "lr": 3e-3, "max_length": 96,
                         **({"max_new_tokens": 8} if "on_policy" in kw else {}), **kw})
    train_student(cfg)
    return [m for m in read_metrics(out) if "loss" in m]


@pytest.mark.parametrize("kind,loss", [("mixed", "js"), ("fresh", "fkl")])
def test_online_on_policy_trains_on_student_answers(student_dir, teacher_dir, caches, tmp_path, kind, loss) -> None:
    log = run(student_dir, teacher_dir, caches["top16"], tmp_path / "run", on_policy=kind, loss=loss, mixed_alpha=1.0)
    assert len(log) == 3 and all(np.isfinite(m["loss"]) for m in log)
    assert all(m["on_policy_batches"] == 1 for m in log)  # alpha 1 / fresh: every micro-batch the student's
    data_only = run(student_dir, teacher_dir, caches["top16"], tmp_path / "data", loss=loss)  # the same batches' prompts
    assert [m["loss"] for m in log] != [m["loss"] for m in data_only]


def test_bad_on_policy_input_is_one_line(student_dir, teacher_dir, caches, tmp_path) -> None:
    common = ["train-student", "--student", str(student_dir), "--cache", str(caches["top16"]), "--max-steps", "1", "--no-progress"]
    r = run_cli(*common, "--output", str(tmp_path / "a"), "--on-policy", "mixed", check=False)
    assert r.returncode != 0 and "--teacher-model" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli(*common, "--output", str(tmp_path / "b"), "--mixed-alpha", "0.3", check=False)
    assert r.returncode != 0 and "--on-policy" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli(*common, "--output", str(tmp_path / "c"), "--on-policy", "adaptive", "--teacher-model", str(teacher_dir), check=False)
    assert r.returncode != 0 and "--eval-cache" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli(*common, "--output", str(tmp_path / "d"), "--on-policy", "fresh", "--teacher-model", str(teacher_dir), "--loss", "opd",
                "--generation-temperature", "0.7", check=False)
    assert_one_line(r, "--generation-temperature 0.7", "reverse KL")
    assert not any((tmp_path / x).exists() for x in "abcd")


def test_answers_are_the_students_own(student_dir, caches) -> None:
    """Through the sharded student, batched: each answer is what the plain model answers its prompt alone, greedily,
    and the micro-batch trains on the answer tokens exactly."""
    import copy

    import torch

    from taid_cache.evaluation.generation import GenerationSettings, end_tokens
    from taid_cache.heads import check_head
    from taid_cache.onpolicy.online import OnPolicyBatches
    from taid_cache.shards import read_cache
    from taid_cache.shards.manifest import load_manifest
    from taid_cache.training.data import collate
    from taid_cache.training.distributed import close_distributed, init_distributed
    from taid_cache.training.student import LossModel, load_causal_lm, shard_model

    env = init_distributed()
    try:
        lm, tokenizer = load_causal_lm(str(student_dir), "student", torch.float32, "eager")
        plain = copy.deepcopy(lm).eval()
        model = shard_model(LossModel(lm, 64, check_head(lm, "student")), env, "fp32", False)
        records = list(read_cache(caches["top16"]))[:3]
        settings = load_manifest(caches["top16"]).settings
        sampler = OnPolicySampler(SamplerConfig("fresh"), 0)
        batches = OnPolicyBatches(iter([collate(records, 512)]), sampler, model, tokenizer, GenerationSettings(max_new_tokens=6),
                                  settings, 512, False, env)
        out = next(batches)
        stop = end_tokens(plain, tokenizer)
        for row, record in enumerate(records):
            prompt = prompt_ids(record.input_ids, record.loss_mask)
            with torch.no_grad():
                alone = plain.generate(torch.as_tensor(prompt)[None], max_new_tokens=6, do_sample=False, eos_token_id=stop,
                                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)[0, len(prompt):].tolist()
            cut = next((j + 1 for j, t in enumerate(alone) if t in stop), len(alone))
            answer = alone[:cut]
            ids = out.inputs["input_ids"][row].tolist()
            assert ids[: len(prompt) + len(answer)] == prompt.tolist() + answer
            # position j predicts token j+1: the targets are exactly the answer's tokens
            assert out.targets[row].nonzero().flatten().tolist() == list(range(len(prompt) - 1, len(prompt) + len(answer) - 1))
        assert len(sampler.buffer) == 0  # fresh answers are used once: no buffer
    finally:
        close_distributed(env)


def test_an_evaluation_at_a_stop_step_leaves_the_adaptive_threshold(student_dir, teacher_dir, caches, tmp_path, monkeypatch) -> None:
    """Held-out losses move the adaptive sampler at --eval-every's steps and the end only: a run stopped at step 3
    (as a round ends) and resumed takes the uninterrupted run's updates (steps 0, 2 and 4) and its choices."""
    updates, real = [], OnPolicySampler.update
    monkeypatch.setattr(OnPolicySampler, "update", lambda self, loss: (updates.append(loss), real(self, loss))[1])
    args = ["train-student", "--student", str(student_dir), "--cache", str(caches["top16"]), "--teacher-model", str(teacher_dir),
            "--max-steps", "4", "--batch-size", "2", "--lr", "3e-3", "--max-length", "96", "--no-progress", "--loss", "js",
            "--on-policy", "adaptive", "--max-new-tokens", "6", "--eval-cache", str(caches["top16"]), "--eval-every", "2",
            "--adaptive-threshold", "0.5"]
    run_cli(*args, "--output", str(tmp_path / "clean"))
    assert len(updates) == 3
    updates.clear()
    run_cli(*args, "--output", str(tmp_path / "stopped"), "--stop-at-step", "3")
    assert len(updates) == 2  # steps 0 and 2: the held-out scores at step 3 are logged, not taken
    run_cli(*args, "--output", str(tmp_path / "stopped"), "--resume")
    assert len(updates) == 3
    keys = ("step", "loss", "on_policy_batches", "adaptive_threshold")
    clean, resumed = ([[m.get(k) for k in keys] for m in read_metrics(tmp_path / run) if "loss" in m] for run in ("clean", "stopped"))
    assert resumed == clean


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mixed", "adaptive"])
def test_kill_9_then_resume_equals_uninterrupted(student_dir, teacher_dir, caches, tmp_path, kind) -> None:
    """The sampler's draws, threshold and replay buffer are checkpointed: a run killed after a checkpoint and
    resumed logs the uninterrupted run's losses, on-policy choices and threshold bit for bit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    args = ["train-student", "--student", str(student_dir), "--cache", str(caches["top16"]), "--teacher-model", str(teacher_dir),
            "--max-steps", "10", "--batch-size", "2", "--lr", "3e-3", "--max-length", "96", "--save-every", "3", "--no-progress",
            "--on-policy", kind, "--max-new-tokens", "6", "--generation-temperature", "1", "--replay-capacity", "4", "--loss", "js"]
    if kind == "adaptive":  # a threshold that starts high, so answers are generated and replayed within 10 steps
        args += ["--eval-cache", str(caches["top16"]), "--eval-every", "2", "--adaptive-threshold", "0.8"]
    run_cli(*args, "--output", str(tmp_path / "clean"))
    crashed = tmp_path / "crashed"
    proc = subprocess.Popen([sys.executable, "-m", "taid_cache.cli", *args, "--output", str(crashed)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not (crashed / "checkpoints" / "step-00000006").exists():
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run_cli(*args, "--output", str(crashed), "--resume")
    keys = ("step", "loss", "on_policy_batches", "adaptive_threshold", "tokens")
    clean, resumed = read_metrics(tmp_path / "clean"), read_metrics(crashed)
    assert [[m.get(k) for k in keys] for m in resumed] == [[m.get(k) for k in keys] for m in clean]
    assert any(m.get("on_policy_batches") for m in clean) and any(m.get("on_policy_batches") == 0 for m in clean)


@pytest.mark.slow
def test_two_ranks_generate_together(student_dir, teacher_dir, caches, tmp_path) -> None:
    """Two gloo ranks: both generate (answers of different lengths: synced forwards), the buffer holds both ranks'
    answers (gathered), and a checkpoint's sampler state holds 2 × batch answers per generation."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "taid_cache.cli",
                           "train-student", "--student", str(student_dir), "--cache", str(caches["top16"]), "--teacher-model",
                           str(teacher_dir), "--output", str(out), "--max-steps", "4", "--batch-size", "2", "--max-length", "96",
                           "--on-policy", "mixed", "--mixed-alpha", "1", "--max-new-tokens", "10", "--generation-temperature", "1",
                           "--save-every", "2", "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [m for m in read_metrics(out) if "loss" in m]
    assert [m["on_policy_batches"] for m in log] == [1, 1, 1, 1]
    meta = json.loads((out / "checkpoints" / "step-00000002" / "meta.json").read_text())
    buffer = meta["on_policy"]["buffer"]
    assert len(buffer) == 2 * 2 * 2  # 2 steps × 2 ranks × 2 answers
    assert len({tuple(ids) for ids, _ in buffer}) > 2  # both ranks' prompts, not one rank's twice


@pytest.mark.parametrize("method", ["gkd-online", "distillm-online", "opd-online"])
def test_the_reproductions_on_policy_methods_train(student_dir, teacher_dir, caches, tmp_path, method) -> None:
    """make reproduce's on-policy rows, through the options it gives train-student: GKD (JS β 0.1, mixed), DistiLLM
    (skew FKL β 0.1, adaptive: a held-out evaluation at step 0 and then by --eval-every) and opd (fresh answers)."""
    from rich.console import Console

    from taid_cache.reproduce.config import METHODS, ReproduceConfig
    from taid_cache.reproduce.pipeline import method_config

    cfg = ReproduceConfig(max_steps=4, batch_size=2, max_length=96, max_response=8)
    run = tmp_path / method
    config = method_config(cfg, method, 0, run, student_dir, teacher_dir, caches["top16"], caches["top16"], Console(quiet=True))
    assert (config.loss, config.on_policy, config.teacher_model, config.max_new_tokens) == (
        METHODS[method]["loss"], METHODS[method]["on_policy"], str(teacher_dir), 8)
    train_student(replace(config, progress=False))
    records = read_metrics(run)
    steps = [m for m in records if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4] and all(np.isfinite(m["loss"]) for m in steps)
    if method == "opd-online":  # every micro-batch the student's answers
        assert all(m["on_policy_batches"] == 1 for m in steps)
    if method == "distillm-online":
        assert [m["step"] for m in records if "eval_loss" in m][0] == 0 and all("adaptive_threshold" in m for m in steps)


def test_on_policy_on_text_rows_is_refused_before_the_run_folder(student_dir, teacher_dir, data_dir, tmp_path) -> None:
    """Text rows have no prompts to answer: one line, and no run folder (not even its lock) left behind."""
    from conftest import assert_one_line

    run_cli("dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "text.jsonl"), "--output", str(tmp_path / "text"),
            "--engine", "hf", "--top-k", "8", "--max-length", "96", "--no-progress")
    result = run_cli("train-student", "--student", str(student_dir), "--cache", str(tmp_path / "text"), "--teacher-model",
                     str(teacher_dir), "--on-policy", "fresh", "--max-steps", "1", "--output", str(tmp_path / "run"), "--no-progress",
                     check=False)
    assert_one_line(result, "--on-policy", "text rows", "no prompts")
    assert not (tmp_path / "run").exists()
