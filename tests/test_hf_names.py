"""The config file speaks transformers: TrainingArguments names read as ours (and the ones taid-cache has no option
for are refused by name), every scheduler of transformers' that needs no arguments, report_to with several
backends, an ambiguous file in one line, and `taid-cache --version`. Fast: nothing trains."""

from __future__ import annotations

import dataclasses
import json
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import assert_one_line
from taid_cache.cli import app
from taid_cache.config import (
    HF_NAMES, HF_REFUSED, LR_SCHEDULERS, DumpConfig, TrainConfig, check_fields, from_json, options_of, read_options, to_json,
)
from taid_cache.errors import UserError
from taid_cache.storage import open_store
from taid_cache.training import metrics
from taid_cache.training.distributed import Dist
from taid_cache.training.metrics import METRICS, MetricsLog, check_report_to, report_backends
from taid_cache.training.optim import EXCLUDED, TRANSFORMERS_NAME, lr_schedule

# TrainingArguments names of transformers 4 that transformers 5 dropped (still in files people have).
TRANSFORMERS_4 = {"warmup_ratio", "evaluation_strategy", "overwrite_output_dir", "logging_dir", "save_safetensors", "group_by_length"}
REQUIRED = "student: s\ncache: c\n"


def trained_with(monkeypatch, *args: str) -> TrainConfig:
    """The TrainConfig `taid-cache train-student ARGS` hands the pipeline (which is not run)."""
    seen = []
    monkeypatch.setattr("taid_cache.pipelines.train_student.train_student", seen.append)
    result = CliRunner().invoke(app, ["train-student", *args])
    assert result.exit_code == 0, result.output
    return seen[0]


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_the_tables_name_transformers_options_and_ours() -> None:
    from transformers import TrainingArguments

    theirs = {f.name for f in dataclasses.fields(TrainingArguments)}
    ours = {f.name for f in options_of(TrainConfig)}
    for hf, field in HF_NAMES.items():
        assert hf in theirs | TRANSFORMERS_4 and field in ours, (hf, field)
    for hf in HF_REFUSED:
        assert hf in theirs | TRANSFORMERS_4 and hf not in ours and hf not in HF_NAMES, hf


def test_a_trainer_config_file_reads_as_ours(tmp_path, monkeypatch) -> None:
    path = config_file(tmp_path, REQUIRED + "output_dir: run\nlearning_rate: 2e-5\nlr_scheduler_type: cosine_with_restarts\n"
                       "per_device_train_batch_size: 4\ngradient_accumulation_steps: 8\nwarmup_steps: 10\nweight_decay: 0.01\n"
                       "max_grad_norm: 0.5\nseed: 42\nreport_to: none\nnum_train_epochs: 2\nsave_steps: 100\neval_steps: 50\n"
                       "dataloader_num_workers: 2\ngradient_checkpointing: true\nbf16: true\n")
    assert read_options(TrainConfig, path) == {
        "student": "s", "cache": "c", "output": "run", "lr": 2e-5, "lr_scheduler": "cosine_with_restarts", "batch_size": 4,
        "grad_accum": 8, "warmup_steps": 10, "weight_decay": 0.01, "grad_clip": 0.5, "seed": 42, "report_to": ["none"],
        "epochs": 2.0, "save_every": 100, "eval_every": 50, "num_workers": 2, "activation_checkpointing": True,
        "precision": "bf16"}
    cfg = trained_with(monkeypatch, "--config", str(path), "--batch-size", "2")  # a flag still wins
    assert cfg.batch_size == 2 and cfg.lr == 2e-5 and cfg.output == "run" and cfg.precision == "bf16"
    check_fields(cfg)


@pytest.mark.parametrize("text,options", [
    ("bf16: false\n", {"precision": "fp32"}),
    ("bf16: true\n", {"precision": "bf16"}),
    ("warmup_steps: 0.1\n", {"warmup_ratio": 0.1}),  # transformers 5: a warmup_steps below 1 is the ratio
    ("warmup_ratio: 0.2\n", {"warmup_ratio": 0.2}),  # transformers 4's name, and ours
    ("warmup_steps: 20.0\n", {"warmup_steps": 20}),
    ("max_steps: 5\nlr: 1e-3\n", {"max_steps": 5, "lr": 1e-3}),  # 1e-3 is a float, not YAML 1.1's string
    ("report_to: [tensorboard, wandb]\n", {"report_to": ["tensorboard", "wandb"]}),
    ("report_to: all\n", {"report_to": ["all"]}),
])
def test_values_as_transformers_means_them(tmp_path, text: str, options: dict) -> None:
    assert read_options(TrainConfig, config_file(tmp_path, text)) == options


@pytest.mark.parametrize("text,words", [
    ("learning_rate: 1.0e-4\nlr: 1.0e-4\n", "learning_rate and lr both give --lr; keep one"),
    ("grad_accum: 2\ngradient_accumulation_steps: 2\n", "grad_accum and gradient_accumulation_steps both give --grad-accum"),
    ("bf16: true\nprecision: bf16\n", "bf16 and precision both give --precision"),
    ("warmup_steps: 0.1\nwarmup_ratio: 0.1\n", "warmup_steps and warmup_ratio both give --warmup-ratio"),
    ("max-steps: 3\nmax_steps: 3\n", "max-steps and max_steps both give --max-steps"),
    ("max_steps: 3\nlr: 0.1\nmax_steps: 4\n", "max_steps is given twice (lines 1 and 3)"),
    ("logging_steps: 10\n", "logging_steps is a transformers TrainingArguments option taid-cache does not take (every optimizer"),
    ("save_total_limit: 2\nfp16: false\n", "save_total_limit, fp16 are transformers TrainingArguments options taid-cache does "
     "not take"),
    ("bf16: 1\n", "bf16 must be true or false, not 1"),
    ("learning_rate: fast\n", "lr must be float, not 'fast'"),
    ("lerning_rate: 0.1\n", "unknown options lerning_rate"),
    ("report_to: [tensorboard, 3]\n", "report_to must be a list of strings"),
])
def test_an_ambiguous_or_foreign_file_is_one_line(tmp_path, text: str, words: str) -> None:
    path = config_file(tmp_path, REQUIRED + "output: o\n" + text)
    words = words.replace("lines 1 and 3", "lines 4 and 6")  # after the three lines above
    assert_one_line(CliRunner().invoke(app, ["train-student", "--config", str(path)]), f"config {path}: {words}")


def test_dump_teacher_files_keep_their_own_names(tmp_path) -> None:
    """Its seed is TrainingArguments' name already; the training names are not its options."""
    assert read_options(DumpConfig, config_file(tmp_path, "seed: 3\ntop-k: 8\n")) == {"seed": 3, "top_k": 8}
    for text, words in (("learning_rate: 0.1\n", "unknown options learning_rate"), ("top-k: 8\ntop_k: 8\n", "top-k and top_k")):
        with pytest.raises(UserError, match=words):
            read_options(DumpConfig, config_file(tmp_path, text))


def test_every_scheduler_transformers_runs_without_arguments_is_offered() -> None:
    from transformers import SchedulerType

    assert set(LR_SCHEDULERS) | set(EXCLUDED) == {s.value for s in SchedulerType}
    assert not set(LR_SCHEDULERS) & set(EXCLUDED)
    for name in EXCLUDED:  # each needs what --lr-scheduler cannot give it: an argument, or a metric to step on
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        from transformers import get_scheduler

        with pytest.raises((TypeError, ValueError)):
            get_scheduler(name, optimizer, num_warmup_steps=2, num_training_steps=10).step()


def learning_rates(scheduler, optimizer, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("name", LR_SCHEDULERS)
@pytest.mark.parametrize("warmup", [{"warmup_ratio": 0.3}, {"warmup_steps": 2}, {}])
def test_each_schedule_is_transformers_own(name: str, warmup: dict) -> None:
    from transformers import get_scheduler

    cfg = TrainConfig(student="s", cache="c", output="o", lr=1e-3, lr_scheduler=name, **warmup)
    ours = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    theirs = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    steps = {"warmup_ratio": 3, "warmup_steps": 2}.get(next(iter(warmup), ""), 0)  # ceil(0.3 * 10) = 3
    expected = learning_rates(get_scheduler(TRANSFORMERS_NAME.get(name, name), theirs, num_warmup_steps=steps,
                                            num_training_steps=10), theirs, 10)
    got = learning_rates(lr_schedule(cfg, ours, 10), ours, 10)
    assert got == expected
    if name == "constant" and steps:  # warm-up then constant, as --lr-scheduler constant always was
        assert got[0] == 0.0 and got[steps:] == [1e-3] * (10 - steps)


def test_report_to_is_a_list_on_the_command_line_and_in_files(tmp_path, monkeypatch) -> None:
    base = ["--student", "s", "--cache", "c", "--output", "o"]
    assert trained_with(monkeypatch, *base).report_to == []
    assert trained_with(monkeypatch, *base, "--report-to", "tensorboard", "--report-to", "wandb").report_to == ["tensorboard", "wandb"]
    assert trained_with(monkeypatch, *base, "--config", str(config_file(tmp_path, "report_to: wandb\n"))).report_to == ["wandb"]
    old = to_json(TrainConfig(student="s", cache="c", output="o")) | {"report_to": "none"}  # a config saved before the list
    assert from_json(TrainConfig, json.loads(json.dumps(old))).report_to == ["none"]
    with pytest.raises(UserError, match="--report-to must be one of none, tensorboard, wandb, all, not 'mlflow'"):
        check_fields(TrainConfig(student="s", cache="c", output="o", report_to=["tensorboard", "mlflow"]))
    assert "report_to" not in TrainConfig(student="s", cache="c", output="o").settings()  # a resumed run may change it


def test_report_backends_and_their_check(monkeypatch) -> None:
    assert report_backends([]) == report_backends(["none"]) == report_backends("none") == []
    assert report_backends(["wandb", "tensorboard", "wandb"]) == ["wandb", "tensorboard"]
    assert report_backends(["all"]) == ["tensorboard", "wandb"]  # both are installed here
    check_report_to(["tensorboard", "wandb"])
    check_report_to(["none"], "s3://bucket/run")  # nothing to write locally
    for names, output, words in ((["none", "wandb"], None, "--report-to none stands alone, not with wandb"),
                                 (["all", "tensorboard"], None, "--report-to all stands alone, not with tensorboard"),
                                 (["wandb"], "s3://bucket/run", "--report-to wandb writes its logs into a local --output folder"),
                                 (["comet_ml"], None, "--report-to must be one of")):
        with pytest.raises(UserError, match=words):
            check_report_to(names, output)
    monkeypatch.setattr(metrics, "installed", lambda backend: backend != "wandb")
    assert report_backends(["all"]) == ["tensorboard"]  # all: the ones installed
    with pytest.raises(UserError, match=r"--report-to wandb needs the wandb package \(pip install 'taid-cache\[wandb\]'\)"):
        check_report_to(["tensorboard", "wandb"])


def test_metrics_go_to_every_backend_listed(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(open_store(str(tmp_path)), Dist(), 0, ["tensorboard", "wandb"], {"lr": 1e-3})
    records = [{"step": s, "loss": 3.0 - s / 4, "lr": 1e-3} for s in range(1, 4)]
    for record in records:
        log.write(record)
    log.close()
    assert [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()] == records
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    board = EventAccumulator(str(events[0]))
    board.Reload()
    assert [(e.step, e.value) for e in board.Scalars("loss")] == [(r["step"], pytest.approx(r["loss"])) for r in records]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (tmp_path / ".wandb-id").read_text().strip() in runs[0].name


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"taid-cache {version('taid-cache')}\n", result.output
