"""Every judgement of a set of students on held-out chat data, each student loaded in turn: against the teacher
(CE, KL, top-1 on the data's loss positions) and by generation (ROUGE-L, exact match, the teacher's NLL of the
answers), with the teacher's own generation scores as the reference row."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ..errors import UserError, first_line
from .against_teacher import against_teacher
from .generation import GenerationSettings, generation_scores, prompts_of


@dataclass(frozen=True)
class EvaluationSettings:
    prompts: int | None = 200  # held-out prompts answered (None: all)
    max_length: int = 2048  # of the held-out sequences scored against the teacher
    generation: GenerationSettings = GenerationSettings()


def load_model(path: Path, what: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise UserError(f"cannot load {what} {path}: {first_line(exc)}") from None


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def evaluate_students(students: dict[str, Path], rows: list[dict[str, Any]], sequences: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
                      settings: EvaluationSettings, teacher_dir: Path | None = None,
                      progress: Callable[[str], None] = lambda name: None, teacher_row: bool = True) -> dict[str, dict[str, float]]:
    """name -> metrics for each student, and "teacher" -> its CE and generation scores when a teacher is given
    (and `teacher_row`: a caller that already holds that row need not pay the teacher's generations again).
    `rows`: chat rows (the prompts and references); `sequences()`: their tokenised (input ids, loss mask) pairs.
    Students are scored in groups whose weights together stay within the teacher's (a larger student alone),
    each group in one pass of the teacher over the held-out data: the teacher's forward is paid once per group,
    not once per student. Memory holds the teacher, one group and the next student loaded."""
    prompts = prompts_of(rows, settings.prompts)
    if not prompts:
        raise UserError("the held-out data has no conversation with an assistant turn to answer")
    teacher, tokenizer = load_model(teacher_dir, "teacher") if teacher_dir is not None else (None, None)
    budget = weight_bytes(teacher) if teacher is not None else 0
    results: dict[str, dict[str, float]] = {}
    if teacher is not None and teacher_row:
        progress("teacher")
        results["teacher"] = generation_scores(teacher, tokenizer, prompts, settings.generation, teacher)
    group: dict[str, tuple[Any, Any]] = {}

    def score_group() -> None:
        scores = against_teacher(teacher, {name: model for name, (model, _) in group.items()}, sequences(),
                                 settings.max_length) if teacher is not None else {}
        if "teacher" in results and "ce" not in results["teacher"]:
            results["teacher"] = {"ce": scores["teacher"]["ce"], **results["teacher"]}
        for name, (model, student_tokenizer) in group.items():
            results[name] = {**scores.get(name, {}), **generation_scores(model, student_tokenizer, prompts, settings.generation, teacher)}
        group.clear()

    for name, path in students.items():
        progress(name)
        student = load_model(path, "student")
        if group and sum(weight_bytes(model) for model, _ in group.values()) + weight_bytes(student[0]) > budget:
            score_group()
        group[name] = student
    if group or ("teacher" in results and "ce" not in results["teacher"]):
        score_group()
    return results
