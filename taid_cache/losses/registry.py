"""The one loss registry: every loss a class (base.py's protocol) declared once, with its parameters, registered by
`register_loss`. The built-in losses register themselves when this module imports their modules (below); a loss
from outside the package registers the same way. The command line's `--loss` choices and loss options,
`SAMPLED_LOSSES`, `LossConfig` and `make reproduce`'s methods are read from here.

Light on purpose (no torch at import): `taid-cache --help` reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

from .base import PARAMS, REGISTRY, Loss, Param, register_loss
# The built-in losses, each module registering its own; the import order is `--loss`'s order.
from . import dense, dkd, ctkd, opd, sft  # noqa: F401

__all__ = ["LOSSES", "PARAMS", "REGISTRY", "SAMPLED_LOSSES", "LossConfig", "Names", "Param", "register_loss"]

class Names(Sequence):
    """The names of the registered losses that satisfy `keep`, read from the registry at each use (a loss registered
    later is among them)."""

    def __init__(self, keep: Callable[[type[Loss]], bool]) -> None:
        self._keep = keep

    def _names(self) -> tuple[str, ...]:
        return tuple(name for name, cls in REGISTRY.items() if self._keep(cls))

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in REGISTRY and self._keep(REGISTRY[name])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Names, tuple, list)):
            return self._names() == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._names())


LOSSES = Names(lambda cls: True)
# What a head + sampled tail cache serves: the losses with an estimator over it, and those that need no teacher.
SAMPLED_LOSSES = Names(lambda cls: cls.serves_sampled)


class LossConfig:
    """One loss and its parameters, by keyword: `LossConfig("dkd", dkd_beta=2.0)`; `distil_ratio` r trains on
    r·distillation + (1−r)·CE. Any registered parameter may be given (those the loss does not read are kept, and
    ignored); each one reads back as an attribute, its default when not given."""

    __slots__ = ("name", "distil_ratio", "_values", "loss")

    def __init__(self, name: str = "taid", distil_ratio: float = 1.0, **params: float) -> None:
        if name not in REGISTRY:
            raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
        unknown = sorted(set(params) - set(PARAMS))
        if unknown:
            raise TypeError(f"LossConfig: unknown loss parameters {', '.join(unknown)}; known: {', '.join(PARAMS)}")
        spec = REGISTRY[name]
        set_ = object.__setattr__
        set_(self, "name", name)
        set_(self, "distil_ratio", distil_ratio)
        set_(self, "_values", dict(params))
        set_(self, "loss", spec(spec.Params(**{k: params[k] for k in spec.reads if k in params})))  # the loss object

    def __getattr__(self, name: str) -> Any:
        if name in PARAMS:
            return self._values.get(name, PARAMS[name].default)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"LossConfig is frozen: build another (LossConfig({self.name!r}, ...))")

    def _key(self) -> tuple:
        return (self.name, self.distil_ratio, tuple(sorted((k, getattr(self, k)) for k in PARAMS)))

    def __eq__(self, other: object) -> bool:
        return self._key() == other._key() if isinstance(other, LossConfig) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        given = "".join(f", {k}={v!r}" for k, v in self._values.items())
        return f"LossConfig({self.name!r}, distil_ratio={self.distil_ratio!r}{given})"

    def __reduce__(self):  # pickles by its arguments (the loss object is rebuilt)
        return (_rebuild, (self.name, self.distil_ratio, self._values))

    @property
    def spec(self) -> type[Loss]:
        """The loss's class: `reads_t`, `needs_labels`, `uses_teacher`, `learns_temperature`, `reads`,
        `serves_sampled`, `sampled_how`, ..."""
        return REGISTRY[self.name]

    def params(self) -> dict[str, float]:
        """The parameters this loss reads, by name."""
        return {name: getattr(self, name) for name in self.spec.reads}


def _rebuild(name: str, distil_ratio: float, values: dict) -> LossConfig:
    return LossConfig(name, distil_ratio, **values)
