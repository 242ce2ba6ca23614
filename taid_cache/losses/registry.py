"""The one loss registry: every loss declared once, with its parameters (defaults, ranges, the flag that sets
them), whether it needs the labels, how a head + sampled tail cache serves it (or that it cannot), and whether
its gradient has a closed form. The command line's `--loss` choices and loss options, `SAMPLED_LOSSES`,
`per_position_fn`, `closed_form` and `make reproduce`'s methods are read from here.

Light on purpose (no torch at import): `taid-cache --help` reads it. The functions themselves live in dense.py,
ctkd.py, dkd.py and sparse.py and are named here (module:function), imported when first used.

Adding a loss: a per-position function f(student_logits, teacher_logprobs, t, labels, **params) -> [N] and one
`LossSpec` below; a parameter new to the registry gets a `Param` and a field of `LossConfig`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Param:
    """A loss parameter: the `LossConfig` field and the train-student option (`--` + dashes) of that name."""

    name: str
    default: float
    within: str
    help: str


PARAMS: dict[str, Param] = {p.name: p for p in (
    Param("temperature", 1.0, "(0, inf)", "τ of the KL family: both distributions at temperature τ, the loss × τ²."),
    Param("skew_beta", 0.1, "(0, 1)", "β of skew-fkl / skew-rkl (DistiLLM): the mixture β·p + (1−β)·q."),
    Param("js_beta", 0.1, "(0, 1)", "β of js, the generalised Jensen-Shannon divergence (0.5: the symmetric one)."),
    Param("adaptive_mu", 0.5, "(0, 1)", "μ of adaptive-kl: the teacher mass of its head."),
    Param("dkd_alpha", 1.0, "[0, inf)", "α of dkd: the weight of the target-class KL."),
    Param("dkd_beta", 0.5, "[0, inf)", "β of dkd: the weight of the non-target KL."),
    Param("ctkd_t_start", 1.0, "(0, inf)", "ctkd: the learned temperature is t_start + t_end · sigmoid(θ)."),
    Param("ctkd_t_end", 20.0, "(0, inf)", "ctkd: the span of the learned temperature."),
    Param("ctkd_lambda_max", 1.0, "[0, inf)", "ctkd: the gradient reversal's weight λ at the start of its cosine curriculum."),
    Param("ctkd_lambda_min", 0.0, "[0, inf)", "ctkd: λ at the curriculum's end."),
    Param("ctkd_loops", 10.0, "(0, inf)", "ctkd: epochs over which λ falls from λ_max to λ_min."),
)}


@dataclass(frozen=True)
class LossSpec:
    name: str
    summary: str
    per_position: str | None  # "module:function" of the dense per-position loss; None: cross-entropy alone (sft)
    params: tuple[str, ...] = ()  # the Params its functions take, by keyword
    tempered: bool = False  # reads --temperature: both distributions at τ and the loss × τ², around its function
    reads_t: bool = False  # takes TAID's interpolation t
    needs_labels: bool = False  # reads the next token (the data), not only the teacher
    sampled: str | None = None  # "module:function" serving a head + sampled tail cache; None: such a cache cannot
    sampled_how: str = ""  # how, in words (docs, --help)
    closed_form: bool = False  # its gradient in closed form on a cached teacher (no autograd graph over [N, V])
    temperature_params: tuple[str, ...] = ()  # a temperature of its own, trained beside the student (ctkd)

    @property
    def uses_teacher(self) -> bool:
        return self.per_position is not None

    @property
    def learns_temperature(self) -> bool:
        return bool(self.temperature_params)

    @property
    def reads(self) -> tuple[str, ...]:
        """Every Param this loss reads."""
        return (*self.params, *(("temperature",) if self.tempered else ()), *self.temperature_params)

    def function(self) -> Callable:
        return load(self.per_position)

    def sampled_function(self) -> Callable:
        return load(self.sampled)


REGISTRY: dict[str, LossSpec] = {s.name: s for s in (
    LossSpec("taid", "TAID: cross-entropy to p_t ∝ q^(1−t) p^t, t moving from t_start to 1", "dense:taid", reads_t=True,
             sampled="objective:taid_sampled", sampled_how="closed form; the tail's shape linear in the draws", closed_form=True),
    LossSpec("fkl", "forward KL(p‖q)", "dense:fkl", tempered=True, sampled="sparse:sampled_fkl",
             sampled_how="unbiased (the draws' counts); at τ ≠ 1 importance-weighted"),
    LossSpec("rkl", "reverse KL(q‖p)", "dense:rkl", tempered=True),
    LossSpec("tvd", "total variation distance", "dense:tvd"),
    LossSpec("js", "generalised Jensen-Shannon divergence", "dense:js", ("js_beta",), tempered=True),
    LossSpec("skew-fkl", "skew forward KL (DistiLLM)", "dense:skew_fkl", ("skew_beta",), tempered=True),
    LossSpec("skew-rkl", "skew reverse KL (DistiLLM)", "dense:skew_rkl", ("skew_beta",), tempered=True),
    LossSpec("adaptive-kl", "FKL and RKL weighted by the head and tail gaps", "dense:adaptive_kl", ("adaptive_mu",), tempered=True),
    LossSpec("dkd", "decoupled KD: target-class and non-target KL", "dkd:dkd", ("dkd_alpha", "dkd_beta"), tempered=True,
             needs_labels=True, sampled="dkd:dkd_sampled", sampled_how="on the sampled estimate (consistent, not unbiased)"),
    LossSpec("ctkd", "FKL at a learned temperature, adversarial on a cosine curriculum", "ctkd:ctkd", sampled="ctkd:ctkd_sampled",
             sampled_how="on the importance-weighted tempered estimate",
             temperature_params=("ctkd_t_start", "ctkd_t_end", "ctkd_lambda_max", "ctkd_lambda_min", "ctkd_loops")),
    LossSpec("sft", "cross-entropy on the data alone (no teacher)", None),
)}
LOSSES = tuple(REGISTRY)
# What a head + sampled tail cache serves: the losses with an estimator over it, and those that need no teacher.
SAMPLED_LOSSES = tuple(name for name, spec in REGISTRY.items() if spec.sampled is not None or not spec.uses_teacher)


def load(target: str | None) -> Callable:
    module, name = target.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


@dataclass(frozen=True)
class LossConfig:
    """One loss and its parameters, by keyword: `LossConfig("dkd", dkd_beta=2.0)`; `distil_ratio` r trains on
    r·distillation + (1−r)·CE."""

    name: str = "taid"
    distil_ratio: float = 1.0
    temperature: float = PARAMS["temperature"].default
    skew_beta: float = PARAMS["skew_beta"].default
    js_beta: float = PARAMS["js_beta"].default
    adaptive_mu: float = PARAMS["adaptive_mu"].default
    dkd_alpha: float = PARAMS["dkd_alpha"].default
    dkd_beta: float = PARAMS["dkd_beta"].default
    ctkd_t_start: float = PARAMS["ctkd_t_start"].default
    ctkd_t_end: float = PARAMS["ctkd_t_end"].default
    ctkd_lambda_max: float = PARAMS["ctkd_lambda_max"].default
    ctkd_lambda_min: float = PARAMS["ctkd_lambda_min"].default
    ctkd_loops: float = PARAMS["ctkd_loops"].default

    def __post_init__(self) -> None:
        if self.name not in REGISTRY:
            raise ValueError(f"unknown loss {self.name!r}; known: {', '.join(LOSSES)}")

    @property
    def spec(self) -> LossSpec:
        return REGISTRY[self.name]

    def params(self) -> dict[str, float]:
        """The parameters this loss's functions take, by keyword."""
        return {name: getattr(self, name) for name in self.spec.params}

