"""Distillation losses, usable on their own (any training loop) and by the trainer.

- dense.py: per-position losses against dense teacher log-probs (TAID and the baselines), CE, `LossConfig`.
- sparse.py: the teacher as a cache holds it (`TopKTeacher`, `SampledTeacher`; `DenseTeacher` for one run
  in-process), `rebuild_teacher` (top-k + a tail mode -> dense), TAID in closed form (`taid_sparse`) and the
  sampled-tail FKL.
- objective.py: one config against one teacher per chunk of positions (`chunk_loss` -> `ChunkLoss`), where the
  closed-form path is chosen.
- chunked.py: `chunked_lm_loss`, the LM head and a `chunk_loss` applied chunk by chunk (one autograd function).
- schedule.py: `TaidSchedule`, the adaptive t.
All maths is in float32; docs/LOSSES.md has the formulas.
"""

from .chunked import chunked_lm_loss
from .dense import (
    LOG_FLOOR, LossConfig, adaptive_kl, cross_entropy, fkl, js, per_position_fn, reduce_masked, rkl, skew_fkl, skew_rkl, taid,
    taid_loss, tvd,
)
from .objective import ChunkFn, ChunkLoss, chunk_loss, closed_form, distillation, with_gradient
from .schedule import TaidSchedule
from .sparse import (
    SAMPLED_LOSSES, DenseTeacher, SampledTeacher, TopKTeacher, head_logprobs, log1mexp, rebuild_teacher, sampled_fkl, split_teacher,
    taid_sparse,
)

__all__ = [
    "LOG_FLOOR", "LossConfig", "adaptive_kl", "cross_entropy", "fkl", "js", "per_position_fn", "reduce_masked", "rkl", "skew_fkl",
    "skew_rkl", "taid", "taid_loss", "tvd", "ChunkFn", "ChunkLoss", "chunk_loss", "closed_form", "distillation", "with_gradient",
    "chunked_lm_loss", "TaidSchedule", "SAMPLED_LOSSES", "DenseTeacher", "SampledTeacher", "TopKTeacher", "head_logprobs",
    "log1mexp", "rebuild_teacher", "sampled_fkl", "split_teacher", "taid_sparse",
]
