"""Where the benchmark scripts put their numbers: printed, and saved as bench/results/NAME.md (the table) and
NAME.json (the numbers, with the machine and commit they were measured on)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from taid_cache.provenance import commit, machine

ROOT = Path(__file__).resolve().parents[1]


def publish(name: str, table: str, numbers: dict[str, Any]) -> None:
    print(table)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.md").write_text(table + "\n")
    (results / f"{name}.json").write_text(json.dumps({"machine": machine(), "commit": commit(), **numbers}, indent=2) + "\n")
