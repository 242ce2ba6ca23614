"""The command line as people expect it: options from a YAML file (a flag wins), transformers' learning-rate
schedules, tensorboard and wandb logs, a help text that shows every option whole, and a checkpoint turned into
a Hugging Face folder."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import MISSING

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import ROOT, run_cli
from taid_cache.cli import app, option_help
from taid_cache.config import DumpConfig, TrainConfig, flag, options_of
from taid_cache.training.metrics import read_metrics
from test_attacks import assert_one_line, train


def steps_of(run) -> list[dict]:
    return [m for m in read_metrics(run) if "loss" in m]


def test_options_from_a_config_file_and_a_flag_that_wins(student_dir, caches, tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"student: {student_dir}\ncache: {caches['top16']}\noutput: {tmp_path / 'a'}\nmax-steps: 3\nbatch_size: 4\n"
                      "loss: fkl\nmax_length: 128\nprogress: false\n")
    run_cli("train-student", "--config", str(config))
    assert len(steps_of(tmp_path / "a")) == 3
    run_cli("train-student", "--config", str(config), "--output", str(tmp_path / "b"), "--max-steps", "2")  # flags win
    assert len(steps_of(tmp_path / "b")) == 2
    # The same file serves the entry torchrun's ranks run, and gives the same steps.
    (tmp_path / "c.yaml").write_text(config.read_text().replace(str(tmp_path / "a"), str(tmp_path / "c")))
    subprocess.run([sys.executable, "-m", "taid_cache.pipelines.train_student", str(tmp_path / "c.yaml")], check=True, cwd=ROOT,
                   capture_output=True)
    assert [m["loss"] for m in steps_of(tmp_path / "c")] == [m["loss"] for m in steps_of(tmp_path / "a")]
    for text, words in (("stdent: x\n", "unknown options stdent"), ("max_steps: three\n", "max_steps must be int"),
                        ("- a\n", "must be a mapping of options")):
        (tmp_path / "bad.yaml").write_text(text)
        result = CliRunner().invoke(app, ["train-student", "--config", str(tmp_path / "bad.yaml")])
        assert_one_line(result, words)
    assert_one_line(CliRunner().invoke(app, ["train-student", "--max-steps", "1"]), "missing --student, --cache, --output")


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_learning_rate_schedules_are_transformers_own(student_dir, caches, tmp_path, schedule: str) -> None:
    """The logged learning rate of each step against the schedule's formula (warm-up over ceil(0.3 · 10) = 3)."""
    out = tmp_path / schedule
    assert train(student_dir, caches["top16"], out, "--max-steps", "10", "--lr", "1e-3", "--lr-scheduler", schedule,
                 "--warmup-ratio", "0.3").exit_code == 0
    warmup, total = 3, 10
    decay = {"cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)), "linear": lambda p: 1 - p, "constant": lambda p: 1.0}[schedule]
    expected = [1e-3 * (s / warmup if s < warmup else decay((s - warmup) / (total - warmup))) for s in range(total)]
    np.testing.assert_allclose([m["lr"] for m in steps_of(out)], expected, rtol=1e-6, atol=1e-12)


def test_report_to_tensorboard_and_wandb_offline(student_dir, caches, tmp_path, monkeypatch) -> None:
    assert train(student_dir, caches["top16"], tmp_path / "tb", "--report-to", "tensorboard").exit_code == 0
    events = list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(events[0]))
    board.Reload()
    assert [e.value for e in board.Scalars("loss")] == pytest.approx([m["loss"] for m in steps_of(tmp_path / "tb")])
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert train(student_dir, caches["top16"], tmp_path / "wb", "--report-to", "wandb").exit_code == 0
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (tmp_path / "wb" / ".wandb-id").read_text().strip() in runs[0].name  # a resume logs into the same run


def test_evaluations_and_resumes_are_said_on_the_console(student_dir, caches, tmp_path) -> None:
    out = tmp_path / "run"
    first = train(student_dir, caches["top16"], out, "--max-steps", "4", "--save-every", "2", "--eval-cache", str(caches["top16"]),
                  "--eval-every", "2")
    assert first.exit_code == 0
    assert re.search(r"step 2: eval_ce [0-9.]+, eval_kl_cache [0-9.]+, eval_top1 [0-9.]+", first.output), first.output
    for f in out.glob("model*.safetensors"):
        f.unlink()
    (out / "config.json").unlink()
    again = train(student_dir, caches["top16"], out, "--max-steps", "4", "--save-every", "2", "--eval-cache", str(caches["top16"]),
                  "--eval-every", "2", "--resume")
    assert again.exit_code == 0 and "resumed from step 2 of 4" in again.output, again.output


@pytest.mark.parametrize("command,config", [("dump-teacher", DumpConfig), ("train-student", TrainConfig)])
def test_help_shows_every_option_whole_with_its_help_choices_range_and_default(command: str, config: type) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    text = " ".join(result.output.split())
    for f in options_of(config):
        assert re.search(rf"(^|\s){re.escape(flag(f.name))}[ /\[<]", text), f.name  # the full name, never cut
        # Its text, choices and range, brackets included (compared without the whitespace the wrapping adds).
        assert "".join(option_help(f).split()) in "".join(text.split()), f.name
        if f.default is not MISSING and f.default is not None and not isinstance(f.default, bool):
            assert f"[default: {f.default}]" in text, f.name


def test_help_imports_neither_torch_nor_transformers() -> None:
    code = ("import sys; from typer.testing import CliRunner; from taid_cache.cli import app; "
            "[CliRunner().invoke(app, [c, '--help']) for c in ('dump-teacher', 'train-student', 'inspect', 'export')]; "
            "print(sorted(m for m in ('torch', 'transformers', 'vllm', 'datasets') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "80"})
    assert proc.stdout.strip() == "[]", proc.stdout


def test_a_checkpoint_becomes_a_hugging_face_folder(student_dir, caches, tmp_path) -> None:
    out = tmp_path / "run"
    assert train(student_dir, caches["top16"], out, "--max-steps", "4", "--save-every", "2").exit_code == 0
    checkpoint = out / "checkpoints" / "step-00000002"
    run_cli("export-checkpoint", str(checkpoint), str(tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # an independent read of the checkpoint

    dcp_to_torch_save(checkpoint, tmp_path / "flat.pt")
    state = torch.load(tmp_path / "flat.pt", weights_only=False)["model"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[f"lm.{name}"], rtol=0, atol=0)
    initial, final = AutoModelForCausalLM.from_pretrained(student_dir), AutoModelForCausalLM.from_pretrained(out)
    name = "model.embed_tokens.weight"
    assert not torch.equal(model.state_dict()[name], initial.state_dict()[name])
    assert not torch.equal(model.state_dict()[name], final.state_dict()[name])
    proc = run_cli("export-checkpoint", str(checkpoint), str(tmp_path / "hf"), check=False)
    assert proc.returncode == 2 and "not an empty folder" in proc.stderr
    assert json.loads((checkpoint / "meta.json").read_text())["step"] == 2
