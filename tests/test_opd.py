"""`--loss opd`, on-policy distillation: the per-token reverse-KL estimate log q(x) − log p(x) as a policy gradient.
Its gradient averaged over x ~ q (exactly, and by sampling) against the exact reverse KL's, its value against a
float64 computation, the cached path (`target_logprob`) against the dense one, and train-student on a
--target-logprobs cache (and refused without one)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_one_line, run_cli
from taid_cache.errors import UserError
from taid_cache.losses import DenseTeacher, LossConfig, SampledTeacher, TopKTeacher, chunk_loss, distillation
from taid_cache.shards import load_manifest, read_cache
from taid_cache.training.metrics import read_metrics

OPD = LossConfig("opd")
N, V = 3, 5


@pytest.fixture()
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(N, V, generator=generator) * 2
    teacher = torch.log_softmax(torch.randn(N, V, generator=generator) * 2, -1)
    return logits, teacher


def dense_gradient(logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-position value, its gradient in the logits) of opd's dense path, through autograd."""
    s = logits.clone().requires_grad_()
    value = distillation(OPD, DenseTeacher(teacher), s, 0.0, labels)
    value.sum().backward()
    return value.detach(), s.grad


def exact_reverse_kl_gradient(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """d/d logits of Σ_v q_v (log q_v − log p_v), in float64."""
    s = logits.double().requires_grad_()
    log_q = torch.log_softmax(s, -1)
    (log_q.exp() * (log_q - teacher.double())).sum().backward()
    return s.grad


def test_the_gradient_over_the_students_samples_is_the_reverse_kls(pair) -> None:
    logits, teacher = pair
    q = torch.softmax(logits.double(), -1)
    want = exact_reverse_kl_gradient(logits, teacher)
    # Exactly: every x at every position (row (n, x) of the repeated batch), weighted by q_n(x).
    rows = logits.repeat_interleave(V, 0)
    _, per_x = dense_gradient(rows, teacher.repeat_interleave(V, 0), torch.arange(V).repeat(N))
    expected = (q[:, :, None] * per_x.view(N, V, V).double()).sum(1)
    torch.testing.assert_close(expected, want, rtol=0, atol=1e-5)
    # By sampling: 200k draws x ~ q per position, the per-draw gradients' mean within 5 of its standard errors.
    draws = 200_000
    x = torch.multinomial(q.float(), draws, replacement=True, generator=torch.Generator().manual_seed(1))
    _, per_draw = dense_gradient(logits.repeat_interleave(draws, 0), teacher.repeat_interleave(draws, 0), x.flatten())
    per_draw = per_draw.view(N, draws, V).double()
    stderr = per_draw.std(1) / draws**0.5
    assert ((per_draw.mean(1) - want).abs() <= 5 * stderr + 1e-6).all(), (per_draw.mean(1) - want) / stderr
    assert (stderr < 0.02).all()  # the check is tight enough to see a wrong gradient


def test_the_value_is_the_estimate_at_the_actual_next_token(pair) -> None:
    logits, teacher = pair
    teacher[0, 2] = -float("inf")  # a token the teacher rules out: floored at −100, as the rkl family's
    labels = torch.tensor([2, 0, 4])
    want = torch.log_softmax(logits.double(), -1)[torch.arange(N), labels] - teacher.double()[torch.arange(N), labels].clamp(min=-100)
    value, _ = dense_gradient(logits, teacher, labels)
    torch.testing.assert_close(value.double(), want, rtol=0, atol=1e-5)
    assert value[0] > 90  # an advantage, not a divergence: it may be negative too
    cached, _ = OPD.loss.closed_form(logits, topk_teacher(teacher, labels), OPD.loss.context(0.0, labels))
    torch.testing.assert_close(cached.double(), want, rtol=0, atol=1e-5)


def topk_teacher(teacher: torch.Tensor, labels: torch.Tensor, k: int = 2) -> TopKTeacher:
    """The teacher as a --target-logprobs top-k cache holds it: a head, its exact tail mass, the labels' log-probs."""
    lps, ids = teacher.topk(k, -1)
    tail = torch.log1p(-lps.exp().sum(-1))
    return TopKTeacher(ids, lps, tail, V, target_logprob=teacher.gather(1, labels[:, None])[:, 0])


def sampled_teacher(teacher: torch.Tensor, labels: torch.Tensor) -> SampledTeacher:
    head = topk_teacher(teacher, labels, k=1)
    drawn = teacher.topk(3, -1).indices[:, 1:]  # two distinct tokens off the head, drawn 3 and 1 times
    return SampledTeacher(head.ids, head.logprobs, head.tail_logmass, drawn, torch.tensor([[3, 1]] * N), teacher.gather(1, drawn), V,
                          target_logprob=head.target_logprob)


@pytest.mark.parametrize("cached,ratio", [(topk_teacher, 1.0), (sampled_teacher, 1.0), (topk_teacher, 0.5), (sampled_teacher, 0.5)])
def test_the_cached_path_is_the_dense_one(pair, cached, ratio: float) -> None:
    """The head and draws do not enter: only the target log-probs. Alone (ratio 1) the closed form, no autograd
    graph; mixed with CE, through the sampled form (a top-k teacher too: its rebuilt distribution would put a
    label off the head at the spread tail's log-prob, not the exact one)."""
    logits, teacher = pair
    labels = torch.tensor([1, 4, 0])
    cfg = LossConfig("opd", distil_ratio=ratio)

    def run(batch_teacher) -> tuple[torch.Tensor, torch.Tensor]:
        s = logits.clone().requires_grad_()
        found = chunk_loss(cfg, batch_teacher, s, labels, 0.0)
        if found.grad is not None:
            assert ratio == 1 and not found.train.requires_grad
            return found.report, found.grad
        found.train.backward()
        return found.report.detach(), s.grad

    dense_value, dense_grad = run(DenseTeacher(teacher))
    value, grad = run(cached(teacher, labels))
    torch.testing.assert_close(value, dense_value, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, dense_grad, rtol=0, atol=1e-6)


def test_a_cached_teacher_without_target_logprobs_is_refused(pair) -> None:
    logits, teacher = pair
    labels = torch.tensor([1, 4, 0])
    plain = replace(topk_teacher(teacher, labels), target_logprob=None)
    with pytest.raises(ValueError, match="--target-logprobs"):
        chunk_loss(OPD, plain, logits, labels, 0.0)


# ---- train-student ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def opd_caches(teacher_dir, data_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("opd")
    common = ["--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--engine", "hf", "--top-k", "4",
              "--max-length", "256", "--no-progress"]
    run_cli("dump-teacher", *common, "--output", str(root / "target"), "--target-logprobs")
    run_cli("dump-teacher", *common, "--output", str(root / "plain"))
    return {"target": root / "target", "plain": root / "plain"}


def first_step_estimate(student_dir: Path, cache: Path) -> float:
    """The mean of lq(x) − lp(x) over every target position of the cache, for the initial student: step 1's loss
    when step 1 holds the whole cache."""
    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for rec in read_cache(cache):
            ids = torch.from_numpy(rec.input_ids)[None]
            log_q = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            lq = log_q[torch.arange(len(ids[0]) - 1), ids[0, 1:]]
            targets = torch.from_numpy(rec.loss_mask[1:])
            total += float((lq - torch.from_numpy(rec.target_logprob).double())[targets].sum())
            count += int(targets.sum())
    return total / count


def test_train_student_runs_opd_from_a_target_logprobs_cache_as_from_the_teacher(student_dir, teacher_dir, opd_caches, tmp_path) -> None:
    records = load_manifest(str(opd_caches["target"])).records
    train = ["train-student", "--student", str(student_dir), "--loss", "opd", "--max-steps", "2", "--batch-size", str(records),
             "--lr", "1e-3", "--max-length", "256", "--no-progress"]
    run_cli(*train, "--cache", str(opd_caches["target"]), "--output", str(tmp_path / "cached"))
    run_cli(*train, "--cache", str(opd_caches["plain"]), "--teacher-model", str(teacher_dir), "--output", str(tmp_path / "online"))
    cached, online = ([m["loss"] for m in read_metrics(tmp_path / run) if "loss" in m] for run in ("cached", "online"))
    assert len(cached) == 2 and np.isfinite(cached).all() and (tmp_path / "cached" / "model.safetensors").exists()
    np.testing.assert_allclose(cached, online, rtol=1e-4, atol=1e-5)
    assert cached[0] == pytest.approx(first_step_estimate(student_dir, opd_caches["target"]), rel=1e-4, abs=1e-5)


def test_train_student_refuses_opd_on_a_cache_without_target_logprobs(student_dir, opd_caches, tmp_path) -> None:
    result = run_cli("train-student", "--student", str(student_dir), "--cache", str(opd_caches["plain"]), "--output",
                     str(tmp_path / "run"), "--loss", "opd", "--max-steps", "2", "--no-progress", check=False)
    assert_one_line(result, "--loss opd", "dump-teacher --target-logprobs")
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_the_hugging_face_trainer_takes_train_students_opd_steps(student_dir, opd_caches, tmp_path) -> None:
    """CacheDistillationTrainer on a --target-logprobs cache: the collator carries the target log-probs, and the
    per-step losses are train-student's (as tests/test_hf_trainer.py checks for the losses a top-k cache serves)."""
    from test_hf_trainer import BATCH, LR, STEPS, hf_args, hf_trainer

    run_cli("train-student", "--student", str(student_dir), "--cache", str(opd_caches["target"]), "--output", str(tmp_path / "cli"),
            "--loss", "opd", "--max-steps", str(STEPS), "--batch-size", str(BATCH), "--lr", str(LR), "--max-length", "256",
            "--no-progress")
    cli = [m["loss"] for m in read_metrics(tmp_path / "cli") if "loss" in m]
    trainer = hf_trainer(student_dir, opd_caches["target"], hf_args(tmp_path / "hf", loss="opd"))
    trainer.train()
    np.testing.assert_allclose([s["loss"] for s in trainer.steps.history], cli, rtol=2e-5, atol=1e-6)
    with pytest.raises(UserError, match="--target-logprobs"):  # a cache without them: refused before training
        hf_trainer(student_dir, opd_caches["plain"], hf_args(tmp_path / "plain", loss="opd"))
