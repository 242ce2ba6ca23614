"""A run's OUTPUT/metrics.jsonl: one JSON record per optimizer step and per evaluation. Locally each record is
appended as it comes; an object has no append, so on an object store the file is rewritten whole at every
checkpoint, evaluation and at the end (a kill loses at most the records since, which the resumed run, starting
from its checkpoint, writes again)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..config import REPORT_BACKENDS
from ..errors import UserError, first_line
from ..storage import Store, is_remote, open_store
from .distributed import Dist


METRICS = "metrics.jsonl"


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """Every record of a run folder's metrics.jsonl."""
    return [json.loads(line) for line in open_store(str(run)).read_text(METRICS).splitlines()]


def parse_line(line: str) -> dict | None:
    """One metrics record; None for a line torn by a kill in mid-write."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def installed(backend: str) -> bool:
    return importlib.util.find_spec(backend) is not None


def report_backends(names: list[str] | str) -> list[str]:
    """`--report-to` as the backends it logs to, as transformers reads it: none (or nothing) is none, all is every
    backend installed; each named once, in the order given."""
    names = [names] if isinstance(names, str) else list(names)
    if "all" in names:
        return [b for b in REPORT_BACKENDS if installed(b)]
    return list(dict.fromkeys(n for n in names if n != "none"))


def check_report_to(names: list[str], output: str | None = None) -> None:
    """Every backend of `--report-to` known and installed (and, given the run's `output`, a local folder for their
    logs), in one line."""
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if name not in ("none", "all", *REPORT_BACKENDS):
            raise UserError(f"--report-to must be one of none, {', '.join(REPORT_BACKENDS)}, all, not {name!r}")
    alone = [n for n in ("none", "all") if n in names]
    if alone and len(set(names)) > 1:
        raise UserError(f"--report-to {alone[0]} stands alone, not with {', '.join(n for n in dict.fromkeys(names) if n != alone[0])}")
    backends = report_backends(names)
    missing = [b for b in backends if not installed(b)]
    if missing:
        packages = ",".join(missing)
        raise UserError(f"--report-to {' '.join(missing)} needs the {' and '.join(missing)} package{'s' * (len(missing) > 1)} "
                        f"(pip install 'taid-cache[{packages}]')")
    if backends and output is not None and is_remote(output):
        raise UserError(f"--report-to {' '.join(backends)} writes its logs into a local --output folder; with --output {output} "
                        "the metrics are in its metrics.jsonl")
    board = Path(output) / "tensorboard" if output is not None and "tensorboard" in backends else None
    if board is not None and board.exists() and not (board.is_dir() and os.access(board, os.W_OK)):
        raise UserError(f"--report-to tensorboard: cannot write {board} (not a folder this process can write into)")


class MetricsLog:
    """OUTPUT/metrics.jsonl, written by rank 0 (a resumed run first drops lines past its checkpoint), and the
    same records to each backend of `--report-to` (tensorboard, wandb)."""

    def __init__(self, output: Store, env: Dist, resumed_step: int, report_to: list[str] | str, settings: dict[str, Any]) -> None:
        self.output, self.enabled = output, env.rank == 0
        self.path = output.local_path(METRICS)  # None on an object store: the records are kept and rewritten
        self.board = self.wandb = None
        if not self.enabled:
            return
        lines = output.read_text(METRICS).splitlines() if output.is_file(METRICS) else []
        self.lines = [line for line in lines if (record := parse_line(line)) is not None and record.get("step", math.inf) <= resumed_step]
        self.flush()
        local = output.local_path()
        backends = report_backends(report_to)
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            folder = local / "tensorboard"
            try:  # its writer thread would say a folder it cannot write in a traceback, later
                folder.mkdir(parents=True, exist_ok=True)
                (probe := folder / f".probe-{os.getpid()}").write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                raise UserError(f"--report-to tensorboard: cannot write {folder} ({first_line(exc)})") from None
            self.board = SummaryWriter(str(folder))
        if "wandb" in backends:
            self.wandb = wandb_run(local, settings)

    def flush(self) -> None:
        """The records so far, stored whole (locally only at the start: later ones are appended)."""
        if self.enabled:
            self.output.write_text(METRICS, "".join(line + "\n" for line in self.lines))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record)
        self.lines.append(line)
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(line + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.board is not None:
            for key, value in scalars.items():
                self.board.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def sync(self) -> None:
        """On an object store, store the records so far (a checkpoint's or an evaluation's moment)."""
        if self.path is None:
            self.flush()

    def close(self) -> None:
        self.sync()
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
