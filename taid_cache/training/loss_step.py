"""One micro-batch's loss: its teacher (the cache's, or a model run in-process) against the student's logits,
chunk by chunk through the LM head. Shared by train-student and the Hugging Face Trainer integration."""

from __future__ import annotations

import torch

from ..losses import LossConfig, chunk_loss
from .data import MicroBatch
from .distributed import Dist
from .student import LossModel
from .teacher import TeacherSource


def micro_batch_loss(model: LossModel, teacher: TeacherSource, mb: MicroBatch, loss: LossConfig, t: float, env: Dist,
                     epoch: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (training loss, reported loss) over the micro-batch's target positions. `epoch` (from 1): where a
    learned temperature's curriculum stands (ctkd)."""
    labels = mb.labels[mb.targets].to(env.device)
    batch_teacher = teacher.for_batch(mb, env) if loss.spec.uses_teacher else None
    lam = loss.loss.curriculum(epoch) if loss.spec.learns_temperature else None
    return model(mb.model_inputs(env.device), mb.targets.to(env.device),
                 lambda logits, sl, *temperature: chunk_loss(loss, None if batch_teacher is None else batch_teacher[sl], logits,
                                                             labels[sl], t, *temperature), lam)
