"""Which data a micro-batch trains on, decided as the original TAID code's `SampleGenerator` decides it (after
DistiLLM and MiniLLM), with its defaults:

- `mixed` (GKD): with probability `mixed_alpha` the micro-batch is replaced: the student answers its prompts, the
  answers join a replay buffer, and the micro-batch is drawn from the buffer (the new answers among the old).
- `adaptive` (DistiLLM): a threshold θ (0 at first) rises by 0.1, up to 1, whenever the validation loss is not
  below the last one that raised it (`update`). With r ~ U(0, 1) and the replay ratio's share s(step) of θ —
  constant θ/2, increasing θ·step/total, decreasing θ·(1 − step/total) — the student generates when r < s or
  when r < θ and the buffer is not yet full, replays from the buffer when otherwise r < θ, and else the
  micro-batch is the dataset's.

The decisions come from one seeded generator that every rank holds in the same state (every rank generates, or
none: generation through a sharded student is collective), and its state is checkpointed with the buffer."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

ON_POLICY = ("mixed", "adaptive", "fresh")  # fresh: every micro-batch the student's new answers (opd's recipe)
REPLAY_RATIOS = ("constant", "increasing", "decreasing")
THRESHOLD_STEP = 0.1  # the original's rise of θ per validation loss that did not fall


class Choice(Enum):
    DATA = "data"  # the dataset's micro-batch
    GENERATE = "generate"  # the student's answers to its prompts (adaptive)
    GENERATE_REPLAY = "generate+replay"  # answers into the buffer, the micro-batch drawn from it (mixed)
    REPLAY = "replay"  # drawn from the buffer


@dataclass(frozen=True)
class SamplerConfig:
    kind: str  # mixed, adaptive or fresh
    mixed_alpha: float = 0.5
    threshold: float = 0.0
    loss_eps: float = 0.0
    replay_ratio: str = "decreasing"
    capacity: int = 1000


@dataclass(frozen=True)
class Answer:
    """A sequence the student wrote: its prompt's ids and its answer's, whole (the answer is the loss mask)."""

    ids: tuple[int, ...]
    prompt_length: int


class ReplayBuffer:
    """The newest `capacity` answers; draws without replacement (the original's `random.sample`)."""

    def __init__(self, capacity: int) -> None:
        self.items: deque[Answer] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def full(self) -> bool:
        return len(self.items) == self.items.maxlen

    def add(self, answers: list[Answer]) -> None:
        self.items.extend(answers)

    def draw(self, k: int, rng: np.random.Generator) -> list[Answer]:
        picked = rng.choice(len(self.items), size=min(k, len(self.items)), replace=False)
        return [self.items[int(i)] for i in picked]


class OnPolicySampler:
    """The decision per micro-batch, the threshold's update, and the replay buffer. Stateful."""

    def __init__(self, cfg: SamplerConfig, seed: int) -> None:
        self.cfg = cfg
        self.threshold = cfg.threshold
        self.prev_loss: float | None = None
        self.rng = np.random.default_rng([seed, 0x0B5])  # shared by every rank: same seed, same draws
        self.buffer = ReplayBuffer(cfg.capacity)

    @property
    def adaptive(self) -> bool:
        """Moved by the held-out loss (`update`)."""
        return self.cfg.kind == "adaptive"

    @property
    def replays(self) -> bool:
        """Keeps answers to draw again (mixed, adaptive); fresh answers are used once."""
        return self.cfg.kind != "fresh"

    def share(self, step: int, total: int) -> float:
        """s(step): the part of θ under which the adaptive sampler generates afresh."""
        ratio = self.cfg.replay_ratio
        if ratio == "constant":
            return self.threshold * 0.5
        if ratio == "increasing":
            return self.threshold * step / total
        return self.threshold * (1 - step / total)

    def decide(self, step: int, total: int) -> Choice:
        """The choice for the next micro-batch; `step`: optimizer steps taken, of `total`."""
        if self.cfg.kind == "fresh":
            return Choice.GENERATE
        r = float(self.rng.uniform())
        if self.cfg.kind == "mixed":
            return Choice.GENERATE_REPLAY if r < self.cfg.mixed_alpha else Choice.DATA
        if r < self.share(step, total) or (r < self.threshold and not self.buffer.full):
            return Choice.GENERATE
        if r < self.threshold:
            return Choice.REPLAY
        return Choice.DATA

    def update(self, loss: float) -> None:
        """A validation loss (adaptive only): θ rises when it is not below the last one that counted."""
        if not self.adaptive:
            return
        if self.prev_loss is None:
            self.prev_loss = loss
        elif loss >= self.prev_loss + self.cfg.loss_eps:
            self.threshold = min(self.threshold + THRESHOLD_STEP, 1.0)
            self.prev_loss = loss

    def state_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "prev_loss": self.prev_loss, "rng": self.rng.bit_generator.state,
                "buffer": [[list(a.ids), a.prompt_length] for a in self.buffer.items]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.threshold, self.prev_loss = state["threshold"], state["prev_loss"]
        self.rng.bit_generator.state = state["rng"]
        self.buffer.items.clear()
        self.buffer.add([Answer(tuple(ids), n) for ids, n in state["buffer"]])
