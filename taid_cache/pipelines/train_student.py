"""Stage two: train a student from a cache (or, for comparison, from a teacher run in-process).

One obvious path: check inputs -> set up ranks, student (FSDP2), optimizer, schedule -> resume if asked ->
per optimizer step: gather the step's micro-batches, count its loss tokens across ranks, forward/backward each
micro-batch (loss = sum over positions / global token count), clip, step, update t from the step's global
loss -> log, evaluate, checkpoint -> save the student with save_pretrained.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import UserError
from ..losses import (
    LOSSES, TAILS, LossConfig, TaidSchedule, cross_entropy, fkl, per_position_fn, rebuild_teacher, taid_sparse_student_tail,
)
from ..packing import keeps_sequences_apart
from ..shards.verify import verify_cache
from ..training.checkpoint import checkpoints, load_checkpoint, save_checkpoint
from ..training.data import CacheStream, MicroBatch, loader
from ..training.student import (
    Dist, LossModel, all_reduce_max, all_reduce_sum, attention_implementation, check_vocabulary, close_distributed, init_distributed,
    load_causal_lm,
    save_student, shard_model,
)

# Settings that may change between a run and its resumption (they do not change what is computed).
RESUMABLE = {"resume", "save_every", "eval_every", "progress", "num_workers", "tensorboard"}


@dataclass
class TrainConfig:
    student: str
    cache: Path
    output: Path
    loss: str = "taid"
    max_steps: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    max_length: int = 2048
    pack: bool = False
    tail: str = "student"
    distil_ratio: float = 1.0
    beta: float = 0.1
    mu: float = 0.5
    taid_t_start: float = 0.4
    taid_t_end: float = 1.0
    taid_alpha: float = 5e-4
    taid_beta: float = 0.99
    taid_disable_adaptive: bool = False
    save_every: int = 0
    resume: bool = False
    teacher_model: Optional[str] = None
    eval_cache: Optional[Path] = None
    eval_every: int = 0
    shuffle_buffer: int = 1024
    num_workers: int = 0
    loss_chunk: int = 1024
    activation_checkpointing: bool = False
    tensorboard: bool = False
    progress: bool = True
    console: Console = field(default_factory=lambda: Console(stderr=True, soft_wrap=True))

    def settings(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "console"}
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}
        return {k: v for k, v in out.items() if k not in RESUMABLE}


def check_options(cfg: TrainConfig) -> None:
    if cfg.loss not in LOSSES:
        raise UserError(f"unknown loss {cfg.loss!r}: choose one of {', '.join(LOSSES)}")
    if cfg.tail not in TAILS:
        raise UserError(f"--tail must be one of {', '.join(TAILS)}, not {cfg.tail!r}")
    if not cfg.taid_t_start < cfg.taid_t_end:
        raise UserError(f"--taid-t-start ({cfg.taid_t_start}) must be below --taid-t-end ({cfg.taid_t_end})")
    if not (0.0 <= cfg.taid_alpha <= 1.0 and 0.0 <= cfg.taid_beta < 1.0):
        raise UserError("--taid-alpha must be in [0, 1] and --taid-beta in [0, 1)")
    if not 0.0 <= cfg.distil_ratio <= 1.0:
        raise UserError(f"--distil-ratio must be in [0, 1], not {cfg.distil_ratio}")
    if (cfg.max_steps is None) == (cfg.epochs is None):
        raise UserError("give exactly one of --max-steps and --epochs")
    if (cfg.max_steps is not None and cfg.max_steps < 1) or (cfg.epochs is not None and cfg.epochs <= 0):
        raise UserError("--max-steps / --epochs must be positive")
    if cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.max_length < 2 or cfg.lr <= 0:
        raise UserError("--batch-size, --grad-accum, --lr must be positive and --max-length at least 2")


def check_packing(model, pack: bool, what: str) -> None:
    if pack and not keeps_sequences_apart(model.get_decoder(), torch.device("cpu")):
        raise UserError(f"--pack: the {what}'s attention does not keep packed sequences apart in this transformers version; train without --pack")


def cosine_schedule(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(total - warmup, 1), 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Teacher:
    """Where the step's teacher distribution comes from: the cache's top-k, or a model run in-process."""

    def __init__(self, cfg: TrainConfig, settings: dict, vocab_rows: int, env: Dist) -> None:
        self.tail, self.valid, self.rows = cfg.tail, settings["tokenizer_size"], vocab_rows
        self.model = None
        if cfg.teacher_model:
            model, tokenizer = load_causal_lm(cfg.teacher_model, "teacher", torch.float32, attention_implementation())
            check_vocabulary(model, tokenizer, settings, "teacher")
            check_packing(model, cfg.pack, "teacher")
            self.model = model.to(env.device).eval().requires_grad_(False)
            self.head = self.model.get_output_embeddings().weight

    def prepare(self, mb: MicroBatch, env: Dist) -> Any:
        """Per micro-batch: the teacher's hidden states (online) or the selected top-k rows (cached)."""
        if self.model is not None:
            with torch.no_grad():
                out = self.model.get_decoder()(**mb.model_inputs(env.device))
            return out.last_hidden_state[:, :-1][mb.targets.to(env.device)]
        return mb.topk_ids[mb.targets].to(env.device), mb.topk_logprobs[mb.targets].to(env.device)

    def logprobs(self, prepared: Any, sl: slice, student_logits: torch.Tensor) -> torch.Tensor:
        if self.model is not None:
            logits = (prepared[sl] @ self.head.t()).float()[:, : self.valid]
            return F.pad(F.log_softmax(logits, -1), (0, self.rows - self.valid), value=-math.inf)
        ids, lps = prepared
        return rebuild_teacher(student_logits, ids[sl], lps[sl], self.tail, self.valid)


def micro_batch_loss(model: LossModel, teacher: Teacher, mb: MicroBatch, loss: LossConfig, t: float, env: Dist):
    """Summed (training loss, reported loss) over the micro-batch's target positions."""
    distil = None if loss.name == "sft" else per_position_fn(loss)
    labels = mb.labels[mb.targets].to(env.device)
    prepared = None if distil is None else teacher.prepare(mb, env)

    if loss.name == "taid" and teacher.model is None and teacher.tail == "student" and loss.distil_ratio == 1:
        ids, lps = prepared

        def closed_form(logits: torch.Tensor, sl: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            value, grad = taid_sparse_student_tail(logits, ids[sl], lps[sl], t, teacher.valid)
            return value.sum(), value.sum(), grad

        return model(mb.model_inputs(env.device), mb.targets.to(env.device), closed_form)

    def fn(logits: torch.Tensor, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        ce = cross_entropy(logits, labels[sl]) if (distil is None or loss.distil_ratio < 1) else None
        if distil is None:
            return ce.sum(), ce.sum()
        d = distil(logits, teacher.logprobs(prepared, sl, logits), t)
        combined = d if ce is None else loss.distil_ratio * d + (1 - loss.distil_ratio) * ce
        return combined.sum(), d.sum()

    return model(mb.model_inputs(env.device), mb.targets.to(env.device), fn)


@torch.no_grad()
def evaluate(model: LossModel, cfg: TrainConfig, settings: dict, env: Dist) -> dict[str, float]:
    """Held-out CE on the data, KL(teacher‖student) against the rebuilt teacher, top-1 agreement. Never touches t."""
    manifest = verify_cache(cfg.eval_cache)
    if manifest["settings"]["tokenizer_hash"] != settings["tokenizer_hash"]:
        raise UserError("--eval-cache was made with another tokenizer than --cache")
    data = CacheStream(cfg.eval_cache, cfg.batch_size, env.rank, env.world, cfg.max_length, 0, 1, False, limit=manifest["records"], pack=cfg.pack)
    sums = torch.zeros(4, device=env.device)  # ce, kl, top1, count
    model.eval()
    for mb in data:
        ids, lps = mb.topk_ids[mb.targets].to(env.device), mb.topk_logprobs[mb.targets].to(env.device)
        labels = mb.labels[mb.targets].to(env.device)

        def fn(logits: torch.Tensor, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
            teacher = rebuild_teacher(logits, ids[sl], lps[sl], cfg.tail, settings["tokenizer_size"])
            sums[0] += cross_entropy(logits, labels[sl]).sum()
            sums[1] += fkl(logits, teacher).sum()
            sums[2] += (logits.argmax(-1) == ids[sl, 0]).sum()
            sums[3] += logits.shape[0]
            return logits.new_zeros(()), logits.new_zeros(())

        model(mb.model_inputs(env.device), mb.targets.to(env.device), fn)
    model.train()
    sums = all_reduce_sum(sums, env)
    n = max(sums[3].item(), 1.0)
    return {"eval_ce": sums[0].item() / n, "eval_kl": sums[1].item() / n, "eval_top1": sums[2].item() / n}


class MetricsLog:
    """OUTPUT/metrics.jsonl, written by rank 0; a resumed run first drops lines past its checkpoint."""

    def __init__(self, output: Path, env: Dist, resumed_step: int, tensorboard: bool) -> None:
        self.path, self.enabled = output / "metrics.jsonl", env.rank == 0
        self.board = None
        if self.enabled:
            kept = [l for l in (self.path.read_text().splitlines() if self.path.exists() else []) if json.loads(l)["step"] <= resumed_step]
            self.path.write_text("".join(l + "\n" for l in kept))
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise UserError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None

                self.board = SummaryWriter(str(output / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, record["step"])


def prepare_output(cfg: TrainConfig) -> Optional[Path]:
    """The checkpoint to resume from, or None for a fresh run into an empty folder."""
    found = checkpoints(cfg.output)
    if cfg.resume:
        if not found:
            raise UserError(f"--resume: no checkpoint in {cfg.output}/checkpoints")
        meta = json.loads((found[-1] / "meta.json").read_text())
        diff = sorted(k for k in meta["settings"].keys() | cfg.settings().keys() if meta["settings"].get(k) != cfg.settings().get(k))
        if diff:
            shown = ", ".join(f"{k} ({meta['settings'].get(k)!r} then, {cfg.settings().get(k)!r} now)" for k in diff[:3])
            raise UserError(f"--resume with changed settings: {shown}")
        return found[-1]
    if cfg.output.exists() and any(cfg.output.iterdir()):
        raise UserError(f"{cfg.output} is not empty: use --resume to continue a run, or another --output")
    return None


def train_student(cfg: TrainConfig) -> dict[str, Any]:
    check_options(cfg)
    manifest = verify_cache(cfg.cache)
    settings = manifest["settings"]
    if manifest["records"] == 0:
        raise UserError(f"the cache {cfg.cache} holds no sequences")
    resume_from = prepare_output(cfg)
    env = init_distributed()
    torch.manual_seed(cfg.seed)
    bf16 = env.device.type == "cuda"
    lm, tokenizer = load_causal_lm(cfg.student, "student", torch.float32, attention_implementation())
    check_vocabulary(lm, tokenizer, settings, "student")
    check_packing(lm, cfg.pack, "student")
    rows = lm.get_output_embeddings().weight.shape[0]
    teacher = Teacher(cfg, settings, rows, env)
    model = shard_model(LossModel(lm, cfg.loss_chunk), env, bf16, cfg.activation_checkpointing)
    global_batch = cfg.batch_size * cfg.grad_accum * env.world
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * manifest["records"] / global_batch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, total_steps)
    schedule = TaidSchedule(cfg.taid_t_start, cfg.taid_t_end, cfg.taid_alpha, cfg.taid_beta, total_steps, not cfg.taid_disable_adaptive)
    loss_cfg = LossConfig(cfg.loss, cfg.beta, cfg.mu, 0.0 if cfg.loss == "sft" else cfg.distil_ratio)
    step, tokens, elapsed_before = 0, 0, 0.0
    cfg.output.mkdir(parents=True, exist_ok=True)
    if resume_from is not None:
        meta = load_checkpoint(resume_from, model, optimizer, scheduler)
        schedule.load_state_dict(meta["taid"])
        step, tokens, elapsed_before = meta["step"], meta["tokens"], meta["elapsed_s"]
    log = MetricsLog(cfg.output, env, step, cfg.tensorboard)
    data = iter(loader(CacheStream(cfg.cache, cfg.batch_size, env.rank, env.world, cfg.max_length, cfg.seed,
                                   cfg.shuffle_buffer, True, start=step * global_batch, pack=cfg.pack), cfg.num_workers))
    model.train()
    start = time.monotonic()
    last: dict[str, Any] = {}
    with Progress(TextColumn("[bold]train-student"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=cfg.console, disable=not (cfg.progress and env.rank == 0)) as bar:
        task = bar.add_task("train", total=total_steps, completed=step, info="")
        while step < total_steps:
            micro = [next(data) for _ in range(cfg.grad_accum)]
            counts = all_reduce_sum(torch.tensor([float(sum(int(m.targets.sum()) for m in micro)), float(sum(m.tokens for m in micro))]), env)
            denominator = max(counts[0].item(), 1.0)
            reported = torch.zeros((), device=env.device)
            t = schedule.t
            for mb in micro:
                combined, rep = micro_batch_loss(model, teacher, mb, loss_cfg, t, env)
                # FSDP averages gradients over ranks; the world factor turns that into the global-token mean.
                (combined * (env.world / denominator)).backward()
                reported += rep / denominator
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            loss_value = all_reduce_sum(reported, env).item()
            if loss_cfg.name == "taid":
                schedule.update(loss_value)
            step += 1
            tokens += int(counts[1].item())
            elapsed = elapsed_before + time.monotonic() - start
            last = {"step": step, "loss": loss_value, "lr": lr, "tokens": tokens, "elapsed_s": elapsed, "grad_norm": grad_norm}
            if loss_cfg.name == "taid":
                last["t"] = t  # the t this step trained with
                # max − min of t over ranks after the update: 0 when every rank holds the same t.
                spread = all_reduce_max(torch.tensor([schedule.t, -schedule.t], dtype=torch.float64), env)
                last["t_rank_spread"] = float(spread[0] + spread[1])
            log.write(last)
            if cfg.eval_cache is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == total_steps):
                log.write({"step": step, **evaluate(model, cfg, settings, env)})
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                save_checkpoint(cfg.output, step, model, optimizer, scheduler,
                                {"settings": cfg.settings(), "taid": schedule.state_dict(), "tokens": tokens, "elapsed_s": elapsed}, env)
            bar.update(task, advance=1, info=f"loss {loss_value:.4f}" + (f"  t {t:.3f}" if loss_cfg.name == "taid" else "")
                       + f"  {tokens / max(elapsed, 1e-9):,.0f} tok/s")
    save_student(model, tokenizer, cfg.output, env)
    if env.rank == 0:
        cfg.console.print(f"trained {step} steps ({cfg.loss}); student saved to {cfg.output}")
    close_distributed(env)
    return last
