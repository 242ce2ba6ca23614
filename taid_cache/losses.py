"""Distillation losses, usable on their own (any training loop) and by the trainer.

Dense forms take student logits [..., V] and teacher log-probs [..., V] and return one value per position;
`reduce_masked` averages them over the loss mask. `taid_loss` is the scalar convenience for TAID.
Sparse teachers (top-k from a cache) become dense log-probs with `rebuild_teacher` and a tail mode.
`chunked_lm_loss` applies the LM head and a loss to chunks of positions, computing gradients chunk by chunk,
so no float32 [positions, V] tensor exists for all positions at once. `TaidSchedule` is the adaptive t.
All maths is in float32; docs/LOSSES.md has the formulas.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .heads import PLAIN, LogitMap, head_logits

LOG_FLOOR = -100.0  # where a loss needs log p of a token the teacher gives no mass (rkl family): e^-100


def _xlogy_ratio(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) with 0 · log 0 = 0."""
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def fkl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Forward KL(p‖q) per position."""
    log_q = F.log_softmax(student_logits.float(), -1)
    return _xlogy_ratio(teacher_logprobs.exp(), teacher_logprobs, log_q)


def rkl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Reverse KL(q‖p) per position (teacher log-probs floored at LOG_FLOOR where it has no mass)."""
    log_q = F.log_softmax(student_logits.float(), -1)
    return _xlogy_ratio(log_q.exp(), log_q, teacher_logprobs.clamp(min=LOG_FLOOR))


def tvd(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Total variation distance ½ Σ |p − q| per position."""
    return 0.5 * (teacher_logprobs.exp() - F.softmax(student_logits.float(), -1)).abs().sum(-1)


def _mixture_logprobs(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1−w)·b), stable in log space."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a)) if 0 < weight_a < 1 else (log_a if weight_a >= 1 else log_b)


def skew_fkl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Skew forward KL (DistiLLM): KL(p ‖ β p + (1−β) q)."""
    log_q = F.log_softmax(student_logits.float(), -1)
    return _xlogy_ratio(teacher_logprobs.exp(), teacher_logprobs, _mixture_logprobs(teacher_logprobs, log_q, beta))


def skew_rkl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Skew reverse KL (DistiLLM): KL(q ‖ β q + (1−β) p)."""
    log_q = F.log_softmax(student_logits.float(), -1)
    return _xlogy_ratio(log_q.exp(), log_q, _mixture_logprobs(log_q, teacher_logprobs, beta))


def js(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon: β KL(p ‖ m) + (1−β) KL(q ‖ m), m = β p + (1−β) q."""
    log_q = F.log_softmax(student_logits.float(), -1)
    log_m = _mixture_logprobs(teacher_logprobs, log_q, beta)
    return beta * _xlogy_ratio(teacher_logprobs.exp(), teacher_logprobs, log_m) + (1 - beta) * _xlogy_ratio(log_q.exp(), log_q, log_m)


def adaptive_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, mu: float = 0.5) -> torch.Tensor:
    """Adaptive KL: FKL and RKL weighted by the student's gap on the teacher's head (the most probable tokens
    up to cumulative mass μ) and on its tail; the weights carry no gradient."""
    p = teacher_logprobs.exp()
    q = F.softmax(student_logits.float(), -1)
    sorted_p, order = p.sort(-1, descending=True)
    in_head_sorted = (sorted_p.cumsum(-1) - sorted_p) < mu  # the token that crosses μ belongs to the head
    head = torch.zeros_like(in_head_sorted).scatter(-1, order, in_head_sorted)
    gap = (p - q).abs().detach()
    g_head, g_tail = (gap * head).sum(-1), (gap * ~head).sum(-1)
    w_head = g_head / (g_head + g_tail).clamp(min=1e-12)
    return w_head * fkl(student_logits, teacher_logprobs) + (1 - w_head) * rkl(student_logits, teacher_logprobs)


def taid(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, t: float) -> torch.Tensor:
    """TAID per position: −Σ p_t log q, p_t = softmax((1−t)·stopgrad(s) + t·ℓ). A cross-entropy; its gradient
    equals that of KL(p_t‖q)."""
    s = student_logits.float()
    # t = 0 must not meet −inf teacher entries (0 · −inf is nan): the target is then the student itself.
    p_t = F.softmax((1 - t) * s.detach() + (t * teacher_logprobs if t > 0 else 0.0), -1)
    log_q = F.log_softmax(s, -1)
    return -(torch.where(p_t > 0, p_t * log_q, torch.zeros_like(p_t))).sum(-1)


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain next-token cross-entropy per position."""
    return F.cross_entropy(student_logits.float().flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)


def reduce_masked(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the positions where mask is true (all positions when mask is None)."""
    if mask is None:
        return per_position.mean()
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def taid_loss(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, t: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar TAID loss for dense teacher log-probs [..., V], averaged over mask-true positions."""
    return reduce_masked(taid(student_logits, teacher_logprobs, t), mask)


@dataclass
class LossConfig:
    name: str = "taid"
    beta: float = 0.1  # skew-fkl / skew-rkl: β; js: β (0.5 is the symmetric JSD)
    mu: float = 0.5  # adaptive-kl
    distil_ratio: float = 1.0  # r·distillation + (1−r)·CE


def per_position_fn(cfg: LossConfig) -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
    """The distillation term of `cfg` as f(student_logits, teacher_logprobs, t) -> [positions]."""
    table: dict[str, Callable] = {
        "taid": lambda s, tl, t: taid(s, tl, t),
        "fkl": lambda s, tl, t: fkl(s, tl),
        "rkl": lambda s, tl, t: rkl(s, tl),
        "tvd": lambda s, tl, t: tvd(s, tl),
        "js": lambda s, tl, t: js(s, tl, cfg.beta),
        "skew-fkl": lambda s, tl, t: skew_fkl(s, tl, cfg.beta),
        "skew-rkl": lambda s, tl, t: skew_rkl(s, tl, cfg.beta),
        "adaptive-kl": lambda s, tl, t: adaptive_kl(s, tl, cfg.mu),
    }
    return table[cfg.name]


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x ≤ 0, accurate at both ends (−inf at x = 0)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def head_logprobs(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Stored log-probs as a head whose mass is at most 1: rounding (a quantised cache, a bf16 teacher) can make
    a confident teacher's entries sum past 1, and the tail and every loss need 1 − Σ ≥ 0. Such rows are
    renormalised; −inf (unused) entries stay −inf."""
    lps = topk_logprobs.float()
    excess = torch.logsumexp(lps, -1, keepdim=True).clamp(min=0.0).nan_to_num(0.0)  # NaN only for all −inf rows
    return lps - excess


def split_teacher(topk_logprobs: torch.Tensor, usable: torch.Tensor, tail_logmass: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse teacher as (head log-probs [N, k], −inf where not usable; log of the mass off the head [N]),
    the two summing to 1.

    With the cache's exact tail mass m (`tail_logmass`, log m), the tail is m and the stored entries are
    rescaled to hold 1 − m together (their quantisation error moves into the head, never into the tail).
    Without it (a caller's own top-k), the tail is 1 − Σ stored, after `head_logprobs`. Entries that are not
    usable (unused slots, ids the student lacks) join the tail."""
    lps = topk_logprobs.float()
    if tail_logmass is None:
        lps = head_logprobs(lps)
        log_tail = log1mexp(torch.logsumexp(lps, -1).clamp(max=0.0))
    else:
        log_tail = tail_logmass.float()
        lps = lps - (torch.logsumexp(lps, -1) - log1mexp(log_tail)).nan_to_num(0.0, posinf=0.0, neginf=0.0)[:, None]
    dropped = lps.masked_fill(usable, -math.inf)
    log_tail = torch.logaddexp(log_tail, torch.logsumexp(dropped, -1))
    return lps.masked_fill(~usable, -math.inf), log_tail


def taid_sparse_student_tail(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, t: float, valid_vocab: int,
    tail_logmass: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TAID against a top-k teacher with the `student` tail, in closed form: (per-position loss, its gradient
    with respect to the logits). Equal to `taid(s, rebuild_teacher(s, ..., "student", V), t)` without building
    the dense teacher. Off the top-k (and below `valid_vocab`), ℓ_v = log q_v + const, so p_t ∝ q_v there:
    p_t,v = c·q_v for one c per row, and only the k top-k entries and a few per-row sums need their own maths
    (docs/LOSSES.md). The gradient is q − p_t. One exp pass over [N, V] besides the log-sum-exp, like CE.
    `tail_logmass` [N]: the cache's exact log tail mass (`split_teacher`).
    """
    s = student_logits.detach().float()
    n, vocab = s.shape
    ids = topk_ids.long()
    usable = (ids >= 0) & (ids < valid_vocab)
    lps, log_tail = split_teacher(topk_logprobs, usable, tail_logmass)
    rows = torch.arange(n, device=s.device)[:, None].expand_as(ids)[usable]
    cols = ids[usable]

    lse = torch.logsumexp(s, -1)
    q = s.sub(lse[:, None]).exp_()  # the student's probabilities; becomes the gradient in place
    gather_at = ids.clamp(0, vocab - 1)  # unusable entries read a harmless column and are masked
    q_k = q.gather(1, gather_at).masked_fill(~usable, 0.0)
    s_k = s.gather(1, gather_at)
    q[rows, cols] = 0.0  # q now holds the student's mass off the top-k
    off = q[:, :valid_vocab]
    q_off = off.sum(-1)  # student mass off the top-k, below valid_vocab
    dot_off = torch.linalg.vecdot(off, s[:, :valid_vocab])

    # Unnormalised log p_t: off the top-k, t·log(tail) + (1−t)·log q_v (log q over the valid rows, shifted
    # consistently); on the top-k, (1−t)·s_k + t·ℓ_k. All relative to the student's log-sum-exp `lse`.
    has_off = q_off > 0
    log_q_off = torch.log(torch.where(has_off, q_off, torch.ones_like(q_off)))
    log_off = (t * log_tail if t > 0 else 0.0) + (1 - t) * (lse + log_q_off)
    log_off = torch.where(has_off, log_off, torch.full_like(log_off, -math.inf))
    z_k = ((1 - t) * s_k + (t * lps if t > 0 else 0.0)).masked_fill(~usable, -math.inf)
    lse_z = torch.logaddexp(log_off, torch.logsumexp(z_k, -1))
    p_k = torch.exp(z_k - lse_z[:, None])  # p_t on the top-k (0 where unused)
    c = torch.where(has_off, torch.exp(log_off - lse_z - log_q_off), torch.zeros_like(lse_z))  # p_t = c·q off the top-k

    loss = lse - c * dot_off - (p_k * s_k.masked_fill(~usable, 0.0)).sum(-1)
    off.mul_(1 - c[:, None])  # the gradient q − p_t: off the top-k; rows past valid_vocab keep q (p_t is 0 there)
    q[rows, cols] = (q_k - p_k)[usable]
    return loss, q


def rebuild_teacher(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, tail: str, valid_vocab: int,
    tail_logmass: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense teacher log-probs [N, V] (V = student rows) from top-k [N, k] (id −1 / −inf where unused).

    The missing mass m (the cache's exact `tail_logmass` = log m, else 1 − Σ top-k probs; `split_teacher`)
    goes to the other tokens below `valid_vocab`:
    `student`: in proportion to the student's detached probabilities; `uniform`: evenly; `renorm`: nowhere
    (the top-k are renormalised). Rows at or beyond `valid_vocab` (an LM head padded past the tokenizer, or
    ids the student does not have) get no teacher mass.
    """
    n, vocab = student_logits.shape
    ids = topk_ids.long()
    usable = (ids >= 0) & (ids < valid_vocab)
    lps, log_tail = split_teacher(topk_logprobs, usable, tail_logmass)
    log_tail = log_tail[:, None]  # −inf when the head holds everything
    ids = torch.where(usable, ids, torch.full_like(ids, vocab))  # parked in an extra column, dropped below
    in_vocab = torch.arange(vocab + 1, device=student_logits.device) < valid_vocab
    if tail == "renorm":
        dense = torch.full((n, vocab + 1), -math.inf, device=student_logits.device)
        return dense.scatter(1, ids, lps - torch.logsumexp(lps, -1, keepdim=True))[:, :vocab]
    if tail == "uniform":
        others = (valid_vocab - usable.sum(-1, keepdim=True)).clamp(min=1)
        background = (log_tail - others.float().log()).expand(n, vocab + 1)
    else:
        log_q = F.log_softmax(student_logits.detach().float().masked_fill(~in_vocab[:vocab], -math.inf), -1)
        log_q = F.pad(log_q, (0, 1), value=-math.inf)
        q_topk = log_q.gather(1, ids).exp().sum(-1, keepdim=True)
        background = log_tail + log_q - torch.log1p(-q_topk.clamp(max=1 - 1e-7))
    dense = torch.where(in_vocab, background, torch.full_like(background, -math.inf))
    return dense.scatter(1, ids, lps)[:, :vocab]


# Losses a sampled tail (a --tail-samples cache) serves: fkl without bias, taid with the estimator of docs/LOSSES.md.
SAMPLED_LOSSES = ("taid", "fkl", "sft")


def sampled_tail_teacher(
    topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor,
    sample_ids: torch.Tensor, sample_draws: torch.Tensor, sample_logprobs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A head + sampled tail cache as one sparse estimate p̂ of the teacher: (ids, log ŵ, ℓ), each [N, k + S].

    ŵ is the estimate: the head's exact p (rescaled to 1 − m, `split_teacher`) and m·c/N for a token drawn c of
    N times off the head, so E[ŵ_v] = p_v for every token and Σ ŵ = 1. ℓ is each entry's exact log p (the FKL
    value Σ ŵ (ℓ − log q), an unbiased KL estimate, needs it; equal to log ŵ on the head). Unused slots: id −1, −inf."""
    head, _ = split_teacher(topk_logprobs, topk_ids >= 0, tail_logmass)
    draws = sample_draws.float()
    total = draws.sum(-1, keepdim=True).clamp(min=1.0)
    sampled = torch.where(draws > 0, tail_logmass.float()[:, None] + draws.log() - total.log(), torch.full_like(draws, -math.inf))
    return (torch.cat([topk_ids.long(), sample_ids.long()], -1), torch.cat([head, sampled], -1),
            torch.cat([head, sample_logprobs.float()], -1))


def sampled_tail_loss(
    name: str, student_logits: torch.Tensor, ids: torch.Tensor, log_w: torch.Tensor, ell: torch.Tensor, t: float, valid_vocab: int,
    head: int,
) -> torch.Tensor:
    """FKL or TAID per position against a sparse estimate from `sampled_tail_teacher` (its first `head` columns
    the exact head, the rest the draws); differentiable in the logits. Entries at or past `valid_vocab` are
    dropped: a head entry's mass joins the tail, a draw leaves the others' shape.

    `fkl`: Σ ŵ (ℓ − log q), an unbiased estimate of KL(p‖q) whose gradient q − ŵ is unbiased too.
    `taid`: p_t ∝ q^(1−t) p^t is not linear in p, and importance weights (q/p)^(1−t) on the draws make its
    estimate too noisy to train on at small t (docs/LOSSES.md). Instead the target keeps TAID's geometric
    interpolation where the cache is exact, over the head tokens and the tail's total (the student-shaped bound
    m^t Q^(1−t), Q the student's mass off the head), and interpolates the tail's shape arithmetically,
    (1−t)·q/Q + t·r̂ with r̂ the draws' shape, which is linear in the draws and so estimated without bias.
    Exact at t = 1 (FKL's estimate) and wherever the teacher's tail is shaped like the student's. Loss
    −Σ target · log q, gradient q − target."""
    log_q = F.log_softmax(student_logits.float(), -1)
    usable = (ids >= 0) & (ids < valid_vocab) & torch.isfinite(log_w)
    log_q_e = log_q.gather(1, ids.clamp(0, log_q.shape[1] - 1))
    if name == "fkl":
        has_any = usable.any(-1, keepdim=True)
        w = torch.where(has_any, torch.softmax(torch.where(has_any, log_w.masked_fill(~usable, -math.inf), 0.0), -1), 0.0)
        return torch.where(usable, w * (ell - log_q_e), 0.0).sum(-1)
    n, vocab = log_q.shape
    lq = log_q.detach()
    in_head = torch.arange(ids.shape[1], device=ids.device) < head
    on_head, drawn = usable & in_head, usable & ~in_head
    # The mass off the usable head: the draws' ŵ sum to m, and head entries the student lacks join them.
    log_tail = torch.logsumexp(log_w.masked_fill(in_head & usable, -math.inf), -1)
    parked = torch.where(on_head, ids, vocab)  # head columns marked in a [N, V + 1] mask, the spare column dropped
    head_cols = torch.zeros(n, vocab + 1, dtype=torch.bool, device=ids.device).scatter_(1, parked, True)[:, :vocab]
    off_head = (torch.arange(vocab, device=ids.device) < valid_vocab) & ~head_cols
    log_q_off = lq.masked_fill(~off_head, -math.inf).logsumexp(-1)
    # The tail's unnormalised TAID weight (0 · −inf is nan: t = 0 or 1 leave one factor out).
    log_bucket = (t * log_tail if t > 0 else 0.0) + ((1 - t) * log_q_off if t < 1 else 0.0)
    log_mu = ((1 - t) * log_q_e.detach() + t * torch.where(on_head, ell, 0.0)).masked_fill(~on_head, -math.inf)
    log_z = torch.logaddexp(log_bucket, torch.logsumexp(log_mu, -1))
    head_target = torch.exp(log_mu - log_z[:, None])
    bucket = torch.exp(log_bucket - log_z).nan_to_num(0.0)
    has_draws = drawn.any(-1)
    mix = torch.where(has_draws, t, 0.0)  # no usable draw: the tail keeps the student's shape
    r_hat = torch.softmax(log_w.masked_fill(~drawn, -math.inf), -1).where(drawn, 0.0)  # the draws' shape (NaN rows: none)
    q_shape = torch.exp(lq - log_q_off[:, None]).masked_fill(~off_head, 0.0)
    student_part = (q_shape * log_q.masked_fill(~off_head, 0.0)).sum(-1)
    return -(head_target * log_q_e).masked_fill(~on_head, 0.0).sum(-1) - bucket * (
        (1 - mix) * student_part + mix * (r_hat * log_q_e).masked_fill(~drawn, 0.0).sum(-1))


class _ChunkedLoss(torch.autograd.Function):
    """Σ over chunks of f(head(hidden_chunk), chunk); gradients are computed chunk by chunk in the forward pass
    and kept (one [N, H], one [V, H] and one [V] tensor), so logits exist for one chunk at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, fn, chunk, mapping):
        # Gradients accumulate in float32 whatever the parameters' dtype (bf16 sums over chunks lose bits).
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_b = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        totals = torch.zeros(2, dtype=torch.float32, device=hidden.device)
        w = weight.detach().requires_grad_(weight.requires_grad)
        b = None if bias is None else bias.detach().requires_grad_(bias.requires_grad)
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, min(start + chunk, hidden.shape[0]))
            h = hidden[sl].detach().requires_grad_(hidden.requires_grad)
            wanted = [x for x in (h, w, b) if x is not None and x.requires_grad]
            with torch.enable_grad():
                raw = F.linear(h, w, b)
                out = fn(mapping(raw), sl)
                if not wanted:
                    grads = ()
                elif len(out) == 3:  # the loss gave d(combined)/d(logits) itself: matrix products finish it
                    g = mapping.grad_raw(raw.detach(), out[2]).to(w.dtype)  # products in the weight's dtype
                    grads = [g @ w.detach() if x is h else g.t() @ h.detach() if x is w else g.float().sum(0) for x in wanted]
                else:
                    grads = torch.autograd.grad(out[0], wanted)
            for x, g in zip(wanted, grads):
                if x is h:
                    grad_h[sl] = g
                elif x is w:
                    grad_w += g
                else:
                    grad_b += g
            totals += torch.stack([out[0].detach(), out[1].detach()])
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.in_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(totals)
        combined_total = totals[0].clone()
        return combined_total, totals[1].clone()

    @staticmethod
    def backward(ctx, grad_combined, _grad_reported):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.in_dtypes
        scaled = [None if g is None else (g * grad_combined).to(d) for g, d in ((grad_h, h_dtype), (grad_w, w_dtype), (grad_b, b_dtype))]
        return scaled[0], scaled[1], scaled[2], None, None, None


def chunked_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    fn: Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]],
    chunk: int = 1024,
    bias: torch.Tensor | None = None,
    mapping: LogitMap = PLAIN,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the LM head (`weight` [V, H], optional `bias` [V], then `mapping`: scaling, soft-capping) to
    `hidden` [N, H] chunk by chunk and sum `fn(logits, slice)`; logits are float32.

    `fn` returns (the scalar to differentiate, a scalar to report) for its slice of positions, optionally with a
    third item, the gradient of the first with respect to the chunk's logits (then no autograd graph is built).
    Returns the two sums; only the first carries gradients (to `hidden`, `weight` and `bias`).
    """
    needs_grad = any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    if torch.is_grad_enabled() and needs_grad:
        return _ChunkedLoss.apply(hidden, weight, bias, fn, chunk, mapping)
    totals = torch.zeros(2, dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, min(start + chunk, hidden.shape[0]))
            totals += torch.stack(fn(head_logits(hidden[sl], weight, bias, mapping), sl)[:2])
    return totals[0], totals[1]


@dataclass
class TaidSchedule:
    """The adaptive t of TAID, updated once per optimizer step from that step's (global) loss."""

    t_start: float = 0.4
    t_end: float = 1.0
    alpha: float = 5e-4
    beta: float = 0.99
    total_steps: int = 1
    adaptive: bool = True
    t: float = float("nan")
    momentum: float = 0.0
    prev_loss: float | None = None
    step: int = 0

    def __post_init__(self) -> None:
        if math.isnan(self.t):
            self.t = self.t_start

    def update(self, loss: float) -> float:
        """Record step `step+1`'s loss and move t; returns the new t."""
        self.step += 1
        if self.prev_loss is None:
            self.prev_loss = loss
            return self.t
        t_linear = self.t_start + (self.t_end - self.t_start) * min(self.step / self.total_steps, 1.0)
        if self.adaptive:
            relative = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
            self.momentum = self.beta * self.momentum + (1 - self.beta) * relative
            adaptive_t = self.t + self.alpha * (1 / (1 + math.exp(-self.momentum))) * (1 - self.t)
            self.t = min(self.t_end, max(t_linear, adaptive_t))
        else:
            self.t = min(self.t_end, t_linear)
        self.prev_loss = loss
        return self.t

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
