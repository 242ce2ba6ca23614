"""One loss config against one teacher, per chunk of positions: the typed interface between the losses and the
chunked LM head, and the one place that picks a loss's path by the teacher it meets: the loss object's closed
form where it has one for that teacher, its sampled form against a head + sampled tail (or any cached teacher,
for a loss that reads it only at the next token), else its dense form (against a dense or rebuilt top-k teacher). Each loss answers for itself (base.py's protocol)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .base import Context, Loss, with_gradient  # noqa: F401  (with_gradient: exported here too)
from .dense import cross_entropy
from .registry import SAMPLED_LOSSES, LossConfig
from .sparse import DenseTeacher, SampledTeacher, TopKTeacher

AnyTeacher = Union[DenseTeacher, TopKTeacher, SampledTeacher]
Temperature = Union[float, torch.Tensor]


@dataclass
class ChunkLoss:
    """A chunk's summed loss: `train` to differentiate, `report` to log (the distillation term alone), and, when
    the loss has it in closed form, `grad` = d(train)/d(logits) [N, V] (then no autograd graph is built)."""

    train: torch.Tensor
    report: torch.Tensor
    grad: Optional[torch.Tensor] = None


ChunkFn = Callable[[torch.Tensor, slice], ChunkLoss]


def _distil(loss: Loss, teacher: AnyTeacher, logits: torch.Tensor, ctx: Context) -> torch.Tensor:
    if isinstance(teacher, SampledTeacher) or (loss.next_token_only and isinstance(teacher, TopKTeacher)):
        if loss.sampled_how is None:
            raise ValueError(f"a sampled tail serves {', '.join(SAMPLED_LOSSES)}, not {loss.name}")
        return loss.sampled(logits, teacher, ctx)
    dense = teacher.logprobs if isinstance(teacher, DenseTeacher) else teacher.dense(logits)
    return loss.per_position(logits, dense, ctx)


def per_position_fn(cfg: LossConfig) -> Callable[..., torch.Tensor]:
    """The distillation term of `cfg` against dense teacher log-probs, as f(student_logits, teacher_logprobs, t,
    labels=None, temperature=None) -> [positions] (`Loss.per_position`: --temperature around the KL family)."""
    loss = cfg.loss
    if not loss.uses_teacher:
        raise ValueError(f"{cfg.name} has no teacher term")

    def apply(logits: torch.Tensor, teacher_logprobs: torch.Tensor, t: float, labels: torch.Tensor | None = None,
              temperature: Temperature | None = None) -> torch.Tensor:
        return loss.per_position(logits, teacher_logprobs, loss.context(t, labels, temperature))

    return apply


def distillation(cfg: LossConfig, teacher: AnyTeacher, logits: torch.Tensor, t: float, labels: torch.Tensor | None = None,
                 temperature: Temperature | None = None) -> torch.Tensor:
    """The distillation term of `cfg` per position, differentiable in `logits`: a dense or rebuilt top-k teacher
    through the loss's dense form; a sampled tail through its sampled form. `temperature`: ctkd's learned one."""
    loss = cfg.loss
    if not loss.uses_teacher:
        raise ValueError(f"{cfg.name} has no teacher term")
    return _distil(loss, teacher, logits, loss.context(t, labels, temperature))


def chunk_loss(cfg: LossConfig, teacher: Optional[AnyTeacher], logits: torch.Tensor, labels: torch.Tensor, t: float,
               temperature: Temperature | None = None) -> ChunkLoss:
    """`cfg` on one chunk: r · distillation + (1 − r) · CE (r = distil_ratio; a loss without a teacher, or no
    teacher: CE alone), reporting the distillation term (CE for sft). Alone (r = 1), a loss's closed form is taken
    where it has one for this teacher (TAID on a top-k teacher with the student tail, or a sampled one)."""
    loss = cfg.loss
    if not loss.uses_teacher or teacher is None:
        ce = cross_entropy(logits, labels).sum()
        return ChunkLoss(ce, ce)
    ctx = loss.context(t, labels, temperature)
    if cfg.distil_ratio == 1 and (found := loss.closed_form(logits, teacher, ctx)) is not None:
        value, grad = found
        return ChunkLoss(value.sum(), value.sum(), grad)
    d = _distil(loss, teacher, logits, ctx)
    if cfg.distil_ratio == 1:
        return ChunkLoss(d.sum(), d.sum())
    ce = cross_entropy(logits, labels)
    return ChunkLoss((cfg.distil_ratio * d + (1 - cfg.distil_ratio) * ce).sum(), d.sum())
