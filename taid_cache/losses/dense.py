"""TAID and the KL family: each loss's class (its parameters, what it reads, its paths; base.py has the protocol)
beside its maths, per position: student logits [..., V] and teacher log-probs [..., V] in, one value per position
out (float32). `torch` and `F` are base.py's, imported on first use (the command line reads these classes)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import TEMPERATURE, F, Loss, param, register_loss, torch, with_gradient

SKEW_BETA = param(0.1, "(0, 1)", "β of skew-fkl / skew-rkl (DistiLLM): the mixture β·p + (1−β)·q.")
JS_BETA = param(0.1, "(0, 1)", "β of js, the generalised Jensen-Shannon divergence (0.5: the symmetric one).")
ADAPTIVE_MU = param(0.5, "(0, 1)", "μ of adaptive-kl: the teacher mass of its head.")

LOG_FLOOR = -100.0  # where a loss needs log p of a token the teacher gives no mass (rkl family): e^-100


def xlogy_ratio(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) with 0 · log 0 = 0."""
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def fkl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Forward KL(p‖q) per position."""
    log_q = F.log_softmax(student_logits.float(), -1)
    return xlogy_ratio(teacher_logprobs.exp(), teacher_logprobs, log_q)


def rkl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Reverse KL(q‖p) per position (teacher log-probs floored at LOG_FLOOR where it has no mass)."""
    log_q = F.log_softmax(student_logits.float(), -1)
    return xlogy_ratio(log_q.exp(), log_q, teacher_logprobs.clamp(min=LOG_FLOOR))


def tvd(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Total variation distance ½ Σ |p − q| per position."""
    return 0.5 * (teacher_logprobs.exp() - F.softmax(student_logits.float(), -1)).abs().sum(-1)


def _mixture_logprobs(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1−w)·b), stable in log space."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a)) if 0 < weight_a < 1 else (log_a if weight_a >= 1 else log_b)


def skew_fkl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, skew_beta: float = 0.1) -> torch.Tensor:
    """Skew forward KL (DistiLLM): KL(p ‖ β p + (1−β) q)."""
    log_q = F.log_softmax(student_logits.float(), -1)
    return xlogy_ratio(teacher_logprobs.exp(), teacher_logprobs, _mixture_logprobs(teacher_logprobs, log_q, skew_beta))


def skew_rkl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, skew_beta: float = 0.1) -> torch.Tensor:
    """Skew reverse KL (DistiLLM): KL(q ‖ β q + (1−β) p)."""
    log_q = F.log_softmax(student_logits.float(), -1)
    return xlogy_ratio(log_q.exp(), log_q, _mixture_logprobs(log_q, teacher_logprobs, skew_beta))


def js(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, js_beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon: β KL(p ‖ m) + (1−β) KL(q ‖ m), m = β p + (1−β) q."""
    log_q = F.log_softmax(student_logits.float(), -1)
    log_m = _mixture_logprobs(teacher_logprobs, log_q, js_beta)
    return (js_beta * xlogy_ratio(teacher_logprobs.exp(), teacher_logprobs, log_m)
            + (1 - js_beta) * xlogy_ratio(log_q.exp(), log_q, log_m))


def adaptive_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, adaptive_mu: float = 0.5) -> torch.Tensor:
    """Adaptive KL: FKL and RKL weighted by the student's gap on the teacher's head (the most probable tokens
    up to cumulative mass μ) and on its tail; the weights carry no gradient."""
    p = teacher_logprobs.exp()
    q = F.softmax(student_logits.float(), -1)
    sorted_p, order = p.sort(-1, descending=True)
    in_head_sorted = (sorted_p.cumsum(-1) - sorted_p) < adaptive_mu  # the token that crosses μ belongs to the head
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


def sampled_fkl(student_logits: torch.Tensor, teacher, t: float | None = None, labels: torch.Tensor | None = None,
                temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Σ ŵ (ℓ − log q) per position against a head + sampled tail (`SampledTeacher.weights`): an unbiased estimate of
    KL(p‖q) whose gradient q − ŵ is unbiased too (at τ ≠ 1: of τ²·KL(p_τ‖q_τ), on the importance-weighted
    estimate). Entries at or past `valid_vocab` are dropped (the others' weights renormalised); differentiable."""
    est = teacher.weights(temperature)
    log_q = F.log_softmax(student_logits.float() / temperature, -1)
    return torch.where(est.usable, est.w * (est.ell - est.at(log_q)), 0.0).sum(-1) * temperature**2


# The losses, in the order of `--loss`.


@register_loss
class TAID(Loss):
    name = "taid"
    summary = "TAID: cross-entropy to p_t ∝ q^(1−t) p^t, t moving from t_start to 1"
    reads_t = True
    sampled_how = "closed form; the tail's shape linear in the draws"

    def dense(self, logits, teacher_logprobs, ctx):
        return taid(logits, teacher_logprobs, ctx.t)

    def closed_form(self, logits, teacher, ctx):
        """`taid_sparse` on a cached teacher whose tail is spread like the student's, or sampled."""
        from .sparse import SampledTeacher, TopKTeacher, taid_sparse

        if isinstance(teacher, SampledTeacher) or (isinstance(teacher, TopKTeacher) and teacher.tail == "student"):
            return taid_sparse(logits, teacher, ctx.t)
        return None

    def sampled(self, logits, teacher, ctx):
        from .sparse import taid_sparse

        value, grad = taid_sparse(logits, teacher, ctx.t)
        return with_gradient(value, logits, grad)


@dataclass(frozen=True)
class Tempered:
    temperature: float = TEMPERATURE


@register_loss
class FKL(Loss):
    name = "fkl"
    summary = "forward KL(p‖q)"
    Params = Tempered
    tempered = True
    sampled_how = "unbiased (the draws' counts); at τ ≠ 1 importance-weighted"

    def dense(self, logits, teacher_logprobs, ctx):
        return fkl(logits, teacher_logprobs)

    def sampled(self, logits, teacher, ctx):
        return sampled_fkl(logits, teacher, temperature=ctx.temperature)


@register_loss
class RKL(Loss):
    name = "rkl"
    summary = "reverse KL(q‖p)"
    Params = Tempered
    tempered = True

    def dense(self, logits, teacher_logprobs, ctx):
        return rkl(logits, teacher_logprobs)


@register_loss
class TVD(Loss):
    name = "tvd"
    summary = "total variation distance"

    def dense(self, logits, teacher_logprobs, ctx):
        return tvd(logits, teacher_logprobs)


@register_loss
class JS(Loss):
    name = "js"
    summary = "generalised Jensen-Shannon divergence"
    tempered = True

    @dataclass(frozen=True)
    class Params:
        js_beta: float = JS_BETA
        temperature: float = TEMPERATURE

    def dense(self, logits, teacher_logprobs, ctx):
        return js(logits, teacher_logprobs, self.params.js_beta)


@dataclass(frozen=True)
class Skewed:
    skew_beta: float = SKEW_BETA
    temperature: float = TEMPERATURE


@register_loss
class SkewFKL(Loss):
    name = "skew-fkl"
    summary = "skew forward KL (DistiLLM)"
    Params = Skewed
    tempered = True

    def dense(self, logits, teacher_logprobs, ctx):
        return skew_fkl(logits, teacher_logprobs, self.params.skew_beta)


@register_loss
class SkewRKL(Loss):
    name = "skew-rkl"
    summary = "skew reverse KL (DistiLLM)"
    Params = Skewed
    tempered = True

    def dense(self, logits, teacher_logprobs, ctx):
        return skew_rkl(logits, teacher_logprobs, self.params.skew_beta)


@register_loss
class AdaptiveKL(Loss):
    name = "adaptive-kl"
    summary = "FKL and RKL weighted by the head and tail gaps"
    tempered = True

    @dataclass(frozen=True)
    class Params:
        adaptive_mu: float = ADAPTIVE_MU
        temperature: float = TEMPERATURE

    def dense(self, logits, teacher_logprobs, ctx):
        return adaptive_kl(logits, teacher_logprobs, self.params.adaptive_mu)
