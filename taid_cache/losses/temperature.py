"""CTKD's learned global temperature (ctkd.py has the loss): T = t_start + t_end · sigmoid(θ), θ's gradient through
a gradient-reversal layer (−λ)."""

from __future__ import annotations

import torch
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
