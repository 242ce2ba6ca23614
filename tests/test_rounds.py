"""`taid-cache distil-on-policy`: rounds of generate -> dump -> one resumed training run, the optimizer, schedules
and t carried across rounds; a crash anywhere resumes to the same student; rounds reused by student."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import assert_one_line, run_cli, write_jsonl
from taid_cache.errors import UserError
from taid_cache.fingerprints import model_hash
from taid_cache.onpolicy.rounds import RoundsConfig, distil_on_policy
from taid_cache.shards.manifest import load_manifest
from taid_cache.training.metrics import read_metrics

LR = 1e-3
STEPS = 4


@pytest.fixture(scope="module")
def prompts(data_dir, tmp_path_factory) -> Path:
    rows = [json.loads(line) for line in (data_dir / "chat.jsonl").read_text().splitlines()[:6]]
    return write_jsonl(tmp_path_factory.mktemp("rounds-prompts") / "prompts.jsonl", rows)


def config(tmp: Path, student_dir, teacher_dir, caches, prompts, output: Path, **over) -> Path:
    values = {"method": "gkd", "student": str(student_dir), "teacher": str(teacher_dir), "prompts": [str(prompts)],
              "cache": str(caches["top16"]), "output": str(output), "rounds": 2, "max_steps": STEPS,
              "rounds_folder": str(tmp / "rounds"),
              "generate": {"engine": "hf", "max_new_tokens": 8, "batch_size": 3, "max_length": 128, "rows_per_part": 3},
              "dump": {"engine": "hf", "max_length": 256},
              "train": {"batch_size": 2, "max_length": 128, "lr": LR, "save_every": 1}, **over}
    path = tmp / f"{output.name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def rounds(path: Path, check: bool = True):
    return run_cli("distil-on-policy", "--config", str(path), "--no-progress", check=check)


def weights(run: Path) -> dict:
    return load_file(next((run / "train").glob("model*.safetensors")))


@pytest.fixture(scope="module")
def finished(student_dir, teacher_dir, caches, prompts, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("rounds")
    path = config(tmp, student_dir, teacher_dir, caches, prompts, tmp / "gkd")
    rounds(path)
    return tmp, tmp / "gkd"


def test_rounds_train_one_run_on_the_growing_mixture(finished, student_dir) -> None:
    tmp, out = finished
    steps = [m for m in read_metrics(out / "train") if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    # One cosine schedule over all rounds (transformers' cosine without warm-up), not one per round.
    assert [m["lr"] for m in steps] == pytest.approx([LR * 0.5 * (1 + math.cos(math.pi * k / STEPS)) for k in range(STEPS)], rel=1e-9)
    folders = sorted((tmp / "rounds").iterdir())
    assert len(folders) == 2
    students = [model_hash(student_dir), model_hash(out / "students" / "after-round-1")]
    lineages = {load_manifest(str(f / "cache")).settings.lineage.fingerprint for f in folders}
    assert lineages == set(students)  # round 1 answered by the initial student, round 2 by round 1's checkpoint
    round_two = next(f for f in folders if load_manifest(str(f / "cache")).settings.lineage.fingerprint == students[1])
    record = json.loads((round_two / "generation" / "generation.json").read_text())
    assert record["settings"]["student_hash"] == students[1] and record["done"]
    meta = json.loads((out / "train" / "checkpoints" / "step-00000003" / "meta.json").read_text())
    assert len(meta["settings"]["mix_identities"]) == 2  # the off-policy cache, then both rounds' caches
    assert meta["settings"]["mix_weights"] == pytest.approx([0.5, 0.25, 0.25])


def test_a_crash_in_a_generation_or_in_training_resumes_to_the_same_student(finished, student_dir, teacher_dir, caches,
                                                                            prompts, tmp_path, monkeypatch) -> None:
    from taid_cache.pipelines import generate
    from taid_cache.training import trainer

    tmp = tmp_path
    path = config(tmp, student_dir, teacher_dir, caches, prompts, tmp / "gkd")
    real_answers, real_record = generate.HfAnswerer.answers, trainer.Trainer.record
    calls = []

    def crash_in_round_two_generation(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # round 1's two parts, then round 2's first
            raise RuntimeError("killed")
        return real_answers(self, *args, **kwargs)

    def crash_at_step_four(self, result):
        if self.progress.step == 4:
            raise RuntimeError("killed")
        return real_record(self, result)

    monkeypatch.setattr(generate.HfAnswerer, "answers", crash_in_round_two_generation)
    with pytest.raises(RuntimeError, match="killed"):
        rounds(path)
    monkeypatch.setattr(generate.HfAnswerer, "answers", real_answers)
    monkeypatch.setattr(trainer.Trainer, "record", crash_at_step_four)
    with pytest.raises(RuntimeError, match="killed"):
        rounds(path)
    monkeypatch.setattr(trainer.Trainer, "record", real_record)
    rounds(path)
    expected, got = weights(finished[1]), weights(tmp / "gkd")
    assert expected.keys() == got.keys() and all((expected[k] == got[k]).all() for k in expected)
    assert [m["step"] for m in read_metrics(tmp / "gkd" / "train") if "loss" in m] == list(range(1, STEPS + 1))


def test_a_run_moved_elsewhere_part_way_resumes_to_the_same_student(finished, student_dir, teacher_dir, caches, prompts,
                                                                    tmp_path, monkeypatch) -> None:
    # Killed in round 2's generation, the run folder and its rounds moved: round 2's student is known by its
    # weights, not its old path, so the rerun continues there and ends where the uninterrupted run did.
    from taid_cache.pipelines import generate

    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    real, calls = generate.HfAnswerer.answers, []

    def crash_in_round_two_generation(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(generate.HfAnswerer, "answers", crash_in_round_two_generation)
    with pytest.raises(RuntimeError, match="killed"):
        rounds(config(here, student_dir, teacher_dir, caches, prompts, here / "gkd"))
    monkeypatch.setattr(generate.HfAnswerer, "answers", real)
    here.rename(there)
    rounds(config(there, student_dir, teacher_dir, caches, prompts, there / "gkd"))
    expected, got = weights(finished[1]), weights(there / "gkd")
    assert expected.keys() == got.keys() and all((expected[k] == got[k]).all() for k in expected)


def test_a_run_from_the_same_student_reuses_its_first_round(finished, student_dir, teacher_dir, caches, prompts) -> None:
    tmp, _ = finished
    before = {f.name: (f / "cache" / "manifest.json").stat().st_mtime_ns for f in (tmp / "rounds").iterdir()}
    path = config(tmp, student_dir, teacher_dir, caches, prompts, tmp / "distillm", method="distillm", rounds=2)
    rounds(path)
    after = {f.name: (f / "cache" / "manifest.json").stat().st_mtime_ns for f in (tmp / "rounds").iterdir()}
    assert len(after) == 3 and all(after[name] == stamp for name, stamp in before.items())  # round 1 shared, untouched


def test_a_rerun_with_the_teacher_and_prompts_moved_and_progress_shown_finds_its_rounds(
        finished, student_dir, teacher_dir, caches, prompts, tmp_path) -> None:
    # Rounds are known by what made them: the models and prompts by hash, not by path, and not by whether the run
    # shows progress bars. A finished run rerun so finds every round made and the training done: nothing is made again.
    tmp, out = finished
    teacher, moved_prompts = tmp_path / "teacher", tmp_path / "prompts.jsonl"
    shutil.copytree(teacher_dir, teacher)
    shutil.copy(prompts, moved_prompts)
    before = {f.name: (f / "cache" / "manifest.json").stat().st_mtime_ns for f in (tmp / "rounds").iterdir()}
    trained = weights(out)
    path = config(tmp_path, student_dir, teacher, caches, moved_prompts, out, rounds_folder=str(tmp / "rounds"))
    result = run_cli("distil-on-policy", "--config", str(path), "--progress")
    assert "is already complete: nothing to do" in result.stderr
    after = {f.name: (f / "cache" / "manifest.json").stat().st_mtime_ns for f in (tmp / "rounds").iterdir()}
    assert after == before
    assert all((trained[k] == v).all() for k, v in weights(out).items())


def test_a_round_cache_of_another_student_is_refused(finished, student_dir, teacher_dir, caches, prompts, tmp_path) -> None:
    tmp, out = finished
    first = next(f for f in (tmp / "rounds").iterdir()
                 if load_manifest(str(f / "cache")).settings.lineage.fingerprint == model_hash(student_dir))
    other = next(f for f in (tmp / "rounds").iterdir() if f != first and (f / "generation" / "generation.json").read_text()
                 .count(str(out)))  # round 2 of this run
    (other / "cache").rename(tmp_path / "kept")
    shutil.copytree(first / "cache", other / "cache")  # round 2's folder now holds round 1's answers
    try:
        result = rounds(config(tmp, student_dir, teacher_dir, caches, prompts, out), check=False)
    finally:
        shutil.rmtree(other / "cache")
        (tmp_path / "kept").rename(other / "cache")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith("error: the round cache ") and "not of the round's student" in lines[-1], result.stderr


def test_bad_rounds_configs_fail_in_one_line_before_any_write(student_dir, teacher_dir, caches, prompts, finished, tmp_path) -> None:
    out = tmp_path / "run"
    cases = [
        ({"train": {"max_steps": 3}}, "run.yaml: train: max_steps is set by the rounds"),
        ({"generate": {"temprature": 1}}, "unknown options temprature"),
        ({"cache": None}, "give cache"),
        ({"method": "opd"}, "would not be read"),
        ({"rounds": 9}, "every round trains at least one step"),
        ({"teacher": str(student_dir)}, "another teacher"),
        ({"train": {"lr": -1}}, "--lr must be"),
        # What the training could not read, refused before the first round is generated and dumped.
        ({"cache": None, "on_policy_share": 1, "dump": {"engine": "hf", "tail_samples": 8}}, "--loss js", "sampled tail"),
        ({"dump": {"engine": "hf", "top_k": 8}}, "dump: top_k 8", "taken from the cache"),
        ({"method": "opd", "on_policy_share": 0.5}, "--loss opd", "--target-logprobs"),
        ({"method": "opd", "on_policy_share": 0.5, "dump": {"engine": "hf", "target_logprobs": True}},
         "dump: target_logprobs True", "dump the cache again with target_logprobs True"),
        ({"method": "opd", "cache": None, "generate": {"engine": "hf", "temperature": 0.7}}, "temperature 0.7", "reverse KL"),
    ]
    for over, *words in cases:
        result = rounds(config(tmp_path, student_dir, teacher_dir, caches, prompts, out, **over), check=False)
        assert_one_line(result, *words)
        assert not out.exists() and not (tmp_path / "rounds").exists(), over
    # A changed generation setting on a rerun of a run part-way or finished: refused, nothing started.
    tmp, finished_out = finished
    changed = config(tmp, student_dir, teacher_dir, caches, prompts, finished_out,
                     generate={"engine": "hf", "max_new_tokens": 9, "batch_size": 3, "max_length": 128, "rows_per_part": 3})
    before = sorted(p.name for p in (tmp / "rounds").iterdir())
    assert_one_line(rounds(changed, check=False), "other settings", "max_new_tokens")
    assert sorted(p.name for p in (tmp / "rounds").iterdir()) == before


def test_a_python_caller_setting_what_the_rounds_set_is_refused_in_one_line(student_dir, teacher_dir, caches, prompts,
                                                                            tmp_path) -> None:
    cfg = RoundsConfig(method="gkd", student=str(student_dir), teacher=str(teacher_dir), prompts=[str(prompts)],
                       output=str(tmp_path / "run"), max_steps=STEPS, cache=str(caches["top16"]),
                       train={"max_steps": 3, "mix": []})
    with pytest.raises(UserError, match=r"^train: max_steps, mix are set by the rounds$"):
        distil_on_policy(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_stop_at_step_needs_a_fixed_schedule(student_dir, caches, tmp_path) -> None:
    common = ["train-student", "--student", str(student_dir), "--cache", str(caches["top16"]), "--output", str(tmp_path / "run"),
              "--no-progress"]
    for extra in (["--epochs", "1", "--stop-at-step", "2"], ["--max-steps", "2", "--stop-at-step", "3"]):
        assert_one_line(run_cli(*common, *extra, check=False), "--stop-at-step", "--max-steps")
    assert not (tmp_path / "run").exists()
