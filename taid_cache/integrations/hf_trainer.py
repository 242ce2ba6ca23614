"""Distilling from a cache with Hugging Face's `Trainer`, shaped like TRL's trainers: `CacheDistillationConfig` (a
`TrainingArguments` that also carries the loss, TAID's schedule and how the cache is read, so one YAML drives it)
and `CacheDistillationTrainer(model=, args=, train_dataset=, eval_dataset=, processing_class=)`.

The names are TRL's pattern without TRL's names: `trl.DistillationTrainer` is TRL's own (an on-policy GKD
trainer with a live teacher), and a second class of that name with other arguments would be a trap for anyone
who imports both. The Trainer drives the loop (optimizer, `lr_scheduler_type`, accumulation, logging,
checkpoints, DDP); the step policy is train-student's (`training/policy.py`): the same loss, the same t moved
once per optimizer step from the step's loss over every micro-batch and process, the same epochs, the same
checks of the cache. With the same data order, initialisation, optimizer and schedule it takes train-student's
steps: the loss per step is the sum over the step's target tokens divided by their count over all processes
(the Trainer's `num_items_in_batch`), the LM head and loss applied chunk by chunk, TAID in closed form."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..config import Range
from ..errors import UserError
from ..heads import check_head
from ..losses import LOSSES, PARAMS, LossConfig, TaidSchedule
from ..shards.contract import CacheSettings
from ..training.distributed import Dist
from ..training.data import CacheMixture, joins
from ..training.evaluate import evaluate
from ..training.loss_step import micro_batch_loss
from ..training.policy import DistillationPolicy, check_parameters, check_serves, total_steps
from ..training.student import LossModel, check_vocabulary
from ..training.teacher import TeacherSource
from .cache_dataset import CacheDataset
from .collator import DistillationCollator, micro_batch

STATE = "taid_cache_state.json"  # in each Trainer checkpoint: the step policy's state (TAID's t)
MIXTURE = "taid_cache_mixture.json"  # and the train caches (their identities) and their weights over the run
TEMPERATURE = "taid_cache_temperature.pt"  # ctkd's learned temperature, trained beside the student


def _field(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


_OWN = [
    ("loss", str, _field("taid", f"Distillation loss: {', '.join(LOSSES)}.")),
    ("distil_ratio", float, _field(1.0, "r: train on r * distillation + (1 - r) * CE.")),
    ("tail", str, _field("student", "A top-k cache's missing mass: student, uniform or renorm.")),
    ("max_length", int, _field(2048, "Longest sequence; longer ones are cut.")),
    ("pack", bool, _field(False, "Pack each batch's sequences into rows of max_length tokens.")),
    ("shuffle_buffer", int, _field(1024, "Sequences in the cache stream's shuffle buffer.")),
    ("read_ahead", int, _field(2, "A cache on an object store: shards fetched ahead of need.")),
    ("local_cache", str | None, _field(None, "A cache on an object store: a local folder keeping its shards.")),
    ("mix", list[str], dataclasses.field(default_factory=list, metadata={"help": "More caches of the train cache's "
                                         "teacher, tokenizer and head, mixed with it as train-student's --mix."})),
    ("mix_weights", list[float], dataclasses.field(default_factory=list, metadata={"help": "Weights of the train cache "
                                                   "then each mix cache [default: by their sequences]."})),
    ("loss_chunk", int, _field(1024, "Positions per LM-head/loss chunk.")),
    ("taid_t_start", float, _field(0.4, "TAID's first t.")),
    ("taid_t_end", float, _field(1.0, "TAID's last t.")),
    ("taid_alpha", float, _field(5e-4, "TAID's adaptive step size alpha.")),
    ("taid_beta", float, _field(0.99, "TAID's momentum beta.")),
    ("taid_disable_adaptive", bool, _field(False, "Linear t schedule only.")),
]
# Every loss parameter, declared once by its loss (losses/): the same names as train-student's options (those
# registered when this module is imported, as for train-student's).
_PARAMS = [(name, float, _field(p.default, p.help)) for name, p in PARAMS.items()]
_NAMES = tuple(name for name, _, _ in _PARAMS)


def _check(self) -> None:
    TrainingArguments.__post_init__(self)
    if self.loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
    for name in _NAMES:
        if (value := getattr(self, name)) not in (within := Range.parse(PARAMS[name].within)):
            raise ValueError(f"{name} must be {within}, not {value}")
    check_parameters(self.loss, {name: getattr(self, name) for name in _NAMES}, str)


def _loss_config(self) -> LossConfig:
    """The loss and its parameters (sft trains on the data alone)."""
    return LossConfig(name=self.loss, distil_ratio=0.0 if self.loss == "sft" else self.distil_ratio,
                      **{name: getattr(self, name) for name in _NAMES})


def _schedule(self, steps: int) -> TaidSchedule:
    return TaidSchedule(self.taid_t_start, self.taid_t_end, self.taid_alpha, self.taid_beta, steps, not self.taid_disable_adaptive)


CacheDistillationConfig = dataclasses.make_dataclass(
    "CacheDistillationConfig", _OWN + _PARAMS, bases=(TrainingArguments,),
    namespace={"__post_init__": _check, "loss_config": _loss_config, "schedule": _schedule, "__module__": __name__,
               "__doc__": "TrainingArguments, plus the loss (and its parameters, named as train-student's options), TAID's "
                          "schedule and how the cache is read: one YAML or `HfArgumentParser` drives a run."})


def as_cache_dataset(data: Any, args: Any, train: bool) -> CacheDataset | None:
    """A cache folder or URI (the training one shuffled and mixed with `args.mix`), or a `CacheDataset` as it is."""
    if isinstance(data, CacheDataset):
        if train and (args.mix or args.mix_weights):
            raise ValueError("args.mix and args.mix_weights mix caches into a train_dataset given as a folder or URI; a "
                             "CacheDataset carries its own: CacheDataset(cache, mix=..., mix_weights=...)")
        if not train and isinstance(data.rows, CacheMixture):
            raise ValueError("eval_dataset is a mixture of caches: give one held-out cache")
        return data
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        return CacheDataset(data, seed=args.seed, shuffle_buffer=args.shuffle_buffer, shuffle=train,
                            batch_size=args.per_device_train_batch_size, read_ahead=args.read_ahead, local_dir=args.local_cache,
                            **({"mix": args.mix, "mix_weights": args.mix_weights} if train else {}))
    raise TypeError(f"a dataset must be a cache folder, a URI or a CacheDataset, not {type(data).__name__}")


class DistillationModel(nn.Module):
    """A student and its distillation loss against a cache's teacher: `forward(**batch)` (a
    `DistillationCollator` batch) returns {"loss": …} normalised by `num_items_in_batch` (or the batch's own
    target count). The student is `.student`; the step policy (t, the epoch) is `.policy`."""

    accepts_loss_kwargs = True  # the Trainer then passes num_items_in_batch and does not rescale the loss itself
    _keys_to_ignore_on_save = None  # what the Trainer asks of a model it saves (the student is saved alone: `_save`)

    def __init__(self, student: nn.Module, settings: CacheSettings, policy: DistillationPolicy, tail: str = "student",
                 chunk: int = 1024) -> None:
        super().__init__()
        loss = policy.loss
        temperature = loss.loss.learned_temperature() if loss.spec.learns_temperature else None
        self.loss_model = LossModel(student, chunk, check_head(student, "student"), temperature)
        self.policy = policy
        self.epoch = 1  # where ctkd's curriculum stands (PolicyCallback moves it)
        self.teacher = TeacherSource(settings, tail, student.get_output_embeddings().weight.shape[0], Dist())
        self.register_buffer("step_loss", torch.zeros(()), persistent=False)  # this process's share of the step's loss

    @property
    def student(self) -> nn.Module:
        return self.loss_model.lm

    def forward(self, num_items_in_batch: torch.Tensor | int | None = None, **batch: Any) -> dict[str, torch.Tensor]:
        mb = micro_batch(batch)
        env = Dist(device=self.step_loss.device)
        combined, reported = micro_batch_loss(self.loss_model, self.teacher, mb, self.policy.loss, self.policy.t, env, self.epoch)
        count = num_items_in_batch if num_items_in_batch is not None else mb.targets.sum().clamp(min=1)
        self.step_loss += reported.detach() / count
        return {"loss": combined / count}


class PolicyCallback(TrainerCallback):
    """After each optimizer step: the step's loss summed over processes (each process held its micro-batches'
    sums over the global token count), the policy moved once from it, and the step recorded in `history`.
    Before each: the epoch ctkd's curriculum reads."""

    def __init__(self, model: DistillationModel) -> None:
        self.model = model
        self.history: list[dict[str, float]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.model.epoch = self.model.policy.epoch(state.global_step)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        loss = self.model.step_loss.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss)
        t = self.model.policy.t
        self.model.policy.after_step(loss.item())
        self.history.append({"step": state.global_step, "loss": loss.item(), "t": t})
        self.model.step_loss.zero_()
        return control


def tokenizer_of(model: nn.Module):
    """The student's own tokenizer, from the folder it was loaded from; None when it cannot be found."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model.name_or_path)
    except Exception:
        return None


def resume_mixture(data: CacheDataset, saved: dict[str, Any] | None, start: int, folder: Path) -> None:
    """The train caches' weights as the checkpoint left them, and today's from global item `start` on when caches
    joined after the checkpoint's (the rule of train-student's --resume); other caches, or other weights for the
    same ones, are refused. A checkpoint without the record is of a release whose Trainer read one cache."""
    now, weights = data.identities, data.schedule.weights
    then = saved["caches"] if saved else now[:1]
    phases = saved["phases"] if saved else [[0, weights[:1]]]
    if not (joins(then, now) or (now == then and phases[-1][1] == weights)):
        raise UserError(f"resume from {folder}: it trained on other caches, or other weights for them, than train_dataset "
                        "and args.mix now give; resume with its caches and weights, or add caches after them")
    data.schedule.load_state_dict({"phases": phases})
    data.schedule.grow(start, weights)


class CacheDistillationTrainer(Trainer):
    """`Trainer` on a cache. `model`: a causal LM with the cache's tokenizer; `args`: a `CacheDistillationConfig`;
    `train_dataset` / `eval_dataset`: cache folders or URIs, or `CacheDataset`s (the training stream is seeded
    with `args.seed`); `processing_class`: the student's tokenizer (checked against the cache's; taken from the
    model's folder when not given). `args.max_steps`, or else `num_train_epochs` passes over the cache, is the
    run's length. Evaluation logs `eval_loss` (the loss at the current t), `eval_kl_cache`, `eval_top1` and
    `eval_ce`; every training log carries TAID's `t` (and ctkd's learned `temperature`) and the epochs done."""

    def __init__(self, model: nn.Module, args: Any, train_dataset: Any, eval_dataset: Any = None, processing_class: Any = None,
                 callbacks: list | None = None, **kwargs: Any) -> None:
        if not hasattr(args, "loss_config"):
            raise TypeError("args must be a CacheDistillationConfig (TrainingArguments with the loss and TAID settings)")
        train = as_cache_dataset(train_dataset, args, train=True)
        if train is None:
            raise ValueError("train_dataset: give the cache (a folder, a URI or a CacheDataset)")
        settings = train.settings
        tokenizer = processing_class if processing_class is not None else tokenizer_of(model)
        if tokenizer is None:
            raise UserError("pass processing_class=<the student's tokenizer>: it must be checked against the cache's, and "
                            f"{getattr(model, 'name_or_path', 'the model')!r} has none")
        check_vocabulary(model, tokenizer, settings, "student")
        check_serves(settings, args.loss, args.tail)
        held_out = as_cache_dataset(eval_dataset, args, train=False)
        if held_out is not None and (held_out.settings.teacher_hash, held_out.settings.tokenizer_hash) != \
                (settings.teacher_hash, settings.tokenizer_hash):
            raise UserError("eval_dataset was dumped from another teacher or tokenizer than train_dataset: its KL would "
                            "measure the student against the wrong teacher")
        args.remove_unused_columns = False  # every field of a cache batch is one the model reads
        # Each process reads its own share of the one stream (batches of different widths cannot be dispatched).
        args.accelerator_config.dispatch_batches = False
        # The step's loss over the step's target tokens of every process: what TAID's t is moved by, as in train-student.
        args.average_tokens_across_devices = True
        # A resumed run starts the stream at its step (integers skipped, no data read: `_load_from_checkpoint`).
        args.ignore_data_skip = True
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        records = train.records
        if args.max_steps <= 0:  # the stream is endless: its length in steps, from the epochs asked for
            args.max_steps = total_steps(None, args.num_train_epochs, records, global_batch)
        self.policy = DistillationPolicy(args.loss_config(), args.schedule(args.max_steps), records, global_batch)
        distillation = DistillationModel(model, settings, self.policy, args.tail, args.loss_chunk)
        self.steps = PolicyCallback(distillation)
        super().__init__(model=distillation, args=args, train_dataset=train, eval_dataset=held_out,
                         data_collator=DistillationCollator(args.max_length, args.pack), processing_class=tokenizer,
                         callbacks=[self.steps, *(callbacks or [])], **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Every training log with t (the last step's), ctkd's temperature, and the epochs done over the cache."""
        self.state.epoch = self.policy.epochs_done(self.state.global_step)
        if "loss" in logs and self.steps.history:
            if self.policy.reads_t:
                logs["t"] = self.steps.history[-1]["t"]
            temperature = self.model.loss_model.temperature if hasattr(self.model, "loss_model") else None
            if temperature is not None:
                logs["temperature"] = temperature.value()
            if self.model.teacher.sampled:
                logs["loss_is_estimate"] = 1.0  # a sampled tail's: unbiased, not a bound (it can fall below 0)
        super().log(logs, start_time)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The held-out cache: the loss at the current t, KL to the cache's teacher, top-1 agreement, CE. Never
        moves t."""
        data = as_cache_dataset(eval_dataset, self.args, train=False) or self.eval_dataset
        if data is None:
            raise ValueError("evaluate: no eval_dataset (a cache folder, a URI or a CacheDataset)")
        args = self.args
        ready = torch.distributed.is_available() and torch.distributed.is_initialized()
        env = Dist(torch.distributed.get_rank() if ready else 0, torch.distributed.get_world_size() if ready else 1, args.device)
        scores = evaluate(self.model.loss_model, data.rows, env, args.per_device_eval_batch_size, args.max_length, args.pack,
                          args.tail, self.policy.loss, self.policy.t)
        metrics = {f"{metric_key_prefix}_{k.removeprefix('eval_')}": v for k, v in scores.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(args, self.state, self.control, metrics)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The student alone, as a Hugging Face folder (`from_pretrained` loads it), with the step policy's state,
        the train caches' weights over the run and ctkd's temperature beside it (what a resumed run needs besides
        the student)."""
        output_dir = output_dir or self.args.output_dir
        prefix = "loss_model.lm."
        student_state = None if state_dict is None else {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        self.model.student.save_pretrained(output_dir, state_dict=student_state)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, Path(output_dir) / "training_args.bin")
        (Path(output_dir) / STATE).write_text(json.dumps(self.policy.state_dict()))
        (Path(output_dir) / MIXTURE).write_text(json.dumps({"caches": self.train_dataset.identities,
                                                            **self.train_dataset.schedule.state_dict()}))
        if self.model.loss_model.temperature is not None:
            torch.save(self.model.loss_model.temperature.state_dict(), Path(output_dir) / TEMPERATURE)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """A checkpoint `_save` wrote: the student's weights into the student, the policy's state, the mixture's
        weights (grown when caches joined), the temperature."""
        from safetensors.torch import load_file

        folder = Path(resume_from_checkpoint)
        student = self.model.student
        index = folder / "model.safetensors.index.json"  # save_pretrained's shards of a large student
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
        weights = {name: value for file in files for name, value in load_file(folder / file).items()}
        missing, unexpected = student.load_state_dict(weights, strict=False)
        # Tied weights (an LM head sharing the embeddings) are saved once: only they may be missing.
        tied = set(dict(student.named_parameters(remove_duplicate=False))) - set(dict(student.named_parameters()))
        if unexpected or set(missing) - tied:
            raise UserError(f"{folder} does not hold this student's weights (missing {sorted(set(missing) - tied)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]})")
        self.policy.load_state_dict(json.loads((folder / STATE).read_text()))
        step = json.loads((folder / "trainer_state.json").read_text())["global_step"]
        start = step * self.policy.global_batch
        self.train_dataset.order = dataclasses.replace(self.train_dataset.order, start=start)
        resume_mixture(self.train_dataset, json.loads((folder / MIXTURE).read_text()) if (folder / MIXTURE).is_file() else None,
                       start, folder)
        if self.model.loss_model.temperature is not None:
            self.model.loss_model.temperature.load_state_dict(torch.load(folder / TEMPERATURE, weights_only=True))
