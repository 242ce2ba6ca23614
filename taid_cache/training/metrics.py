"""A run's OUTPUT/metrics.jsonl: one JSON record per optimizer step and per evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..atomic import write_text
from .distributed import Dist


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """Every record of a run folder's metrics.jsonl."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def parse_line(line: str) -> dict | None:
    """One metrics record; None for a line torn by a kill in mid-write."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class MetricsLog:
    """OUTPUT/metrics.jsonl, written by rank 0; a resumed run first drops lines past its checkpoint."""

    def __init__(self, output: Path, env: Dist, resumed_step: int, tensorboard: bool) -> None:
        self.path, self.enabled = output / "metrics.jsonl", env.rank == 0
        self.board = None
        if self.enabled:
            lines = self.path.read_text().splitlines() if self.path.exists() else []
            kept = [line for line in lines if (record := parse_line(line)) is not None and record.get("step", math.inf) <= resumed_step]
            write_text(self.path, "".join(line + "\n" for line in kept))
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(str(output / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, record["step"])
