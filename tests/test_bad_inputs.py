"""Every user mistake: one line naming the problem, non-zero exit, no traceback, nothing that looks finished."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from taid_cache.cli import app
from conftest import without_chat_template


def dump(teacher: Path, data: Path, out: Path, *extra: str):
    args = ["dump-teacher", "--model", str(teacher), "--data", str(data), "--output", str(out), "--engine", "hf", "--no-progress", *extra]
    return CliRunner().invoke(app, args)


def assert_user_error(result, out: Path, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]
    assert not (out / "manifest.json").exists()


@pytest.fixture()
def no_template_teacher(teacher_dir, tmp_path) -> Path:
    return without_chat_template(teacher_dir, tmp_path / "no-template")


@pytest.fixture()
def broken_teacher(teacher_dir, tmp_path) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(teacher_dir, copy)
    (copy / "config.json").write_text("{ not json")
    return copy


def test_missing_model(data_dir, tmp_path) -> None:
    assert_user_error(dump(tmp_path / "nowhere", data_dir / "chat.jsonl", tmp_path / "o"), tmp_path / "o", "cannot load model")


def test_unloadable_model(broken_teacher, data_dir, tmp_path) -> None:
    assert_user_error(dump(broken_teacher, data_dir / "chat.jsonl", tmp_path / "o"), tmp_path / "o", "cannot load model")


def test_no_usable_column(teacher_dir, data_dir, tmp_path) -> None:
    assert_user_error(dump(teacher_dir, data_dir / "nocolumn.jsonl", tmp_path / "o"), tmp_path / "o", "no usable column", "question")


def test_empty_dataset(teacher_dir, data_dir, tmp_path) -> None:
    assert_user_error(dump(teacher_dir, data_dir / "empty.jsonl", tmp_path / "o"), tmp_path / "o", "no rows")


def test_missing_data_file(teacher_dir, tmp_path) -> None:
    assert_user_error(dump(teacher_dir, tmp_path / "absent.jsonl", tmp_path / "o"), tmp_path / "o", "not found")


@pytest.mark.parametrize("k,words", [("0", ("--top-k", "at least 1")), ("513", ("--top-k 513", "vocabulary (512"))])
def test_bad_top_k(teacher_dir, data_dir, tmp_path, k: str, words) -> None:
    assert_user_error(dump(teacher_dir, data_dir / "chat.jsonl", tmp_path / "o", "--top-k", k, "--tail-samples", "0"), tmp_path / "o", *words)


def test_bad_top_p_and_precision(teacher_dir, data_dir, tmp_path) -> None:
    assert_user_error(dump(teacher_dir, data_dir / "chat.jsonl", tmp_path / "o", "--top-p", "1.5"), tmp_path / "o", "--top-p")
    assert_user_error(dump(teacher_dir, data_dir / "chat.jsonl", tmp_path / "o", "--precision", "int3"), tmp_path / "o", "--precision")


def test_max_length_beyond_context(teacher_dir, data_dir, tmp_path) -> None:
    assert_user_error(dump(teacher_dir, data_dir / "chat.jsonl", tmp_path / "o", "--max-length", "4096"), tmp_path / "o", "context of 1024")


def test_chat_rows_without_chat_template(no_template_teacher, data_dir, tmp_path) -> None:
    assert_user_error(dump(no_template_teacher, data_dir / "chat.jsonl", tmp_path / "o"), tmp_path / "o", "no chat template")


def test_conversation_the_template_rejects_late_in_the_data(teacher_dir, data_dir, tmp_path) -> None:
    """The last row has a role the template refuses: the dump stops before its first shard (small batches and
    shards would have committed the rows before it), and the corrected data then dumps into the same folder."""
    strict = tmp_path / "strict"
    shutil.copytree(teacher_dir, strict)
    config = json.loads((strict / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (strict / "tokenizer_config.json").write_text(json.dumps(config))
    (strict / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
        "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    rows = [json.loads(line) for line in (data_dir / "chat.jsonl").read_text().splitlines()]
    bad = rows + [{"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}]}]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    out = tmp_path / "o"
    small = ("--batch-tokens", "64", "--shard-size-mb", "0.001")
    assert_user_error(dump(strict, tmp_path / "bad.jsonl", out, *small), out, f"row {len(rows)}", "unknown role tool")
    assert not list(out.rglob("*.arrow")) and not list(out.rglob("worker-*.json"))
    fixed = dump(strict, data_dir / "chat.jsonl", out, *small)
    assert fixed.exit_code == 0, fixed.output
    assert json.loads((out / "manifest.json").read_text())["records"] == len(rows)


def test_output_holding_a_cache_with_other_settings(teacher_dir, data_dir, tmp_path) -> None:
    out = tmp_path / "o"
    first = dump(teacher_dir, data_dir / "tokens.jsonl", out, "--top-k", "4")
    assert first.exit_code == 0, first.output
    manifest = (out / "manifest.json").read_text()
    result = dump(teacher_dir, data_dir / "tokens.jsonl", out, "--top-k", "8")
    assert result.exit_code == 2 and "other settings" in result.output and "top_k" in result.output
    assert (out / "manifest.json").read_text() == manifest  # the existing cache is untouched


def test_output_folder_with_other_files(teacher_dir, data_dir, tmp_path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_user_error(dump(teacher_dir, data_dir / "tokens.jsonl", out), out, "not empty")


def test_verify_and_inspect_on_a_non_cache(tmp_path) -> None:
    for command in ("verify", "inspect"):
        result = CliRunner().invoke(app, [command, str(tmp_path)])
        assert result.exit_code == 2 and result.output.startswith("error: ") and "not a taid-cache cache" in result.output
