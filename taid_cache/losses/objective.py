"""One loss config against one teacher, per chunk of positions: the typed interface between the losses and the
chunked LM head, and the one place that picks a loss's path: its dense function (a rebuilt top-k teacher), its
sampled-tail estimator, or its closed form, each named in registry.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from .dense import cross_entropy
from .registry import SAMPLED_LOSSES, LossConfig
from .sparse import DenseTeacher, SampledTeacher, TopKTeacher, taid_sparse

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


def with_gradient(value: torch.Tensor, logits: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """`value` (per position), differentiable in `logits` with the given gradient: a closed form usable in any
    autograd loop."""
    linear = torch.linalg.vecdot(logits.float(), grad)
    return value + linear - linear.detach()


def taid_sampled(student_logits: torch.Tensor, teacher: SampledTeacher, t: float, labels: torch.Tensor | None = None) -> torch.Tensor:
    """TAID against a head + sampled tail, differentiable (its closed form, `taid_sparse`)."""
    value, grad = taid_sparse(student_logits, teacher, t)
    return with_gradient(value, student_logits, grad)


def temperature_of(cfg: LossConfig, learned: Temperature | None) -> Temperature:
    """The temperature a loss runs at: a learned one (ctkd), else --temperature for the KL family, else 1."""
    if cfg.spec.learns_temperature:
        if learned is None:
            raise ValueError(f"{cfg.name} trains its own temperature: pass it (CurriculumTemperature)")
        return learned
    return cfg.temperature if cfg.spec.tempered else 1.0


def arguments(cfg: LossConfig, t: float, labels: torch.Tensor | None, temperature: Temperature) -> dict:
    """The keyword arguments the loss's own functions take (registry.py), but t."""
    spec = cfg.spec
    kwargs = cfg.params()
    if spec.needs_labels:
        if labels is None:
            raise ValueError(f"{cfg.name} needs the labels (the data's next tokens)")
        kwargs["labels"] = labels
    if spec.learns_temperature:
        kwargs["temperature"] = temperature
    return kwargs


def per_position_fn(cfg: LossConfig) -> Callable[..., torch.Tensor]:
    """The distillation term of `cfg` against dense teacher log-probs, as f(student_logits, teacher_logprobs, t,
    labels=None, temperature=None) -> [positions]; --temperature wraps the KL family's functions (both sides at
    τ, × τ²)."""
    spec = cfg.spec
    if not spec.uses_teacher:
        raise ValueError(f"{cfg.name} has no teacher term")
    fn = spec.function()

    def apply(logits: torch.Tensor, teacher_logprobs: torch.Tensor, t: float, labels: torch.Tensor | None = None,
              temperature: Temperature | None = None) -> torch.Tensor:
        tau = temperature_of(cfg, temperature)
        kwargs = {**arguments(cfg, t, labels, tau), **({"t": t} if spec.reads_t else {})}
        if spec.tempered and not (isinstance(tau, (int, float)) and tau == 1):
            return fn(logits.float() / tau, F.log_softmax(teacher_logprobs.float() / tau, -1), **kwargs) * tau**2
        return fn(logits, teacher_logprobs, **kwargs)

    return apply


def distillation(cfg: LossConfig, teacher: AnyTeacher, logits: torch.Tensor, t: float, labels: torch.Tensor | None = None,
                 temperature: Temperature | None = None) -> torch.Tensor:
    """The distillation term of `cfg` per position, differentiable in `logits`: a dense or rebuilt top-k teacher
    through the loss's dense function; a sampled tail through its own estimator."""
    if isinstance(teacher, SampledTeacher):
        spec = cfg.spec
        if spec.sampled is None:
            raise ValueError(f"a sampled tail serves {', '.join(SAMPLED_LOSSES)}, not {cfg.name}")
        tau = temperature_of(cfg, temperature)
        kwargs = {**arguments(cfg, t, labels, tau), **({"temperature": tau} if spec.tempered else {})}
        return spec.sampled_function()(logits, teacher, t, **kwargs)
    dense = teacher.logprobs if isinstance(teacher, DenseTeacher) else teacher.dense(logits)
    return per_position_fn(cfg)(logits, dense, t, labels, temperature)


def closed_form(cfg: LossConfig, teacher: AnyTeacher) -> bool:
    """A loss with a closed form (TAID), alone (no CE mix), on a cached teacher whose tail is spread like the
    student's, or sampled."""
    sparse = isinstance(teacher, SampledTeacher) or (isinstance(teacher, TopKTeacher) and teacher.tail == "student")
    return cfg.spec.closed_form and cfg.distil_ratio == 1 and sparse


def chunk_loss(cfg: LossConfig, teacher: Optional[AnyTeacher], logits: torch.Tensor, labels: torch.Tensor, t: float,
               temperature: Temperature | None = None) -> ChunkLoss:
    """`cfg` on one chunk: r · distillation + (1 − r) · CE (r = distil_ratio; a loss without a teacher, or no
    teacher: CE alone), reporting the distillation term (CE for sft). `temperature`: ctkd's learned one."""
    if not cfg.spec.uses_teacher or teacher is None:
        ce = cross_entropy(logits, labels).sum()
        return ChunkLoss(ce, ce)
    if closed_form(cfg, teacher):
        value, grad = taid_sparse(logits, teacher, t)
        return ChunkLoss(value.sum(), value.sum(), grad)
    d = distillation(cfg, teacher, logits, t, labels, temperature)
    if cfg.distil_ratio == 1:
        return ChunkLoss(d.sum(), d.sum())
    ce = cross_entropy(logits, labels)
    return ChunkLoss((cfg.distil_ratio * d + (1 - cfg.distil_ratio) * ce).sum(), d.sum())
