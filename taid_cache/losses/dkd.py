"""Decoupled knowledge distillation (DKD, Zhao et al. 2022), per position, with the data's next token as the
target class g: α·TCKD + β·NCKD, where TCKD = KL of the binary (g, not g) split of p against q's, and NCKD = KL
of p over the other tokens, renormalised, against q's (docs/LOSSES.md). At temperature τ (applied around it, as
for the KL family) both distributions are at τ and the loss is × τ², as the original's."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import TEMPERATURE, F, Loss, param, register_loss, torch
from .dense import xlogy_ratio


def dkd(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, labels: torch.Tensor, dkd_alpha: float = 1.0,
        dkd_beta: float = 0.5) -> torch.Tensor:
    """α·TCKD + β·NCKD per position; `labels` [N]: the target token of each position."""
    log_q = F.log_softmax(student_logits.float(), -1)
    log_p = teacher_logprobs.float()
    gold = labels.long()[:, None]
    is_gold = torch.zeros_like(log_q, dtype=torch.bool).scatter_(1, gold, True)
    log_p_g, log_q_g = log_p.gather(1, gold)[:, 0], log_q.gather(1, gold)[:, 0]
    # log(1 − p_g) as the log-sum-exp of the other tokens: exact where p_g is near 1.
    log_p_rest = log_p.masked_fill(is_gold, -math.inf).logsumexp(-1)
    log_q_rest = log_q.masked_fill(is_gold, -math.inf).logsumexp(-1)
    binary_p = torch.stack([log_p_g, log_p_rest], -1)
    tckd = xlogy_ratio(binary_p.exp(), binary_p, torch.stack([log_q_g, log_q_rest], -1))
    others_p = (log_p - log_p_rest[:, None]).masked_fill(is_gold, -math.inf)
    others_q = (log_q - log_q_rest[:, None]).masked_fill(is_gold, -math.inf)
    nckd = xlogy_ratio(others_p.exp(), others_p, others_q)
    return dkd_alpha * tckd + dkd_beta * nckd


def dkd_sampled(student_logits: torch.Tensor, teacher, t: float, labels: torch.Tensor, dkd_alpha: float = 1.0,
                dkd_beta: float = 0.5, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """DKD against a head + sampled tail, on the cache's estimate p̂ (its exact head, m·c/N at the draws; at
    temperature τ the importance-weighted one): p̂ weighs each term, and each log p is the entry's exact log-prob
    (as the sampled FKL does), so the entropy-like terms carry no plug-in bias. p̂_g of a target never drawn is 0,
    its unbiased estimate. TCKD and NCKD are not linear in p̂, so this is consistent as the draws grow, not
    unbiased (docs/LOSSES.md)."""
    est = teacher.weights(temperature)
    ids, w, ell, usable = est
    log_q = F.log_softmax(student_logits.float() / temperature, -1)
    gold = labels.long()[:, None]
    at_gold = usable & (ids == gold)
    p_g = torch.where(at_gold, w, 0.0).sum(-1)
    log_p_g = torch.where(at_gold, ell.float(), -math.inf).amax(-1)  # the target's exact log-prob, where it is stored
    log_q_g = log_q.gather(1, gold)[:, 0]
    log_q_rest = log_q.masked_fill(torch.zeros_like(log_q, dtype=torch.bool).scatter_(1, gold, True), -math.inf).logsumexp(-1)
    rest = (1 - p_g).clamp(min=0.0)
    log_rest = torch.log(rest)
    tckd = (torch.where(p_g > 0, p_g * (log_p_g - log_q_g), 0.0)
            + torch.where(rest > 0, rest * (log_rest - log_q_rest), 0.0))
    others = usable & ~at_gold
    share = torch.where(others, w / rest.clamp(min=1e-30)[:, None], 0.0)
    log_q_e = est.at(log_q)
    nckd = torch.where(others, share * ((ell.float() - log_rest[:, None]) - (log_q_e - log_q_rest[:, None])), 0.0).sum(-1)
    return (dkd_alpha * tckd + dkd_beta * nckd) * temperature**2


@register_loss
class DKD(Loss):
    name = "dkd"
    summary = "decoupled KD: target-class and non-target KL"
    tempered = True
    needs_labels = True
    sampled_how = "on the sampled estimate (consistent, not unbiased)"

    @dataclass(frozen=True)
    class Params:
        dkd_alpha: float = param(1.0, "[0, inf)", "α of dkd: the weight of the target-class KL.")
        dkd_beta: float = param(0.5, "[0, inf)", "β of dkd: the weight of the non-target KL.")
        temperature: float = TEMPERATURE

    def dense(self, logits, teacher_logprobs, ctx):
        return dkd(logits, teacher_logprobs, ctx.labels, self.params.dkd_alpha, self.params.dkd_beta)

    def sampled(self, logits, teacher, ctx):
        return dkd_sampled(logits, teacher, ctx.t, ctx.labels, self.params.dkd_alpha, self.params.dkd_beta, ctx.temperature)
