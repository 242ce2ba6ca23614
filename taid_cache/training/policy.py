"""The step policy of distillation, one object for every front-end (train-student's `Trainer`, the Hugging Face
`CacheDistillationTrainer`, on-policy rounds): what a cache serves, how many steps and epochs a run has, where
ctkd's curriculum stands, and TAID's t, moved once per optimizer step from the step's global loss."""

from __future__ import annotations

import math
from typing import Callable, Mapping, Protocol

from ..errors import UserError
from ..losses import PARAMS, REGISTRY, SAMPLED_LOSSES, LossConfig, TaidSchedule


class Serves(Protocol):
    """What decides the losses a cache serves: a written cache's `CacheSettings`, or the `DumpConfig` of one about
    to be dumped (distil-on-policy checks its rounds' caches before it makes them)."""

    @property
    def sampled(self) -> bool: ...

    target_logprobs: bool


def check_serves(settings: Serves, loss: str, tail: str) -> None:
    """Refuse a loss or a tail mode a cache cannot serve, in one line (before anything is loaded)."""
    if settings.sampled and loss not in SAMPLED_LOSSES:
        raise UserError(f"--loss {loss}: a cache with a sampled tail (--tail-samples) serves {', '.join(SAMPLED_LOSSES)}; "
                        f"{loss} needs the teacher's log-probs at tokens it never drew: a top-k cache serves it (dump-teacher "
                        "--tail-samples 0, with --top-k 64 say)")
    if settings.sampled and tail != "student":
        raise UserError(f"--tail {tail}: a cache with a sampled tail (--tail-samples) has its tail in its draws; "
                        "--tail shapes the tail of a top-k cache only")
    if loss == "opd" and not settings.target_logprobs:
        raise UserError("--loss opd reads the teacher's log-prob of each actual next token, which this cache lacks: "
                        "dump it with dump-teacher --target-logprobs")


def check_opd_sampling(temperature: float, top_p: float, named: str) -> None:
    """opd's gradient is the reverse KL's only for answers drawn from the student as it is: refuse other sampling in
    one line, `named` as the front-end names the settings (train-student's flags, distil-on-policy's section)."""
    if temperature != 1 or top_p != 1:
        raise UserError(f"{named}: --loss opd trains on answers drawn from the student at temperature 1 with the whole "
                        "distribution (top-p 1): its gradient is the reverse KL's only for those")


def check_parameters(loss: str, values: Mapping[str, float], named: Callable[[str], str]) -> None:
    """A loss parameter set (away from its default) for a loss that does not read it: one line, naming it as the
    front-end does (`named`: train-student's --flag, or the config field)."""
    reads = REGISTRY[loss].reads
    for name, value in values.items():
        if name not in reads and value != PARAMS[name].default:
            readers = ", ".join(n for n, s in REGISTRY.items() if name in s.reads)
            raise UserError(f"{named(name)} {value}: --loss {loss} does not read it (it is a parameter of {readers})")


def total_steps(max_steps: int | None, epochs: float | None, records: int, global_batch: int) -> int:
    """Optimizer steps of a run: as given, or enough global batches for `epochs` passes over the cache."""
    return max_steps or max(1, math.ceil(epochs * records / global_batch))


class DistillationPolicy:
    """One run's loss and the state it carries between optimizer steps (TAID's schedule). Stateful: its
    `state_dict` is what a checkpoint keeps of it."""

    def __init__(self, loss: LossConfig, schedule: TaidSchedule, records: int, global_batch: int) -> None:
        self.loss, self.schedule, self.records, self.global_batch = loss, schedule, records, global_batch

    @property
    def reads_t(self) -> bool:
        return self.loss.spec.reads_t

    @property
    def t(self) -> float:
        return self.schedule.t

    def epochs_done(self, step: int) -> float:
        """Passes over the cache after `step` optimizer steps."""
        return step * self.global_batch / self.records

    def epoch(self, step: int) -> int:
        """The epoch step `step + 1` trains in, counted from 1 (as ctkd's curriculum counts)."""
        return 1 + step * self.global_batch // self.records

    def after_step(self, loss: float) -> None:
        """The step's loss, averaged over its micro-batches and ranks: t moves once (a loss that reads it only)."""
        if self.reads_t:
            self.schedule.update(loss)

    def state_dict(self) -> dict:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state)
