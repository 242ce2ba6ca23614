"""sft: cross-entropy on the data alone, the teacher unused (`objective.chunk_loss` computes it: `dense.cross_entropy`)."""

from __future__ import annotations

from .base import Loss, register_loss


@register_loss
class SFT(Loss):
    name = "sft"
    summary = "cross-entropy on the data alone (no teacher)"
    uses_teacher = False
