"""The loss registry (each loss declared once, everything else derived from it), DKD, CTKD and the distillation
temperature against dense float64 references written here: exact where the cache is exact, within a statistical
bound where it samples."""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import pytest
import torch

from taid_cache import losses as L
from taid_cache.config import TrainConfig, options_of
from taid_cache.losses.registry import LOSSES, PARAMS, REGISTRY, SAMPLED_LOSSES, LossConfig
from test_attacks import assert_one_line, train
from test_tail_samples import Teacher

N, V = 7, 30


def test_every_parameter_is_declared_once_and_reaches_the_command_line() -> None:
    assert {f.name for f in fields(LossConfig)} - {"name", "distil_ratio"} == set(PARAMS)
    options = {f.name: f for f in options_of(TrainConfig)}
    for name, param in PARAMS.items():
        f = options[name]
        assert f.default == param.default and f.metadata["help"] == param.help and f.metadata["within"].text == param.within
    assert options["loss"].metadata["choices"] == LOSSES
    assert all(name in PARAMS for spec in REGISTRY.values() for name in spec.reads)
    assert set(SAMPLED_LOSSES) == {"taid", "fkl", "dkd", "ctkd", "sft"}
    loss = TrainConfig(student="s", cache="c", output="o", loss="dkd", dkd_beta=2.0).loss_config()
    assert (loss.name, loss.dkd_beta, loss.params()) == ("dkd", 2.0, {"dkd_alpha": 1.0, "dkd_beta": 2.0})


def teacher_and_student(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(N, V, generator=gen, dtype=torch.float64) * 3, -1)
    return logp, torch.randn(N, V, generator=gen, dtype=torch.float64) * 2, torch.randint(0, V, (N,), generator=gen)


def dkd64(s: np.ndarray, logp: np.ndarray, labels: np.ndarray, alpha: float, beta: float, tau: float) -> np.ndarray:
    """DKD from its definition, in float64: the binary (target, rest) KL and the KL over the other classes."""
    out = []
    for sr, lr, g in zip(s, logp, labels):
        p = np.exp(lr / tau - np.logaddexp.reduce(lr / tau))
        q = np.exp(sr / tau - np.logaddexp.reduce(sr / tau))
        tckd = sum(a * math.log(a / b) for a, b in ((p[g], q[g]), (1 - p[g], 1 - q[g])) if a > 0)
        rest = [v for v in range(len(p)) if v != g]
        pr, qr = p[rest] / p[rest].sum(), q[rest] / q[rest].sum()
        nckd = sum(a * math.log(a / b) for a, b in zip(pr, qr) if a > 0)
        out.append((alpha * tckd + beta * nckd) * tau**2)
    return np.array(out)


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_dkd_against_its_definition_dense_and_from_an_exact_cache(tau: float) -> None:
    logp, s, labels = teacher_and_student()
    cfg = LossConfig("dkd", dkd_alpha=1.3, dkd_beta=0.7, temperature=tau)
    want = dkd64(s.numpy(), logp.numpy(), labels.numpy(), 1.3, 0.7, tau)
    got = L.per_position_fn(cfg)(s.float(), logp.float(), 0.0, labels)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, atol=1e-5)
    values, ids = logp.topk(V, -1)  # a cache of every token: exact
    cached = L.distillation(cfg, L.TopKTeacher(ids, values.float(), None, V), s.float(), 0.0, labels)
    np.testing.assert_allclose(cached.double().numpy(), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs the labels"):
        L.distillation(cfg, L.DenseTeacher(logp.float()), s.float(), 0.0)


def test_fkl_at_a_temperature_is_tau_squared_kl_of_both_tempered() -> None:
    logp, s, _ = teacher_and_student(1)
    for tau in (0.5, 2.0, 4.0):
        p = torch.softmax(logp / tau, -1)
        q_log = torch.log_softmax(s / tau, -1)
        want = tau**2 * (p * (p.log() - q_log)).sum(-1)
        got = L.per_position_fn(LossConfig("fkl", temperature=tau))(s.float(), logp.float(), 0.0)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
        values, ids = logp.topk(V, -1)
        cached = L.distillation(LossConfig("fkl", temperature=tau), L.TopKTeacher(ids, values.float(), None, V), s.float(), 0.0)
        torch.testing.assert_close(cached.double(), want, rtol=1e-4, atol=1e-5)


def test_the_tempered_tail_sum_is_estimated_without_bias() -> None:
    """Σ_tail p^(1/τ) from the draws: m·c/N·p^(1/τ−1) summed; its average over many caches approaches the truth at
    the rate its own spread predicts (a statistical bound, 4 standard errors)."""
    teacher = Teacher()
    tau = 2.0
    truth = (teacher.off.exp() ** (1 / tau)).sum(-1)
    estimates = []
    for seed in range(300):
        est = teacher.estimate(32, seed)
        draws = est.sample_draws.double()
        terms = torch.where(draws > 0, est.tail_logmass.double()[:, None].exp() * draws / 32
                            * est.sample_logprobs.double().exp() ** (1 / tau - 1), 0.0)
        estimates.append(terms.sum(-1))
    estimates = torch.stack(estimates)
    error = (estimates.mean(0) - truth).abs()
    assert (error <= 4 * estimates.std(0) / math.sqrt(len(estimates)) + 1e-9).all()


@pytest.mark.parametrize("name", ["fkl", "dkd", "ctkd"])
def test_a_sampled_tail_serves_them_within_a_statistical_bound(name: str) -> None:
    """At many draws the sampled estimate's loss approaches the dense one; their gap shrinks as draws grow."""
    teacher = Teacher()
    logits = teacher.student.clone()
    labels = torch.randint(0, 512, (logits.shape[0],), generator=torch.Generator().manual_seed(3))
    cfg = LossConfig(name, temperature=2.0) if name != "ctkd" else LossConfig(name)
    learned = torch.tensor([3.0])
    dense = L.distillation(cfg, L.DenseTeacher(teacher.logp.float()), logits, 1.0, labels, learned).double()
    gaps = []
    for draws in (8, 512):
        mean = torch.stack([L.distillation(cfg, teacher.estimate(draws, seed), logits, 1.0, labels, learned).double()
                            for seed in range(40)]).mean(0)
        gaps.append((mean - dense).abs().mean().item())
    assert gaps[1] < gaps[0] and gaps[1] <= 0.05 * dense.abs().mean().item(), gaps


def test_ctkd_against_its_definition_and_its_reversed_temperature_gradient() -> None:
    logp, s, _ = teacher_and_student(2)
    module = L.CurriculumTemperature(1.0, 20.0)
    lam = L.curriculum_lambda(3, 1.0, 0.0, 10)
    assert lam == pytest.approx((math.cos(3 * math.pi / 10) + 1) / 2)
    assert L.curriculum_lambda(0, 1.0, 0.2, 10) == 1.0 and L.curriculum_lambda(12, 1.0, 0.2, 10) == pytest.approx(0.2)
    temperature = module(lam)
    tau = 1.0 + 20.0 * torch.sigmoid(torch.tensor(1.0))
    torch.testing.assert_close(temperature.detach(), tau.reshape(1))
    value = L.per_position_fn(LossConfig("ctkd"))(s.float(), logp.float(), 0.0, None, temperature)
    p = torch.softmax(logp / tau, -1)
    want = -(p * torch.log_softmax(s / tau, -1)).sum(-1) * tau**2  # the cross-entropy at T, × T²
    torch.testing.assert_close(value.double(), want.double(), rtol=1e-4, atol=1e-4)
    value.sum().backward()
    # Through the reversal: −λ times the derivative of the loss in θ (computed here without the layer).
    theta = torch.ones(1, dtype=torch.float64, requires_grad=True)
    plain_t = 1.0 + 20.0 * torch.sigmoid(theta)
    plain = (-(torch.softmax(logp / plain_t, -1) * torch.log_softmax(s / plain_t, -1)).sum(-1) * plain_t**2).sum()
    (grad,) = torch.autograd.grad(plain, theta)
    torch.testing.assert_close(module.theta.grad.double(), -lam * grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("flags, words", [
    (("--loss", "fkl", "--temperature", "0"), "--temperature must be in (0, inf)"),
    (("--loss", "fkl", "--temperature", "-1"), "--temperature must be"),
    (("--loss", "fkl", "--temperature", "nan"), "--temperature must be"),
    (("--loss", "skew-fkl", "--beta", "0.2"), "--skew-beta"),
    (("--loss", "adaptive-kl", "--mu", "0.2"), "--adaptive-mu"),
    (("--loss", "fkl", "--dkd-alpha", "2"), "does not read it"),
    (("--loss", "taid", "--temperature", "2"), "does not read it"),
])
def test_bad_loss_options_are_one_line_before_any_write(student_dir, caches, tmp_path, flags, words: str) -> None:
    from test_attacks import nothing_written

    assert_one_line(train(student_dir, caches["top16"], tmp_path / "o", *flags), words)
    assert nothing_written(tmp_path / "o")
