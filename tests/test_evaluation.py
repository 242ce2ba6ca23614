"""Students judged by what they generate: ROUGE-L and exact match against references, answers that stop at the
end of the assistant turn, and the teacher's NLL of answers as a judge."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_cli
from taid_cache.evaluation.generation import GenerationSettings, generate_answers, generation_scores, prompts_of, teacher_nll
from taid_cache.evaluation.scores import exact_match, normalise, rouge_l


def test_rouge_l_and_exact_match_against_known_values() -> None:
    reference = "The cats were sitting on the mat"
    assert rouge_l([reference], [reference]) == pytest.approx(100.0)
    assert rouge_l(["completely unrelated words here"], [reference]) == 0.0
    # Stemmed (cats ~ cat, sitting ~ sit): an LCS of 5 of 7 reference and 5 of 5 prediction tokens.
    f = 2 * (5 / 5) * (5 / 7) / (5 / 5 + 5 / 7)
    assert rouge_l(["the cat sit on mat"], [reference]) == pytest.approx(100 * f)
    assert normalise("  Hello,   World! ") == "hello world"
    assert exact_match(["Hello, world!", "no"], ["hello world", "yes"]) == 50.0


def chat_rows(data_dir, n: int = 12) -> list[dict]:
    return [json.loads(line) for line in (data_dir / "chat.jsonl").read_text().splitlines()][:n]


def test_answers_stop_at_the_end_of_the_turn(teacher_dir, data_dir) -> None:
    """A model made to end its turn at once answers with the end marker alone (the tokenizer's eos), and every
    answer ends at its first end marker or at the length limit."""
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert tokenizer.eos_token_id == end  # the embedded tokenizer's eos is the turn end
    prompts = prompts_of(chat_rows(data_dir), None)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    settings = GenerationSettings(max_new_tokens=12, batch_size=5)
    for answer in generate_answers(model, tokenizer, prompts, settings):
        assert len(answer) == 12 or answer[-1] == end
        assert end not in answer[:-1]
    bias = torch.zeros(model.lm_head.weight.shape[0])
    bias[end] = 1e4  # the end marker's logit made dominant everywhere
    model.lm_head.bias = torch.nn.Parameter(bias)
    answers = generate_answers(model, tokenizer, prompts, settings)
    assert all(answer == [end] for answer in answers)
    # Made to answer with newlines alone: every answer is blank, and scored so.
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    bias[end], bias[newline[0]] = 0.0, 1e4
    scores = generation_scores(model, tokenizer, prompts, settings)
    assert scores["blank_answers"] == 1.0 and scores["answer_tokens"] == 12 and scores["rouge_l"] == 0.0


def test_the_teacher_prefers_its_own_greedy_answers_to_a_random_students(teacher_dir, student_dir, data_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    prompts = prompts_of(chat_rows(data_dir), None)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    settings = GenerationSettings(max_new_tokens=24, batch_size=4)
    own = teacher_nll(teacher, tokenizer, prompts, generate_answers(teacher, tokenizer, prompts, settings))
    other = teacher_nll(teacher, tokenizer, prompts, generate_answers(student, tokenizer, prompts, settings))
    assert own < other
    # Seeded sampling repeats itself and differs from greedy decoding.
    sampled = [generate_answers(student, tokenizer, prompts, GenerationSettings(24, 4, sample=True, seed=s)) for s in (3, 3, 4)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_the_evaluate_command(teacher_dir, student_dir, data_dir, tmp_path) -> None:
    proc = run_cli("evaluate", str(student_dir), "--data", str(data_dir / "chat.jsonl"), "--teacher", str(teacher_dir),
                   "--prompts", "6", "--max-new-tokens", "16", "--max-length", "256", "--json", str(tmp_path / "scores.json"))
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores) == {"teacher", str(student_dir)}
    student = scores[str(student_dir)]
    assert {"rouge_l", "exact_match", "teacher_nll", "ce", "kl", "top1", "answer_tokens", "answers_ended", "blank_answers"} <= set(student)
    assert 0 <= student["rouge_l"] <= 100 and student["kl"] > 0 and scores["teacher"]["teacher_nll"] < student["teacher_nll"]
    assert "ROUGE-L" in proc.stdout
    # Piped (not a terminal, as here): the table at its natural width, each row's name and figures on one line.
    row = next(line for line in proc.stdout.splitlines() if str(student_dir) in line)
    assert f"{student['kl']:.3f}" in row and f"{student['rouge_l']:.3f}" in row
    for flags, words in ((["--prompts", "0"], "--prompts must be"), (["--sample-temperature", "nan"], "--sample-temperature"),
                         (["--data", str(data_dir / "text.jsonl")], "chat rows")):
        args = ["evaluate", str(student_dir), "--data", str(data_dir / "chat.jsonl"), *flags]
        bad = run_cli(*args, check=False)
        assert bad.returncode == 2 and words in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_students_are_scored_in_groups_that_pay_the_teacher_once_each(teacher_dir, student_dir, data_dir, caches, tmp_path,
                                                                      monkeypatch) -> None:
    """Several students against the teacher: the same scores as each student evaluated alone, with one teacher
    pass over the held-out data per group of students whose weights reach the teacher's."""
    from taid_cache.evaluation import run
    from taid_cache.reproduce.models import LlamaSize, new_llama
    from taid_cache.shards import read_cache

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    big, small = tmp_path / "big", tmp_path / "small"
    new_llama(LlamaSize(), len(tokenizer), tokenizer, seed=5, out=big)  # the teacher's size
    new_llama(LlamaSize(hidden=64, layers=1, heads=1, intermediate=128), len(tokenizer), tokenizer, seed=6, out=small)
    sequences = lambda: ((r.input_ids, r.loss_mask) for r in read_cache(caches["top16"]))  # noqa: E731
    rows = chat_rows(data_dir)
    settings = run.EvaluationSettings(prompts=4, max_length=256, generation=GenerationSettings(max_new_tokens=8, batch_size=4))
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    prompts = prompts_of(rows, 4)
    expected = {"teacher": {"ce": run.against_teacher(teacher, {}, sequences(), 256)["teacher"]["ce"],
                            **generation_scores(teacher, tokenizer, prompts, settings.generation, teacher)}}
    for name, folder in (("big", big), ("a", student_dir), ("b", small)):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        expected[name] = {**run.against_teacher(teacher, {name: model}, sequences(), 256)[name],
                          **generation_scores(model, tokenizer, prompts, settings.generation, teacher)}
    passes: list[list[str]] = []
    real = run.against_teacher
    monkeypatch.setattr(run, "against_teacher", lambda t, students, *a: passes.append(list(students)) or real(t, students, *a))
    got = run.evaluate_students({"big": big, "a": student_dir, "b": small}, rows, sequences, settings, teacher_dir)
    assert passes == [["big"], ["a", "b"]]  # the teacher-sized student fills a group alone; the two small ones share one
    assert list(got) == ["teacher", "big", "a", "b"]
    for name, metrics in expected.items():
        assert got[name] == pytest.approx(metrics, rel=1e-6), name
    passes.clear()
    assert run.evaluate_students({"a": student_dir}, rows, sequences, settings, teacher_dir, teacher_row=False)["a"] == pytest.approx(expected["a"], rel=1e-6)
    assert passes == [["a"]]
