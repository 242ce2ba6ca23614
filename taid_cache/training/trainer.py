"""train-student's training loop as one object (anchor: torchtitan's Stateful trainer): its state — the progress
(step, tokens, time), the step policy (TAID's t; `policy.py`), the model, optimizer and LR schedule, each rank's
RNG — is saved and restored by one `CheckpointManager`; the data cursor is the step itself (the stream skips
integers). `fit` reads top to bottom, one line per concern."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from ..config import TrainConfig
from ..errors import Interrupted, SafePoints, UserError, interrupts_at_safe_points
from ..losses import LossConfig
from ..progress import step_bar
from .checkpoint import CheckpointManager
from .data import CacheRows, MicroBatch
from .distributed import Dist, all_reduce_max, all_reduce_sum
from .evaluate import evaluate
from .loss_step import micro_batch_loss
from .metrics import MetricsLog
from .policy import DistillationPolicy
from .teacher import TeacherSource

if TYPE_CHECKING:
    from ..onpolicy.online import OnPolicyBatches


@dataclass
class Progress:
    """Where a run stands: optimizer steps taken, real tokens trained on, seconds spent (across resumes)."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens, self.elapsed_s = state["step"], state["tokens"], state["elapsed_s"]


@dataclass
class StepResult:
    """One optimizer step, as logged."""

    loss: float
    grad_norm: float
    lr: float
    t: float
    tokens: int


def step_batches(data: Iterator[MicroBatch], grad_accum: int, env: Dist, interruptions: SafePoints) -> tuple[list[MicroBatch], torch.Tensor]:
    """This rank's micro-batches for one optimizer step, and the global [loss targets, tokens] of the step.
    A rank that cannot read its data (a shard damaged since the run's start) says so in the same all-reduce:
    every rank then stops with one line, instead of the others failing inside a collective it never joins. A
    signal any rank recorded rides the same all-reduce, so every rank stops before the same step."""
    try:
        micro, failure = [next(data) for _ in range(grad_accum)], None
    except UserError as exc:
        micro, failure = [], exc
    counts = all_reduce_sum(torch.tensor([float(sum(int(m.targets.sum()) for m in micro)),
                                          float(sum(m.tokens for m in micro)), float(failure is not None),
                                          float(interruptions.requested)]), env)
    if failure is not None:
        raise failure
    if counts[2].item() > 0:
        raise UserError(f"rank {env.rank}: another rank could not read its training data and stopped; its error names the problem")
    if counts[3].item() > 0:
        raise KeyboardInterrupt
    return micro, counts[:2]


def all_finite(model, env: Dist) -> bool:
    """Every parameter (each rank's shard) finite, agreed across ranks."""
    bad = torch.zeros((), device=env.device)
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        bad += (~torch.isfinite(local)).sum()
    return all_reduce_sum(bad, env).item() == 0


def require_finite(model, env: Dist, step: int) -> None:
    """Never save NaN or infinite weights: an update can overflow even when its gradient was finite."""
    if not all_finite(model, env):
        raise UserError(f"step {step}: the student's weights are no longer finite (NaN or inf); stopped without saving "
                        "them (lower --lr)")


class Trainer:
    """A built run (model sharded, optimizer, schedules, data, logs) and its loop. `fit` trains to `total_steps`
    (or --stop-at-step) from wherever `progress` stands (a fresh run or one `restore`d); the caller saves the
    student after it."""

    def __init__(self, cfg: TrainConfig, env: Dist, model, optimizer, scheduler, policy: DistillationPolicy,
                 teacher: TeacherSource, data: Iterator[MicroBatch], eval_rows: CacheRows | None, total_steps: int,
                 checkpoints: CheckpointManager, progress: Progress, log: MetricsLog, interrupted: Callable[[int], str],
                 on_policy: OnPolicyBatches | None = None) -> None:
        self.cfg, self.env, self.model, self.optimizer, self.scheduler = cfg, env, model, optimizer, scheduler
        self.policy, self.teacher, self.data, self.eval_rows, self.total_steps = policy, teacher, data, eval_rows, total_steps
        self.checkpoints, self.progress, self.log, self.interrupted = checkpoints, progress, log, interrupted
        self.loss: LossConfig = policy.loss
        self.on_policy = on_policy  # `data` with the on-policy sampler's choices applied (online --on-policy)
        self.last: dict[str, Any] = {}
        self.interruptions = SafePoints()  # fit's: a signal is acted on between steps, never inside one

    def fit(self) -> dict[str, Any]:
        start, elapsed_before = time.monotonic(), self.progress.elapsed_s
        with step_bar("train-student", self.cfg.console, self.cfg.progress and self.env.rank == 0) as bar:
            task = bar.add_task("train", total=self.total_steps, completed=self.progress.step, info="")
            try:
                with interrupts_at_safe_points() as self.interruptions:
                    if self.validates_first and self.progress.step == 0:
                        self.evaluate(bar)  # the adaptive sampler's first held-out loss (the original's --validate_first)
                    while self.progress.step < self.stop_step:
                        result = self.train_step()
                        self.progress.elapsed_s = elapsed_before + time.monotonic() - start
                        self.record(result)
                        self.evaluate_if_due(bar)
                        self.save_if_due()
                        bar.update(task, advance=1, info=self.summary(result))
            except KeyboardInterrupt:
                raise Interrupted(self.interrupted(self.progress.step) if self.env.rank == 0 else "") from None
            finally:
                self.log.close()
        require_finite(self.model, self.env, self.progress.step)
        return self.last

    def train_step(self) -> StepResult:
        """One optimizer step: this rank's micro-batches forward and backward (loss = sum over the step's target
        positions / their global count), clip, step, and t moved once from the step's global loss."""
        if self.on_policy is not None:
            self.on_policy.at(self.progress.step, self.total_steps)
        micro, counts = step_batches(self.data, self.cfg.grad_accum, self.env, self.interruptions)
        denominator = max(counts[0].item(), 1.0)
        reported = torch.zeros((), device=self.env.device)
        t, epoch = self.policy.t, self.policy.epoch(self.progress.step)
        for mb in micro:
            combined, rep = micro_batch_loss(self.model, self.teacher, mb, self.loss, t, self.env, epoch)
            # FSDP averages gradients over ranks; the world factor turns that into the global-token mean.
            (combined * (self.env.world / denominator)).backward()
            reported += rep / denominator
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        loss_value = all_reduce_sum(reported, self.env).item()
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            raise UserError(f"step {self.progress.step + 1}: the loss ({loss_value}) or gradient norm ({grad_norm}) is not finite; "
                            "stopped without saving this step (lower --lr, or check the student and the cache)")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.policy.after_step(loss_value)
        self.progress.step += 1
        self.progress.tokens += int(counts[1].item())
        return StepResult(loss_value, grad_norm, lr, t, self.progress.tokens)

    def record(self, result: StepResult) -> None:
        p = self.progress
        self.last = {"step": p.step, "loss": result.loss, "lr": result.lr, "tokens": p.tokens, "elapsed_s": p.elapsed_s,
                     "grad_norm": result.grad_norm}
        if self.model.temperature is not None:
            self.last["temperature"] = self.model.temperature.value()
        if self.on_policy is not None:
            self.last["on_policy_batches"] = self.on_policy.taken()  # of the step's micro-batches, per rank
            if self.validates_first:
                self.last["adaptive_threshold"] = self.on_policy.sampler.threshold
        if self.teacher.sampled:
            self.last["loss_is_estimate"] = True  # a sampled tail's: unbiased, not a bound (it can fall below 0)
        if self.policy.reads_t:
            self.last["t"] = result.t  # the t this step trained with
            # max − min of t over ranks after the update: 0 when every rank holds the same t.
            spread = all_reduce_max(torch.tensor([self.policy.t, -self.policy.t], dtype=torch.float64), self.env)
            self.last["t_rank_spread"] = float(spread[0] + spread[1])
        self.log.write(self.last)

    def evaluate_if_due(self, bar) -> None:
        step, every = self.progress.step, self.cfg.eval_every
        scheduled = bool(every and step % every == 0) or step == self.total_steps
        if self.eval_rows is None or not (scheduled or step == self.stop_step):
            return
        # At a --stop-at-step the uninterrupted run would not evaluate, its scores are logged but do not move the
        # adaptive sampler: stopped there and resumed, the run chooses as the uninterrupted one does.
        self.evaluate(bar, moves_sampler=scheduled)

    @property
    def validates_first(self) -> bool:
        """The adaptive sampler's run: it evaluates at step 0 and moves with each held-out loss."""
        return self.on_policy is not None and self.on_policy.sampler.adaptive

    def evaluate(self, bar, moves_sampler: bool = True) -> None:
        """Held-out scores, logged; the adaptive sampler also takes the run's own loss on them (`eval_loss`)."""
        cfg, step = self.cfg, self.progress.step
        objective = self.loss if self.validates_first else None
        scores = evaluate(self.model, self.eval_rows, self.env, cfg.batch_size, cfg.max_length, cfg.pack, cfg.tail,
                          objective, self.policy.t)
        if objective is not None and moves_sampler:
            self.on_policy.sampler.update(scores["eval_loss"])
        self.log.write({"step": step, **scores})
        self.log.sync()
        if self.env.rank == 0:
            bar.console.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))

    @property
    def stop_step(self) -> int:
        """Where `fit` stops: --stop-at-step (a checkpoint is saved there), else the schedule's end."""
        return min(self.cfg.stop_at_step or self.total_steps, self.total_steps)

    def save_if_due(self) -> None:
        """A checkpoint every --save-every steps and at --stop-at-step; never at the end (the student is saved)."""
        step, every = self.progress.step, self.cfg.save_every
        if step < self.total_steps and ((every and step % every == 0) or step == self.stop_step):
            require_finite(self.model, self.env, step)
            self.log.sync()
            self.checkpoints.save(step, self.model, self.optimizer, self.scheduler, self.env)

    def summary(self, result: StepResult) -> str:
        t = f"  t {result.t:.3f}" if self.policy.reads_t else ""
        return f"loss{'≈' if self.teacher.sampled else ''} {result.loss:.4f}{t}  {self.progress.tokens / max(self.progress.elapsed_s, 1e-9):,.0f} tok/s"
