"""`taid-cache evaluate`: the command's checks and inputs (the held-out rows, tokenised with the students'
tokenizer), then `run.evaluate_students`."""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from ..config import Range
from ..errors import UserError
from ..storage.folders import fetch_local
from .generation import GenerationSettings
from .run import EvaluationSettings, evaluate_students


def check(name: str, value: float, within: str) -> None:
    bounds = Range.parse(within)
    if value not in bounds:
        raise UserError(f"--{name} must be {bounds}, not {value}")


def evaluate_command(students: list[str], data: str, teacher: str | None, prompts: int, max_new_tokens: int, batch_size: int,
                     sample: bool, sample_temperature: float, seed: int, max_length: int, as_json: Path | None,
                     show_progress: bool = True) -> dict:
    """The command on local folders and files, or on URIs of them (fetched into a temporary folder first)."""
    for name, value, within in (("prompts", prompts, "[1, inf)"), ("max-new-tokens", max_new_tokens, "[1, inf)"),
                                ("batch-size", batch_size, "[1, inf)"), ("sample-temperature", sample_temperature, "(0, inf)"),
                                ("seed", seed, "[0, 2^64)"), ("max-length", max_length, "[2, inf)")):
        check(name, value, within)
    if as_json is not None and not as_json.parent.is_dir():
        raise UserError(f"--json {as_json}: the folder {as_json.parent} does not exist")
    with tempfile.TemporaryDirectory(prefix="taid-cache-evaluate-") as scratch:
        local = {name: str(fetch_local(name, Path(scratch) / f"{i}")) for i, name in enumerate([*students, data, *([teacher] if teacher else [])])}
        return evaluate_local({name: local[name] for name in students}, local[data], local[teacher] if teacher else None,
                              data, prompts, max_new_tokens, batch_size, sample, sample_temperature, seed, max_length, as_json,
                              show_progress)


@contextlib.contextmanager
def reporting(enabled: bool) -> Iterator[tuple]:
    """On stderr: one bar per model's answers (rich's, as dump-teacher's and train-student's; drawn live on a
    terminal), and each note (what was cut or not scored) as a line of its own."""
    from rich.console import Console

    from ..progress import step_bar

    console = Console(stderr=True)
    bars = step_bar("evaluate", console, enabled)
    tasks: dict[str, int] = {}

    def say(line: str) -> None:
        console.print(f"note: {line}", markup=False, highlight=False, soft_wrap=True)

    def answered(name: str, done: int, total: int) -> None:
        if name not in tasks:
            tasks[name] = bars.add_task(name, total=total, info=f"{name}: answers")
        bars.update(tasks[name], completed=done)

    with bars:
        yield say, answered


def evaluate_local(students: dict[str, str], data: str, teacher: str | None, data_name: str, prompts: int, max_new_tokens: int,
                   batch_size: int, sample: bool, sample_temperature: float, seed: int, max_length: int, as_json: Path | None,
                   show_progress: bool = True) -> dict:
    from transformers import AutoTokenizer

    from ..fingerprints import resolve_model, tokenizer_hash
    from ..inputs import RowTokenizer, check_rows, load_rows, resolve_data, source_tag

    folders = {name: resolve_model(path, "student") for name, path in students.items()}
    teacher_dir = resolve_model(teacher, "teacher") if teacher is not None else None
    tokenizer = AutoTokenizer.from_pretrained(next(iter(folders.values())))
    for name, folder in folders.items():  # before the teacher's tokenizer is compared: a missing template is the cause
        if not getattr(AutoTokenizer.from_pretrained(folder), "chat_template", None):
            raise UserError(f"student {name}'s tokenizer has no chat template: evaluate answers the held-out chat "
                            "prompts through it")
    if teacher_dir is not None and tokenizer_hash(AutoTokenizer.from_pretrained(teacher_dir)) != tokenizer_hash(tokenizer):
        raise UserError("the teacher's tokenizer differs from the students': its NLL and KL would compare other tokens")
    if teacher_dir is not None:
        from transformers import AutoConfig

        for name, folder in folders.items():  # from the configs: before any model is loaded or anything generated
            rows = AutoConfig.from_pretrained(folder).get_text_config().vocab_size
            if rows < len(tokenizer):
                raise UserError(f"student {name} has {rows} LM-head rows, fewer than the tokenizer's {len(tokenizer)} tokens: "
                                "its KL and top-1 against the teacher cannot be scored")
    files = resolve_data([data])
    rows = load_rows(files, "train")
    if "messages" not in rows.column_names:
        raise UserError(f"--data {data_name}: held-out data must be chat rows (a messages column); it has {', '.join(rows.column_names)}")
    check_rows(rows, "chat", len(tokenizer))
    # Whole: against_teacher cuts each to what it scores, and counts the loss positions past that.
    to_sequence = RowTokenizer(tokenizer, "chat", sys.maxsize, "truncate", source_tag(files))

    def sequences():
        for index, row in enumerate(rows):
            seq, _ = to_sequence(row, index)
            if seq is not None:
                yield seq.input_ids, seq.loss_mask

    settings = EvaluationSettings(prompts, max_length, GenerationSettings(max_new_tokens, batch_size, sample, sample_temperature, seed))
    with reporting(show_progress) as (say, answered):
        results = evaluate_students(folders, list(rows), sequences, settings, teacher_dir, say=say, answered=answered)
    if as_json is not None:
        as_json.write_text(json.dumps(results, indent=2) + "\n")
    return results
