"""Distillation losses, usable on their own (any training loop) and by the trainer.

- base.py: the protocol. A loss is a class (`Loss`): its parameters declared once (`Params`, each a `param`),
  what it reads (t, labels, a temperature), its dense form, its sampled form where a sampled tail serves it, its
  closed form where it has one; `register_loss` registers it (from inside the package or outside).
- registry.py: `REGISTRY` (name -> class), `PARAMS`, `LOSSES`, `SAMPLED_LOSSES`, and `LossConfig` (a loss and its
  parameters, by keyword); it imports the built-in losses: dense.py (TAID and the KL family), dkd.py (decoupled
  KD), ctkd.py (curriculum temperature KD; its learned temperature in temperature.py), opd.py (on-policy
  distillation: the per-token reverse-KL estimate as a policy gradient), sft.py.
- sparse.py: the teacher as a cache holds it (`TopKTeacher`, `SampledTeacher` and its one estimate
  `SampledTeacher.weights`; `DenseTeacher` for one run in-process), `rebuild_teacher` (top-k + a tail mode ->
  dense) and TAID in closed form (`taid_sparse`).
- objective.py: one config against one teacher per chunk of positions (`chunk_loss` -> `ChunkLoss`), where a
  loss's path (dense, sampled, closed form) is chosen by the teacher.
- chunked.py: `chunked_lm_loss`, the LM head and a `chunk_loss` applied chunk by chunk (one autograd function).
- schedule.py: `TaidSchedule`, the adaptive t.
All maths is in float32; docs/LOSSES.md has the formulas. The registry and the loss classes are imported at
once without torch (the command line reads them); everything else on first use.
"""

from importlib import import_module

from .base import TEMPERATURE, Context, Loss, param
from .registry import LOSSES, PARAMS, REGISTRY, SAMPLED_LOSSES, LossConfig, Param, register_loss

_EXPORTS = {
    "chunked": ("chunked_lm_loss",),
    "ctkd": ("ctkd", "ctkd_sampled", "curriculum_lambda"),
    "dense": ("LOG_FLOOR", "adaptive_kl", "cross_entropy", "fkl", "js", "reduce_masked", "rkl", "sampled_fkl", "skew_fkl",
              "skew_rkl", "taid", "taid_loss", "tvd"),
    "dkd": ("dkd", "dkd_sampled"),
    "objective": ("ChunkFn", "ChunkLoss", "chunk_loss", "distillation", "per_position_fn", "with_gradient"),
    "schedule": ("TaidSchedule",),
    "sparse": ("DenseTeacher", "SampledTeacher", "TopKTeacher", "Weights", "head_logprobs", "log1mexp", "rebuild_teacher",
               "split_teacher", "taid_sparse"),
    "temperature": ("CurriculumTemperature", "GradientReversal"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["LOSSES", "PARAMS", "REGISTRY", "SAMPLED_LOSSES", "TEMPERATURE", "Context", "Loss", "LossConfig", "Param", "param",
           "register_loss", *_MODULE_OF]


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
