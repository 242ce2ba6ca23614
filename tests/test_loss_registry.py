"""The loss registry (each loss declared once, everything else derived from it), DKD, CTKD and the distillation
temperature against dense float64 references written here: exact where the cache is exact, within a statistical
bound where it samples."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import pytest
import torch

from taid_cache import losses as L
from taid_cache.config import LOSS_PARAMETERS, TrainConfig, options_of
from taid_cache.losses.registry import LOSSES, PARAMS, REGISTRY, SAMPLED_LOSSES, LossConfig
from test_attacks import assert_one_line, train
from test_tail_samples import Teacher

N, V = 7, 30


def test_every_parameter_is_declared_once_and_reaches_the_command_line() -> None:
    assert list(PARAMS) == [n for n in LOSS_PARAMETERS]  # every built-in parameter is an option, in declaration order
    options = {f.name: f for f in options_of(TrainConfig)}
    for name, param in PARAMS.items():
        f = options[name]
        assert f.default == param.default and f.metadata["help"] == param.help and f.metadata["within"].text == param.within
        assert getattr(LossConfig("taid"), name) == param.default
        assert any(name in spec.reads for spec in REGISTRY.values())
    assert options["loss"].metadata["choices"] == LOSSES == tuple(REGISTRY)
    assert all(name in PARAMS for spec in REGISTRY.values() for name in spec.reads)
    assert set(SAMPLED_LOSSES) == {"taid", "fkl", "dkd", "ctkd", "opd", "sft"}
    # One declaration per shared parameter: the very same field in every loss that reads it.
    assert len({id(f) for spec in REGISTRY.values() for f in fields(spec.Params) if f.name == "temperature"}) == 1
    loss = TrainConfig(student="s", cache="c", output="o", loss="dkd", dkd_beta=2.0).loss_config()
    assert (loss.name, loss.dkd_beta, loss.params()) == ("dkd", 2.0, {"dkd_alpha": 1.0, "dkd_beta": 2.0, "temperature": 1.0})
    assert loss.loss.params == REGISTRY["dkd"].Params(dkd_beta=2.0) and loss == LossConfig("dkd", dkd_beta=2.0)
    with pytest.raises(TypeError, match="unknown loss parameters"):
        LossConfig("dkd", dkd_gamma=1.0)


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
    (("--loss", "fkl", "--temperature", "0"), "--temperature must be in [0.1, 20]"),
    (("--loss", "fkl", "--temperature", "1e6"), "--temperature must be in [0.1, 20]"),
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


# A loss from outside the package: one class, registered with its own parameter (tests below).


SCALE = L.param(2.0, "(0, inf)", "scaled-fkl: the factor on the forward KL.")


class ScaledFKL(L.Loss):
    """c · KL(p‖q), tempered like the KL family, with a sampled form on the cache's estimate."""

    name = "scaled-fkl"
    summary = "a scaled forward KL (a test's loss)"
    tempered = True
    sampled_how = "on the sampled estimate"

    @dataclass(frozen=True)
    class Params:
        scaled_fkl_scale: float = SCALE
        temperature: float = L.TEMPERATURE

    def dense(self, logits, teacher_logprobs, ctx):
        p, log_q = teacher_logprobs.exp(), torch.log_softmax(logits.float(), -1)
        return self.params.scaled_fkl_scale * torch.where(p > 0, p * (teacher_logprobs - log_q), 0.0).sum(-1)

    def sampled(self, logits, teacher, ctx):
        est = teacher.weights(ctx.temperature)
        log_q = torch.log_softmax(logits.float() / ctx.temperature, -1)
        kl = torch.where(est.usable, est.w * (est.ell - est.at(log_q)), 0.0).sum(-1)
        return self.params.scaled_fkl_scale * kl * ctx.temperature**2


@pytest.fixture()
def own_registry():
    """The registry as it was, after the test (a test's losses do not leak into the others)."""
    saved, params = dict(REGISTRY), dict(PARAMS)
    yield
    REGISTRY.clear()
    REGISTRY.update(saved)
    PARAMS.clear()
    PARAMS.update(params)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_a_loss_registered_from_outside_the_package(own_registry, tau: float) -> None:
    L.register_loss(ScaledFKL)
    assert "scaled-fkl" in LOSSES and "scaled-fkl" in SAMPLED_LOSSES and PARAMS["scaled_fkl_scale"].default == 2.0
    assert ScaledFKL.reads == ("scaled_fkl_scale", "temperature")
    assert "scaled_fkl_scale" not in {f.name for f in options_of(TrainConfig)}  # registered after config: no option
    logp, s, labels = teacher_and_student(4)
    cfg = LossConfig("scaled-fkl", scaled_fkl_scale=3.0, temperature=tau)
    assert (cfg.scaled_fkl_scale, LossConfig("scaled-fkl").scaled_fkl_scale) == (3.0, 2.0)
    p, q_log = torch.softmax(logp / tau, -1), torch.log_softmax(s / tau, -1)
    want = 3.0 * tau**2 * (p * (p.log() - q_log)).sum(-1)  # its formula, in float64
    values, ids = logp.topk(V, -1)
    for teacher in (L.DenseTeacher(logp.float()), L.TopKTeacher(ids, values.float(), None, V)):
        out = L.chunk_loss(cfg, teacher, s.float(), labels, 0.0)
        assert out.grad is None
        torch.testing.assert_close(out.report.double(), want.sum(), rtol=1e-4, atol=1e-4)
    mixed = L.chunk_loss(LossConfig("scaled-fkl", distil_ratio=0.25, scaled_fkl_scale=3.0, temperature=tau),
                         L.DenseTeacher(logp.float()), s.float(), labels, 0.0)
    ce = torch.nn.functional.cross_entropy(s, labels, reduction="sum")
    torch.testing.assert_close(mixed.train.double(), 0.25 * want.sum() + 0.75 * ce, rtol=1e-4, atol=1e-4)
    # Its sampled form against the built-in FKL's on the same cache: the same estimate, scaled.
    sampled = Teacher().estimate(64, 0)
    logits = Teacher().student.clone()
    fkl = L.distillation(LossConfig("fkl", temperature=tau), sampled, logits, 0.0)
    torch.testing.assert_close(L.distillation(cfg, sampled, logits, 0.0), 3.0 * fkl)


def test_a_duplicate_registration_is_refused(own_registry) -> None:
    before = (dict(REGISTRY), dict(PARAMS))

    class Again(ScaledFKL):
        name = "fkl"

    with pytest.raises(ValueError, match="'fkl' is already registered"):
        L.register_loss(Again)

    class OtherTemperature(L.Loss):
        name = "hot-fkl"
        tempered = True

        @dataclass(frozen=True)
        class Params:
            temperature: float = L.param(2.0, "(0, inf)", "another τ")

    with pytest.raises(ValueError, match="parameter temperature .* declared by fkl"):
        L.register_loss(OtherTemperature)
    assert (dict(REGISTRY), dict(PARAMS)) == before  # nothing half-registered
    with pytest.raises(TypeError, match="param"):
        class Undeclared(L.Loss):  # noqa: F841  a parameter without its range and help
            @dataclass(frozen=True)
            class Params:
                scale: float = 1.0


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_the_shared_sampled_estimate_against_a_direct_computation(tau: float) -> None:
    """`SampledTeacher.weights`: ŵ (the head's p, m·c/N at a draw; at τ ≠ 1 reweighted by p^(1/τ − 1)) normalised over
    the usable entries, computed here entry by entry in float64; a row with nothing usable weighs nothing."""
    teacher = Teacher().estimate(16, 1)
    valid = 500  # some head entries and draws past it: dropped
    teacher = L.SampledTeacher(teacher.ids, teacher.logprobs, teacher.tail_logmass, teacher.sample_ids, teacher.sample_draws,
                               teacher.sample_logprobs, valid)
    teacher.ids[0] = valid + 1  # a row whose head is all past valid_vocab ...
    teacher.sample_ids[0] = -1  # ... and has no draws
    teacher.sample_draws[0] = 0
    est = teacher.weights(tau)
    lps = teacher.logprobs.double()
    log_m = teacher.tail_logmass.double()
    head_scale = torch.log1p(-log_m.exp()) - lps.logsumexp(-1)
    draws = teacher.sample_draws.double()
    for row in range(teacher.ids.shape[0]):
        entries = []  # (id, ŵ, ℓ) of every usable entry
        for v, lp in zip(teacher.ids[row].tolist(), lps[row].tolist()):
            if 0 <= v < valid:
                entries.append((v, math.exp(lp + head_scale[row].item()), lp + head_scale[row].item()))
        total = draws[row].sum().item()
        for v, c, lp in zip(teacher.sample_ids[row].tolist(), draws[row].tolist(), teacher.sample_logprobs[row].double().tolist()):
            if 0 <= v < valid and c > 0:
                entries.append((v, math.exp(log_m[row].item()) * c / total, lp))
        weights = [w * math.exp((1 / tau - 1) * ell) for _, w, ell in entries]
        got_w = est.w[row][est.usable[row]].double()
        assert est.ids[row][est.usable[row]].tolist() == [v for v, _, _ in entries]
        if not entries:
            assert (est.w[row] == 0).all()
            continue
        torch.testing.assert_close(got_w, torch.tensor(weights, dtype=torch.float64) / sum(weights), rtol=1e-5, atol=1e-7)
        assert (est.w[row][~est.usable[row]] == 0).all()
    log_q = torch.log_softmax(torch.randn(teacher.ids.shape[0], 512, generator=torch.Generator().manual_seed(0)), -1)
    gathered = est.at(log_q)
    usable_ids = est.ids.clamp(min=0)
    assert torch.equal(gathered[est.usable], log_q.gather(1, usable_ids)[est.usable])
