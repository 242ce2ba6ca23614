"""Per-position losses against a dense teacher: student logits [..., V] and teacher log-probs [..., V] in, one
value per position out (float32). Each is declared, with its parameters, in registry.py."""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F

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
