"""`make reproduce`: data -> tokenizer -> teacher -> cache -> students -> evaluation -> report.

Every stage leaves a finished artefact that the next run reuses (the teacher, the caches, each finished
student, the evaluation), so rerunning after an interruption redoes only what was not finished; the dump and
the student trainings resume from their own checkpoints.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from ..atomic import atomic_path, read_json, remove_temporaries, write_json, write_text
from ..errors import UserError
from ..fingerprints import resolve_model
from ..gguf import convert_gguf, is_gguf_source, locate
from ..config import DumpConfig, GenerateConfig, TrainConfig, check_fields, to_json
from ..engines.base import open_engine
from ..pipelines.dump_teacher import dump_engine, dump_teacher, engine_config, teacher_facts
from ..pipelines.train_student import train_student
from ..onpolicy.rounds import RECIPES, RoundsConfig, distil_on_policy, round_costs
from ..shards.inspect import cache_stats, plot_captured_mass
from .config import METHODS, ReproduceConfig, check_settings, is_rounds, method_cache, runs_of


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def length_filter(tokenizer, cfg: ReproduceConfig) -> Callable[[list[dict]], bool]:
    """The paper's filter: drop conversations whose prompt, response or whole exceed the limits."""

    def keep(messages: list[dict]) -> bool:
        prompt = len(tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True))
        whole = tokenizer.apply_chat_template(messages, tokenize=False)
        n_prompt = len(tokenizer(whole[:prompt], add_special_tokens=False)["input_ids"])
        n_whole = len(tokenizer(whole, add_special_tokens=False)["input_ids"])
        return n_whole <= cfg.max_length and n_prompt <= cfg.max_prompt and n_whole - n_prompt <= cfg.max_response

    return keep


def embedded_data(cfg: ReproduceConfig, data: Path) -> None:
    """Standard-library source split by file: plain text for pre-training, function chat pairs for distillation."""
    from .corpus import chat_pairs, split_of, stdlib_files

    files = stdlib_files()
    texts = {split: [p.read_text(errors="ignore") for p in files if split_of(p) == split] for split in ("train", "heldout")}
    pairs = {split: [c for t in texts[split] for c in chat_pairs(t)] for split in texts}
    rng = random.Random(cfg.seed)
    for split in pairs:
        rng.shuffle(pairs[split])
    write_jsonl(data / "pretrain.jsonl", [{"text": t} for t in texts["train"]])
    write_jsonl(data / "chat-train-raw.jsonl", [{"messages": c} for c in pairs["train"]])
    write_jsonl(data / "chat-heldout-raw.jsonl", [{"messages": c} for c in pairs["heldout"]])


def pretrain_texts(out: Path) -> list[str]:
    return [json.loads(line)["text"] for line in (out / "data" / "pretrain.jsonl").read_text().splitlines()]


def config_data(cfg: ReproduceConfig, data: Path) -> None:
    """A config's chat data (local files or a hub dataset with a `messages` column), unfiltered."""
    from ..inputs import load_rows, resolve_data

    train = load_rows(resolve_data(cfg.train_data), cfg.train_split)
    heldout = load_rows(resolve_data(cfg.heldout_data or cfg.train_data), cfg.heldout_split)
    order = list(range(len(heldout)))
    random.Random(cfg.heldout_seed).shuffle(order)
    write_jsonl(data / "chat-train-raw.jsonl", [{"messages": r["messages"]} for r in train])
    write_jsonl(data / "chat-heldout-raw.jsonl", [{"messages": heldout[i]["messages"]} for i in order])


def filtered(cfg: ReproduceConfig, data: Path, tokenizer) -> tuple[Path, Path]:
    """Filtered chat files: every train pair that fits (at most train_pairs for the embedded default) and the
    first heldout_rows (heldout_pairs) held-out ones that fit."""
    keep = length_filter(tokenizer, cfg)
    limits = {"train": cfg.train_pairs if cfg.builtin_data else None,
              "heldout": cfg.heldout_pairs if cfg.builtin_data else cfg.heldout_rows}
    out = {}
    for split, limit in limits.items():
        path = data / f"chat-{split}.jsonl"
        if not path.exists():
            rows = []
            for line in (data / f"chat-{split}-raw.jsonl").read_text().splitlines():
                messages = json.loads(line)["messages"]
                if keep(messages):
                    rows.append({"messages": messages, "id": f"{split}-{len(rows)}"})
                    if limit is not None and len(rows) >= limit:
                        break
            write_jsonl(path, rows)
        out[split] = path
    return out["train"], out["heldout"]


def build_teacher(cfg: ReproduceConfig, out: Path, console: Console) -> Path:
    """The embedded teacher: a Llama trained from scratch on the pre-training text for a fixed number of steps."""
    from transformers import AutoTokenizer

    from .models import new_llama
    from .pretrain import PretrainConfig, pack_blocks, pretrain

    folder = out / "teacher"
    if (folder / "model.safetensors").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    model = new_llama(cfg.teacher_size, len(tokenizer), tokenizer, seed=cfg.seed)
    blocks = pack_blocks(tokenizer(pretrain_texts(out))["input_ids"], 256)  # one batch call: the fast tokenizer's threads
    losses = pretrain(model, blocks, PretrainConfig(steps=cfg.pretrain_steps, seed=cfg.seed), console=console)
    remove_temporaries(folder)
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "pretrain.json", {"steps": len(losses), "losses": losses})
    return folder


def dump_caches(cfg: ReproduceConfig, teacher: Path, caches: dict[str, tuple[Path, Path, int, int]], console: Console) -> dict[str, Path]:
    """Stage one for every cache (name -> data, output, top-k, draws) with the reproduction's settings, through one
    engine start for all of them; a finished cache (manifest written) is reused, an interrupted one resumes."""
    dumps = {name: dump_config(cfg, teacher, data, output, top_k, tail_samples, console)
             for name, (data, output, top_k, tail_samples) in caches.items()}
    missing = [d for d in dumps.values() if not (Path(d.output) / "manifest.json").exists()]
    if missing:
        folder = resolve_model(str(teacher))
        engine = open_engine(dump_engine(missing[0])[0], engine_config(missing[0], folder, teacher_facts(folder), cfg.max_length))
        try:
            for dump in missing:
                dump_teacher(dump, engine)
        finally:
            engine.close()
    return {name: Path(d.output) for name, d in dumps.items()}


def student_init(cfg: ReproduceConfig, out: Path, teacher: Path, seed: int) -> Path:
    """The student initialisation of one seed, with the teacher's tokenizer: the config's student (embeddings
    resized to the tokenizer; one folder for every seed), or a random Llama of `student_size` initialised from
    the seed (one folder per seed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import new_llama

    folder = out / ("student-init" if cfg.student is not None else f"student-init-seed{seed}")
    if any(folder.glob("model*.safetensors")):
        return folder
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    remove_temporaries(folder)
    with atomic_path(folder) as tmp:
        if cfg.student is None:
            new_llama(cfg.student_size, len(tokenizer), tokenizer, seed=cfg.seed + 1 + seed, out=tmp)
        else:
            model = AutoModelForCausalLM.from_pretrained(cfg.student)
            if model.get_output_embeddings().weight.shape[0] < len(tokenizer):
                model.resize_token_embeddings(len(tokenizer))
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return folder


def shared_train_options(cfg: ReproduceConfig, seed: int, heldout: Path) -> dict[str, Any]:
    """train-student's options every method of the reproduction shares (round-cached ones included)."""
    every = max(1, (cfg.max_steps or 1000) // 4)
    return dict(batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                taid_t_start=cfg.taid_t_start, seed=seed, max_length=cfg.max_length, save_every=every,
                eval_cache=str(heldout), eval_every=every)


def method_config(cfg: ReproduceConfig, method: str, seed: int, run: Path, student: Path, teacher: Path, cache: Path, heldout: Path,
                  console: Console, resume: bool = False) -> TrainConfig:
    """train-student's options for one method of the reproduction."""
    options = dict(METHODS[method])
    online = options.pop("online", False)
    options.pop("cache", None)  # which cache: the caller's choice
    options.pop("rounds", None)  # a round-cached method's loss and parameters, as its rounds train (rounds_config)
    if "on_policy" in options:  # the student's answers as long as the data's (the length filter's response)
        options.setdefault("max_new_tokens", cfg.max_response)
    return TrainConfig(student=str(student), cache=str(cache), output=str(run), max_steps=cfg.max_steps, epochs=cfg.epochs,
                       teacher_model=str(teacher) if online else None, resume=resume, console=console,
                       **shared_train_options(cfg, seed, heldout), **options)


def rounds_config(cfg: ReproduceConfig, method: str, seed: int, run: Path, student: Path, teacher: Path, cache: Path,
                  heldout: Path, prompts: Path, console: Console) -> RoundsConfig:
    """distil-on-policy's settings for a round-cached method: the reproduction's training options and dumps, answers
    as long as the data's responses, and round folders shared by every run (OUT/rounds: a round of the same student
    and settings is generated and dumped once)."""
    return RoundsConfig(
        method=method, student=str(student), teacher=str(teacher), prompts=[str(prompts)], output=str(run),
        max_steps=cfg.max_steps, rounds=cfg.rounds, cache=None if RECIPES[method].share == 1 else str(cache),
        rounds_folder=str(run.parents[2] / "rounds"), console=console,
        generate={"engine": cfg.engine, "max_new_tokens": cfg.max_response, "seed": seed, "max_length": cfg.max_length},
        dump={"engine": cfg.engine, "max_length": cfg.max_length, "seed": cfg.seed, "tensor_parallel_size": cfg.tensor_parallel_size},
        train=shared_train_options(cfg, seed, heldout))


def train_rounds(cfg: ReproduceConfig, method: str, seed: int, out: Path, student: Path, teacher: Path, cache: Path, heldout: Path,
                 prompts: Path, console: Console) -> Path:
    """One round-cached student (distil-on-policy, which resumes itself); a finished one is reused."""
    run = out / "runs" / run_name(method, seed)
    if not any((run / "train").glob("model*.safetensors")):
        distil_on_policy(rounds_config(cfg, method, seed, run, student, teacher, cache, heldout, prompts, console))
    return run / "train"


def train_cache(cfg: ReproduceConfig, method: str, caches: dict[str, Path]) -> Path:
    """The train cache a method reads, of the reproduction's caches."""
    return caches["sampled" if method_cache(cfg, method) == "sampled" else "train"]


def teacher_costs(cfg: ReproduceConfig, runs: dict[str, Path], caches: dict[str, Path]) -> dict[str, dict[str, float]]:
    """What the teacher did for each run: the tokens it scored (online: every trained token; cached: the train
    cache's, paid once for every run that reads it; round-cached: that, where the recipe mixes it, and its rounds'
    caches) and the seconds the rounds' generations and dumps took."""
    from ..shards.manifest import load_manifest
    from ..training.metrics import read_metrics

    tokens = {cache: load_manifest(cache).tokens for cache in caches.values()}
    costs = {}
    for name, run in runs.items():
        method = name.rsplit("/seed-", 1)[0]
        options = METHODS[method]
        off_policy = tokens[train_cache(cfg, method, caches)]
        if options.get("online"):
            costs[name] = {"teacher_tokens": [m for m in read_metrics(run) if "loss" in m][-1]["tokens"], "rounds_s": 0.0}
        elif is_rounds(method):
            rounds = round_costs(run.parent)
            costs[name] = {"teacher_tokens": sum(r["teacher_tokens"] for r in rounds) + (off_policy if RECIPES[method].share < 1 else 0),
                           "rounds_s": sum(r.get("generate_s", 0.0) + r.get("dump_s", 0.0) for r in rounds)}
        else:
            costs[name] = {"teacher_tokens": off_policy, "rounds_s": 0.0}
    return costs


def dump_config(cfg: ReproduceConfig, teacher: Path, data: Path, output: Path, top_k: int, tail_samples: int,
                console: Console) -> DumpConfig:
    """dump-teacher's options for one cache of the reproduction."""
    return DumpConfig(model=str(teacher), data=[str(data)], output=str(output), engine=cfg.engine, top_k=top_k, tail_samples=tail_samples,
                      seed=cfg.seed, tensor_parallel_size=cfg.tensor_parallel_size, max_length=cfg.max_length, console=console)


def check_reproduction(cfg: ReproduceConfig, out: Path, console: Console) -> None:
    """Everything a later stage would refuse, before the first write: the settings, every stage's options (as
    dump-teacher and train-student check them), the local data files and the models."""
    from ..inputs import resolve_data
    from ..pipelines import dump_teacher as dump_stage, generate as generate_stage, train_student as train_stage

    check_settings(cfg, "the reproduction")
    placeholder = out / "check"
    caches = [(cfg.top_k, 0)] + ([(cfg.sampled_top_k, cfg.tail_samples)] if any(method_cache(cfg, m) == "sampled" for m in cfg.methods) else [])
    try:
        for top_k, draws in caches:
            dump_stage.check_options(dump_config(cfg, placeholder, placeholder, placeholder, top_k, draws, console))
        for method in cfg.methods:
            train_stage.check_options(method_config(cfg, method, cfg.seeds[0], placeholder, placeholder, placeholder, placeholder, placeholder, console))
        for method in filter(is_rounds, cfg.methods):
            rounds = rounds_config(cfg, method, cfg.seeds[0], out / "runs" / run_name(method, cfg.seeds[0]), placeholder, placeholder,
                                   placeholder, placeholder, placeholder, console)
            check_fields(rounds)
            generate_stage.check_options(GenerateConfig(student=str(placeholder), data=[str(placeholder)], output=str(placeholder),
                                                        console=console, **rounds.generate))
    except UserError as exc:
        raise UserError(f"the reproduction's settings, as its stages would take them: {exc}") from None
    for data in (cfg.train_data, cfg.heldout_data):
        for value in resolve_data(data or []):
            if Path(value).suffix.lower() in (".jsonl", ".json", ".parquet", ".csv", ".arrow") and not Path(value).is_file():
                raise UserError(f"data file not found: {value}")
    if cfg.teacher is not None:
        locate(cfg.teacher) if is_gguf_source(cfg.teacher) else resolve_model(cfg.teacher, "teacher")
    if cfg.student is not None:
        resolve_model(cfg.student, "student")


def run_name(method: str, seed: int) -> str:
    """A run's key in eval.json and its folder under OUT/runs."""
    return f"{method}/seed-{seed}"


def train_method(cfg: ReproduceConfig, method: str, seed: int, out: Path, student: Path, teacher: Path, cache: Path, heldout: Path,
                 console: Console) -> Path:
    """One student; a finished one is reused, an interrupted one resumes from its checkpoint."""
    run = out / "runs" / run_name(method, seed)
    if (run / "model.safetensors").exists():
        return run
    resume = any((run / "checkpoints").glob("step-*"))
    if run.exists() and not resume:
        shutil.rmtree(run)
    train = method_config(cfg, method, seed, run, student, teacher, cache, heldout, console, resume)
    if cfg.nproc_per_node > 1:  # the ranks read the same config from a file
        config_file = run.parent / f"seed-{seed}.json"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(config_file, to_json(train))
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cfg.nproc_per_node),
                        "-m", "taid_cache.pipelines.train_student", str(config_file)], check=True)
    else:
        train_student(train)
    return run


def evaluate_runs(cfg: ReproduceConfig, out: Path, runs: dict[str, Path], teacher: Path, heldout_file: Path, heldout_cache: Path,
                  console: Console) -> dict[str, dict[str, float]]:
    """eval.json: each run against the real teacher and by generation, and the teacher's own row; the runs
    already in it are kept (a rerun evaluates only the new ones)."""
    from ..evaluation.generation import GenerationSettings
    from ..evaluation.run import EvaluationSettings, evaluate_students
    from ..shards import read_cache

    path = out / "eval.json"
    evaluation = read_json(path) if path.exists() else {}
    missing = {name: folder for name, folder in runs.items() if name not in evaluation}
    if missing or "teacher" not in evaluation:
        rows = [json.loads(line) for line in heldout_file.read_text().splitlines()]
        settings = EvaluationSettings(cfg.generation_prompts, cfg.max_length, GenerationSettings(cfg.max_new_tokens))
        evaluation.update(evaluate_students(missing, rows, lambda: ((r.input_ids, r.loss_mask) for r in read_cache(heldout_cache)),
                                            settings, teacher, progress=lambda name: console.print(f"evaluating {name}"),
                                            teacher_row="teacher" not in evaluation))
        write_json(path, evaluation)
    return evaluation


def run_reproduce(cfg: ReproduceConfig, out: Path, console: Console | None = None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from .report import write_report

    console = console or Console(stderr=True, soft_wrap=True)
    settings = out / "settings.json"
    if settings.exists() and read_json(settings) != json.loads(json.dumps(cfg.to_dict())):
        raise UserError(f"{out} holds a reproduction with other settings; use another OUT")
    # Before the first write: a typo must not leave an OUT that refuses the corrected config.
    check_reproduction(cfg, out, console)
    if not settings.exists():
        shutil.rmtree(out / "data", ignore_errors=True)  # left by a first stage that never finished: of unknown settings
    (out / "data").mkdir(parents=True, exist_ok=True)
    total = 7
    started = time.monotonic()

    def stage(i: int, text: str) -> None:
        console.rule(f"[bold][{i}/{total}] {text}[/]  ({time.monotonic() - started:.0f} s)")

    stage(1, "data")
    if not (out / "data" / "chat-train-raw.jsonl").exists():
        (embedded_data if cfg.builtin_data else config_data)(cfg, out / "data")
    write_json(settings, cfg.to_dict())  # the first stage committed: OUT now belongs to these settings
    stage(2, "tokenizer and teacher")
    if cfg.builds_teacher:
        if not (out / "tokenizer" / "tokenizer.json").exists():
            from .tokenizer import train_tokenizer

            train_tokenizer(pretrain_texts(out), cfg.vocab_size, out / "tokenizer")
        teacher = build_teacher(cfg, out, console)
    elif is_gguf_source(cfg.teacher):
        teacher = out / "teacher"
        if not (teacher / "config.json").exists():
            convert_gguf(cfg.teacher, teacher)
    else:
        teacher = Path(cfg.teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    train_file, heldout_file = filtered(cfg, out / "data", tokenizer)
    stage(3, "dump-teacher: the teacher's top-k (and head + sampled tail) into the caches")
    wanted = {"train": (train_file, out / "cache-train", cfg.top_k, 0), "heldout": (heldout_file, out / "cache-heldout", cfg.top_k, 0)}
    if any(method_cache(cfg, m) == "sampled" for m in cfg.methods):
        wanted["sampled"] = (train_file, out / "cache-train-sampled", cfg.sampled_top_k, cfg.tail_samples)
    caches = dump_caches(cfg, teacher, wanted, console)
    stats, captured = cache_stats(caches["train"])
    plot_captured_mass(captured, stats, out / "cache-mass.png")
    write_json(out / "inspect.json", stats)
    stage(4, "student initialisation")
    students = {seed: student_init(cfg, out, teacher, seed) for seed in cfg.seeds}
    plan = runs_of(cfg)
    stage(5, f"train-student: {len(cfg.methods)} methods, {len(plan)} runs")
    runs = {}
    prompts = out / "data" / "round-prompts.jsonl"
    if any(is_rounds(m) for m in cfg.methods) and not prompts.exists():
        write_text(prompts, "".join(train_file.read_text().splitlines(keepends=True)[:cfg.round_prompts]))
    for i, (method, seed) in enumerate(plan, 1):
        console.print(f"[bold]run {i}/{len(plan)}: {method}, seed {seed}")
        cache = train_cache(cfg, method, caches)
        if is_rounds(method):
            runs[run_name(method, seed)] = train_rounds(cfg, method, seed, out, students[seed], teacher, cache, caches["heldout"],
                                                        prompts, console)
        else:
            runs[run_name(method, seed)] = train_method(cfg, method, seed, out, students[seed], teacher, cache, caches["heldout"], console)
    stage(6, "evaluation against the real teacher and by generation")
    evaluation = evaluate_runs(cfg, out, runs, teacher, heldout_file, caches["heldout"], console)
    stage(7, "report")
    sampled = cache_stats(caches["sampled"])[0] if "sampled" in caches else None
    return write_report(cfg, out, runs, evaluation, stats, sampled, teacher_costs(cfg, runs, caches), console)
