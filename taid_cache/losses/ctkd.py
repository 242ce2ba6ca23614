"""Curriculum temperature knowledge distillation (CTKD, Li et al. 2023): forward KL at a global temperature
T = t_start + t_end · sigmoid(θ) that is itself trained, adversarially: θ's gradient passes a gradient-reversal
layer (−λ), so T moves to make the distillation harder, and λ rises in difficulty on a cosine curriculum over
the epochs, from λ_max to λ_min. As in TAID's CTKD, the loss is the cross-entropy −Σ p_T log q_T, × T².

The original TAID code's reversal layer multiplies θ's gradient by +λ despite its name; here it is −λ, the
reversal the CTKD paper and that layer's own docstring describe (docs/LOSSES.md)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient times −λ backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lam * grad, None


def curriculum_lambda(epoch: float, lambda_max: float, lambda_min: float, loops: float) -> float:
    """λ at an epoch (counted from 1, like the original): cosine from λ_max at epoch 0 to λ_min at `loops`."""
    e = min(max(epoch, 0.0), loops)
    return lambda_min + (lambda_max - lambda_min) * 0.5 * (math.cos(e * math.pi / loops) + 1.0)


class CurriculumTemperature(nn.Module):
    """The learned global temperature: one parameter θ (starting at 1, as the original's; a 1-element vector, as
    FSDP shards parameters along their first dimension)."""

    def __init__(self, t_start: float, t_end: float) -> None:
        super().__init__()
        self.t_start, self.t_end = t_start, t_end
        self.theta = nn.Parameter(torch.ones(1))

    def forward(self, lam: float) -> torch.Tensor:
        return self.t_start + self.t_end * torch.sigmoid(GradientReversal.apply(self.theta, lam))

    def value(self) -> float:
        """T now (gathered from its shards under FSDP), for the logs."""
        theta = self.theta.detach()
        theta = theta.full_tensor() if hasattr(theta, "full_tensor") else theta
        return float(self.t_start + self.t_end * torch.sigmoid(theta)[0])


def ctkd(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """−Σ p_T log q_T × T² per position, T the learned temperature (a scalar tensor)."""
    p_t = F.softmax(teacher_logprobs.float() / temperature, -1)
    log_q_t = F.log_softmax(student_logits.float() / temperature, -1)
    return -torch.where(p_t > 0, p_t * log_q_t, torch.zeros_like(p_t)).sum(-1) * temperature**2


def ctkd_sampled(student_logits: torch.Tensor, teacher, t: float, temperature: torch.Tensor) -> torch.Tensor:
    """The same against a head + sampled tail: the teacher at T is the importance-weighted estimate of the cache
    (its exact head at T, the draws reweighted by p^(1/T − 1); `SampledTeacher.estimate`)."""
    ids, log_w, _ = teacher.estimate(temperature)
    log_q_t = F.log_softmax(student_logits.float() / temperature, -1)
    usable = (ids >= 0) & (ids < teacher.valid_vocab) & torch.isfinite(log_w)
    log_q_e = log_q_t.gather(1, ids.long().clamp(0, log_q_t.shape[1] - 1))
    w = torch.softmax(log_w.masked_fill(~usable, -math.inf), -1).nan_to_num(0.0)
    return -torch.where(usable, w * log_q_e, 0.0).sum(-1) * temperature**2
