"""What `make reproduce` runs: the embedded default (everything built here) or a YAML config naming real models
and data. Both go through the same stages (taid_cache/reproduce/pipeline.py).

Each of the three inputs is either given or built here, independently:
- teacher: a model folder or hub name, or a GGUF source (converted once into OUT/teacher); none = trained here;
- student: a model folder or hub name; none = a random Llama of `student_size` with the teacher's tokenizer;
- train_data: chat files or hub datasets; none = chat pairs from the standard library's documented functions."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from ..config import Range, json_value, listed, read_yaml, shown
from ..errors import UserError
from ..losses.registry import LOSSES, REGISTRY, SAMPLED_LOSSES
from ..onpolicy.rounds import RECIPES
from .models import LlamaSize

def method_table() -> dict[str, dict[str, Any]]:
    """Method name -> train-student options: every loss of the registry under its own name, and the variants the
    comparison needs. `cache`: the train cache a method must read ("top-k" or "sampled"); without it, a loss a
    sampled tail cannot serve reads the top-k cache and the others the config's `cache`. `*-online` run the
    teacher in-process (the original set-up); the on-policy ones also train on the student's own answers (train-student
    --on-policy), as the original's GKD (JS at β 0.1, mixed) and DistiLLM (skew FKL at β 0.1, adaptive), and the
    per-token reverse-KL recipe (opd, every micro-batch fresh answers sampled at temperature 1). `rounds`: the same
    recipes through the cache, in rounds (`taid-cache distil-on-policy`): the teacher scores each round's answers
    once."""
    methods: dict[str, dict[str, Any]] = {name: {"loss": name} for name in LOSSES if not REGISTRY[name].next_token_only}
    methods.update({
        "taid-no-adaptive": {"loss": "taid", "taid_disable_adaptive": True},
        "taid-tail-uniform": {"loss": "taid", "tail": "uniform", "cache": "top-k"},
        "taid-tail-renorm": {"loss": "taid", "tail": "renorm", "cache": "top-k"},
        "taid-online": {"loss": "taid", "online": True},
        "fkl-online": {"loss": "fkl", "online": True},
        "gkd-online": {"loss": "js", "js_beta": 0.1, "on_policy": "mixed", "online": True},
        "distillm-online": {"loss": "skew-fkl", "skew_beta": 0.1, "on_policy": "adaptive", "online": True},
        "opd-online": {"loss": "opd", "on_policy": "fresh", "online": True},
        "taid-top-k": {"loss": "taid", "cache": "top-k"},
        "fkl-top-k": {"loss": "fkl", "cache": "top-k"},
        "taid-sampled": {"loss": "taid", "cache": "sampled"},
        "fkl-sampled": {"loss": "fkl", "cache": "sampled"},
        # CTKD's learned T starts at 15.6 and barely moves in a short run; the student it distils at T ≈ 16 fails at
        # T = 1 from either cache (docs/LOSSES.md). ctkd-top-k keeps the top-k cache's run beside the sampled one.
        "ctkd-top-k": {"loss": "ctkd", "cache": "top-k"},
    })
    methods.update({name: {"loss": recipe.loss, **recipe.parameters, "rounds": name} for name, recipe in RECIPES.items()})
    return methods


METHODS = method_table()
# Rows run only when named in `methods`: the sampled-cache duplicates of rows the default has, and the online
# on-policy recipes, whose student generates inside every step (about 35 minutes together on 2 cores,
# docs/RESULTS.md): the default runs them round-cached (gkd, distillm, opd) to stay near an hour.
BY_NAME_ONLY = ("taid-sampled", "fkl-sampled", "gkd-online", "distillm-online", "opd-online")
# Ranked with several seeds by default; the other rows are diagnostics (one seed).
RANKED = ["sft", "fkl", "taid", "taid-online", "ctkd", "dkd"]
CACHES = ("sampled", "top-k")


@dataclass
class ReproduceConfig:
    name: str = "embedded"
    # Real models and data (a config file); None = built here (see the module docstring).
    teacher: Optional[str] = None
    student: Optional[str] = None
    train_data: Optional[list[str]] = None
    train_split: str = "train"
    heldout_data: Optional[list[str]] = None
    heldout_split: str = "test"
    heldout_rows: int = 2000
    heldout_seed: int = 42
    # Length filters, in teacher tokens (the paper: sequence 2048, prompt 1536, response 512).
    max_length: int = 512
    max_prompt: int = 384
    max_response: int = 256
    # The embedded default's sizes.
    vocab_size: int = 8192
    # 7.6M parameters (4.2M of them embeddings) vs 0.63M (tied embeddings): 12x.
    teacher_size: LlamaSize = field(default_factory=lambda: LlamaSize(hidden=256, layers=4, heads=4, intermediate=768))
    student_size: LlamaSize = field(default_factory=lambda: LlamaSize(hidden=64, layers=2, heads=1, intermediate=192, tie_embeddings=True))
    pretrain_steps: int = 500  # about 10 minutes on 2 CPU cores
    train_pairs: int = 3000
    heldout_pairs: int = 300
    # Stage one.
    engine: str = "auto"
    tensor_parallel_size: int = 1
    top_k: int = 64  # the top-k cache
    # The head + sampled tail cache: a top-`sampled_top_k` head and `tail_samples` draws off it per position
    # (hf engine). 16 + 32 stores 120 bytes per token here against top-64's 135.
    sampled_top_k: int = 16
    tail_samples: int = 32
    # The cache of the methods that can read either: the sampled one, which bench/fidelity.py found best per byte
    # on this default (docs and README); `*-top-k` keep the other as rows.
    cache: str = "sampled"
    # Stage two.
    methods: list[str] = field(default_factory=lambda: [m for m in METHODS if m not in BY_NAME_ONLY])
    # Each method in `seeded` runs once per seed (its own student initialisation and data order), the others with
    # the first seed only; the report gives mean ± standard deviation over a method's seeds.
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    seeded: list[str] = field(default_factory=lambda: list(RANKED))
    max_steps: Optional[int] = 600
    epochs: Optional[float] = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 0
    taid_t_start: float = 0.4
    nproc_per_node: int = 1  # the round-cached methods (gkd, distillm, opd) train in one process whatever it is
    # The round-cached methods: rounds over max_steps, each answering the first `round_prompts` train prompts afresh.
    rounds: int = 4
    round_prompts: int = 256
    seed: int = 0  # of the data's shuffle and the teacher's pre-training
    # Evaluation by generation: greedy answers to the first `generation_prompts` held-out prompts.
    generation_prompts: int = 100
    max_new_tokens: int = 64

    @property
    def builds_teacher(self) -> bool:
        return self.teacher is None

    @property
    def builtin_data(self) -> bool:
        return self.train_data is None

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.__dict__ if isinstance(value, LlamaSize) else value
        return out


def quick() -> ReproduceConfig:
    """The same steps at a size that finishes in a few minutes on 2 cores."""
    return ReproduceConfig(
        name="embedded-quick", vocab_size=1024, teacher_size=LlamaSize(hidden=128, layers=2, heads=2, intermediate=384),
        student_size=LlamaSize(hidden=64, layers=1, heads=1, intermediate=128), pretrain_steps=100, train_pairs=200,
        heldout_pairs=40, max_length=256, max_prompt=160, max_response=128,
        methods=["sft", "fkl", "rkl", "dkd", "ctkd", "taid", "taid-online", "taid-top-k"], seeds=[0, 1], seeded=["fkl", "taid"],
        max_steps=25, batch_size=8, lr=3e-3, engine="hf", top_k=32, sampled_top_k=8, tail_samples=24, generation_prompts=16,
        max_new_tokens=24,
    )


# Numeric settings of the reproduction itself (stage options are checked by their own pipelines: `check`).
RANGES = {"heldout_rows": "[1, inf)", "max_length": "[2, inf)", "max_prompt": "[1, inf)", "max_response": "[1, inf)",
          "vocab_size": "[16, inf)", "pretrain_steps": "[1, inf)", "train_pairs": "[1, inf)", "heldout_pairs": "[1, inf)",
          "nproc_per_node": "[1, inf)", "tensor_parallel_size": "[1, inf)", "top_k": "[1, inf)", "sampled_top_k": "[0, inf)",
          "tail_samples": "[0, inf)", "generation_prompts": "[1, inf)", "max_new_tokens": "[1, inf)",
          "rounds": "[1, 1000]", "round_prompts": "[1, inf)"}


def typed(name: str, value: Any, hint: Any, where: str) -> Any:
    """A YAML value as the field's type (the JSON rules of config.py), or a one-line error naming the key."""
    try:
        return json_value(name, value, hint)
    except UserError as exc:
        raise UserError(f"config {where}: {exc}") from None


def load_config(path: Path) -> ReproduceConfig:
    raw = read_yaml(path)  # the stages' loader: no key twice, no alias, every failure one short line
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserError(f"config {path} must be a mapping of keys (key: value lines), not a {type(raw).__name__}")
    known = {f.name for f in fields(ReproduceConfig)}
    unknown = sorted(str(k) for k in set(raw) - known)
    if unknown:
        raise UserError(f"config {path}: unknown keys {listed(unknown)}")
    hints = typing.get_type_hints(ReproduceConfig)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if hints[key] is LlamaSize:
            sizes = {f.name: f for f in fields(LlamaSize)}
            unknown = sorted(str(k) for k in set(value) - set(sizes)) if isinstance(value, dict) else None
            if unknown is None or unknown:
                raise UserError(f"config {path}: {key} must map {', '.join(sizes)} to values"
                                + (f"; unknown keys {listed(unknown)}" if unknown else ""))
            size_hints = typing.get_type_hints(LlamaSize)
            values[key] = LlamaSize(**{k: typed(f"{key}.{k}", v, size_hints[k], str(path)) for k, v in value.items()})
        else:
            values[key] = typed(key, value, hints[key], str(path))
    cfg = ReproduceConfig(**values)
    check_settings(cfg, f"config {path}")
    return cfg


def check_settings(cfg: ReproduceConfig, where: str) -> None:
    """The reproduction's own settings: ranges, methods, caches, which inputs go together."""
    for key, text in RANGES.items():
        within = Range.parse(text)
        if getattr(cfg, key) not in within:
            raise UserError(f"{where}: {key} must be {within}, not {shown(getattr(cfg, key))}")
    for key in ("methods", "seeded"):
        bad = [m for m in getattr(cfg, key) if m not in METHODS]
        if bad:
            raise UserError(f"{where}: unknown methods {listed(bad)} in {key}; known: {', '.join(METHODS)}")
    if not cfg.methods:
        raise UserError(f"{where}: methods is empty")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds) or min(cfg.seeds) < 0:
        raise UserError(f"{where}: seeds must be distinct integers of at least 0, not {shown(cfg.seeds)}")
    if cfg.cache not in CACHES:
        raise UserError(f"{where}: cache must be one of {', '.join(CACHES)}, not {shown(cfg.cache)}")
    if cfg.tail_samples < 1 and any(method_cache(cfg, m) == "sampled" for m in cfg.methods):
        raise UserError(f"{where}: tail_samples must be at least 1 for methods on the sampled cache (or set cache: top-k)")
    if cfg.teacher is None and (cfg.student is not None or cfg.train_data is not None):
        raise UserError(f"{where}: a student or train_data needs a teacher (give none of them for the embedded default)")
    rounds = [m for m in cfg.methods if is_rounds(m)]
    if rounds and (cfg.max_steps is None or cfg.max_steps < cfg.rounds):
        raise UserError(f"{where}: the round-cached methods ({listed(rounds)}) need max_steps of at least rounds "
                        f"({cfg.rounds}), not {shown(cfg.max_steps)}: each round trains to its share of the steps")
    if cfg.train_data is not None and not cfg.train_data:
        raise UserError(f"{where}: train_data is empty (leave it out for the standard-library chat pairs)")


def method_cache(cfg: ReproduceConfig, method: str) -> str:
    """Which train cache a method reads: its own ("top-k" or "sampled"); the top-k one for a loss a sampled tail
    cannot serve; else the config's `cache`."""
    options = METHODS[method]
    if "cache" in options:
        return options["cache"]
    return cfg.cache if options["loss"] in SAMPLED_LOSSES else "top-k"


def is_rounds(method: str) -> bool:
    """A method trained through the cache in rounds of the student's answers (distil-on-policy)."""
    return "rounds" in METHODS[method]


def method_seeds(cfg: ReproduceConfig, method: str) -> list[int]:
    return list(cfg.seeds) if method in cfg.seeded else cfg.seeds[:1]


def runs_of(cfg: ReproduceConfig) -> list[tuple[str, int]]:
    """Every (method, seed) the reproduction trains, methods in order."""
    return [(method, seed) for method in cfg.methods for seed in method_seeds(cfg, method)]
