"""One loss config against one teacher, per chunk of positions: the typed interface between the losses and the
chunked LM head, and the one place that picks the closed-form path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .dense import LossConfig, cross_entropy, per_position_fn
from .sparse import SAMPLED_LOSSES, DenseTeacher, SampledTeacher, TopKTeacher, sampled_fkl, taid_sparse

AnyTeacher = Union[DenseTeacher, TopKTeacher, SampledTeacher]


@dataclass
class ChunkLoss:
    """A chunk's summed loss: `train` to differentiate, `report` to log (the distillation term alone), and, when
    the loss has it in closed form, `grad` = d(train)/d(logits) [N, V] (then no autograd graph is built)."""

    train: torch.Tensor
    report: torch.Tensor
    grad: Optional[torch.Tensor] = None


ChunkFn = Callable[[torch.Tensor, slice], ChunkLoss]


def with_gradient(value: torch.Tensor, logits: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """`value` (per position), differentiable in `logits` with the given gradient: a closed form usable in any
    autograd loop."""
    linear = torch.linalg.vecdot(logits.float(), grad)
    return value + linear - linear.detach()


def distillation(cfg: LossConfig, teacher: AnyTeacher, logits: torch.Tensor, t: float) -> torch.Tensor:
    """The distillation term of `cfg` per position, differentiable in `logits`: a dense or rebuilt top-k teacher
    through dense.py's losses; a sampled tail through its own estimators."""
    if isinstance(teacher, SampledTeacher):
        if cfg.name == "fkl":
            return sampled_fkl(logits, teacher)
        if cfg.name == "taid":
            value, grad = taid_sparse(logits, teacher, t)
            return with_gradient(value, logits, grad)
        raise ValueError(f"a sampled tail serves {', '.join(SAMPLED_LOSSES)}, not {cfg.name}")
    dense = teacher.logprobs if isinstance(teacher, DenseTeacher) else teacher.dense(logits)
    return per_position_fn(cfg)(logits, dense, t)


def closed_form(cfg: LossConfig, teacher: AnyTeacher) -> bool:
    """TAID on a cached teacher whose tail is spread like the student's (or sampled) has its gradient in closed form."""
    sparse = isinstance(teacher, SampledTeacher) or (isinstance(teacher, TopKTeacher) and teacher.tail == "student")
    return cfg.name == "taid" and cfg.distil_ratio == 1 and sparse


def chunk_loss(cfg: LossConfig, teacher: Optional[AnyTeacher], logits: torch.Tensor, labels: torch.Tensor, t: float) -> ChunkLoss:
    """`cfg` on one chunk: r · distillation + (1 − r) · CE (r = distil_ratio; `sft` or no teacher: CE alone),
    reporting the distillation term (CE for sft)."""
    if cfg.name == "sft" or teacher is None:
        ce = cross_entropy(logits, labels).sum()
        return ChunkLoss(ce, ce)
    if closed_form(cfg, teacher):
        value, grad = taid_sparse(logits, teacher, t)
        return ChunkLoss(value.sum(), value.sum(), grad)
    d = distillation(cfg, teacher, logits, t)
    if cfg.distil_ratio == 1:
        return ChunkLoss(d.sum(), d.sum())
    ce = cross_entropy(logits, labels)
    return ChunkLoss((cfg.distil_ratio * d + (1 - cfg.distil_ratio) * ce).sum(), d.sum())
