"""Stage two: train a student from a cache (or, for comparison, from a teacher run in-process).

One obvious path: check inputs -> set up ranks, student (FSDP2), optimizer, schedule -> resume if asked ->
per optimizer step: gather the step's micro-batches, count its loss tokens across ranks, forward/backward each
micro-batch (loss = sum over positions / global token count), clip, step, update t from the step's global
loss -> log, evaluate, checkpoint -> save the student with save_pretrained.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..config import LOSS_PARAMETERS, TrainConfig, check_fields, flag, option_defaults, read_config
from ..errors import UserError, first_line, user_errors, write_errors
from ..fingerprints import model_hash, resolve_model
from ..evaluation.generation import GenerationSettings
from ..heads import check_head
from ..losses import TaidSchedule
from ..onpolicy.online import OnPolicyBatches
from ..onpolicy.sampler import OnPolicySampler, SamplerConfig
from ..progress import only_our_bars
from ..settings import describe_differences
from ..shards.contract import CacheSettings, Manifest
from ..shards.manifest import load_manifest
from ..shards.reader import read_cache
from ..shards.verify import verify_cache
from ..storage import Store, open_store, remote_errors
from ..training.policy import DistillationPolicy, check_opd_sampling, check_parameters, check_serves, total_steps
from ..training.trainer import Progress, Trainer
from ..training.checkpoint import CheckpointManager, checkpoints, readable_meta, remove_interrupted_saves, step_of
from ..training.data import (CacheMixture, CacheRows, CacheStream, MixSchedule, StreamOrder, check_mixable, joins,
                             micro_batches, weights_or_default)
from ..training.distributed import Dist, broadcast_object, close_distributed, init_distributed
from ..training.metrics import MetricsLog, check_report_to
from ..training.optim import lr_schedule
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
    if cfg.stop_at_step is not None and (cfg.max_steps is None or cfg.stop_at_step > cfg.max_steps):
        raise UserError(f"--stop-at-step {cfg.stop_at_step} needs --max-steps of at least that: a run stopped part-way "
                        "keeps the schedule's length fixed")
    if not cfg.taid_t_start < cfg.taid_t_end:
        raise UserError(f"--taid-t-start ({cfg.taid_t_start}) must be below --taid-t-end ({cfg.taid_t_end})")
    if cfg.eval_every and cfg.eval_cache is None:
        raise UserError("--eval-every needs --eval-cache (the held-out cache to evaluate on)")
    check_report_to(cfg.report_to, cfg.output)
    check_on_policy_options(cfg)
    if cfg.mix_weights and not cfg.mix:
        raise UserError("--mix-weights weighs --cache against the --mix caches, and no --mix is given")
    if cfg.mix_weights and len(cfg.mix_weights) != 1 + len(cfg.mix):
        raise UserError(f"--mix-weights: {len(cfg.mix_weights)} weights for {1 + len(cfg.mix)} caches (--cache, then each "
                        "--mix): give one per cache, or none for weights by their sequences")
    for location in (*train_caches(cfg), cfg.eval_cache, cfg.output):
        if location is not None:
            open_store(location)  # an unknown scheme, or one whose package is missing, in one line


def train_caches(cfg: TrainConfig) -> list[str]:
    """The caches a run trains on: --cache, then each --mix."""
    return [cfg.cache, *cfg.mix]


def mix_weights(cfg: TrainConfig, manifests: list[Manifest]) -> list[float]:
    """Each train cache's share: --mix-weights, or by the caches' sequences."""
    return weights_or_default(cfg.mix_weights, manifests)


def check_on_policy_options(cfg: TrainConfig) -> None:
    """The on-policy options: each needs --on-policy, which needs an online teacher to score the answers."""
    if cfg.on_policy is None:
        for name, default in ON_POLICY_OPTIONS.items():
            if getattr(cfg, name) != default:
                raise UserError(f"{flag(name)} {getattr(cfg, name)}: it is an option of --on-policy (not given)")
        return
    if not cfg.teacher_model:
        raise UserError(f"--on-policy {cfg.on_policy} needs --teacher-model: the teacher scores the student's answers as "
                        "they are written (for on-policy data through a cache, run taid-cache distil-on-policy)")
    if cfg.on_policy == "adaptive" and cfg.eval_cache is None:
        raise UserError("--on-policy adaptive needs --eval-cache: its threshold moves with the held-out loss")
    if cfg.loss == "opd":
        temperature = generation_temperature(cfg)
        check_opd_sampling(temperature, cfg.generation_top_p,
                           f"--generation-temperature {temperature:g} --generation-top-p {cfg.generation_top_p:g}")


# The on-policy options and their defaults: set without --on-policy, they would do nothing.
ON_POLICY_OPTIONS = {name: TrainConfig.__dataclass_fields__[name].default for name in (
    "mixed_alpha", "adaptive_threshold", "adaptive_eps", "replay_ratio", "replay_capacity", "max_new_tokens",
    "generation_temperature", "generation_top_p")}


def generation_temperature(cfg: TrainConfig) -> float:
    """The student's sampling temperature: as given, else 1 for opd (its recipe) and greedy (the original's) otherwise."""
    if cfg.generation_temperature is not None:
        return cfg.generation_temperature
    return 1.0 if cfg.loss == "opd" else 0.0


def check_loss_parameters(cfg: TrainConfig) -> None:
    """The replaced --beta / --mu, and a loss parameter set for a loss that does not read it, in one line each."""
    if cfg.beta is not None:
        raise UserError("--beta is replaced by --skew-beta (skew-fkl, skew-rkl) and --js-beta (js)")
    if cfg.mu is not None:
        raise UserError("--mu is replaced by --adaptive-mu (adaptive-kl)")
    check_parameters(cfg.loss, {name: getattr(cfg, name) for name in LOSS_PARAMETERS}, flag)


def verified(cache: str, env: Dist, local_dir: str | None) -> Manifest:
    """The cache's manifest, checked in full once per run by rank 0; the other ranks wait for its verdict."""
    error = manifest = None
    if env.rank == 0:
        try:
            manifest = verify_cache(cache, local_dir)
        except UserError as exc:
            error = str(exc)
        except Exception as exc:  # an unreadable file: the other ranks must hear of it, not wait
            error = f"cannot verify {cache}: {first_line(exc)}"
    error = broadcast_object(error, env)
    if error is not None:
        raise UserError(error)
    return manifest or load_manifest(cache)


def check_loss_tokens(cache: str, max_length: int) -> None:
    """Refuse a cache with no training target within --max-length: the run would train on nothing."""
    for record in read_cache(cache):
        if record.loss_mask[1:max_length].any():
            return
    raise UserError(f"no training targets: no sequence of {cache} has a loss-mask token within its first {max_length} "
                    "tokens (chat rows without assistant turns, or --max-length too short)")


def run_settings(cfg: TrainConfig, manifests: list[Manifest], env: Dist, global_batch: int) -> dict[str, Any]:
    """What a resumed run must share with the run it continues (the mixed caches' identities only when there are
    some: a run of one cache keeps the settings it always had)."""
    manifest, mixed = manifests[0], manifests[1:]
    return {**cfg.settings(), "cache_identity": manifest.identity, **({"mix_identities": [m.identity for m in mixed]} if mixed else {}),
            "student_hash": model_hash(resolve_model(cfg.student)),
            "teacher_model_hash": model_hash(resolve_model(cfg.teacher_model)) if cfg.teacher_model else None,
            "world_size": env.world, "global_batch": global_batch}


def without_grown_mix(then: dict[str, Any], now: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A resumed run may add caches after the ones it trained on, with new weights (how distil-on-policy's rounds
    grow the mixture, the optimizer, schedules and TAID's t carried on); the caches it trained on, and every
    other setting, stay. The new weights hold from the resumed step on (the checkpoint's `MixSchedule` keeps the
    steps before it as they were drawn), and the stream is a function of the step, so a kill inside a round
    resumes it exactly."""
    before, after = then.get("mix_identities", []), now.get("mix_identities", [])
    if joins(before, after):
        mix = ("mix_identities", "mix_weights")
        return {k: v for k, v in then.items() if k not in mix}, {k: v for k, v in now.items() if k not in mix}
    return then, now


def prepare_output(cfg: TrainConfig, output: Store, settings: dict[str, Any], env: Dist) -> bool:
    """Check the run folder before anything is written; True when the run resumes from a checkpoint."""
    if cfg.resume:
        meta = readable_meta(output)
        if meta is None:
            raise UserError(f"--resume: no checkpoint in {output.where('checkpoints')}")
        # An option the run's release did not have ran at its default (how options are added), so it is taken as
        # that: a run checkpointed before an upgrade resumes after it.
        then = {**{k: v for k, v in option_defaults(TrainConfig).items() if k in settings}, **meta["settings"]}
        then, now = without_grown_mix(then, settings)
        diff = describe_differences(then, now, "then", "now")
        if diff:
            raise UserError(f"--resume with changed settings: {diff}")
        return True
    cleared = clear_unrecoverable(output, bool(checkpoints(output))) if env.rank == 0 else None
    if not broadcast_object(cleared, env):
        raise refuse_non_empty(output)
    return False


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
    # A missing or unreachable cache is one line before any write, and so are caches that cannot train.
    manifests = [load_manifest(location) for location in train_caches(cfg)]
    check_trainable(cfg, manifests)
    if not cfg.teacher_model:  # what the cache's teacher serves (opd's target log-probs, a sampled tail's losses)
        check_serves(manifests[0].settings, cfg.loss, cfg.tail)
    if cfg.on_policy is not None:
        for location, manifest in zip(train_caches(cfg), manifests):
            check_prompts(cfg, location, manifest.settings, env)
    if cfg.eval_cache is not None:
        load_manifest(cfg.eval_cache)
    output = open_store(cfg.output)
    with remote_errors(output.url, "--output"):
        output.check_writable("--output")
    with run_lock(output, env), write_errors(cfg.output, lambda: how_to_continue(output)):
        return run_locked(cfg, output, env)


def check_trainable(cfg: TrainConfig, manifests: list[Manifest]) -> None:
    """Each train cache holds sequences and training targets within --max-length, together a --batch-size of
    sequences; several mix (one teacher, tokenizer and head: `check_mixable`)."""
    caches = train_caches(cfg)
    for location, manifest in zip(caches, manifests):
        if manifest.records == 0:
            raise UserError(f"the cache {location} holds no sequences")
        check_loss_tokens(location, cfg.max_length)
    records = sum(m.records for m in manifests)
    if cfg.batch_size > records:
        raise UserError(f"--batch-size {cfg.batch_size} is more than the {records} sequences of {' and '.join(caches)}")
    if cfg.mix:
        check_mixable(manifests, caches, mix_weights(cfg, manifests))


def run_locked(cfg: TrainConfig, output: Store, env: Dist) -> dict[str, Any]:
    if broadcast_object(install_staged(output) if env.rank == 0 else None, env):
        cfg.console.print(f"finished installing the student an interrupted run had saved in {cfg.output}")
    if env.rank == 0:
        remove_interrupted_saves(output)
    manifests = [verified(location, env, cfg.local_cache) for location in train_caches(cfg)]
    settings = manifests[0].settings  # the mixed caches agree on the teacher and head
    records = sum(m.records for m in manifests)
    eval_rows = held_out_rows(cfg, settings, env)
    global_batch = cfg.batch_size * cfg.grad_accum * env.world
    run_config = run_settings(cfg, manifests, env, global_batch)
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
    temperature = loss_cfg.loss.learned_temperature() if loss_cfg.spec.learns_temperature else None
    model = shard_model(LossModel(lm, cfg.loss_chunk, check_head(lm, "student"), temperature), env, cfg.precision,
                        cfg.activation_checkpointing)
    steps = total_steps(cfg.max_steps, cfg.epochs, records, global_batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = lr_schedule(cfg, optimizer, steps)
    schedule = TaidSchedule(cfg.taid_t_start, cfg.taid_t_end, cfg.taid_alpha, cfg.taid_beta, steps, not cfg.taid_disable_adaptive)
    policy = DistillationPolicy(loss_cfg, schedule, records, global_batch)
    progress = Progress()
    sampler = on_policy_sampler(cfg)
    mixture = MixSchedule.of(mix_weights(cfg, manifests))
    states = {"taid": policy, "mixture": mixture, **({"on_policy": sampler} if sampler is not None else {})}
    checkpoints = CheckpointManager(output, progress, states, run_config, lambda folder: describe_student(lm, tokenizer, folder),
                                    added_since=frozenset({"mixture"}))
    if resume:
        checkpoints.restore(model, optimizer, scheduler, env, lambda line: cfg.console.print(line) if env.rank == 0 else None)
        mixture.grow(progress.step * global_batch, mix_weights(cfg, manifests))  # caches joined: their weights from here on
        if env.rank == 0:
            cfg.console.print(f"resumed from step {progress.step} of {steps} ({cfg.output})")
    log = MetricsLog(output, env, progress.step, cfg.report_to, run_config)
    order = StreamOrder(cfg.seed, cfg.shuffle_buffer, True, progress.step * global_batch, None, env.rank, env.world, cfg.batch_size)
    sources = [CacheRows(location, cfg.read_ahead, cfg.local_cache, m) for location, m in zip(train_caches(cfg), manifests)]
    rows = CacheMixture(sources, mixture) if cfg.mix else sources[0]
    data = micro_batches(CacheStream(rows, order, cfg.max_length, cfg.pack), cfg.num_workers)
    on_policy = None
    if sampler is not None:
        temperature = generation_temperature(cfg)
        generation = GenerationSettings(cfg.max_new_tokens, cfg.batch_size, temperature > 0, temperature or 1.0, cfg.seed,
                                        cfg.generation_top_p)
        data = on_policy = OnPolicyBatches(data, sampler, model, tokenizer, generation, settings, cfg.max_length, cfg.pack, env)
    if sampler is not None and sampler.adaptive and not cfg.eval_every:
        # The original validates twice an epoch (--val_check_interval 0.5), and the threshold moves only then; a
        # copy of the config, so the caller's is left as given.
        cfg = replace(cfg, eval_every=max(1, math.ceil(records / global_batch / 2)))
    model.train()
    trainer = Trainer(cfg, env, model, optimizer, scheduler, policy, teacher, data, eval_rows, steps, checkpoints, progress, log,
                      lambda step: interrupted_at(output, step), on_policy)
    last = trainer.fit()
    if progress.step < steps:  # --stop-at-step: the checkpoint there is what --resume continues from
        if env.rank == 0:
            cfg.console.print(f"trained to step {progress.step} of {steps} ({cfg.loss}); checkpoint saved in {cfg.output}, "
                              "--resume continues")
        return last
    save_student(model, tokenizer, output, env)
    if env.rank == 0:
        install_staged(output)
        cfg.console.print(f"trained {progress.step} steps ({cfg.loss}); student saved to {cfg.output}")
    return last


def check_prompts(cfg: TrainConfig, location: str, settings: CacheSettings, env: Dist) -> None:
    """On-policy answers need prompts: chat rows (rendered by a chat template) or tokens rows with a loss mask; and
    the buffer must hold a global micro-batch to draw one."""
    if settings.input_kind == "text":
        raise UserError(f"--on-policy: {location} holds text rows, which have no prompts to answer (dump chat rows, or "
                        "tokens rows whose loss mask marks the answers)")
    if cfg.on_policy != "fresh" and cfg.replay_capacity < cfg.batch_size * env.world:
        raise UserError(f"--replay-capacity {cfg.replay_capacity} is below a global micro-batch ({cfg.batch_size * env.world} "
                        "sequences): the buffer could not give one")


def on_policy_sampler(cfg: TrainConfig) -> OnPolicySampler | None:
    if cfg.on_policy is None:
        return None
    return OnPolicySampler(SamplerConfig(cfg.on_policy, cfg.mixed_alpha, cfg.adaptive_threshold, cfg.adaptive_eps,
                                         cfg.replay_ratio, cfg.replay_capacity), cfg.seed)


def held_out_rows(cfg: TrainConfig, settings: CacheSettings, env: Dist) -> CacheRows | None:
    """--eval-cache, verified, and of the same teacher and tokenizer as --cache (its KL is to that teacher)."""
    if cfg.eval_cache is None:
        return None
    rows = CacheRows(cfg.eval_cache, cfg.read_ahead, cfg.local_cache, verified(cfg.eval_cache, env, cfg.local_cache))
    held_out = rows.manifest.settings
    for what, theirs, ours in (("tokenizer", held_out.tokenizer_hash, settings.tokenizer_hash),
                               ("teacher", held_out.teacher_hash, settings.teacher_hash)):
        if theirs != ours:
            raise UserError(f"--eval-cache was dumped from another {what} than --cache ({what}_hash differs): its KL would "
                            "measure the student against the wrong teacher")
    return rows


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
