"""The options are declared once (taid_cache/config.py): the commands, the JSON form and the checks follow it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from taid_cache.cli import app
from taid_cache.config import DumpConfig, Range, TrainConfig, check_fields, from_json, options_of, to_json
from taid_cache.errors import UserError
from taid_cache.losses import LOSSES
from taid_cache.pipelines.train_student import main


@pytest.mark.parametrize("name,config", [("dump-teacher", DumpConfig), ("train-student", TrainConfig)])
def test_command_options_are_the_config_fields(name, config) -> None:
    command = typer.main.get_command(app).commands[name]
    params = {p.name: p for p in command.params}
    assert params.pop("config_file").opts == ["--config"]  # a YAML / JSON file of these same fields
    assert set(params) == {f.name for f in options_of(config)}
    assert "console" not in params
    for f in options_of(config):
        param = params[f.name]
        assert param.opts[0] == "--" + f.name.replace("_", "-")
        assert not param.required, f.name  # a required field may come from --config: the command checks it
        if f.default is not MISSING:
            assert param.default == f.default, f.name
        elif f.default_factory is not MISSING:
            assert param.default is None, f.name  # computed when the config is built
        for choice in f.metadata["choices"]:
            assert choice in param.help, (f.name, choice)
    required = ["--" + f.name.replace("_", "-") for f in options_of(config) if f.default is MISSING and f.default_factory is MISSING]
    result = CliRunner().invoke(app, [name])
    assert result.exit_code == 2 and f"missing {', '.join(required)} (give it" in result.output, result.output


def test_train_student_defaults_reach_the_config(monkeypatch, tmp_path) -> None:
    """Only the required flags on the command line: the pipeline receives TrainConfig's own defaults."""
    seen = []
    monkeypatch.setattr("taid_cache.pipelines.train_student.train_student", seen.append)
    result = CliRunner().invoke(app, ["train-student", "--student", "s", "--cache", str(tmp_path), "--output", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    expected = TrainConfig(student="s", cache=tmp_path, output=tmp_path / "o")
    assert to_json(seen[0]) == to_json(expected)


def test_json_round_trip() -> None:
    cfg = TrainConfig(student="s", cache=Path("/c"), output=Path("o"), eval_cache=Path("e"), epochs=1.5, loss="fkl", pack=True)
    back = from_json(TrainConfig, json.loads(json.dumps(to_json(cfg))))
    assert to_json(back) == to_json(cfg)
    assert back.cache == "/c" and back.eval_cache == "e" and back.teacher_model is None  # locations stay strings (URIs too)
    dump = DumpConfig(model="m", data=["a.jsonl", "b.jsonl"], output=Path("out"), top_p=0.9)
    assert to_json(from_json(DumpConfig, to_json(dump))) == to_json(dump)


def test_resumable_settings() -> None:
    """What a resumed run may change: the paths (recorded by content instead) and what does not change the maths."""
    cfg = TrainConfig(student="s", cache=Path("c"), output=Path("o"), max_steps=3)
    resumable = {f.name for f in fields(TrainConfig) if f.name not in cfg.settings()} - {"console"}
    assert resumable == {"resume", "save_every", "eval_every", "eval_cache", "progress", "num_workers", "report_to",
                         "output", "cache", "mix", "student", "teacher_model", "read_ahead", "local_cache",
                         "stop_at_step"}  # where a run pauses; its schedules run over max_steps either way
    assert cfg.settings()["max_steps"] == 3 and cfg.settings()["precision"] == "fp32"


@pytest.mark.parametrize("text,inside,outside", [
    ("(0, inf)", [1e-9, 5.0], [0.0, -1.0, math.inf, math.nan]),
    ("[0, 1)", [0.0, 0.999], [1.0, -1e-9, math.nan]),
    ("[1, 22]", [1, 22], [0, 23]),
])
def test_range(text, inside, outside) -> None:
    r = Range.parse(text)
    assert all(v in r for v in inside) and not any(v in r for v in outside)
    assert str(r) == ("at least 1" if text == "[1, inf)" else f"in {text}")
    assert str(Range.parse("[2, inf)")) == "at least 2"


@pytest.mark.parametrize("change,words", [
    ({"lr": 0.0}, "--lr must be in (0, inf), not 0.0"),
    ({"lr": math.nan}, "--lr must be in (0, inf), not nan"),
    ({"batch_size": 0}, "--batch-size must be at least 1, not 0"),
    ({"tail": "zero"}, "--tail must be one of student, uniform, renorm, not 'zero'"),
    ({"max_steps": None, "epochs": -1.0}, "--epochs must be in (0, inf), not -1.0"),
])
def test_check_fields_names_the_option(change, words) -> None:
    cfg = TrainConfig(**{"student": "s", "cache": Path("c"), "output": Path("o"), "max_steps": 1, **change})
    with pytest.raises(UserError) as err:
        check_fields(cfg)
    assert str(err.value) == words


def test_config_file_entry_point_reports_one_line(tmp_path, capsys) -> None:
    """The entry torchrun starts for `make reproduce` (a saved TrainConfig) fails on a bad file like the CLI does."""
    bad = tmp_path / "run.json"
    good = {"student": "s", "cache": "c", "output": str(tmp_path / "o"), "max_steps": 1}
    cases = [
        ({**good, "loss": "kl-magic"}, "--loss must be one of " + ", ".join(LOSSES) + ", not 'kl-magic'"),
        ({"student": "s", "unknown_option": 1}, "unknown_option"),
        ({**good, "max_steps": "5"}, "max_steps must be int, not '5'"),
        ({**good, "loss": None}, "loss must be str, not None"),
        ({**good, "lr": True}, "lr must be float, not True"),
        ({"student": "s"}, "cache"),  # a required option missing
        ([1, 2], "must be a mapping of options, not list"),
    ]
    usage = "usage: python -m taid_cache.pipelines.train_student CONFIG.json (a TrainConfig saved with config.to_json)"
    for values, words in [*cases, (None, usage)]:
        bad.write_text(json.dumps(values))
        with pytest.raises(SystemExit) as code:
            main([str(bad)] if values is not None else [str(bad), "extra"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (values, lines)
    proc = subprocess.run([sys.executable, "-m", "taid_cache.pipelines.train_student"], capture_output=True, text=True)  # as torchrun starts it
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {usage}"], proc.stderr
    assert not (tmp_path / "o").exists()


def test_json_values_take_the_option_types() -> None:
    cfg = from_json(TrainConfig, {"student": "s", "cache": "c", "output": "o", "lr": 1, "epochs": 2, "eval_cache": None})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and isinstance(cfg.epochs, float) and cfg.eval_cache is None
    assert cfg.cache == "c" and cfg.output == "o"  # locations are strings: a URI must not become a local path
    with pytest.raises(UserError, match="max_steps must be int, not 1.5"):
        from_json(TrainConfig, {"student": "s", "cache": "c", "output": "o", "max_steps": 1.5})
    with pytest.raises(UserError, match="data must be a list of strings"):
        from_json(DumpConfig, {"model": "m", "data": "a.jsonl", "output": "o"})
    mixed = from_json(TrainConfig, {"student": "s", "cache": "c", "output": "o", "mix": ["d"], "mix_weights": [3, 0.5]})
    assert mixed.mix_weights == [3.0, 0.5] and all(isinstance(w, float) for w in mixed.mix_weights)
    with pytest.raises(UserError, match="mix_weights must be a list of numbers"):
        from_json(TrainConfig, {"student": "s", "cache": "c", "output": "o", "mix_weights": [True]})


def test_reproduce_hands_several_ranks_the_config_it_would_train_with(monkeypatch, tmp_path) -> None:
    """nproc_per_node > 1: torchrun starts the JSON entry on a file holding exactly the one-process TrainConfig."""
    from taid_cache.reproduce import pipeline
    from taid_cache.reproduce.config import ReproduceConfig

    launched, trained = [], []
    monkeypatch.setattr(pipeline.subprocess, "run", lambda cmd, check: launched.append(cmd))
    monkeypatch.setattr(pipeline, "train_student", trained.append)
    paths = [tmp_path / name for name in ("student", "teacher", "cache", "heldout")]
    for nproc, out in ((1, tmp_path / "one"), (2, tmp_path / "two")):
        pipeline.train_method(ReproduceConfig(nproc_per_node=nproc), "taid-online", 0, out, *paths, console=None)
    assert len(trained) == 1 and len(launched) == 1
    cmd = launched[0]
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--nproc-per-node", "2", "-m"] and cmd[6] == "taid_cache.pipelines.train_student"
    saved = json.loads(Path(cmd[7]).read_text())
    expected = to_json(trained[0])
    assert Path(cmd[7]) == tmp_path / "two" / "runs" / "taid-online" / "seed-0.json"
    assert saved == {**expected, "output": str(tmp_path / "two" / "runs" / "taid-online" / "seed-0")}
    assert saved["teacher_model"] == str(paths[1]) and saved["loss"] == "taid" and saved["max_steps"] == 600
