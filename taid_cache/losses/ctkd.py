"""Curriculum temperature knowledge distillation (CTKD, Li et al. 2023): forward KL at a global temperature
T = t_start + t_end · sigmoid(θ) that is itself trained, adversarially: θ's gradient passes a gradient-reversal
layer (−λ), so T moves to make the distillation harder, and λ rises in difficulty on a cosine curriculum over
the epochs, from λ_max to λ_min. As in TAID's CTKD, the loss is the cross-entropy −Σ p_T log q_T, × T².

The original TAID code's reversal layer multiplies θ's gradient by +λ despite its name; here it is −λ, the
reversal the CTKD paper and that layer's own docstring describe (docs/LOSSES.md). The learned temperature's
module is temperature.py's `CurriculumTemperature` (`CTKD.learned_temperature`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import F, Loss, param, register_loss, torch


def curriculum_lambda(epoch: float, lambda_max: float, lambda_min: float, loops: float) -> float:
    """λ at an epoch (counted from 1, like the original): cosine from λ_max at epoch 0 to λ_min at `loops`."""
    e = min(max(epoch, 0.0), loops)
    return lambda_min + (lambda_max - lambda_min) * 0.5 * (math.cos(e * math.pi / loops) + 1.0)


def ctkd(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """−Σ p_T log q_T × T² per position, T the learned temperature (a scalar tensor)."""
    p_t = F.softmax(teacher_logprobs.float() / temperature, -1)
    log_q_t = F.log_softmax(student_logits.float() / temperature, -1)
    return -torch.where(p_t > 0, p_t * log_q_t, torch.zeros_like(p_t)).sum(-1) * temperature**2


def ctkd_sampled(student_logits: torch.Tensor, teacher, t: float, temperature: torch.Tensor) -> torch.Tensor:
    """The same against a head + sampled tail: the teacher at T is the importance-weighted estimate of the cache
    (its exact head at T, the draws reweighted by p^(1/T − 1); `SampledTeacher.weights`)."""
    est = teacher.weights(temperature)
    log_q_t = F.log_softmax(student_logits.float() / temperature, -1)
    return -torch.where(est.usable, est.w * est.at(log_q_t), 0.0).sum(-1) * temperature**2


@register_loss
class CTKD(Loss):
    name = "ctkd"
    summary = "FKL at a learned temperature, adversarial on a cosine curriculum"
    learns_temperature = True
    sampled_how = "on the importance-weighted tempered estimate"

    @dataclass(frozen=True)
    class Params:
        ctkd_t_start: float = param(1.0, "(0, inf)", "ctkd: the learned temperature is t_start + t_end · sigmoid(θ).")
        ctkd_t_end: float = param(20.0, "(0, inf)", "ctkd: the span of the learned temperature.")
        ctkd_lambda_max: float = param(1.0, "[0, inf)", "ctkd: the gradient reversal's weight λ at the start of its cosine "
                                       "curriculum.")
        ctkd_lambda_min: float = param(0.0, "[0, inf)", "ctkd: λ at the curriculum's end.")
        ctkd_loops: float = param(10.0, "(0, inf)", "ctkd: epochs over which λ falls from λ_max to λ_min.")

    def dense(self, logits, teacher_logprobs, ctx):
        return ctkd(logits, teacher_logprobs, ctx.temperature)

    def sampled(self, logits, teacher, ctx):
        return ctkd_sampled(logits, teacher, ctx.t, ctx.temperature)

    def learned_temperature(self):
        from .temperature import CurriculumTemperature

        return CurriculumTemperature(self.params.ctkd_t_start, self.params.ctkd_t_end)

    def curriculum(self, epoch: float) -> float:
        p = self.params
        return curriculum_lambda(epoch, p.ctkd_lambda_max, p.ctkd_lambda_min, p.ctkd_loops)
