"""Losses against dense references written here in float64, the tail modes' maths, chunked = unchunked,
and the TAID t rule against a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from taid_cache import losses as L
from taid_cache.config import TAILS
from taid_cache.losses import REGISTRY

# The losses whose only inputs are the student's logits and the teacher (dkd also reads the labels, ctkd a
# learned temperature: tests/test_loss_registry.py).
PLAIN_LOSSES = [n for n, spec in REGISTRY.items() if spec.uses_teacher and not spec.needs_labels and not spec.learns_temperature]

torch.manual_seed(0)
N, V = 6, 12


def softmax64(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl64(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.array([sum(pi * math.log(pi / qi) for pi, qi in zip(pr, qr) if pi > 0) for pr, qr in zip(p, q)])


@pytest.fixture()
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.randn(N, V) * 2
    teacher = torch.log_softmax(torch.randn(N, V) * 3, -1)
    return s, teacher


def reference(name: str, s: np.ndarray, lt: np.ndarray, t: float = 0.3, beta: float = 0.1, mu: float = 0.5) -> np.ndarray:
    p, q = np.exp(lt), softmax64(s)
    if name == "fkl":
        return kl64(p, q)
    if name == "rkl":
        return kl64(q, p)
    if name == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    if name == "js":
        m = beta * p + (1 - beta) * q
        return beta * kl64(p, m) + (1 - beta) * kl64(q, m)
    if name == "skew-fkl":
        return kl64(p, beta * p + (1 - beta) * q)
    if name == "skew-rkl":
        return kl64(q, beta * q + (1 - beta) * p)
    if name == "taid":
        p_t = softmax64((1 - t) * s + t * lt)
        return -(p_t * np.log(q)).sum(-1)
    if name == "adaptive-kl":
        out = []
        for pr, qr, f, r in zip(p, q, kl64(p, q), kl64(q, p)):
            head, total = set(), 0.0
            for v in np.argsort(-pr):
                if total >= mu:
                    break
                head.add(v)
                total += pr[v]
            gh = sum(abs(pr[v] - qr[v]) for v in head)
            gt = sum(abs(pr[v] - qr[v]) for v in range(len(pr)) if v not in head)
            out.append(gh / (gh + gt) * f + gt / (gh + gt) * r)
        return np.array(out)
    raise KeyError(name)


@pytest.mark.parametrize("name", PLAIN_LOSSES)
def test_every_loss_matches_its_dense_reference(name: str, pair) -> None:
    s, lt = pair
    cfg = L.LossConfig(name=name, js_beta=0.5, skew_beta=0.1, adaptive_mu=0.5)
    got = L.per_position_fn(cfg)(s, lt, 0.3).double().numpy()
    want = reference(name, s.double().numpy(), lt.double().numpy(), 0.3, cfg.js_beta if name == "js" else cfg.skew_beta, cfg.adaptive_mu)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_taid_gradient_is_q_minus_p_t(pair) -> None:
    s, lt = pair
    s = s.clone().requires_grad_()
    mask = torch.tensor([True, False, True, True, False, True])
    L.taid_loss(s, lt, 0.7, mask).backward()
    p_t = torch.softmax(0.3 * s.detach() + 0.7 * lt, -1)
    expected = (torch.softmax(s.detach(), -1) - p_t) * mask[:, None] / mask.sum()
    torch.testing.assert_close(s.grad, expected, atol=1e-6, rtol=1e-5)
    assert L.taid_loss(s, lt, 1.0).item() == pytest.approx(
        (L.fkl(s, lt) - (lt.exp() * lt).sum(-1)).mean().item(), rel=1e-5)  # t = 1: cross-entropy to the teacher


def test_taid_loss_averages_over_the_mask_once(pair) -> None:
    s, lt = pair
    mask = torch.tensor([True, True, False, False, False, False])
    per = L.taid(s, lt, 0.5)
    assert L.taid_loss(s, lt, 0.5, mask).item() == pytest.approx(per[:2].mean().item(), rel=1e-6)
    assert L.taid_loss(s, lt, 0.5).item() == pytest.approx(per.mean().item(), rel=1e-6)


def sparse(lt: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, ids = lt.topk(k, -1)
    return ids, values


def test_tail_renorm_is_renormalised_top_k(pair) -> None:
    s, lt = pair
    ids, lps = sparse(lt, 4)
    dense = L.rebuild_teacher(s, ids, lps, "renorm", V).double()
    p = dense.exp()
    assert torch.allclose(p.sum(-1), torch.ones(N, dtype=torch.float64), atol=1e-6)
    expected = torch.softmax(lps.double(), -1)
    torch.testing.assert_close(p.gather(1, ids), expected, atol=1e-6, rtol=1e-5)
    assert (p > 0).sum(-1).tolist() == [4] * N


def test_tail_uniform_spreads_missing_mass_evenly(pair) -> None:
    s, lt = pair
    ids, lps = sparse(lt, 4)
    p = L.rebuild_teacher(s, ids, lps, "uniform", V).double().exp()
    torch.testing.assert_close(p.gather(1, ids), lps.double().exp(), atol=1e-6, rtol=1e-5)
    tail = 1 - lps.double().exp().sum(-1)
    others = p.clone().scatter_(1, ids, 0.0)
    torch.testing.assert_close(others.sum(-1), tail, atol=1e-6, rtol=1e-5)
    nonzero = others[others > 0].view(N, V - 4)
    torch.testing.assert_close(nonzero, (tail / (V - 4))[:, None].expand(N, V - 4), atol=1e-7, rtol=1e-5)


def test_tail_student_follows_the_student_and_is_a_tail_bucket_for_fkl(pair) -> None:
    s, lt = pair
    ids, lps = sparse(lt, 4)
    dense = L.rebuild_teacher(s, ids, lps, "student", V)
    p = dense.double().exp()
    q = torch.softmax(s.double(), -1)
    others = p.clone().scatter_(1, ids, 0.0)
    q_others = q.clone().scatter_(1, ids, 0.0)
    ratio = others / q_others  # constant over the non-top-k tokens: proportional to the student
    ratio = torch.where(q_others > 0, ratio, torch.nan).numpy()
    np.testing.assert_allclose(np.nanmax(ratio, 1), np.nanmin(ratio, 1), rtol=1e-4)
    # Forward KL with this tail = KL over k+1 buckets (top-k, then everything else as one).
    p_k, q_k = lps.double().exp(), q.gather(1, ids)
    tail_p, tail_q = 1 - p_k.sum(-1), 1 - q_k.sum(-1)
    bucket = (p_k * (p_k / q_k).log()).sum(-1) + tail_p * (tail_p / tail_q).log()
    torch.testing.assert_close(L.fkl(s, dense).double(), bucket, atol=1e-5, rtol=1e-4)


def test_padded_vocabulary_rows_get_no_teacher_mass(pair) -> None:
    s, lt = pair
    ids, lps = sparse(lt[:, :10].log_softmax(-1), 3)
    for tail in TAILS:
        p = L.rebuild_teacher(s, ids, lps, tail, valid_vocab=10).exp()
        assert (p[:, 10:] == 0).all()
        assert torch.allclose(p.sum(-1), torch.ones(N), atol=1e-5)


def test_top_p_padding_entries_are_ignored(pair) -> None:
    s, lt = pair
    ids, lps = sparse(lt, 5)
    ids[:, 3:], lps[:, 3:] = -1, -math.inf
    a = L.rebuild_teacher(s, ids, lps, "uniform", V)
    b = L.rebuild_teacher(s, ids[:, :3], lps[:, :3], "uniform", V)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", PLAIN_LOSSES)
@pytest.mark.parametrize("tail", TAILS)
def test_chunked_equals_unchunked(name: str, tail: str) -> None:
    torch.manual_seed(1)
    n, h, vocab, k = 37, 16, 50, 6
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(vocab, h) * 0.5).requires_grad_()
    ids, lps = sparse(torch.log_softmax(torch.randn(n, vocab) * 3, -1), k)
    fn_pos = L.per_position_fn(L.LossConfig(name=name))

    def per_position(logits: torch.Tensor, sl: slice) -> torch.Tensor:
        return fn_pos(logits, L.rebuild_teacher(logits, ids[sl], lps[sl], tail, vocab), 0.6)

    dense = per_position(hidden @ weight.t(), slice(None)).sum()
    dense.backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    def summed(logits: torch.Tensor, sl: slice) -> L.ChunkLoss:
        value = per_position(logits, sl).sum()
        return L.ChunkLoss(value, value)

    total, reported = L.chunked_lm_loss(hidden, weight, summed, chunk=8)
    total.backward()
    assert total.item() == pytest.approx(dense.item(), rel=1e-5) and reported.item() == pytest.approx(dense.item(), rel=1e-5)
    torch.testing.assert_close(hidden.grad, gh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weight.grad, gw, atol=1e-5, rtol=1e-4)


def test_taid_schedule_against_a_hand_computation() -> None:
    sched = L.TaidSchedule(t_start=0.4, t_end=1.0, alpha=0.1, beta=0.9, total_steps=100)
    assert sched.update(5.0) == 0.4 and sched.prev_loss == 5.0 and sched.momentum == 0.0  # first step only records
    # step 2: rel = (5 - 4) / 5 = 0.2; m = 0.1 * 0.2 = 0.02; t_lin = 0.4 + 0.6 * 2/100 = 0.412;
    # adaptive = 0.4 + 0.1 * sigmoid(0.02) * 0.6
    t2 = sched.update(4.0)
    sig = 1 / (1 + math.exp(-0.02))
    assert sched.momentum == pytest.approx(0.02)
    assert t2 == pytest.approx(max(0.412, 0.4 + 0.1 * sig * 0.6))
    # step 3: loss rises: rel = (4 - 4.5) / 4 = -0.125; m = 0.9 * 0.02 + 0.1 * -0.125 = 0.0055
    t3 = sched.update(4.5)
    assert sched.momentum == pytest.approx(0.0055)
    expected = max(0.4 + 0.6 * 3 / 100, t2 + 0.1 * (1 / (1 + math.exp(-0.0055))) * (1 - t2))
    assert t3 == pytest.approx(expected)
    assert t3 >= t2  # never decreases


def test_taid_schedule_linear_floor_cap_and_state_round_trip() -> None:
    sched = L.TaidSchedule(t_start=0.2, t_end=0.9, alpha=0.0, beta=0.99, total_steps=10)
    ts = [sched.update(1.0) for _ in range(12)]
    assert ts[0] == 0.2
    assert ts[1] == pytest.approx(0.2 + 0.7 * 2 / 10)  # alpha 0: the linear schedule is the floor
    assert ts[-1] == pytest.approx(0.9) and max(ts) <= 0.9
    linear = L.TaidSchedule(t_start=0.2, t_end=0.9, alpha=0.5, total_steps=10, adaptive=False)
    assert [linear.update(x) for x in (3.0, 1.0)] == [0.2, pytest.approx(0.34)]
    copy = L.TaidSchedule()
    copy.load_state_dict(sched.state_dict())
    assert copy == sched


def quantised_with_exact_tail(lt: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A compact cache's view of dense log-probs: top-k on the 1/64-nat grid, and the exact log tail mass."""
    ids, lps = sparse(lt, k)
    tail = lt.double().scatter(1, ids, -math.inf).logsumexp(-1).float()
    return ids, torch.round(lps * 64) / 64, tail


@pytest.mark.parametrize("tail", TAILS)
def test_an_exact_tail_mass_is_kept_and_the_head_rescaled_to_the_rest(tail: str) -> None:
    # A confident teacher: the top entry holds 0.99 to 0.9999, where 1 − Σ of quantised entries is noise.
    torch.manual_seed(5)
    logits = torch.randn(N, V)
    logits[:, 0] += torch.linspace(5, 10, N)
    lt = torch.log_softmax(logits, -1)
    ids, lps, log_m = quantised_with_exact_tail(lt, 4)
    s = torch.randn(N, V)
    p = L.rebuild_teacher(s, ids, lps, tail, V, log_m).double().exp()
    torch.testing.assert_close(p.sum(-1), torch.ones(N, dtype=torch.float64), atol=1e-6, rtol=0)
    head = p.gather(1, ids)
    if tail == "renorm":  # the tail is dropped by definition: the head alone, renormalised
        torch.testing.assert_close(head, torch.softmax(lps.double(), -1), atol=1e-6, rtol=1e-5)
        return
    true_tail = torch.softmax(logits.double(), -1).scatter(1, ids, 0.0).sum(-1)
    assert (true_tail > 0).all() and true_tail.min() < 1e-3
    off = p.scatter(1, ids, 0.0).sum(-1)  # summed where it lies: 1 − Σ head would cancel in the test itself
    assert ((off - true_tail).abs() / true_tail).max() < 1e-5  # exact, far inside the 1% relative
    # The head keeps its stored proportions, scaled to 1 − m.
    torch.testing.assert_close(head / head.sum(-1, keepdim=True), torch.softmax(lps.double(), -1), atol=1e-6, rtol=1e-5)


def test_head_entries_the_student_lacks_join_the_exact_tail() -> None:
    torch.manual_seed(6)
    lt = torch.log_softmax(torch.randn(N, V) * 3, -1)
    ids, lps, log_m = quantised_with_exact_tail(lt, 5)
    ids[:, 1] = V + 3  # an id past the student's vocabulary
    p = L.rebuild_teacher(torch.randn(N, V), ids, lps, "uniform", V, log_m).double()
    scaled = lps.double() - lps.double().logsumexp(-1, keepdim=True) + torch.log1p(-log_m.double().exp())[:, None]
    expected_tail = log_m.double().exp() + scaled[:, 1].exp()
    usable = [0, 2, 3, 4]
    torch.testing.assert_close(p.exp().gather(1, ids[:, usable]), scaled[:, usable].exp(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(1 - p.exp().gather(1, ids[:, usable]).sum(-1), expected_tail, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("exact_tail", [False, True])
@pytest.mark.parametrize("valid", [36, 40])  # 36: rows 36..39 are an LM head padded past the tokenizer
@pytest.mark.parametrize("t", [0.0, 0.35, 1.0])
def test_taid_student_tail_closed_form_equals_the_general_path(t: float, valid: int, exact_tail: bool) -> None:
    torch.manual_seed(3)
    n, vocab, k = 20, 40, 5
    s = torch.randn(n, vocab) * 2
    ids, lps, log_m = quantised_with_exact_tail(torch.log_softmax(torch.randn(n, valid) * 3, -1), k)
    ids[:4, 3:], lps[:4, 3:] = -1, -math.inf  # top-p padding
    log_m = log_m if exact_tail else None
    general = s.clone().requires_grad_()
    loss = L.taid(general, L.rebuild_teacher(general, ids, lps, "student", valid, log_m), t)
    loss.sum().backward()
    fast, grad = L.taid_sparse(s, L.TopKTeacher(ids, lps, log_m, valid), t)
    if t > 0:
        torch.testing.assert_close(fast, loss.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, general.grad, atol=1e-6, rtol=1e-5)
    else:  # t = 0: the target is the student itself over the tokenizer's rows
        torch.testing.assert_close(grad[:, :valid].sum(-1), torch.softmax(s, -1)[:, valid:].sum(-1).neg(), atol=1e-6, rtol=1e-5)


def test_chunked_loss_with_an_analytic_gradient() -> None:
    torch.manual_seed(4)
    n, h, vocab, k = 29, 8, 30, 4
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(vocab, h, requires_grad=True)
    ids, lps = sparse(torch.log_softmax(torch.randn(n, vocab) * 3, -1), k)
    dense = L.taid(hidden @ weight.t(), L.rebuild_teacher((hidden @ weight.t()).detach(), ids, lps, "student", vocab), 0.6).sum()
    dense.backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    def fn(logits: torch.Tensor, sl: slice):
        loss, grad = L.taid_sparse(logits, L.TopKTeacher(ids[sl], lps[sl], None, vocab), 0.6)
        return L.ChunkLoss(loss.sum(), loss.sum(), grad)

    total, _ = L.chunked_lm_loss(hidden, weight, fn, chunk=6)
    total.backward()
    assert total.item() == pytest.approx(dense.item(), rel=1e-5)
    torch.testing.assert_close(hidden.grad, gh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weight.grad, gw, atol=1e-5, rtol=1e-4)


def sampled_teacher(n: int, vocab: int, valid: int, k: int, draws: int, seed: int) -> L.SampledTeacher:
    """A head of k and up to `draws` distinct draws per position off it (counts ≥ 1), some ids past `valid`."""
    gen = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(n, vocab, generator=gen) * 2, -1)
    head_lps, head_ids = logp.topk(k, -1)
    off = logp.scatter(-1, head_ids, -math.inf)
    log_m = off.logsumexp(-1)
    picks = torch.multinomial(off.exp(), draws, replacement=True, generator=gen)
    ids = torch.full((n, draws), -1)
    counts = torch.zeros(n, draws, dtype=torch.int64)
    for row in range(n):
        unique, c = picks[row].unique(return_counts=True)
        ids[row, : len(unique)], counts[row, : len(unique)] = unique, c
    lps = torch.where(ids >= 0, logp.gather(1, ids.clamp(min=0)), -math.inf)
    return L.SampledTeacher(head_ids, head_lps, log_m, ids, counts, lps, valid)


@pytest.mark.parametrize("t", [0.0, 0.4, 1.0])
def test_sampled_taid_closed_form_against_a_dense_target(t: float) -> None:
    """The target built densely in float64 from its definition: p_t ∝ q^(1−t) p^t on the head, the bucket
    m^t Q^(1−t) filled (1−t)·q/Q + t·r̂ (r̂ the draws' counts, normalised); loss −Σ target log q."""
    n, vocab, valid, k = 9, 40, 36, 4
    teacher = sampled_teacher(n, vocab, valid, k, 12, 0)
    s = torch.randn(n, vocab, generator=torch.Generator().manual_seed(1)) * 2
    q = torch.softmax(s.double(), -1)
    ids, lps = teacher.ids, teacher.logprobs.double()
    usable = ids < valid
    head_p = lps.exp() * (1 - teacher.tail_logmass.double().exp())[:, None] / lps.exp().sum(-1, keepdim=True)  # rescaled to 1 − m
    m = teacher.tail_logmass.double().exp() + torch.where(usable, 0.0, head_p).sum(-1)  # head entries past valid join the tail
    in_head = torch.zeros(n, vocab, dtype=torch.bool).scatter(1, torch.where(usable, ids, 0), usable)
    off = ~in_head & (torch.arange(vocab) < valid)
    big_q = torch.where(off, q, 0.0).sum(-1)
    head_w = torch.where(usable, q.gather(1, ids) ** (1 - t) * head_p ** t, 0.0)
    bucket = m ** t * big_q ** (1 - t)
    z = head_w.sum(-1) + bucket
    drawn = (teacher.sample_ids >= 0) & (teacher.sample_ids < valid)
    counts = torch.where(drawn, teacher.sample_draws.double(), 0.0)
    r_hat = torch.zeros(n, vocab, dtype=torch.float64).scatter_add(1, teacher.sample_ids.clamp(min=0), counts / counts.sum(-1, keepdim=True))
    target = torch.zeros(n, vocab, dtype=torch.float64).scatter_add(1, torch.where(usable, ids, 0), head_w / z[:, None])
    target += (bucket / z)[:, None] * ((1 - t) * torch.where(off, q, 0.0) / big_q[:, None] + t * r_hat)
    expected_loss = -(target * torch.log_softmax(s.double(), -1)).sum(-1)
    loss, grad = L.taid_sparse(s, teacher, t)
    torch.testing.assert_close(loss.double(), expected_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), q - target, atol=1e-6, rtol=1e-4)
    logits = s.clone().requires_grad_()  # the same through autograd (`distillation`)
    L.distillation(L.LossConfig("taid"), teacher, logits, t).sum().backward()
    torch.testing.assert_close(logits.grad.double(), q - target, atol=1e-6, rtol=1e-4)


def test_chunk_loss_takes_the_closed_form_exactly_where_it_holds() -> None:
    n, vocab, k = 7, 30, 5
    s = torch.randn(n, vocab, generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(3))
    lps, ids = torch.log_softmax(torch.randn(n, vocab, generator=torch.Generator().manual_seed(4)) * 3, -1).topk(k, -1)
    top_k = L.TopKTeacher(ids, lps, None, vocab)
    sampled = sampled_teacher(n, vocab, vocab, k, 8, 5)
    dense = L.DenseTeacher(torch.log_softmax(torch.randn(n, vocab), -1))
    cases = [("taid", top_k, 1.0, True), ("taid", sampled, 1.0, True), ("taid", L.TopKTeacher(ids, lps, None, vocab, "uniform"), 1.0, False),
             ("taid", dense, 1.0, False), ("taid", top_k, 0.5, False), ("taid", sampled, 0.5, False), ("fkl", top_k, 1.0, False)]
    for name, teacher, ratio, closed in cases:
        cfg = L.LossConfig(name, distil_ratio=ratio)
        out = L.chunk_loss(cfg, teacher, s, labels, 0.6)
        assert (out.grad is not None) == closed, (name, teacher, ratio)
        logits = s.clone().requires_grad_()  # independent: autograd through the definition r·d + (1 − r)·CE
        d = L.distillation(cfg, teacher, logits, 0.6)
        combined = (ratio * d + (1 - ratio) * L.cross_entropy(logits, labels)).sum()
        combined.backward()
        torch.testing.assert_close(out.train, combined.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.report, d.sum().detach(), atol=1e-5, rtol=1e-5)
        if closed:
            torch.testing.assert_close(out.grad, logits.grad, atol=1e-6, rtol=1e-4)
    sft = L.chunk_loss(L.LossConfig("sft"), None, s, labels, 0.6)
    assert sft.train.item() == pytest.approx(L.cross_entropy(s, labels).sum().item()) and sft.grad is None
