"""A run's OUTPUT/metrics.jsonl: one JSON record per optimizer step and per evaluation."""

from __future__ import annotations

import json
import math
import uuid
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
    """OUTPUT/metrics.jsonl, written by rank 0 (a resumed run first drops lines past its checkpoint), and the
    same records to tensorboard or wandb (`--report-to`)."""

    def __init__(self, output: Path, env: Dist, resumed_step: int, report_to: str, settings: dict[str, Any]) -> None:
        self.path, self.enabled = output / "metrics.jsonl", env.rank == 0
        self.board = self.wandb = None
        if not self.enabled:
            return
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        kept = [line for line in lines if (record := parse_line(line)) is not None and record.get("step", math.inf) <= resumed_step]
        write_text(self.path, "".join(line + "\n" for line in kept))
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(output / "tensorboard"))
        elif report_to == "wandb":
            self.wandb = wandb_run(output, settings)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.board is not None:
            for key, value in scalars.items():
                self.board.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
        if self.wandb is not None:
            self.wandb.finish()


def wandb_run(output: Path, settings: dict[str, Any]):
    """One wandb run per run folder: its id kept in OUTPUT/.wandb-id, so a resumed run logs into the same one."""
    import wandb

    id_file = output / ".wandb-id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]  # wandb's own id helper moved between releases
    write_text(id_file, run_id)
    return wandb.init(project="taid-cache", id=run_id, resume="allow", dir=str(output), config=settings, name=output.name)
