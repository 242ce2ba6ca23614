"""Stage two: train a student from a cache (or, for comparison, from a teacher run in-process).

One obvious path: check inputs -> set up ranks, student (FSDP2), optimizer, schedule -> resume if asked ->
per optimizer step: gather the step's micro-batches, count its loss tokens across ranks, forward/backward each
micro-batch (loss = sum over positions / global token count), clip, step, update t from the step's global
loss -> log, evaluate, checkpoint -> save the student with save_pretrained.
"""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from ..config import TrainConfig, check_fields, flag, read_config
from ..errors import Interrupted, UserError, first_line, user_errors, write_errors
from ..fingerprints import model_hash, resolve_model
from ..heads import check_head
from ..losses import PARAMS, REGISTRY, SAMPLED_LOSSES, CurriculumTemperature, TaidSchedule
from ..progress import only_our_bars, step_bar
from ..settings import describe_differences
from ..shards.contract import Manifest
from ..shards.manifest import load_manifest
from ..shards.reader import read_cache
from ..shards.verify import verify_cache
from ..storage import Store, is_remote, open_store, remote_errors
from ..training.checkpoint import checkpoints, load_newest, readable_meta, remove_interrupted_saves, save_checkpoint, step_of
from ..training.data import CacheRows, CacheStream, MicroBatch, StreamOrder, micro_batches
from ..training.distributed import Dist, all_reduce_max, all_reduce_sum, broadcast_object, close_distributed, init_distributed
from ..training.evaluate import evaluate
from ..training.loss_step import micro_batch_loss
from ..training.metrics import MetricsLog
from ..training.run_folder import clear_unrecoverable, install_staged, is_finished, refuse_non_empty, run_lock
from ..training.teacher import TeacherSource
from ..training.student import (
    LossModel, attention_implementation, check_packing, check_vocabulary, load_causal_lm, save_student, shard_model,
)


def check_options(cfg: TrainConfig) -> None:
    """Every option in range before anything is loaded or written: each field's declared range (config.py), then
    the ones that depend on each other."""
    check_fields(cfg)
    check_loss_parameters(cfg)
    if (cfg.max_steps is None) == (cfg.epochs is None):
        raise UserError("give exactly one of --max-steps and --epochs")
    if not cfg.taid_t_start < cfg.taid_t_end:
        raise UserError(f"--taid-t-start ({cfg.taid_t_start}) must be below --taid-t-end ({cfg.taid_t_end})")
    if cfg.eval_every and cfg.eval_cache is None:
        raise UserError("--eval-every needs --eval-cache (the held-out cache to evaluate on)")
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        raise UserError(f"--report-to {cfg.report_to} needs the {cfg.report_to} package (pip install 'taid-cache[{cfg.report_to}]')")
    if cfg.report_to != "none" and is_remote(cfg.output):
        raise UserError(f"--report-to {cfg.report_to} writes its logs into a local --output folder; with --output {cfg.output} "
                        "the metrics are in its metrics.jsonl")
    for location in (cfg.cache, cfg.eval_cache, cfg.output):
        if location is not None:
            open_store(location)  # an unknown scheme, or one whose package is missing, in one line


def check_loss_parameters(cfg: TrainConfig) -> None:
    """The replaced --beta / --mu, and a loss parameter set for a loss that does not read it, in one line each."""
    if cfg.beta is not None:
        raise UserError("--beta is replaced by --skew-beta (skew-fkl, skew-rkl) and --js-beta (js)")
    if cfg.mu is not None:
        raise UserError("--mu is replaced by --adaptive-mu (adaptive-kl)")
    spec = REGISTRY[cfg.loss]
    for name, param in PARAMS.items():
        if name not in spec.reads and getattr(cfg, name) != param.default:
            readers = ", ".join(n for n, s in REGISTRY.items() if name in s.reads)
            raise UserError(f"{flag(name)} {getattr(cfg, name)}: --loss {cfg.loss} does not read it (it is a parameter of {readers})")


def lr_schedule(cfg: TrainConfig, optimizer, total: int):
    """transformers' scheduler of that name (what a Trainer run with the same arguments uses)."""
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total)
    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def verified(cache: str, env: Dist, local_dir: str | None) -> Manifest:
    """The cache's manifest, checked in full once per run by rank 0; the other ranks wait for its verdict."""
    error = None
    if env.rank == 0:
        try:
            verify_cache(cache, local_dir)
        except UserError as exc:
            error = str(exc)
        except Exception as exc:  # an unreadable file: the other ranks must hear of it, not wait
            error = f"cannot verify {cache}: {first_line(exc)}"
    error = broadcast_object(error, env)
    if error is not None:
        raise UserError(error)
    return load_manifest(cache)


def check_loss_tokens(cache: str, max_length: int) -> None:
    """Refuse a cache with no training target within --max-length: the run would train on nothing."""
    for record in read_cache(cache):
        if record.loss_mask[1:max_length].any():
            return
    raise UserError(f"no training targets: no sequence of {cache} has a loss-mask token within its first {max_length} "
                    "tokens (chat rows without assistant turns, or --max-length too short)")


def run_settings(cfg: TrainConfig, manifest: Manifest, env: Dist, global_batch: int) -> dict[str, Any]:
    """What a resumed run must share with the run it continues."""
    return {**cfg.settings(), "cache_identity": manifest.identity, "student_hash": model_hash(resolve_model(cfg.student)),
            "teacher_model_hash": model_hash(resolve_model(cfg.teacher_model)) if cfg.teacher_model else None,
            "world_size": env.world, "global_batch": global_batch}


def prepare_output(cfg: TrainConfig, output: Store, settings: dict[str, Any], env: Dist) -> bool:
    """Check the run folder before anything is written; True when the run resumes from a checkpoint."""
    if cfg.resume:
        meta = readable_meta(output)
        if meta is None:
            raise UserError(f"--resume: no checkpoint in {output.where('checkpoints')}")
        diff = describe_differences(meta["settings"], settings, "then", "now")
        if diff:
            raise UserError(f"--resume with changed settings: {diff}")
        return True
    cleared = clear_unrecoverable(output, bool(checkpoints(output))) if env.rank == 0 else None
    if not broadcast_object(cleared, env):
        raise refuse_non_empty(output)
    return False


def step_batches(data: Iterator[MicroBatch], grad_accum: int, env: Dist) -> tuple[list[MicroBatch], torch.Tensor]:
    """This rank's micro-batches for one optimizer step, and the global [loss targets, tokens] of the step.
    A rank that cannot read its data (a shard damaged since the run's start) says so in the same all-reduce:
    every rank then stops with one line, instead of the others failing inside a collective it never joins."""
    try:
        micro, failure = [next(data) for _ in range(grad_accum)], None
    except UserError as exc:
        micro, failure = [], exc
    counts = all_reduce_sum(torch.tensor([float(sum(int(m.targets.sum()) for m in micro)),
                                          float(sum(m.tokens for m in micro)), float(failure is not None)]), env)
    if failure is not None:
        raise failure
    if counts[2].item() > 0:
        raise UserError(f"rank {env.rank}: another rank could not read its training data and stopped; its error names the problem")
    return micro, counts[:2]


def all_finite(model, env: Dist) -> bool:
    """Every parameter (each rank's shard) finite, agreed across ranks."""
    bad = torch.zeros((), device=env.device)
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        bad += (~torch.isfinite(local)).sum()
    return all_reduce_sum(bad, env).item() == 0


def train_student(cfg: TrainConfig) -> dict[str, Any]:
    check_options(cfg)
    env = init_distributed()
    try:
        result = run(cfg, env)
    except BaseException:
        close_distributed(env, barrier=False)
        raise
    close_distributed(env)
    return result


def run(cfg: TrainConfig, env: Dist) -> dict[str, Any]:
    for location in (cfg.cache, cfg.eval_cache):  # a missing or unreachable cache is one line before any write
        if location is not None:
            load_manifest(location)
    output = open_store(cfg.output)
    with remote_errors(output.url, "--output"):
        output.check_writable("--output")
    with run_lock(output, env), write_errors(cfg.output, lambda: how_to_continue(output)):
        return run_locked(cfg, output, env)


def run_locked(cfg: TrainConfig, output: Store, env: Dist) -> dict[str, Any]:
    if broadcast_object(install_staged(output) if env.rank == 0 else None, env):
        cfg.console.print(f"finished installing the student an interrupted run had saved in {cfg.output}")
    if env.rank == 0:
        remove_interrupted_saves(output)
    manifest = verified(cfg.cache, env, cfg.local_cache)
    settings = manifest.settings
    if manifest.records == 0:
        raise UserError(f"the cache {cfg.cache} holds no sequences")
    check_loss_tokens(cfg.cache, cfg.max_length)
    if settings.sampled and cfg.loss not in SAMPLED_LOSSES and not cfg.teacher_model:
        raise UserError(f"--loss {cfg.loss}: a cache with a sampled tail (--tail-samples) serves {', '.join(SAMPLED_LOSSES)}; "
                        "the other losses need the teacher's log-probs at tokens it never drew")
    if settings.sampled and cfg.tail != "student" and not cfg.teacher_model:
        raise UserError(f"--tail {cfg.tail}: a cache with a sampled tail (--tail-samples) has its tail in its draws; "
                        "--tail shapes the tail of a top-k cache only")
    if cfg.batch_size > manifest.records:
        raise UserError(f"--batch-size {cfg.batch_size} is more than the {manifest.records} sequences of {cfg.cache}")
    eval_rows = None
    if cfg.eval_cache is not None:
        verified(cfg.eval_cache, env, cfg.local_cache)
        eval_rows = CacheRows(cfg.eval_cache, cfg.read_ahead, cfg.local_cache)
        held_out = eval_rows.manifest.settings
        for what, theirs, ours in (("tokenizer", held_out.tokenizer_hash, settings.tokenizer_hash),
                                   ("teacher", held_out.teacher_hash, settings.teacher_hash)):
            if theirs != ours:
                raise UserError(f"--eval-cache was dumped from another {what} than --cache ({what}_hash differs): its KL would "
                                "measure the student against the wrong teacher")
    global_batch = cfg.batch_size * cfg.grad_accum * env.world
    run_config = run_settings(cfg, manifest, env, global_batch)
    resume = prepare_output(cfg, output, run_config, env)
    if resume and is_finished(output):
        cfg.console.print(f"the run in {cfg.output} already finished (its student is saved there): nothing to do")
        return {}
    torch.manual_seed(cfg.seed)
    lm, tokenizer = load_causal_lm(cfg.student, "student", torch.float32, attention_implementation())
    check_vocabulary(lm, tokenizer, settings, "student")
    check_packing(lm, cfg.pack, "student")
    rows = lm.get_output_embeddings().weight.shape[0]
    teacher = TeacherSource(settings, cfg.tail, rows, env, cfg.teacher_model, cfg.pack)
    loss_cfg = cfg.loss_config()
    temperature = CurriculumTemperature(cfg.ctkd_t_start, cfg.ctkd_t_end) if loss_cfg.spec.learns_temperature else None
    model = shard_model(LossModel(lm, cfg.loss_chunk, check_head(lm, "student"), temperature), env, cfg.precision,
                        cfg.activation_checkpointing)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * manifest.records / global_batch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = lr_schedule(cfg, optimizer, total_steps)
    schedule = TaidSchedule(cfg.taid_t_start, cfg.taid_t_end, cfg.taid_alpha, cfg.taid_beta, total_steps, not cfg.taid_disable_adaptive)
    step, tokens, elapsed_before = 0, 0, 0.0
    if resume:
        meta = load_newest(output, model, optimizer, scheduler, env, lambda line: cfg.console.print(line) if env.rank == 0 else None)
        schedule.load_state_dict(meta["taid"])
        step, tokens, elapsed_before = meta["step"], meta["tokens"], meta["elapsed_s"]
        if env.rank == 0:
            cfg.console.print(f"resumed from step {step} of {total_steps} ({cfg.output})")
    log = MetricsLog(output, env, step, cfg.report_to, run_config)
    order = StreamOrder(cfg.seed, cfg.shuffle_buffer, True, step * global_batch, None, env.rank, env.world, cfg.batch_size)
    data = micro_batches(CacheStream(CacheRows(cfg.cache, cfg.read_ahead, cfg.local_cache), order, cfg.max_length, cfg.pack),
                         cfg.num_workers)
    model.train()
    start = time.monotonic()
    last: dict[str, Any] = {}
    with step_bar("train-student", cfg.console, cfg.progress and env.rank == 0) as bar:
        task = bar.add_task("train", total=total_steps, completed=step, info="")
        try:
            while step < total_steps:
                micro, counts = step_batches(data, cfg.grad_accum, env)
                denominator = max(counts[0].item(), 1.0)
                reported = torch.zeros((), device=env.device)
                t = schedule.t
                epoch = 1 + step * global_batch // manifest.records  # counted from 1, as ctkd's curriculum counts
                for mb in micro:
                    combined, rep = micro_batch_loss(model, teacher, mb, loss_cfg, t, env, epoch)
                    # FSDP averages gradients over ranks; the world factor turns that into the global-token mean.
                    (combined * (env.world / denominator)).backward()
                    reported += rep / denominator
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                loss_value = all_reduce_sum(reported, env).item()
                if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                    raise UserError(f"step {step + 1}: the loss ({loss_value}) or gradient norm ({grad_norm}) is not finite; "
                                    "stopped without saving this step (lower --lr, or check the student and the cache)")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                if loss_cfg.spec.reads_t:
                    schedule.update(loss_value)
                step += 1
                tokens += int(counts[1].item())
                elapsed = elapsed_before + time.monotonic() - start
                last = {"step": step, "loss": loss_value, "lr": lr, "tokens": tokens, "elapsed_s": elapsed, "grad_norm": grad_norm}
                if temperature is not None:
                    last["temperature"] = model.temperature.value()
                if loss_cfg.spec.reads_t:
                    last["t"] = t  # the t this step trained with
                    # max − min of t over ranks after the update: 0 when every rank holds the same t.
                    spread = all_reduce_max(torch.tensor([schedule.t, -schedule.t], dtype=torch.float64), env)
                    last["t_rank_spread"] = float(spread[0] + spread[1])
                log.write(last)
                if eval_rows is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps):
                    scores = evaluate(model, cfg, eval_rows, env)
                    log.write({"step": step, **scores})
                    log.sync()
                    if env.rank == 0:
                        bar.console.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
                if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                    require_finite(model, env, step)
                    log.sync()
                    save_checkpoint(output, step, model, optimizer, scheduler,
                                    {"settings": run_config, "taid": schedule.state_dict(), "tokens": tokens, "elapsed_s": elapsed}, env,
                                    lambda folder: describe_student(lm, tokenizer, folder))
                bar.update(task, advance=1, info=f"loss {loss_value:.4f}" + (f"  t {t:.3f}" if loss_cfg.spec.reads_t else "")
                           + f"  {tokens / max(elapsed, 1e-9):,.0f} tok/s")
        except KeyboardInterrupt:
            raise Interrupted(interrupted_at(output, step) if env.rank == 0 else "") from None
        finally:
            log.close()
    require_finite(model, env, step)
    save_student(model, tokenizer, output, env)
    if env.rank == 0:
        install_staged(output)
        cfg.console.print(f"trained {step} steps ({cfg.loss}); student saved to {cfg.output}")
    return last


def describe_student(lm, tokenizer, folder: Path) -> None:
    """The student's config, generation config and tokenizer: what makes a checkpoint a model folder."""
    lm.config.save_pretrained(folder)
    lm.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def how_to_continue(output: Store) -> str:
    """After a stop: resume from the newest checkpoint, or, before the first one, start again."""
    saved = checkpoints(output)
    if not saved:
        return "rerun the same command (no checkpoint yet; --save-every N keeps progress)"
    return f"rerun with --resume (it continues from the checkpoint of step {step_of(saved[-1])})"


def interrupted_at(output: Store, step: int) -> str:
    """Ctrl-C or SIGTERM: where the run stopped and how to continue it."""
    return f"interrupted at step {step}: {how_to_continue(output)}"


def require_finite(model, env: Dist, step: int) -> None:
    """Never save NaN or infinite weights: an update can overflow even when its gradient was finite."""
    if not all_finite(model, env):
        raise UserError(f"step {step}: the student's weights are no longer finite (NaN or inf); stopped without saving "
                        "them (lower --lr)")


@user_errors
def main(argv: list[str]) -> None:
    """`torchrun ... -m taid_cache.pipelines.train_student CONFIG.json`: a TrainConfig saved with config.to_json
    (how `make reproduce` starts several ranks)."""
    if len(argv) != 1:
        raise UserError("usage: python -m taid_cache.pipelines.train_student CONFIG.json (a TrainConfig saved with config.to_json)")
    only_our_bars()
    train_student(read_config(TrainConfig, Path(argv[0])))


if __name__ == "__main__":
    import sys

    from ..errors import run_and_exit

    run_and_exit(lambda: main(sys.argv[1:]))
