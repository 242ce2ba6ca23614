"""Head + sampled tail (`--tail-samples N`): the draws, their storage, and the losses over them.

The statistical tests compare the average of R independent estimates with the full-vocabulary value. For FKL
the estimate is unbiased and the expected squared error of the average is known exactly (multinomial
variance): Σ_positions m² (1 − Σ_v r_v²) / (N R), with r the teacher's distribution off the head and m its
mass. The measured error is a sum over P·V coordinates of P independent positions, so it concentrates around
that value (its spread over seeds is well under a factor 2 at P = 48). The TAID estimate is linear in the
draws' shape r̂, so its average converges to the same loss with r in place of r̂ (`expected_estimate`); that
expectation is exact TAID where the teacher's tail is shaped like the student's, and at t = 1.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_cli
from taid_cache.engines.head_path import tail_and_entropy
from taid_cache.engines.tail_sampling import distinct_draws, draw_off_head, sequence_uniforms
from taid_cache.losses import LossConfig, SampledTeacher, distillation, rebuild_teacher, taid
from taid_cache.config import TrainConfig
from taid_cache.pipelines.train_student import train_student
from taid_cache.training.metrics import read_metrics
from taid_cache.shards import read_cache
from taid_cache.shards.manifest import load_manifest
from taid_cache.shards.codec import LOGPROB_STEP, ragged_grid
from test_dump_teacher import reference_logprobs

P, V, K = 48, 512, 8


class Teacher:
    """A fixed teacher [P, V] (peaked rows), a fixed student, the head and what lies off it."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.logp = torch.log_softmax(torch.randn(P, V, generator=gen, dtype=torch.float64) * 3.0, -1)
        self.student = torch.randn(P, V, generator=gen)
        self.head_lps, self.head_ids = self.logp.topk(K, -1)
        self.off = self.logp.scatter(-1, self.head_ids, -math.inf)
        self.log_m = self.off.logsumexp(-1)
        self.r = (self.off - self.log_m[:, None]).exp()  # the distribution off the head

    def weights(self) -> torch.Tensor:
        """The off-head weights the engine hands to the draws (from its own tail pass)."""
        return tail_and_entropy(self.logp.float(), self.logp.float().exp(), self.head_ids, torch.zeros(P, dtype=torch.bool))[2]

    def estimate(self, draws: int, seed: int) -> SampledTeacher:
        """The head and `draws` draws as a cache would hold them, from the dump's own sampling code."""
        uniforms = torch.rand(P, draws, generator=torch.Generator().manual_seed(seed))
        ids, lps = draw_off_head(self.weights(), self.logp.float(), self.log_m.float(), uniforms)
        s = distinct_draws(ids.numpy(), lps.numpy())
        grid = [torch.from_numpy(ragged_grid(x, s.counts, draws, fill))
                for x, fill in ((s.ids.astype(np.int64), -1), (s.draws.astype(np.int64), 0), (s.logprobs, -np.inf))]
        return SampledTeacher(self.head_ids, self.head_lps.float(), self.log_m.float(), *grid, V)

    def gradient(self, name: str, estimate: SampledTeacher, t: float) -> torch.Tensor:
        logits = self.student.clone().requires_grad_(True)
        distillation(LossConfig(name), estimate, logits, t).sum().backward()
        return logits.grad.double()

    def full_gradient(self, t: float) -> torch.Tensor:
        logits = self.student.clone().requires_grad_(True)
        taid(logits, self.logp.float(), t).sum().backward()  # at t = 1 this is FKL's gradient q − p
        return logits.grad.double()

    def expected_estimate(self, tail: torch.Tensor | None = None) -> SampledTeacher:
        """What the draws average to: every off-head token drawn r_v times of 1, so ŵ = m r_v (`tail`: another shape r)."""
        r = self.r if tail is None else tail
        off_ids = torch.arange(V).expand(P, V)
        return SampledTeacher(self.head_ids, self.head_lps.float(), self.log_m.float(), off_ids, r.float(),
                              (self.log_m[:, None] + r.log()).float(), V)


@pytest.fixture(scope="module")
def teacher() -> Teacher:
    return Teacher()


def test_draws_lie_off_the_head_and_are_counted_once(teacher: Teacher) -> None:
    draws = 64
    uniforms = torch.rand(P, draws, generator=torch.Generator().manual_seed(1))
    log_m = teacher.log_m.float().clone()
    log_m[5] = -math.inf  # a position whose head holds all the mass: nothing to draw
    ids, lps = draw_off_head(teacher.weights(), teacher.logp.float(), log_m, uniforms)
    s = distinct_draws(ids.numpy(), lps.numpy())
    assert s.counts[5] == 0 and (s.counts[np.arange(P) != 5] >= 1).all()
    at = np.concatenate(([0], np.cumsum(s.counts)))
    for j in range(P):
        got, n, lp = s.ids[at[j] : at[j + 1]], s.draws[at[j] : at[j + 1]], s.logprobs[at[j] : at[j + 1]]
        assert len(set(got.tolist())) == len(got)  # distinct
        assert not set(got.tolist()) & set(teacher.head_ids[j].tolist())  # off the head
        np.testing.assert_allclose(lp, teacher.logp[j, got].numpy(), atol=1e-5)  # exact log p of each id
        assert (np.diff(lp) <= 0).all()  # descending: the order the compact codec stores
        if j != 5:
            assert n.sum() == draws and (n >= 1).all()
            # Inverse CDF by hand: each uniform's id is the first whose cumulative tail mass exceeds it.
            cdf = np.cumsum(teacher.r[j].numpy())
            expected = np.searchsorted(cdf / cdf[-1], uniforms[j].numpy().astype(np.float64), side="right")
            drawn = ids[j].numpy()
            assert (drawn == expected).mean() >= 0.99  # float32 vs float64 CDF: only a boundary draw may move
            assert sorted(zip(got.tolist(), n.tolist())) == sorted(zip(*np.unique(drawn, return_counts=True)))


def test_uniforms_depend_on_seed_and_sample_only() -> None:
    a = sequence_uniforms(0, "row-7", 5, 3)
    np.testing.assert_array_equal(a, sequence_uniforms(0, "row-7", 5, 3))
    np.testing.assert_array_equal(a[:4], sequence_uniforms(0, "row-7", 4, 3))  # a cut sequence keeps its first draws
    assert not np.array_equal(a, sequence_uniforms(1, "row-7", 5, 3))
    assert not np.array_equal(a, sequence_uniforms(0, "row-8", 5, 3))
    assert a.min() >= 0 and a.max() < 1


def test_estimate_is_unbiased_and_sums_to_one(teacher: Teacher) -> None:
    """E[ŵ] = p for every token: the average of R estimates approaches p at the multinomial's rate."""
    draws, repeats = 32, 300
    total = torch.zeros(P, V, dtype=torch.float64)
    for seed in range(repeats):
        ids, log_w, _ = teacher.estimate(draws, seed).estimate()
        dense = torch.zeros(P, V + 1, dtype=torch.float64).scatter_add_(1, ids.clamp(min=-1) % (V + 1), log_w.double().exp())
        torch.testing.assert_close(dense[:, :V].sum(-1), torch.ones(P, dtype=torch.float64), atol=1e-5, rtol=0)
        total += dense[:, :V]
    error = ((total / repeats - teacher.logp.exp()) ** 2).sum().item()
    expected = (teacher.log_m.exp() ** 2 * (1 - (teacher.r**2).sum(-1)) / (draws * repeats)).sum().item()
    assert 0.5 <= error / expected <= 2.0, error / expected


def test_fkl_gradient_converges_to_full_distillation(teacher: Teacher) -> None:
    full = teacher.full_gradient(1.0)
    for draws in (16, 64):
        repeats = 200
        mean = torch.stack([teacher.gradient("fkl", teacher.estimate(draws, seed), 1.0) for seed in range(repeats)]).mean(0)
        error = ((mean - full) ** 2).sum().item()
        expected = (teacher.log_m.exp() ** 2 * (1 - (teacher.r**2).sum(-1)) / (draws * repeats)).sum().item()
        assert 0.5 <= error / expected <= 2.0, (draws, error / expected)
    # The top-k teacher's error does not average away: its bias alone is many times the sampled average's error.
    top_k = teacher.student.clone().requires_grad_(True)
    rebuilt = rebuild_teacher(top_k, teacher.head_ids, teacher.head_lps.float(), "student", V, teacher.log_m.float())
    taid(top_k, rebuilt, 1.0).sum().backward()
    assert ((top_k.grad.double() - full) ** 2).sum().item() > 20 * error


@pytest.mark.parametrize("draws", [16, 64])
def test_taid_gradient_converges_to_its_expectation(teacher: Teacher, draws: int) -> None:
    t, repeats = 0.5, 200
    grads = torch.stack([teacher.gradient("taid", teacher.estimate(draws, seed), t) for seed in range(repeats)])
    mean = grads.mean(0)
    noise = ((grads - mean) ** 2).sum((1, 2)).mean().item() / repeats  # the average's own sampling variance
    expected = teacher.gradient("taid", teacher.expected_estimate(), t)
    assert ((mean - expected) ** 2).sum().item() <= 2 * noise
    # What that expectation leaves of full TAID (the arithmetic tail's bias) dwarfs the average's noise here,
    # so the first assertion could not pass by accident of a biased mean.
    assert ((expected - teacher.full_gradient(t)) ** 2).sum().item() > 10 * noise


@pytest.mark.parametrize("t", [0.3, 0.7])
def test_taid_is_exact_where_the_teachers_tail_is_shaped_like_the_students(teacher: Teacher, t: float) -> None:
    q = torch.softmax(teacher.student.double(), -1)
    off = torch.isfinite(teacher.off)
    q_tail = torch.where(off, q, 0.0) / torch.where(off, q, 0.0).sum(-1, keepdim=True)
    # The teacher with its own head and mass m off it, spread in the student's shape there.
    logp = torch.where(off, teacher.log_m[:, None] + q_tail.log(), teacher.logp)
    logits = teacher.student.clone().requires_grad_(True)
    taid(logits, logp.float(), t).sum().backward()
    torch.testing.assert_close(teacher.gradient("taid", teacher.expected_estimate(q_tail), t), logits.grad.double(), atol=1e-6, rtol=1e-4)


def test_taid_at_t_one_is_fkl(teacher: Teacher) -> None:
    estimate = teacher.estimate(32, 0)
    torch.testing.assert_close(teacher.gradient("taid", estimate, 1.0), teacher.gradient("fkl", estimate, 1.0))


def test_sampled_cache_against_an_independent_forward_pass(teacher_dir, data_dir, tmp_path) -> None:
    """Stored draws lie off the stored head, carry their exact log-probs, sum to N, and depend only on the seed
    and the sample: another batch size draws the same; another seed does not."""
    common = ["dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--engine", "hf",
              "--top-k", "4", "--tail-samples", "24", "--max-length", "256", "--no-progress"]
    run_cli(*common, "--output", str(tmp_path / "a"))
    run_cli(*common, "--output", str(tmp_path / "b"), "--batch-tokens", "300")
    run_cli(*common, "--output", str(tmp_path / "c"), "--seed", "1")
    a, b, c = (list(read_cache(tmp_path / x)) for x in "abc")
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    moved = total = 0
    for rec in a[:6]:
        ref = reference_logprobs(teacher_dir, rec.input_ids, model)[:-1]
        ids, draws, lps = rec.sample_ids, rec.sample_draws, rec.sample_logprobs
        assert ids.shape == (len(ref), 24) and (draws.sum(1) == 24).all()
        used = ids >= 0
        assert not (used[:, :, None] & (ids[:, :, None] == rec.topk_ids[:, None, :])).any()
        true = np.take_along_axis(ref, np.where(used, ids, 0), 1)
        assert np.abs(np.where(used, lps - true, 0)).max() <= LOGPROB_STEP / 2 + 1e-5
    for x, y, z in zip(a, b, c):
        same = (x.sample_ids == y.sample_ids) & (x.sample_draws == y.sample_draws)
        moved += int((~same.all(1)).sum())  # another batch: float noise may move a draw across a CDF boundary
        total += len(same)
        assert not np.array_equal(x.sample_ids, z.sample_ids)
    assert moved <= total * 0.01
    stats = json.loads(run_cli("inspect", str(tmp_path / "a"), "--json").stdout)
    distinct = np.mean(np.concatenate([(r.sample_draws > 0).sum(1) for r in a]))
    assert stats["tail_samples"] == 24 and stats["sampled_ids_per_position"] == pytest.approx(distinct)


def test_sampled_cache_trains_fkl_and_taid_and_refuses_the_rest(teacher_dir, student_dir, data_dir, tmp_path) -> None:
    """The first step's reported FKL loss equals Σ ŵ (ℓ − log q) computed here from the cache and the student."""
    run_cli("dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--engine", "hf", "--top-k", "2",
            "--tail-samples", "16", "--max-length", "256", "--no-progress", "--output", str(tmp_path / "cache"))
    records = list(read_cache(tmp_path / "cache"))
    train_student(TrainConfig(student=str(student_dir), cache=tmp_path / "cache", output=tmp_path / "fkl", loss="fkl",
                              max_steps=2, batch_size=len(records), lr=1e-3, max_length=256, shuffle_buffer=1, progress=False))
    first = next(m for m in read_metrics(tmp_path / "fkl") if m.get("step") == 1)
    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    total = positions = 0.0
    for rec in records:
        targets = rec.loss_mask[1:]
        with torch.no_grad():
            log_q = torch.log_softmax(model(torch.from_numpy(rec.input_ids)[None]).logits[0, :-1].double(), -1)[targets]
        m = np.exp(rec.tail_logmass[targets].astype(np.float64))
        for j, row in enumerate(np.flatnonzero(targets)):
            head = rec.topk_ids[row]
            p_head = np.exp(rec.topk_logprobs[row].astype(np.float64))
            p_head *= (1 - m[j]) / p_head.sum()  # the readers' head: rescaled to 1 − m
            used = rec.sample_ids[row] >= 0
            w = m[j] * rec.sample_draws[row][used] / 16
            ids = np.concatenate([head, rec.sample_ids[row][used]])
            weights = np.concatenate([p_head, w])
            ell = np.concatenate([np.log(p_head), rec.sample_logprobs[row][used]])
            total += float((weights * (ell - log_q[j, ids].numpy())).sum())
            positions += 1
    assert first["loss"] == pytest.approx(total / positions, rel=1e-4)
    train_student(TrainConfig(student=str(student_dir), cache=tmp_path / "cache", output=tmp_path / "taid", loss="taid",
                              max_steps=2, batch_size=4, lr=1e-3, max_length=256, progress=False))
    result = run_cli("train-student", "--student", str(student_dir), "--cache", str(tmp_path / "cache"), "--output",
                     str(tmp_path / "rkl"), "--loss", "rkl", "--max-steps", "1", "--no-progress", check=False)
    assert result.returncode == 2 and "sampled tail" in result.stderr and not (tmp_path / "rkl" / "metrics.jsonl").exists()


@pytest.mark.parametrize("extra, words", [
    (["--tail-samples", "-1"], "--tail-samples must be in"),
    (["--tail-samples", "8", "--top-p", "0.9"], "cannot be combined with --top-p"),
    (["--top-k", "0", "--tail-samples", "0"], "--top-k must be at least 1"),
    (["--top-p", "0.9"], "add --tail-samples 0"),  # the default's draws: the message says how to get a top-p cache
])
def test_bad_sampling_options(teacher_dir, data_dir, tmp_path, extra: list[str], words: str) -> None:
    args = ["dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--output", str(tmp_path / "o"),
            "--engine", "hf", "--no-progress", *extra]
    result = run_cli(*args, check=False)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.json"))


def test_a_head_of_zero_entries(teacher_dir, data_dir, tmp_path) -> None:
    """--top-k 0: the sampled tail stands alone; every position's estimate still sums to 1."""
    run_cli("dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--engine", "hf", "--top-k", "0",
            "--tail-samples", "8", "--max-length", "256", "--no-progress", "--output", str(tmp_path / "c"))
    rec = next(iter(read_cache(tmp_path / "c")))
    assert rec.topk_ids.shape[1] == 0 and np.allclose(rec.tail_logmass, 0.0, atol=1e-6)
    keys = ("topk_ids", "topk_logprobs", "tail_logmass", "sample_ids", "sample_draws", "sample_logprobs")
    ids, log_w, _ = SampledTeacher(*(torch.from_numpy(getattr(rec, k)) for k in keys), load_manifest(str(tmp_path / "c")).settings.tokenizer_size).estimate()
    torch.testing.assert_close(log_w.exp().sum(-1), torch.ones(len(ids)), atol=1e-5, rtol=0)
