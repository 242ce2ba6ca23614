"""The loss protocol: a loss is a class, registered once with `register_loss`, that declares its parameters (one
frozen dataclass, `Params`, each field a `param(default, within, help)`), what it reads, and its maths:

- `dense(logits, teacher_logprobs, ctx)`: the per-position value against dense teacher log-probs (a tempered
  loss sees both sides at τ here; the base applies τ and the × τ² around it, `per_position`);
- `sampled(logits, teacher, ctx)`: the same against a head + sampled tail (`SampledTeacher`; its one estimate
  is `teacher.weights(τ)`), where `sampled_how` says how (None: a sampled tail cannot serve it);
- `closed_form(logits, teacher, ctx)`: (value, d value / d logits) without an autograd graph, or None where it
  has none for that teacher.

`ctx` (`Context`) carries TAID's t, the labels and the temperature the loss runs at. `objective.chunk_loss` asks
the loss object for each, in one calling convention; the registry (`REGISTRY`, `PARAMS`) is filled by the
built-in modules (registry.py imports them) and by anyone else calling `register_loss`.

Light on purpose (no torch at import): the command line reads the registry. Loss modules compute with the
`torch` and `F` of this module, which import torch on first use.
"""

from __future__ import annotations

import importlib
import itertools
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, Optional


class LazyModule:
    """A module imported on first attribute access (each attribute then cached on this object)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(importlib.import_module(self._name), attr)
        setattr(self, attr, value)
        return value

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


torch = LazyModule("torch")
F = LazyModule("torch.nn.functional")

_declared = itertools.count()  # parameters keep their declaration order (the command line's option order)


def param(default: float, within: str, help: str) -> Any:
    """A field of a loss's `Params`: its default, its range (an interval such as "(0, inf)" or "[0, 1]") and its help,
    which become the train-student option `--name-with-dashes`, its check and its `--help`. A parameter several
    losses read is declared once, as a module constant, and used as the default of each one's field."""
    return field(default=default, metadata={"within": within, "help": help, "order": next(_declared)})


@dataclass(frozen=True)
class Param:
    """A declared loss parameter, as the registry lists it (`PARAMS`)."""

    name: str
    default: float
    within: str
    help: str
    type: Any = "float"  # its annotation, as written in `Params`
    order: int = 0


@dataclass(frozen=True)
class NoParams:
    """The parameters of a loss that has none."""


# Knowledge distillation uses τ from 1 to 20 (Hinton et al.; ctkd's learned one spans 1..21). Past 20 the × τ²
# scale turns a sampled tail's unbiased but noisy estimate into noise (losses of ±1e9 at τ = 1e6, seen); below 0.1
# the tempered distributions are their argmax and τ² shrinks the loss a hundredfold.
TEMPERATURE = param(1.0, "[0.1, 20]", "τ of the KL family: both distributions at temperature τ, the loss × τ².")


@dataclass(frozen=True)
class Context:
    """What a loss reads besides the logits and the teacher: TAID's t, the data's next tokens [N] (None when not
    given; a loss with `needs_labels` always gets them) and the temperature it runs at (its `temperature`
    parameter when `tempered`, a learned one when `learns_temperature`, else 1)."""

    t: float
    labels: Any = None
    temperature: Any = 1.0


class Loss:
    """A distillation loss. Subclasses set the class attributes and supply their maths (`dense`, and `sampled` /
    `closed_form` where they have them); the rest is derived. An instance holds one `Params` value."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    reads_t: ClassVar[bool] = False  # takes TAID's interpolation t (ctx.t)
    needs_labels: ClassVar[bool] = False  # reads the data's next tokens (ctx.labels), not only the teacher
    tempered: ClassVar[bool] = False  # reads `temperature`: both distributions at τ and the loss × τ², around `dense`
    uses_teacher: ClassVar[bool] = True  # False: cross-entropy on the data alone (sft)
    learns_temperature: ClassVar[bool] = False  # a temperature of its own, trained beside the student (ctkd)
    sampled_how: ClassVar[Optional[str]] = None  # how a head + sampled tail serves it, in words; None: it cannot
    # It reads a cached teacher only at the actual next token (opd): every cached teacher goes through `sampled`,
    # never through a rebuilt dense distribution (whose log-prob off the head is the spread tail's, not the token's).
    next_token_only: ClassVar[bool] = False
    # Derived for each subclass:
    reads: ClassVar[tuple[str, ...]] = ()  # the parameters it reads: its `Params` fields
    serves_sampled: ClassVar[bool] = True  # a head + sampled tail cache serves it (an estimator, or no teacher)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not is_dataclass(cls.Params):
            raise TypeError(f"{cls.__name__}.Params must be a dataclass")
        undeclared = [f.name for f in fields(cls.Params) if "within" not in f.metadata]
        if undeclared:
            raise TypeError(f"{cls.__name__}.Params: declare {', '.join(undeclared)} with param(default, within, help)")
        cls.reads = tuple(f.name for f in fields(cls.Params))
        if cls.tempered and "temperature" not in cls.reads:
            raise TypeError(f"{cls.__name__} is tempered: its Params need `temperature: float = TEMPERATURE`")
        if cls.sampled_how is not None and cls.sampled is Loss.sampled:
            raise TypeError(f"{cls.__name__} says how a sampled tail serves it but has no `sampled` method")
        cls.serves_sampled = cls.sampled_how is not None or not cls.uses_teacher

    def __init__(self, params: Any = None) -> None:
        self.params = self.Params() if params is None else params

    # The maths a loss supplies.

    def dense(self, logits, teacher_logprobs, ctx: Context):
        """The loss per position [N] against dense teacher log-probs [N, V], differentiable in `logits`."""
        raise NotImplementedError(f"{self.name} has no teacher term")

    def sampled(self, logits, teacher, ctx: Context):
        """The loss per position against a head + sampled tail (`SampledTeacher`), at ctx.temperature."""
        raise ValueError(f"a head + sampled tail cannot serve {self.name}")

    def closed_form(self, logits, teacher, ctx: Context):
        """(value [N], its gradient in the logits [N, V]) against this teacher, or None: no closed form for it."""
        return None

    def learned_temperature(self):
        """The module that learns this loss's temperature (`learns_temperature`), built from its parameters."""
        raise ValueError(f"{self.name} learns no temperature")

    def curriculum(self, epoch: float) -> float:
        """The weight of the learned temperature's gradient reversal at an epoch (counted from 1)."""
        raise ValueError(f"{self.name} learns no temperature")

    # What the objective calls (derived; a loss need not override them).

    def context(self, t: float, labels: Any = None, learned: Any = None) -> Context:
        """The context this loss runs in: its temperature, and the labels when it needs them."""
        if self.learns_temperature:
            if learned is None:
                raise ValueError(f"{self.name} trains its own temperature: pass it (CurriculumTemperature)")
            temperature = learned
        else:
            temperature = self.params.temperature if self.tempered else 1.0
        if self.needs_labels and labels is None:
            raise ValueError(f"{self.name} needs the labels (the data's next tokens)")
        return Context(t, labels, temperature)

    def per_position(self, logits, teacher_logprobs, ctx: Context):
        """`dense` at ctx.temperature: for a tempered loss both sides at τ and the value × τ² (nothing at τ = 1)."""
        tau = ctx.temperature
        if self.tempered and not (isinstance(tau, (int, float)) and tau == 1):
            return self.dense(logits.float() / tau, F.log_softmax(teacher_logprobs.float() / tau, -1), ctx) * tau**2
        return self.dense(logits, teacher_logprobs, ctx)


REGISTRY: dict[str, type[Loss]] = {}  # name -> loss class, in registration order
PARAMS: dict[str, Param] = {}  # name -> declared parameter, in declaration order


def register_loss(cls: type[Loss]) -> type[Loss]:
    """Register a loss class under its `name` (a class decorator; usable from outside the package). Refused: a name
    already registered, and a parameter name another loss declares with another default or range."""
    if not (isinstance(cls, type) and issubclass(cls, Loss)):
        raise TypeError(f"register_loss takes a subclass of Loss, not {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in REGISTRY:
        raise ValueError(f"a loss named {cls.name!r} is already registered ({REGISTRY[cls.name].__qualname__})")
    declared = {f.name: Param(f.name, f.default, f.metadata["within"], f.metadata["help"], f.type, f.metadata["order"])
                for f in fields(cls.Params)}
    for name, p in declared.items():
        known = PARAMS.get(name)
        if known is not None and (known.default, known.within) != (p.default, p.within):
            readers = ", ".join(n for n, other in REGISTRY.items() if name in other.reads)
            raise ValueError(f"{cls.name}: parameter {name} (default {p.default}, {p.within}) is declared by {readers} "
                             f"with default {known.default}, {known.within}")
    REGISTRY[cls.name] = cls
    for name, p in declared.items():
        PARAMS.setdefault(name, p)
    for name, p in sorted(PARAMS.items(), key=lambda item: item[1].order):  # keep declaration order
        PARAMS[name] = PARAMS.pop(name)
    return cls


def with_gradient(value, logits, grad):
    """`value` (per position), differentiable in `logits` with the given gradient: a closed form usable in any
    autograd loop."""
    linear = torch.linalg.vecdot(logits.float(), grad)
    return value + linear - linear.detach()
