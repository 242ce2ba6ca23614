"""TAID's adaptive interpolation parameter t."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class TaidSchedule:
    """The adaptive t of TAID, updated once per optimizer step from that step's (global) loss."""

    t_start: float = 0.4
    t_end: float = 1.0
    alpha: float = 5e-4
    beta: float = 0.99
    total_steps: int = 1
    adaptive: bool = True
    t: float = float("nan")
    momentum: float = 0.0
    prev_loss: float | None = None
    step: int = 0

    def __post_init__(self) -> None:
        if math.isnan(self.t):
            self.t = self.t_start

    def update(self, loss: float) -> float:
        """Record step `step+1`'s loss and move t; returns the new t."""
        self.step += 1
        if self.prev_loss is None:
            self.prev_loss = loss
            return self.t
        t_linear = self.t_start + (self.t_end - self.t_start) * min(self.step / self.total_steps, 1.0)
        if self.adaptive:
            relative = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
            self.momentum = self.beta * self.momentum + (1 - self.beta) * relative
            adaptive_t = self.t + self.alpha * (1 / (1 + math.exp(-self.momentum))) * (1 - self.t)
            self.t = min(self.t_end, max(t_linear, adaptive_t))
        else:
            self.t = min(self.t_end, t_linear)
        self.prev_loss = loss
        return self.t

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
