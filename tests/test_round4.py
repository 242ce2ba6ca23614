"""Reliability, round four: user mistakes that were tracebacks or silent garbage, now one line (each test failed on
the release before these fixes)."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import assert_one_line, run_cli
from test_attacks import cli, finished_run, train
from taid_cache.training.metrics import read_metrics


def test_a_temperature_past_what_distillation_uses_is_refused(student_dir, caches, tmp_path) -> None:
    """τ = 1e6 on a sampled cache logged losses of ±1e10 (the estimate's noise × τ²), exit 0."""
    assert_one_line(train(student_dir, caches["top16"], tmp_path / "t", "--loss", "fkl", "--temperature", "1e6"),
                    "--temperature must be in [0.1, 20]")


def test_the_logged_loss_of_a_sampled_cache_says_it_is_an_estimate(teacher_dir, student_dir, data_dir, tmp_path) -> None:
    run_cli("dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--output", str(tmp_path / "c"),
            "--engine", "hf", "--top-k", "4", "--tail-samples", "8", "--max-length", "128", "--no-progress")
    assert train(student_dir, tmp_path / "c", tmp_path / "run", "--loss", "fkl").exit_code == 0
    assert all(m["loss_is_estimate"] for m in read_metrics(tmp_path / "run") if "loss" in m)
    assert train(student_dir, tmp_path / "c", tmp_path / "online", "--loss", "fkl", "--teacher-model", str(teacher_dir)).exit_code == 0
    assert not any("loss_is_estimate" in m for m in read_metrics(tmp_path / "online"))


def test_an_unwritable_tensorboard_folder_on_resume_is_one_line(student_dir, caches, tmp_path) -> None:
    """A file where the tensorboard folder goes (as a folder the writer cannot write into is, to it): a traceback
    from its writer before; one line naming it now, and the resume with a writable one then runs."""
    out = finished_run(student_dir, caches["top16"], tmp_path / "run")
    (out / "tensorboard").write_text("not a folder")
    assert_one_line(train(student_dir, caches["top16"], out, "--save-every", "1", "--max-steps", "4", "--resume",
                          "--report-to", "tensorboard"), "--report-to tensorboard: cannot write", str(out / "tensorboard"))
    (out / "tensorboard").unlink()
    assert train(student_dir, caches["top16"], out, "--save-every", "1", "--max-steps", "4", "--resume", "--report-to",
                 "tensorboard").exit_code == 0


def test_evaluating_a_student_with_fewer_lm_head_rows_than_the_vocabulary_is_one_line(teacher_dir, student_dir, data_dir, tmp_path) -> None:
    small = AutoModelForCausalLM.from_pretrained(student_dir)
    small.resize_token_embeddings(100)
    small.save_pretrained(tmp_path / "small")
    AutoTokenizer.from_pretrained(student_dir).save_pretrained(tmp_path / "small")
    assert_one_line(cli("evaluate", str(tmp_path / "small"), "--data", str(data_dir / "chat.jsonl"), "--teacher", str(teacher_dir),
                        "--prompts", "2", "--max-new-tokens", "2"), "has 100 LM-head rows, fewer than the tokenizer's")


def test_an_export_removes_what_a_killed_export_left_beside_its_folder(caches, tmp_path) -> None:
    """A kill mid-export leaves its hidden temporary folder; the rerun removes it (it never did)."""
    left = tmp_path / ".out.tmp-host-1-abcd1234"
    (left / "data-00000.parquet").parent.mkdir(parents=True)
    (left / "data-00000.parquet").write_bytes(b"half")
    assert cli("export", str(caches["top16"]), str(tmp_path / "out")).exit_code == 0
    assert not left.exists() and (tmp_path / "out" / "data-00000.parquet").is_file()
