"""The one progress-bar layout of every long step (dump, train, pre-training): a bold label, the bar, done/total,
the caller's own columns, and the time elapsed; and no other library's bars beside it."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn


def step_bar(label: str, console: Console | None, enabled: bool, *columns: ProgressColumn) -> Progress:
    """A rich Progress for `label`; without `columns`, one text column shows the task's `info` field."""
    middle = columns or (TextColumn("{task.fields[info]}"),)
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), *middle, TimeElapsedColumn(),
                    console=console, disable=not enabled)


def only_our_bars() -> None:
    """Switch off transformers' own progress bars (weights loading): ours are the ones to watch."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
