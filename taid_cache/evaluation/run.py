"""Every judgement of a set of students on held-out chat data, each student loaded in turn: against the teacher
(CE, KL, top-1 on the data's loss positions) and by generation (ROUGE-L, exact match, the teacher's NLL of the
answers), with the teacher's own generation scores as the reference row."""

from __future__ import annotations

from dataclasses import dataclass, replace
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


def model_context(folder: Path) -> int | None:
    """The positions a model was built for (its config's max_position_embeddings), or None when it says none."""
    from transformers import AutoConfig

    try:
        value = getattr(AutoConfig.from_pretrained(folder).get_text_config(), "max_position_embeddings", None)
    except Exception:
        return None  # load_model says what cannot be read
    return value if isinstance(value, int) and value > 0 else None


def shared_context(folders: dict[str, Path]) -> tuple[int | None, str | None]:
    """The smallest context of these models and whose it is: every prompt, answer and scored sequence fits it,
    so every model answers the same prompts and the teacher judges answers it can read."""
    known = {name: c for name, folder in folders.items() if (c := model_context(folder)) is not None}
    if not known:
        return None, None
    name = min(known, key=known.get)
    return known[name], name


def evaluate_students(students: dict[str, Path], rows: list[dict[str, Any]], sequences: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
                      settings: EvaluationSettings, teacher_dir: Path | None = None,
                      progress: Callable[[str], None] = lambda name: None, teacher_row: bool = True,
                      say: Callable[[str], None] = lambda line: None,
                      answered: Callable[[str, int, int], None] = lambda name, done, total: None) -> dict[str, dict[str, float]]:
    """name -> metrics for each student, and "teacher" -> its CE and generation scores when a teacher is given
    (and `teacher_row`: a caller that already holds that row need not pay the teacher's generations again).
    `rows`: chat rows (the prompts and references); `sequences()`: their tokenised (input ids, loss mask) pairs.
    Students are scored in groups whose weights together stay within the teacher's (a larger student alone),
    each group in one pass of the teacher over the held-out data: the teacher's forward is paid once per group,
    not once per student. Memory holds the teacher, one group and the next student loaded.
    Everything stays within the smallest context of the models (`shared_context`): the scored sequences are cut
    to it, a prompt that fills it is not answered, no answer runs past it. `say(line)`: what was cut or left
    unscored, once each; `progress(name)`: a model's turn begins; `answered(name, done, total)`: its prompts."""
    prompts = prompts_of(rows, settings.prompts)
    if not prompts:
        raise UserError("the held-out data has no conversation with an assistant turn to answer")
    context, smallest = shared_context({**({"teacher": teacher_dir} if teacher_dir is not None else {}), **students})
    generation = settings.generation if context is None or settings.generation.context is not None else replace(
        settings.generation, context=context)
    max_length = settings.max_length if context is None else min(settings.max_length, context)
    if max_length < settings.max_length:
        say(f"held-out sequences are scored on their first {max_length} tokens, the context of {smallest} "
            f"(a max length of {settings.max_length} was asked)")
    teacher, tokenizer = load_model(teacher_dir, "teacher") if teacher_dir is not None else (None, None)
    budget = weight_bytes(teacher) if teacher is not None else 0
    results: dict[str, dict[str, float]] = {}
    said: set[str] = set()

    def say_once(line: str) -> None:
        if line not in said:
            said.add(line)
            say(line)

    def generated(name: str, model, model_tokenizer) -> dict[str, float]:
        done = [0]

        def on_batch(count: int) -> None:
            done[0] += count
            answered(name, done[0], len(prompts))

        answered(name, 0, len(prompts))
        scores = generation_scores(model, model_tokenizer, prompts, generation, teacher, on_batch)
        left = len(prompts) - scores["prompts_answered"]
        if left:
            say_once(f"{left} of {len(prompts)} held-out prompts fill the context of {smallest} ({context} tokens) and "
                     f"are not answered" + (": no generation scores" if not scores["prompts_answered"] else
                                            f"; generation scores are over the other {scores['prompts_answered']}"))
        return scores

    if teacher is not None and teacher_row:
        progress("teacher")
        results["teacher"] = generated("teacher", teacher, tokenizer)
    group: dict[str, tuple[Any, Any]] = {}
    teacher_ce = [False]  # the teacher's own CE joined to its row (by the first group's pass)

    def score_group() -> None:
        scores = against_teacher(teacher, {name: model for name, (model, _) in group.items()}, sequences(),
                                 max_length) if teacher is not None else {}
        if teacher is not None:
            say_unscored(scores["teacher"], max_length, say_once)
        if "teacher" in results and not teacher_ce[0]:
            results["teacher"] = {**({"ce": scores["teacher"]["ce"]} if "ce" in scores["teacher"] else {}), **results["teacher"]}
            teacher_ce[0] = True
        for name, (model, student_tokenizer) in group.items():
            results[name] = {**scores.get(name, {}), **generated(name, model, student_tokenizer)}
        group.clear()

    for name, path in students.items():
        progress(name)
        student = load_model(path, "student")
        if group and sum(weight_bytes(model) for model, _ in group.values()) + weight_bytes(student[0]) > budget:
            score_group()
        group[name] = student
    if group or ("teacher" in results and not teacher_ce[0]):
        score_group()
    return results


def say_unscored(counts: dict[str, float], max_length: int, say: Callable[[str], None]) -> None:
    """The held-out loss positions past the scored length, in words: some (the scores are over the rest), or all
    (then there are no CE, KL and top-1 to report)."""
    scored, unscored = counts["scored_positions"], counts["unscored_positions"]
    if not scored:
        say(f"no held-out loss position lies within the first {max_length} tokens of its sequence ({unscored} lie past "
            "them): CE, KL and top-1 are not reported (raise --max-length, up to the models' context)")
    elif unscored:
        say(f"{unscored} of {scored + unscored} held-out loss positions lie past the first {max_length} tokens of their "
            f"sequences and are not scored: CE, KL and top-1 are over the other {scored}")
