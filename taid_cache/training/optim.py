"""The learning-rate schedule: transformers' own schedulers, by name (`--lr-scheduler`, config.LR_SCHEDULERS), built
as a Trainer run with the same arguments builds them.

Offered: each transformers `SchedulerType` that `get_scheduler` runs with the optimizer, the warm-up and the step
count alone. Our `constant` is transformers' `constant_with_warmup` (warm-up, then constant), as it has always been
here, so an old config trains the same; transformers' own `constant` is that with no warm-up. Left out, and why:"""

from __future__ import annotations

import math
from typing import Any

from ..config import LR_SCHEDULERS
from ..errors import UserError

EXCLUDED = {
    "reduce_lr_on_plateau": "steps on a metric (ReduceLROnPlateau.step(metrics)); the schedule here steps once per optimizer "
                            "step, with no metric",
    "greedy": "steps on a metric (GreedyLR.step(metrics)), as reduce_lr_on_plateau",
    "cosine_with_min_lr": "needs min_lr or min_lr_rate (lr_scheduler_kwargs)",
    "cosine_warmup_with_min_lr": "needs min_lr or min_lr_rate (lr_scheduler_kwargs)",
    "warmup_stable_decay": "needs num_decay_steps (lr_scheduler_kwargs)",
}
TRANSFORMERS_NAME = {"constant": "constant_with_warmup"}  # ours -> transformers'; every other name is the same


def warmup_steps(cfg: Any, total: int) -> int:
    """--warmup-steps, else --warmup-ratio of the run's steps (rounded up, as transformers does)."""
    return cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total)


def lr_schedule(cfg: Any, optimizer, total: int):
    """transformers' scheduler of that name (what a Trainer run with the same arguments uses)."""
    from transformers import get_scheduler

    if cfg.lr_scheduler not in LR_SCHEDULERS:
        raise UserError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, not {cfg.lr_scheduler!r}")
    name = TRANSFORMERS_NAME.get(cfg.lr_scheduler, cfg.lr_scheduler)
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(cfg, total), num_training_steps=total)
    except ValueError as exc:  # polynomial: an --lr at or below its end value (1e-7)
        raise UserError(f"--lr-scheduler {cfg.lr_scheduler}: {' '.join(str(exc).split())}") from None
