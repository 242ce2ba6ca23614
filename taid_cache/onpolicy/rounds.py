"""`taid-cache distil-on-policy`: on-policy distillation through the cache, in rounds, the teacher paid once per
round instead of at every step.

Round r: the current student answers the prompts (`generate`); the teacher scores those rows once
(`dump_teacher`, one engine start for every round); one training run, resumed round after round, trains to step
(r + 1) · max_steps / rounds on the off-policy cache mixed with every round's cache so far (`train_student` with
`mix` and `stop_at_step`), so the optimizer, the learning-rate and TAID schedules and t carry across rounds; the
checkpoint at the round's end, as a model folder, is the next round's student. Every stage resumes, so a rerun
after a kill anywhere continues where it stopped and ends with the same student.

A round's generation and cache live in a folder named by what made them (the student's and the teacher's hashes,
the prompts' fingerprint, the generation and dump settings; no paths): every run whose round starts from the
same student reuses it (round 0 of every method that shares the initial student and settings)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Optional

from rich.console import Console

from ..config import (
    DumpConfig, GenerateConfig, TrainConfig, check_fields, checked_options, listed, option, options_of, read_yaml,
    stderr_console, to_json,
)
from ..engines.base import Engine, open_engine
from ..atomic import read_json, write_json
from ..errors import UserError
from ..fingerprints import model_hash, resolve_model
from ..inputs import dataset_fingerprint, load_rows, resolve_data
from ..pipelines import dump_teacher as dump_stage, generate as generate_stage, train_student as train_stage
from ..settings import describe_differences
from ..shards.manifest import load_manifest
from ..storage import open_store
from ..training.checkpoint import checkpoint_to_hf, checkpoints, step_of
from ..training.data import MIX_AGREE
from ..training.policy import check_opd_sampling, check_serves
from ..training.run_folder import is_finished

METHODS = ("gkd", "distillm", "opd")
RECORD = "rounds.json"  # in OUTPUT: the run's settings, which a rerun must share
USED = "round-caches.json"  # in OUTPUT: each round's cache, in order
COST = "cost.json"  # in a round's folder: the seconds its generation and dump took (the calls that finished them)


@dataclass(frozen=True)
class Method:
    """A method's recipe as rounds: its loss and the loss's parameters, how the student answers, and the share of
    each step's sequences that are the rounds' answers (the rest are the off-policy cache's)."""

    loss: str
    parameters: dict[str, float]
    temperature: float
    share: float


# The original's scripts: GKD is js with β 0.1 on mixed batches (mixed_alpha 0.5), DistiLLM skew-fkl with β 0.1
# (its adaptive share, moved by the held-out loss, is a fixed half here: a round's data is fixed when it is
# dumped), both answering greedily; opd samples at temperature 1 and trains on the student's answers only.
RECIPES = {
    "gkd": Method("js", {"js_beta": 0.1}, 0.0, 0.5),
    "distillm": Method("skew-fkl", {"skew_beta": 0.1}, 0.0, 0.5),
    "opd": Method("opd", {}, 1.0, 1.0),
}

# What the rounds set in each stage's options: a section naming one is refused.
SET_BY_ROUNDS = {
    "generate": ("student", "data", "output"),
    "dump": ("model", "data", "output"),
    "train": ("student", "cache", "mix", "mix_weights", "output", "max_steps", "epochs", "stop_at_step", "resume",
              "teacher_model", "on_policy"),
}
# A dump's options that must match the off-policy cache's for the caches to mix: taken from it unless given.
MIXED_DUMP_SETTINGS = ("top_k", "top_p", "tail_samples", "target_logprobs", "precision")


@dataclass
class RoundsConfig:
    """`taid-cache distil-on-policy`: on-policy distillation in rounds through the cache (a YAML file)."""

    method: str = option(help="The on-policy recipe: gkd (js), distillm (skew-fkl) or opd (per-token reverse KL on sampled "
                         "answers).", choices=METHODS)
    student: str = option(help="The student's initialisation: a model folder with a chat template.")
    teacher: str = option(help="The teacher: a model folder (of the off-policy cache's teacher).")
    prompts: list[str] = option(help="Prompts the student answers each round: chat rows, as `generate --data` takes them.")
    output: str = option(help="Run folder (local): train/ (the training run), students/ (each round's student).")
    max_steps: int = option(help="Optimizer steps over all rounds.", within="[1, inf)")
    rounds: int = option(4, "Rounds: the student answers afresh at the start of each.", within="[1, 1000]")
    cache: Optional[str] = option(None, "The off-policy cache (dump-teacher's, of --teacher) mixed with the rounds' "
                                  "caches; needless when the on-policy share is 1.")
    on_policy_share: Optional[float] = option(None, "The share of each step's sequences drawn from the rounds' caches "
                                              "(spread over the rounds so far by their sequences) [default: the method's: "
                                              "gkd and distillm 0.5, opd 1].", within="(0, 1]")
    rounds_folder: Optional[str] = option(None, "Where the rounds' generations and caches are kept, one folder per "
                                          "student and settings (share it between runs to reuse them) [default: "
                                          "OUTPUT/rounds].")
    generate: dict[str, Any] = field(default_factory=dict)  # `taid-cache generate` options, but student, data, output
    dump: dict[str, Any] = field(default_factory=dict)  # `dump-teacher` options, but model, data, output
    train: dict[str, Any] = field(default_factory=dict)  # `train-student` options, but what the rounds set
    console: Console = field(default_factory=stderr_console)

    @property
    def recipe(self) -> Method:
        return RECIPES[self.method]

    @property
    def share(self) -> float:
        return self.recipe.share if self.on_policy_share is None else self.on_policy_share

    def round_end(self, r: int) -> int:
        """The step round r trains to."""
        return (r + 1) * self.max_steps // self.rounds


def check_sections(cfg: RoundsConfig, where: str = "") -> None:
    """Refuse a stage's option the rounds set themselves (from a file, whose name `where` gives, or a Python caller)."""
    for name in SET_BY_ROUNDS:
        taken = sorted(set(getattr(cfg, name)) & set(SET_BY_ROUNDS[name]))
        if taken:
            raise UserError(f"{where}{name}: {listed(taken)} {'is' if len(taken) == 1 else 'are'} set by the rounds")


def read_rounds_config(path: Path) -> RoundsConfig:
    """A rounds config file: its own options, then its generate / dump / train sections, each checked against that
    command's options; every mistake in one line naming the file, before anything is loaded or written."""
    values = read_yaml(path)
    where = f"config {path}"
    if not isinstance(values, dict):
        raise UserError(f"{where} must be a mapping of options, not {type(values).__name__}")
    sections = {}
    for name, config in (("generate", GenerateConfig), ("dump", DumpConfig), ("train", TrainConfig)):
        section = values.pop(name, None) or {}
        sections[name] = checked_options(config, section, f"{where}: {name}", hf=config is TrainConfig)
    options = checked_options(RoundsConfig, values, where)
    missing = [f.name for f in options_of(RoundsConfig)
               if f.default is MISSING and f.default_factory is MISSING and f.name not in options]
    if missing:
        raise UserError(f"{where}: missing {listed(missing)}")
    cfg = RoundsConfig(**options, **sections)
    check_fields(cfg)
    check_sections(cfg, f"{where}: ")
    return cfg


# Options that say where things are or how a run shows itself, not what a round holds: its models and prompts
# enter a round's key and a run's record by their hashes instead, so a moved teacher, prompt file or run folder,
# or --no-progress, finds the rounds already made.
NOT_CONTENT = ("student", "model", "data", "output", "progress")


def contents(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in NOT_CONTENT}


def round_key(made_of: dict[str, Any], student_hash: str, generate: GenerateConfig, dump: DumpConfig) -> str:
    """A round's folder name: what made its generation and cache (`made_of`: the teacher and the prompts, by hash),
    whatever their paths."""

    made_of = {**made_of, "student_hash": student_hash, "generate": contents(to_json(generate)), "dump": contents(to_json(dump))}
    return hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:16]


class Rounds:
    """One distil-on-policy run: its stages' settings, checked before anything is written, and the teacher's
    engine, opened at the first dump and kept open for every round's."""

    def __init__(self, cfg: RoundsConfig, progress: bool = True) -> None:
        self.cfg, self.progress = cfg, progress
        self.engine: Engine | None = None
        self.output = Path(cfg.output)
        self.folder = Path(cfg.rounds_folder) if cfg.rounds_folder else self.output / "rounds"
        check_sections(cfg)
        if cfg.rounds > cfg.max_steps:
            raise UserError(f"rounds {cfg.rounds} is more than max_steps {cfg.max_steps}: every round trains at least one step")
        if cfg.share < 1 and cfg.cache is None:
            raise UserError(f"{cfg.method} mixes the rounds' answers ({cfg.share:g} of each step) with an off-policy cache: "
                            "give cache (dump-teacher's, of the teacher), or on_policy_share 1")
        if cfg.share == 1 and cfg.cache is not None:
            raise UserError(f"on-policy share 1 trains on the rounds' answers alone: cache {cfg.cache} would not be read; drop it")
        self.off_policy = load_manifest(cfg.cache) if cfg.cache else None
        self.teacher_hash = model_hash(resolve_model(cfg.teacher))
        if self.off_policy is not None and self.off_policy.settings.teacher_hash != self.teacher_hash:
            raise UserError(f"cache {cfg.cache} was dumped from another teacher than {cfg.teacher} (teacher_hash differs): "
                            "the rounds' caches could not be mixed with it")
        self.dump_options = self.dump_defaults()
        self.check_stages()
        self.made_of = {"teacher_hash": self.teacher_hash, "prompts": self.prompts_fingerprint()}

    def dump_defaults(self) -> dict[str, Any]:
        """The dump section, with what the caches must share for mixing taken from the off-policy cache (one given
        that differs is refused here, in one line), and opd's target log-probs."""
        options = dict(self.cfg.dump)
        if self.off_policy is not None:
            settings = self.off_policy.settings
            for name in MIXED_DUMP_SETTINGS:
                if name in MIX_AGREE and name in options and options[name] != getattr(settings, name):
                    raise UserError(f"dump: {name} {options[name]}: the rounds' caches are mixed with cache {self.cfg.cache}, "
                                    f"dumped with {name} {getattr(settings, name)}; drop it (it is taken from the cache), or "
                                    f"dump the cache again with {name} {options[name]}")
                options.setdefault(name, getattr(settings, name))
        if self.train_options()["loss"] == "opd":  # it reads the realized token's log-prob only: no draws to pay for
            options.setdefault("target_logprobs", True)
            options.setdefault("tail_samples", 0)
        options.setdefault("progress", self.progress)
        return options

    def train_options(self) -> dict[str, Any]:
        """The train section over the method's loss and parameters (a loss given replaces the method's)."""
        recipe = self.cfg.recipe
        method = {"loss": recipe.loss, **recipe.parameters} if "loss" not in self.cfg.train else {}
        return {**method, "progress": self.progress, **self.cfg.train}

    def generate_config(self, student: str, output: Path) -> GenerateConfig:
        options = {"temperature": self.cfg.recipe.temperature, "progress": self.progress, **self.cfg.generate}
        return GenerateConfig(student=student, data=list(self.cfg.prompts), output=str(output), console=self.cfg.console, **options)

    def dump_config(self, folder: Path) -> DumpConfig:
        return DumpConfig(model=self.cfg.teacher, data=[str(folder / "generation")], output=str(folder / "cache"),
                          console=self.cfg.console, **self.dump_options)

    def train_config(self, r: int, caches: list[str]) -> TrainConfig:
        """Round r's training: the one run, resumed, to the round's end, on the off-policy cache and the rounds'."""

        share = self.cfg.share
        records = [load_manifest(c).records for c in caches]
        weights = [share * n / sum(records) for n in records]
        if share < 1:
            caches, weights = [self.cfg.cache, *caches], [1 - share, *weights]
        run = self.output / "train"
        return TrainConfig(student=self.cfg.student, cache=caches[0], mix=caches[1:], mix_weights=weights if len(caches) > 1 else [],
                           output=str(run), max_steps=self.cfg.max_steps, stop_at_step=self.cfg.round_end(r),
                           resume=run.is_dir() and bool(checkpoints(open_store(str(run)))), console=self.cfg.console,
                           **self.train_options())

    def check_stages(self) -> None:
        """Each stage's own checks of its options, on round 0's configs: a typo fails before any write."""

        generation = self.generate_config(self.cfg.student, self.folder / "check")
        generate_stage.check_options(generation)
        dump = self.dump_config(self.folder / "check")
        dump_stage.check_options(dump)
        cfg = TrainConfig(student=self.cfg.student, cache=self.cfg.cache or str(self.folder / "check"), output=str(self.output / "train"),
                          max_steps=self.cfg.max_steps, stop_at_step=self.cfg.round_end(0), console=self.cfg.console,
                          **self.train_options())
        train_stage.check_options(cfg)
        if cfg.on_policy is not None or cfg.teacher_model is not None:
            raise UserError("the rounds train from the teacher's caches: their train section takes no teacher_model or on_policy")
        # What the training will read: the off-policy cache's settings, which the rounds' dumps share, or (alone)
        # those of the rounds' dumps, checked before the first round pays for them.
        check_serves(self.off_policy.settings if self.off_policy is not None else dump, cfg.loss, cfg.tail)
        if cfg.loss == "opd":
            check_opd_sampling(generation.temperature, generation.top_p,
                               f"generate: temperature {generation.temperature:g}, top_p {generation.top_p:g}")

    def prompts_fingerprint(self) -> str:
        """The prompts by what they hold (as a generation records them), not where they are."""
        generation = self.generate_config(self.cfg.student, Path())
        data = resolve_data(generation.data)
        return dataset_fingerprint(data, load_rows(data, generation.split))

    def settings(self) -> dict[str, Any]:
        """What a rerun must share with the run it continues (RECORD): the method, models, data and every stage's
        options; the models and the off-policy cache by what they hold."""
        cfg = self.cfg
        return {"method": cfg.method, "student_hash": model_hash(resolve_model(cfg.student)), **self.made_of,
                "cache_identity": self.off_policy.identity if self.off_policy else None,
                "rounds": cfg.rounds, "max_steps": cfg.max_steps, "on_policy_share": cfg.share,
                "generate": contents(to_json(self.generate_config(cfg.student, Path()))),
                "dump": contents(self.dump_options), "train": contents(self.train_options())}

    def check_record(self) -> None:
        """A rerun continues the run in OUTPUT only with its settings (a changed generation setting would start
        other rounds under a training run that is part-way): refused in one line before any write. The first run
        writes them."""
        record, settings = self.output / RECORD, json.loads(json.dumps(self.settings()))
        if record.is_file():
            diff = describe_differences(json.loads(record.read_text()), settings, "then", "now")
            if diff:
                raise UserError(f"{self.output} holds a distil-on-policy run of other settings: {diff}; rerun with its "
                                "settings to resume it, or give another output")
            return
        if self.output.exists() and any(self.output.iterdir()):
            raise UserError(f"{self.output} is not empty and holds no distil-on-policy run ({RECORD}): give a new output")
        self.output.mkdir(parents=True, exist_ok=True)
        write_json(record, settings)

    def run(self) -> dict[str, Any]:
        self.check_record()
        student, caches, last = self.cfg.student, [], {}
        try:
            for r in range(self.cfg.rounds):
                caches.append(self.round_cache(r, student))
                if self.trained_to() < self.cfg.round_end(r):  # a rerun skips the rounds the run trained past
                    last = train_stage.train_student(self.train_config(r, caches))
                if r + 1 < self.cfg.rounds:
                    student = self.student_after(r)
        finally:
            if self.engine is not None:
                self.engine.close()
        write_json(self.output / USED, caches)
        self.cfg.console.print(f"distil-on-policy: {self.cfg.rounds} rounds of {self.cfg.method}; student saved to "
                               f"{self.output / 'train'}")
        return {"rounds": self.cfg.rounds, "caches": caches, "student": str(self.output / "train"), "last": last}

    def trained_to(self) -> int:
        """The step the training run has reached: its newest checkpoint's, or the last when it finished."""
        run = open_store(str(self.output / "train"))
        if is_finished(run):
            return self.cfg.max_steps
        saved = checkpoints(run) if (self.output / "train").is_dir() else []
        return step_of(saved[-1]) if saved else 0

    def round_cache(self, r: int, student: str) -> str:
        """Round r's cache of `student`'s answers: generated and dumped, or found where an earlier run (or this
        one, before a kill) left it; its lineage must be that student."""

        student_hash = model_hash(resolve_model(student))
        folder = self.folder / round_key(self.made_of, student_hash, self.generate_config(student, Path()), self.dump_config(Path()))
        self.cfg.console.print(f"round {r + 1} of {self.cfg.rounds}: {student} answers the prompts ({folder})")
        started = time.monotonic()
        if not generate_stage.generate(self.generate_config(student, folder / "generation"))["nothing_to_do"]:
            add_cost(folder, "generate_s", time.monotonic() - started)
        dump = self.dump_config(folder)
        if not (folder / "cache" / "manifest.json").is_file():
            started = time.monotonic()
            dump_stage.dump_teacher(dump, self.open_engine(dump))
            add_cost(folder, "dump_s", time.monotonic() - started)
        lineage = load_manifest(dump.output).settings.lineage
        if lineage.kind != "student" or lineage.fingerprint != student_hash:
            raise UserError(f"the round cache {dump.output} holds the answers of {lineage.kind} {lineage.name} "
                            f"({lineage.fingerprint[:12]}), not of the round's student {student} ({student_hash[:12]})")
        return dump.output

    def open_engine(self, dump: DumpConfig) -> Engine:
        """The teacher's engine, opened once for every round's dump (the same settings each time)."""
        if self.engine is None:
            folder = resolve_model(dump.model)
            facts = dump_stage.teacher_facts(folder)
            self.engine = open_engine(dump_stage.dump_engine(dump)[0], dump_stage.engine_config(dump, folder, facts, dump.max_length or facts.context or 2048))
        return self.engine

    def student_after(self, r: int) -> str:
        """The checkpoint at round r's end as a model folder: the next round's student."""

        out = self.output / "students" / f"after-round-{r + 1}"
        if not out.is_dir():
            checkpoint_to_hf(self.output / "train" / "checkpoints" / f"step-{self.cfg.round_end(r):08d}", out)
        return str(out)


def add_cost(folder: Path, stage: str, seconds: float) -> None:
    """Add a stage's seconds to the round folder's COST (what each run that reuses the round did not pay again)."""
    path = folder / COST
    cost = read_json(path) if path.is_file() else {}
    write_json(path, {**cost, stage: cost.get(stage, 0.0) + seconds})


def round_costs(output: Path) -> list[dict[str, Any]]:
    """A finished run's rounds: each round's cache, its teacher tokens and the seconds its stages took."""
    rounds = []
    for cache in read_json(output / USED):
        cost_file = Path(cache).parent / COST
        rounds.append({"cache": cache, "teacher_tokens": load_manifest(cache).tokens,
                       **(read_json(cost_file) if cost_file.is_file() else {})})
    return rounds


def distil_on_policy(cfg: RoundsConfig, progress: bool = True) -> dict[str, Any]:
    return Rounds(cfg, progress).run()
