"""`python -m taid_cache.reproduce [--quick] [--config FILE] [--out DIR]` (what `make reproduce` runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import run_and_exit, user_errors


@user_errors
def main(
    out: Optional[Path] = typer.Option(None, help="Output folder [default: runs/reproduce, or runs/reproduce-quick]."),
    quick: bool = typer.Option(False, help="The same steps at a size that finishes in minutes."),
    config: Optional[Path] = typer.Option(None, help="YAML config (configs/*.yaml) instead of the embedded default."),
) -> None:
    """Run the whole pipeline end to end and write results.json, results.md and plots."""
    from ..progress import only_our_bars
    from .config import ReproduceConfig, load_config, quick as quick_config
    from .pipeline import run_reproduce

    only_our_bars()
    cfg = load_config(config) if config else quick_config() if quick else ReproduceConfig()
    run_reproduce(cfg, out or Path("runs") / ("reproduce-quick" if quick else "reproduce"))


if __name__ == "__main__":
    run_and_exit(lambda: typer.run(main))
