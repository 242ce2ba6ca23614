"""Distillation losses, usable on their own (any training loop) and by the trainer.

- registry.py: every loss declared once (`REGISTRY`, `LossSpec`, its `Param`s) and `LossConfig`, by keyword.
- dense.py: per-position losses against dense teacher log-probs (TAID and the baselines), CE; dkd.py, ctkd.py:
  decoupled KD and curriculum temperature KD.
- sparse.py: the teacher as a cache holds it (`TopKTeacher`, `SampledTeacher`; `DenseTeacher` for one run
  in-process), `rebuild_teacher` (top-k + a tail mode -> dense), TAID in closed form (`taid_sparse`) and the
  sampled-tail FKL.
- objective.py: one config against one teacher per chunk of positions (`chunk_loss` -> `ChunkLoss`), where a
  loss's path (dense, sampled, closed form) is chosen.
- chunked.py: `chunked_lm_loss`, the LM head and a `chunk_loss` applied chunk by chunk (one autograd function).
- schedule.py: `TaidSchedule`, the adaptive t.
All maths is in float32; docs/LOSSES.md has the formulas. The registry is imported at once (the command line
reads it without torch); everything else on first use.
"""

from importlib import import_module

from .registry import LOSSES, PARAMS, REGISTRY, SAMPLED_LOSSES, LossConfig, LossSpec, Param

_EXPORTS = {
    "chunked": ("chunked_lm_loss",),
    "ctkd": ("CurriculumTemperature", "ctkd", "ctkd_sampled", "curriculum_lambda"),
    "dense": ("LOG_FLOOR", "adaptive_kl", "cross_entropy", "fkl", "js", "reduce_masked", "rkl", "skew_fkl", "skew_rkl", "taid",
              "taid_loss", "tvd"),
    "dkd": ("dkd", "dkd_sampled"),
    "objective": ("ChunkFn", "ChunkLoss", "chunk_loss", "closed_form", "distillation", "per_position_fn", "with_gradient"),
    "schedule": ("TaidSchedule",),
    "sparse": ("DenseTeacher", "SampledTeacher", "TopKTeacher", "head_logprobs", "log1mexp", "rebuild_teacher", "sampled_fkl",
               "split_teacher", "taid_sparse"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["LOSSES", "PARAMS", "REGISTRY", "SAMPLED_LOSSES", "LossConfig", "LossSpec", "Param", *_MODULE_OF]


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
