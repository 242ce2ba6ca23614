"""Distilling from a cache with Hugging Face's `Trainer`: the student and its loss as one module
(`DistillationModel`, so DDP and accelerate wrap and call it as any model), a `Trainer` that feeds it the cache
(`DistillationTrainer`) and saves the student alone, and TAID's t moved once per optimizer step, from the step's
loss over every micro-batch and process (`TaidCallback`).

With the same data order, initialisation, optimizer and schedule it takes the steps train-student takes: the
loss per step is the sum over the step's target tokens divided by their count over all processes (the
Trainer's `num_items_in_batch`), the LM head and loss are applied chunk by chunk, TAID in closed form."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from ..heads import check_head
from ..shards.contract import CacheSettings
from ..losses import SAMPLED_LOSSES, CurriculumTemperature, LossConfig, TaidSchedule
from ..training.distributed import Dist
from ..training.loss_step import micro_batch_loss
from ..training.student import LossModel, check_vocabulary
from ..training.teacher import TeacherSource
from .cache_dataset import CacheDataset
from .collator import DistillationCollator, micro_batch


class DistillationModel(nn.Module):
    """A student and its distillation loss against a cache's teacher: `forward(**batch)` (a
    `DistillationCollator` batch) returns {"loss": …} normalised by `num_items_in_batch` (or the batch's own
    target count). The student is `.student`."""

    accepts_loss_kwargs = True  # the Trainer then passes num_items_in_batch and does not rescale the loss itself

    def __init__(self, student: nn.Module, settings: CacheSettings, loss: LossConfig, schedule: TaidSchedule | None = None,
                 tail: str = "student", chunk: int = 1024) -> None:
        super().__init__()
        if settings.sampled and loss.name not in SAMPLED_LOSSES:
            raise ValueError(f"a cache with a sampled tail serves {', '.join(SAMPLED_LOSSES)}, not {loss.name}")
        temperature = CurriculumTemperature(loss.ctkd_t_start, loss.ctkd_t_end) if loss.spec.learns_temperature else None
        self.loss_model = LossModel(student, chunk, check_head(student, "student"), temperature)
        self.loss, self.schedule = loss, schedule or TaidSchedule()
        self.epoch = 1  # where ctkd's curriculum stands (TaidCallback moves it)
        self.teacher = TeacherSource(settings, tail, student.get_output_embeddings().weight.shape[0], Dist())
        self.register_buffer("step_loss", torch.zeros(()), persistent=False)  # this process's share of the step's loss

    @property
    def student(self) -> nn.Module:
        return self.loss_model.lm

    def forward(self, num_items_in_batch: torch.Tensor | int | None = None, **batch: Any) -> dict[str, torch.Tensor]:
        mb = micro_batch(batch)
        env = Dist(device=self.step_loss.device)
        combined, reported = micro_batch_loss(self.loss_model, self.teacher, mb, self.loss, self.schedule.t, env, self.epoch)
        count = num_items_in_batch if num_items_in_batch is not None else mb.targets.sum().clamp(min=1)
        self.step_loss += reported.detach() / count
        return {"loss": combined / count}


class TaidCallback(TrainerCallback):
    """After each optimizer step: the step's loss summed over processes (each process held its micro-batches'
    sums over the global token count), t moved once from it, and the step recorded in `history`. Before each:
    the epoch (from 1) ctkd's curriculum reads, from the steps taken and the cache's size."""

    def __init__(self, model: DistillationModel, records: int) -> None:
        self.model, self.records = model, records
        self.history: list[dict[str, float]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self.model.epoch = 1 + state.global_step * global_batch // self.records
        return control

    def on_step_end(self, args, state, control, **kwargs):
        loss = self.model.step_loss.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss)
        t = self.model.schedule.t
        if self.model.loss.name == "taid":
            self.model.schedule.update(loss.item())
        self.history.append({"step": state.global_step, "loss": loss.item(), "t": t})
        self.model.step_loss.zero_()
        return control


class DistillationTrainer(Trainer):
    """`Trainer` on a cache. `student`: a causal LM with the cache's tokenizer; `cache`: a dump-teacher folder;
    `loss`: a `LossConfig` (TAID's t settings in `schedule`, its total steps taken from `args.max_steps`). The
    training data is the cache's stream (`CacheDataset`, seeded with `args.seed`); everything else is the
    Trainer's own (optimizer, `lr_scheduler_type`, accumulation, logging, checkpoints, DDP)."""

    def __init__(self, student: nn.Module, cache: str | Path, args, loss: LossConfig | None = None,
                 schedule: TaidSchedule | None = None, tail: str = "student", max_length: int = 2048, pack: bool = False,
                 shuffle_buffer: int = 1024, tokenizer=None, **kwargs: Any) -> None:
        if args.max_steps <= 0:
            raise ValueError("DistillationTrainer streams the cache: give TrainingArguments(max_steps=...)")
        args.remove_unused_columns = False  # every field of a cache batch is one the model reads
        # Each process reads its own share of the one stream (batches of different widths cannot be dispatched).
        args.accelerator_config.dispatch_batches = False
        data = CacheDataset(cache, seed=args.seed, shuffle_buffer=shuffle_buffer, batch_size=args.per_device_train_batch_size)
        if tokenizer is not None:
            check_vocabulary(student, tokenizer, data.settings, "student")
        schedule = schedule or TaidSchedule()
        schedule.total_steps = args.max_steps
        model = DistillationModel(student, data.settings, loss or LossConfig("taid"), schedule, tail)
        self.taid = TaidCallback(model, data.manifest.records)
        super().__init__(model=model, args=args, train_dataset=data, data_collator=DistillationCollator(max_length, pack),
                         processing_class=tokenizer, callbacks=[self.taid, *kwargs.pop("callbacks", [])], **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The student alone, as a Hugging Face folder (`from_pretrained` loads it)."""
        output_dir = output_dir or self.args.output_dir
        prefix = "loss_model.lm."
        student_state = None if state_dict is None else {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        self.model.student.save_pretrained(output_dir, state_dict=student_state)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, Path(output_dir) / "training_args.bin")
