"""The reliability attacks of issue 9, one test each (or one parametrised case each): silent wrong results,
tracebacks instead of one line, leftovers that block the corrected command, misleading messages, and the
hazards found by reading the code."""

from __future__ import annotations

import importlib.util
import dataclasses
import itertools
import json
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import assert_one_line, run_process, write_jsonl
from taid_cache.atomic import atomic_path, exclusive_lock, remove_temporaries, temporary_name
from taid_cache.cli import app
from taid_cache.errors import SafePoints, UserError
from taid_cache.fingerprints import model_hash
from taid_cache.config import LOSSES, TAILS
from taid_cache.losses import LossConfig, fkl, per_position_fn, rebuild_teacher, taid_sparse, TopKTeacher
from taid_cache.shards import read_cache
from taid_cache.shards.codec import decode_logprobs, encode_logprobs
from taid_cache.shards.contract import Cursor, WorkerPart
from taid_cache.shards.manifest import load_manifest, save_part
from taid_cache.storage import open_store
from taid_cache.shards.record import TeacherRecord
from taid_cache.shards.writer import ShardWriter
from taid_cache.training.trainer import step_batches
from taid_cache.training.metrics import read_metrics
from taid_cache.training.data import CacheRows, CacheStream, StreamOrder, micro_batches
from taid_cache.training.distributed import Dist


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def dump(teacher: Path, data: Path, out: Path, *extra: str):
    return cli("dump-teacher", "--model", str(teacher), "--data", str(data), "--output", str(out), "--engine", "hf",
               "--no-progress", *extra)


def train(student: Path, cache: Path, out: Path, *extra: str):
    return cli("train-student", "--student", str(student), "--cache", str(cache), "--output", str(out), "--no-progress",
               "--batch-size", "4", "--max-length", "128", *(extra if "--epochs" in extra else ("--max-steps", "3", *extra)))


def nothing_written(out: Path) -> bool:
    """No part, manifest, metrics, checkpoint or model: at most an empty folder (or a parts/ with only locks)."""
    if not out.exists():
        return True
    files = [p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    return not files


def finished_run(student: Path, cache: Path, out: Path, steps: int = 4) -> Path:
    """A run that saved checkpoints at every step; its final student is then removed, as if killed after its
    last checkpoint."""
    result = train(student, cache, out, "--save-every", "1", "--max-steps", str(steps))
    assert result.exit_code == 0, result.output
    for f in out.iterdir():
        if f.is_file() and f.name != "metrics.jsonl":
            f.unlink()
    return out


def torch_load_dcp(folder: Path) -> dict:
    """A torch.distributed.checkpoint folder read back as one plain state dict (independent of the trainer)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, folder.with_suffix(".pt"))
    return torch.load(folder.with_suffix(".pt"), weights_only=False)


def losses_of(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if "loss" in r]


# ---------------------------------------------------------------- silent wrong results


def test_resume_refuses_a_cache_rebuilt_at_the_same_path(teacher_dir, student_dir, data_dir, tmp_path) -> None:
    cache = tmp_path / "cache"
    assert dump(teacher_dir, data_dir / "chat.jsonl", cache, "--top-k", "16").exit_code == 0
    run = finished_run(student_dir, cache, tmp_path / "run", steps=3)
    shutil.rmtree(cache)
    assert dump(teacher_dir, data_dir / "chat.jsonl", cache, "--top-k", "8").exit_code == 0
    assert_one_line(train(student_dir, cache, run, "--resume", "--save-every", "1", "--max-steps", "3"),
                    "changed settings", "cache_identity")


def test_model_hash_tells_apart_checkpoints_differing_in_one_weight(teacher_dir, tmp_path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(teacher_dir, copy)
    before = model_hash(copy)
    weights = load_file(copy / "model.safetensors")
    name = sorted(weights)[0]
    weights[name].view(-1)[0] += 1.0
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert (copy / "model.safetensors").stat().st_size == (teacher_dir / "model.safetensors").stat().st_size
    assert model_hash(copy) != before
    assert model_hash(teacher_dir) == before


def test_resumed_dump_refuses_a_teacher_changed_in_one_weight(teacher_dir, data_dir, tmp_path) -> None:
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    out = tmp_path / "cache"
    assert dump(teacher, data_dir / "chat.jsonl", out, "--num-workers", "2", "--worker-index", "0").exit_code == 0
    weights = load_file(teacher / "model.safetensors")
    name = sorted(weights)[-1]
    weights[name].view(-1)[0] *= 1.5
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    assert_one_line(dump(teacher, data_dir / "chat.jsonl", out, "--num-workers", "2", "--worker-index", "1"),
                    "other settings", "teacher_hash")


@pytest.mark.parametrize("flags,named", [
    (("--lr", "inf"), "--lr"), (("--lr", "nan"), "--lr"), (("--lr", "0"), "--lr"),
    (("--weight-decay", "nan"), "--weight-decay"), (("--epochs", "nan"), "--epochs"), (("--epochs", "inf"), "--epochs"),
    (("--loss", "skew-fkl", "--beta", "nan"), "--beta"), (("--loss", "skew-fkl", "--beta", "-1"), "--beta"),
    (("--loss", "skew-fkl", "--beta", "5"), "--beta"), (("--taid-t-end", "5"), "--taid-t-end"),
    (("--taid-t-start", "-3"), "--taid-t-start"), (("--mu", "nan"), "--mu"), (("--loss-chunk", "0"), "--loss-chunk"),
    (("--shuffle-buffer", "0"), "--shuffle-buffer"), (("--num-workers", "-1"), "--num-workers"), (("--seed", "-1"), "--seed"),
    (("--eval-every", "2"), "--eval-cache"),
])
def test_options_out_of_range_are_refused_before_any_write(student_dir, caches, tmp_path, flags, named) -> None:
    out = tmp_path / "o"
    steps = () if flags[0] == "--epochs" else ("--max-steps", "2")  # exactly one of the two
    result = cli("train-student", "--student", str(student_dir), "--cache", str(caches["top16"]), "--output", str(out),
                 "--no-progress", *steps, *flags)
    assert_one_line(result, named)
    assert nothing_written(out)


def test_an_overflowing_step_stops_without_saving_nan(student_dir, caches, tmp_path) -> None:
    out = tmp_path / "o"
    assert_one_line(train(student_dir, caches["top16"], out, "--lr", "1e30", "--max-steps", "4", "--save-every", "1"),
                    "not finite")
    assert not (out / "model.safetensors").exists()
    for ckpt in (out / "checkpoints").glob("step-*"):
        for name, value in torch_load_dcp(ckpt)["model"].items():
            assert torch.isfinite(value).all(), name


def test_a_run_without_loss_tokens_is_refused(teacher_dir, student_dir, caches, tmp_path) -> None:
    # Chat rows: the assistant answers start well after position 2.
    assert_one_line(train(student_dir, caches["top16"], tmp_path / "a", "--max-length", "2"), "no training targets")
    write_jsonl(tmp_path / "masked.jsonl", [{"input_ids": list(range(5, 40)), "loss_mask": [False] * 35}])
    assert dump(teacher_dir, tmp_path / "masked.jsonl", tmp_path / "masked").exit_code == 0
    assert_one_line(train(student_dir, tmp_path / "masked", tmp_path / "b"), "no training targets")
    assert nothing_written(tmp_path / "a") and nothing_written(tmp_path / "b")


def shard_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("shard-*.arrow"))


def decoded(cache: Path) -> list[dict]:
    return list(read_cache(cache))


def same_records(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.sample_id == y.sample_id and all(np.array_equal(getattr(x, k), getattr(y, k)) for k in ("input_ids", "loss_mask", "topk_ids", "topk_logprobs"))
        for x, y in zip(a, b))


def test_readers_never_decode_a_flipped_byte_to_other_values(caches, tmp_path) -> None:
    reference = decoded(caches["top16"])
    rng = random.Random(0)
    caught = 0
    for trial in range(40):
        copy = tmp_path / f"c{trial}"
        shutil.copytree(caches["top16"], copy)
        shard = rng.choice(shard_files(copy))
        data = bytearray(shard.read_bytes())
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        shard.write_bytes(bytes(data))
        try:
            got = decoded(copy)
        except UserError:
            caught += 1
        else:
            assert same_records(got, reference)  # a flip in bytes no reader uses (padding) changes nothing
        assert_one_line(cli("inspect", str(copy)), "bad shard")  # inspect checks the file checksum first
        shutil.rmtree(copy)
    assert caught >= 30


def test_a_shard_from_another_cache_is_refused(teacher_dir, data_dir, caches, tmp_path) -> None:
    other = tmp_path / "other"
    assert dump(teacher_dir, data_dir / "text.jsonl", other, "--top-k", "16", "--max-length", "256").exit_code == 0
    copy = tmp_path / "copy"
    shutil.copytree(caches["top16"], copy)
    shutil.copy(shard_files(other)[0], shard_files(copy)[0])
    assert_one_line(cli("inspect", str(copy)), "bad shard")
    with pytest.raises(UserError, match="bad shard"):
        decoded(copy)


def test_an_interrupted_final_save_is_finished_by_the_next_start(student_dir, caches, tmp_path) -> None:
    done = tmp_path / "done"
    assert train(student_dir, caches["top16"], done, "--save-every", "1").exit_code == 0
    # Killed after the staged student was complete, while moving it in: some files moved, config.json not yet.
    run = tmp_path / "run"
    shutil.copytree(done, run)
    staged = run / ".student.staged"
    staged.mkdir()
    for f in run.iterdir():
        if f.is_file() and f.name not in ("metrics.jsonl", "model.safetensors"):
            f.rename(staged / f.name)
    result = train(student_dir, caches["top16"], run, "--resume", "--save-every", "1")
    assert result.exit_code == 0 and "finished installing" in result.output, result.output
    assert not staged.exists()
    a, b = AutoModelForCausalLM.from_pretrained(done), AutoModelForCausalLM.from_pretrained(run)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # Killed while the staging folder was being written (before its rename): the partial folder is hidden
    # temporary state; the checkpoint resumes and the run finishes.
    broken = finished_run(student_dir, caches["top16"], tmp_path / "broken", steps=3)
    (broken / ".student.staged.tmp-host-1-abcd").mkdir()
    (broken / ".student.staged.tmp-host-1-abcd" / "config.json").write_text("")
    assert train(student_dir, caches["top16"], broken, "--resume", "--save-every", "1").exit_code == 0
    assert AutoModelForCausalLM.from_pretrained(broken) is not None
    assert not list(broken.glob(".student.staged*"))  # the interrupted save's leftovers are gone


def test_a_run_that_died_before_any_checkpoint_can_be_rerun(student_dir, caches, tmp_path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
    result = train(student_dir, caches["top16"], out)
    assert result.exit_code == 0, result.output
    assert [m["step"] for m in losses_of(out)] == [1, 2, 3]


# ---------------------------------------------------------------- one line, not a traceback: row contents

BAD_ROWS = {
    "empty messages": ([{"messages": []}], "messages"),
    "turn without role": ([{"messages": [{"content": "hi"}]}], "role"),
    "messages as a string": ([{"messages": "hello"}], "messages"),
    "null text": ([{"text": "fine"}, {"text": None}], "text"),
    "int text": ([{"text": 7}], "text"),
    "id beyond the vocabulary": ([{"input_ids": [1, 2, 512]}], "vocabulary"),
    "negative id": ([{"input_ids": [1, -2, 3]}], "vocabulary"),
    "ids as strings": ([{"input_ids": ["1", "2", "3"]}], "integer"),
    "float ids": ([{"input_ids": [1.7, 2.0, 3.0]}], "integer"),
    "loss_mask of another length": ([{"input_ids": [1, 2, 3], "loss_mask": [True]}], "loss_mask"),
}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_fail_in_one_line_before_any_write(teacher_dir, tmp_path, case: str, fmt: str) -> None:
    rows, word = BAD_ROWS[case]
    path = tmp_path / f"rows.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    out = tmp_path / "o"
    assert_one_line(dump(teacher_dir, path, out), word)
    assert nothing_written(out)


def test_empty_messages_among_good_rows(teacher_dir, data_dir, tmp_path) -> None:
    good = [json.loads(line) for line in (data_dir / "chat.jsonl").read_text().splitlines()][:3]
    write_jsonl(tmp_path / "rows.jsonl", [*good, {"messages": []}])
    assert_one_line(dump(teacher_dir, tmp_path / "rows.jsonl", tmp_path / "o"), "empty conversation", "row 3")


def test_malformed_jsonl_is_one_stderr_line(teacher_dir, tmp_path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    proc = run_process("dump-teacher", "--model", str(teacher_dir), "--data", str(tmp_path / "bad.jsonl"), "--output",
                   str(tmp_path / "o"), "--engine", "hf", "--no-progress", check=False)
    assert proc.returncode == 2
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr
    assert proc.stderr.startswith("error: cannot load dataset")


# ---------------------------------------------------------------- outputs, engines, locks, corrupt bookkeeping


def test_output_that_is_a_file(teacher_dir, student_dir, data_dir, caches, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    assert_one_line(dump(teacher_dir, data_dir / "chat.jsonl", blocker), "is a file")
    assert_one_line(dump(teacher_dir, data_dir / "chat.jsonl", blocker / "sub"), "cannot write")
    assert_one_line(train(student_dir, caches["top16"], blocker), "is a file")
    assert_one_line(train(student_dir, caches["top16"], blocker / "sub"), "cannot write")
    assert blocker.read_text() == "mine"


def test_engine_vllm_without_vllm(teacher_dir, data_dir, tmp_path, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    out = tmp_path / "o"
    assert_one_line(cli("dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--output",
                        str(out), "--engine", "vllm", "--no-progress"), "--engine vllm", "not installed")
    assert nothing_written(out)


def test_a_second_process_with_the_same_worker_index_is_refused(teacher_dir, data_dir, tmp_path) -> None:
    out = tmp_path / "o"
    (out / "parts").mkdir(parents=True)
    with exclusive_lock(out / "parts" / "worker-00000.lock", "test"):  # held as the first process would
        assert_one_line(dump(teacher_dir, data_dir / "chat.jsonl", out), "another process", "worker 0")
    assert dump(teacher_dir, data_dir / "chat.jsonl", out).exit_code == 0  # and runs once the lock is free


@pytest.mark.parametrize("content", ["", "{ not json", "[1, 2]"])
def test_corrupt_manifest_is_one_line_everywhere(teacher_dir, student_dir, data_dir, caches, tmp_path, content) -> None:
    copy = tmp_path / "c"
    shutil.copytree(caches["top16"], copy)
    (copy / "manifest.json").write_text(content)
    for result in (cli("verify", str(copy)), cli("inspect", str(copy)), train(student_dir, copy, tmp_path / "t"),
                   dump(teacher_dir, data_dir / "chat.jsonl", copy, "--top-k", "16", "--max-length", "256")):
        assert_one_line(result, "manifest", "corrupt")


def test_corrupt_part_file_on_rerun(teacher_dir, data_dir, tmp_path) -> None:
    out = tmp_path / "o"
    assert dump(teacher_dir, data_dir / "chat.jsonl", out, "--num-workers", "2", "--worker-index", "0").exit_code == 0
    part = next((out / "parts").glob("worker-00000-*.json"))
    part.write_text('{"worker_index": 0')
    assert_one_line(dump(teacher_dir, data_dir / "chat.jsonl", out, "--num-workers", "2", "--worker-index", "0"), "corrupt", part.name)
    part.write_text('{"unexpected": 1}')
    assert_one_line(dump(teacher_dir, data_dir / "chat.jsonl", out, "--num-workers", "2", "--worker-index", "0"), "corrupt", part.name)


def test_parts_left_by_workers_that_died_before_their_first_shard(teacher_dir, data_dir, tmp_path) -> None:
    """Three workers killed before any commit leave three empty parts; the corrected one-worker command must
    finish the cache (manifest written), not wait forever for workers of the old count."""
    out = tmp_path / "o"
    assert dump(teacher_dir, data_dir / "chat.jsonl", out).exit_code == 0
    settings = load_manifest(str(out)).settings
    shutil.rmtree(out)
    (out / "parts").mkdir(parents=True)
    for index in range(3):  # what three killed workers leave: parts with settings and no shard
        save_part(open_store(str(out)), WorkerPart(dataclasses.replace(settings, num_workers=3), index, 3, 8 * index, 8 * index + 8,
                                                   cursor=Cursor(8 * index)))
    assert dump(teacher_dir, data_dir / "chat.jsonl", out).exit_code == 0
    assert [p.name for p in (out / "parts").glob("*.json")] == ["worker-00000-of-00001.json"]
    assert len(list(read_cache(out))) == 24  # complete


def test_unreadable_newest_checkpoint_falls_back_to_the_one_before(student_dir, caches, tmp_path) -> None:
    clean = tmp_path / "clean"
    assert train(student_dir, caches["top16"], clean, "--save-every", "1", "--max-steps", "4").exit_code == 0
    for damage in ("truncate state", "remove meta"):
        run = finished_run(student_dir, caches["top16"], tmp_path / damage.replace(" ", "-"))
        newest = sorted((run / "checkpoints").glob("step-*"))[-1]
        if damage == "truncate state":
            state = max(newest.glob("*.distcp"), key=lambda f: f.stat().st_size)
            state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
        else:
            (newest / "meta.json").unlink()
        result = train(student_dir, caches["top16"], run, "--resume", "--save-every", "1", "--max-steps", "4")
        assert result.exit_code == 0, result.output
        assert [m["step"] for m in losses_of(run)] == [1, 2, 3, 4]
        for a, b in zip(losses_of(clean), losses_of(run)):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_torn_metrics_line_on_resume(student_dir, caches, tmp_path) -> None:
    run = finished_run(student_dir, caches["top16"], tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "lo')
    assert train(student_dir, caches["top16"], run, "--resume", "--save-every", "1", "--max-steps", "4").exit_code == 0
    assert [m["step"] for m in losses_of(run)] == [1, 2, 3, 4]


def test_inspect_on_a_missing_or_truncated_shard_and_plot_folder(caches, tmp_path) -> None:
    for damage in ("missing", "truncated"):
        copy = tmp_path / damage
        shutil.copytree(caches["top16"], copy)
        shard = shard_files(copy)[0]
        if damage == "missing":
            shard.unlink()
        else:
            shard.write_bytes(shard.read_bytes()[:100])
        assert_one_line(cli("inspect", str(copy)), "bad shard", shard.name)
    assert_one_line(cli("inspect", str(caches["top16"]), "--plot", str(tmp_path / "nowhere" / "p.png")), "--plot", "does not exist")


# ---------------------------------------------------------------- leftovers that blocked the corrected command


def test_dump_typos_leave_nothing_that_blocks_the_corrected_command(teacher_dir, data_dir, tmp_path) -> None:
    out = tmp_path / "o"
    no_weights = tmp_path / "no-weights"
    shutil.copytree(teacher_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    write_jsonl(tmp_path / "badmask.jsonl", [{"input_ids": [1, 2, 3], "loss_mask": [True]}])
    for attempt in (dump(teacher_dir, data_dir / "chat.jsonl", out, "--dtype", "flaot32"),
                    dump(no_weights, data_dir / "chat.jsonl", out),
                    dump(teacher_dir, tmp_path / "badmask.jsonl", out)):
        assert attempt.exit_code == 2 and attempt.output.startswith("error: "), attempt.output
        assert nothing_written(out)
    assert dump(teacher_dir, data_dir / "chat.jsonl", out).exit_code == 0


def test_train_typos_leave_nothing_that_blocks_the_corrected_command(student_dir, caches, tmp_path, monkeypatch) -> None:
    out = tmp_path / "o"
    attempts = [train(student_dir, caches["top16"], out, "--eval-cache", str(tmp_path / "nowhere"), "--eval-every", "1"),
                train(student_dir, caches["top16"], out, "--loss", "skew-fkl", "--beta", "5")]
    real = importlib.util.find_spec
    with monkeypatch.context() as patch:  # as on a machine without wandb
        patch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
        attempts.append(train(student_dir, caches["top16"], out, "--report-to", "wandb"))
    assert "pip install 'taid-cache[wandb]'" in attempts[-1].output
    for attempt in attempts:
        assert attempt.exit_code == 2 and attempt.output.startswith("error: "), attempt.output
        assert nothing_written(out)
    assert train(student_dir, caches["top16"], out).exit_code == 0


def test_eval_cache_without_eval_every_evaluates_at_the_end(student_dir, caches, tmp_path) -> None:
    out = tmp_path / "o"
    assert train(student_dir, caches["top16"], out, "--eval-cache", str(caches["top16"])).exit_code == 0
    records = read_metrics(out)
    evals = [r for r in records if "eval_kl_cache" in r]
    assert [r["step"] for r in evals] == [3] and evals[0]["eval_kl_cache"] > 0


def test_a_killed_atomic_install_leaves_nothing_the_next_run_keeps(tmp_path) -> None:
    """A kill inside atomic_path leaves its uniquely named temporary; the next attempt removes it (and only it)."""
    final = tmp_path / "teacher"
    for name in (temporary_name(final), temporary_name(final)):
        (name / "sub").mkdir(parents=True)
        (name / "sub" / "weights").write_bytes(b"x" * 100)
    stray_file = temporary_name(final)
    stray_file.write_text("partial")
    others = [temporary_name(tmp_path / "teacherish"), tmp_path / "teacher.tmp-kept"]
    for other in others:
        other.write_text("not ours")
    remove_temporaries(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in others)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
    assert (final / "config.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == sorted(["teacher", *(p.name for p in others)])


# ---------------------------------------------------------------- messages


def test_missing_manifest_says_so_and_any_worker_rebuilds_it(teacher_dir, data_dir, tmp_path) -> None:
    out = tmp_path / "o"
    assert dump(teacher_dir, data_dir / "chat.jsonl", out).exit_code == 0
    manifest = (out / "manifest.json").read_text()
    (out / "manifest.json").unlink()
    assert_one_line(cli("verify", str(out)), "manifest.json is missing", "rerun any worker")
    assert dump(teacher_dir, data_dir / "chat.jsonl", out).exit_code == 0
    assert (out / "manifest.json").read_text() == manifest


def test_nonexistent_student_path(caches, tmp_path) -> None:
    assert_one_line(train(tmp_path / "no" / "such" / "student", caches["top16"], tmp_path / "o"), "no such model folder")


def test_a_moved_run_folder_resumes(student_dir, caches, tmp_path) -> None:
    run = finished_run(student_dir, caches["top16"], tmp_path / "run")
    moved = tmp_path / "moved"
    run.rename(moved)
    result = train(student_dir, caches["top16"], moved, "--resume", "--save-every", "1", "--max-steps", "4")
    assert result.exit_code == 0, result.output
    assert (moved / "config.json").is_file()


# ---------------------------------------------------------------- hazards read in the code


def test_temporary_names_are_unique_across_processes_and_hosts(tmp_path) -> None:
    import os
    import socket

    names = {temporary_name(tmp_path / "f.json").name for _ in range(100)}
    assert len(names) == 100
    assert all(socket.gethostname() in n and str(os.getpid()) in n and n.startswith(".f.json.tmp") for n in names)


@pytest.mark.parametrize("counts", [[], [0], [0, 0, 3, 2], [2, 0, 0, 3, 0], [1], [0, 4]])
def test_compact_codec_round_trips_empty_and_leading_empty_positions(counts) -> None:
    rng = np.random.default_rng(len(counts))
    counts = np.asarray(counts, dtype=np.int64)
    runs = [np.sort(-rng.exponential(3.0, n))[::-1] for n in counts]
    flat = np.concatenate(runs) if runs else np.zeros(0)
    decoded_lps = decode_logprobs(encode_logprobs(flat, counts, "compact"), counts, "compact")
    assert decoded_lps.shape == flat.shape
    assert np.abs(decoded_lps - flat).max(initial=0.0) <= 1 / 128 + 1e-6


@pytest.mark.parametrize("bad,where", [(np.nan, "head"), (np.inf, "head"), (-np.inf, "head"), (np.nan, "tail"), (np.inf, "tail")])
def test_non_finite_teacher_log_probs_are_refused_and_not_stored(tmp_path, bad, where) -> None:
    writer = ShardWriter(open_store(str(tmp_path)), 0, 0, 512, 4, "compact", 1 << 20, 3, lambda entry: None)
    lps = np.log(np.full((2, 4), 0.2, dtype=np.float32))
    tail = np.log(np.full(2, 0.2, dtype=np.float32))
    (lps[1:, 2] if where == "head" else tail[1:])[0] = bad
    record = TeacherRecord("s0", np.arange(3), np.ones(3, bool), np.tile(np.arange(4), (2, 1)), lps, tail, np.ones(2, np.float32))
    with pytest.raises(UserError, match="non-finite"):
        writer.write([record], Cursor(1))
    writer.commit()
    assert not list(tmp_path.glob("shard-*.arrow"))


def test_single_position_sequences_round_trip(teacher_dir, tmp_path) -> None:
    write_jsonl(tmp_path / "short.jsonl", [{"input_ids": [5, 6]}, {"input_ids": [7, 8, 9]}])
    assert dump(teacher_dir, tmp_path / "short.jsonl", tmp_path / "o", "--top-k", "4").exit_code == 0
    records = list(read_cache(tmp_path / "o"))
    assert [r.topk_ids.shape for r in records] == [(1, 4), (2, 4)]


@pytest.mark.parametrize("tail", TAILS)
def test_heads_summing_past_one_give_no_nan_negative_kl_or_negative_tail(tail: str) -> None:
    torch.manual_seed(0)
    n, vocab, k = 64, 50, 8
    logits = torch.randn(n, vocab) * 3
    teacher = torch.log_softmax(torch.randn(n, vocab) * 6, -1)
    lps, ids = teacher.topk(k, -1)
    lps = lps + 0.01  # rounding up, as a coarse grid does at a confident position: Σ exp > 1
    assert (lps.exp().sum(-1) > 1).any()
    dense = rebuild_teacher(logits, ids, lps, tail, vocab)
    assert torch.isfinite(torch.logsumexp(dense, -1)).all()
    assert torch.logsumexp(dense, -1).le(1e-5).all()  # sums to at most 1: the tail is never negative
    assert fkl(logits, dense).ge(-1e-5).all()
    labels, learned = torch.randint(0, vocab, (n,)), torch.tensor([3.0])  # dkd reads the labels, ctkd a temperature
    for name in LOSSES:
        if name in ("sft", "opd"):  # no teacher term; a per-token estimate, negative where q(x) < p(x)
            continue
        value = per_position_fn(LossConfig(name))(logits, dense, 0.5, labels, learned)
        assert torch.isfinite(value).all() and value.ge(-1e-5).all(), name
    value, grad = taid_sparse(logits, TopKTeacher(ids, lps, None, vocab), 0.5)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all() and value.ge(-1e-5).all()


def damaged_copy(cache: Path, out: Path) -> Path:
    """A copy whose every shard is cut in half: any read fails with the reader's one-line error."""
    shutil.copytree(cache, out)
    for shard in shard_files(out):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return out


@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_shard_in_a_loader_worker_is_one_line(caches, tmp_path, workers: int) -> None:
    """Read in a loader worker, the reader's error reaches the trainer as itself, not wrapped in the worker's traceback."""
    copy = damaged_copy(caches["top16"], tmp_path / "c")
    with pytest.raises(UserError) as caught:
        next(micro_batches(CacheStream(CacheRows(str(copy)), StreamOrder(0, 4, True, batch_size=2), 64), workers))
    assert str(caught.value).startswith("bad shard ") and len(str(caught.value).splitlines()) == 1


class FailingStream:
    """Rank 1 cannot read its second step's data; rank 0 can."""

    def __init__(self, rank: int, batch) -> None:
        self.rank, self.batch, self.served = rank, batch, 0

    def __next__(self):
        self.served += 1
        if self.rank == 1 and self.served > 2:
            raise UserError("bad shard shard-w00000-00000.arrow: record batch 0 fails its checksum")
        return self.batch


def two_rank_steps(rank: int, store: str, batch, out: str, signalled: bool) -> None:
    """Three steps of two ranks; rank 1's data fails at the second (or, `signalled`, rank 1 records a signal)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    env, outcome, interruptions = Dist(rank, 2), [], SafePoints()
    data = itertools.repeat(batch) if signalled else FailingStream(rank, batch)
    try:
        for _ in range(3):
            micro, counts = step_batches(data, 2, env, interruptions)
            outcome.append(counts.tolist())
            if signalled and rank == 1:
                interruptions.signals.append(signal.SIGTERM)
    except UserError as exc:
        outcome.append(str(exc))
    except KeyboardInterrupt:
        outcome.append("interrupted")
    torch.distributed.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(outcome))


@pytest.mark.distributed
def test_a_rank_that_cannot_read_its_data_stops_every_rank_with_one_line(caches, tmp_path) -> None:
    """Rank 1's reader fails at the second step: both ranks finish the first step with the global counts, then
    each stops with a one-line error (its own, or one pointing at the other rank) instead of hanging or
    failing inside a collective."""
    batch = next(micro_batches(CacheStream(CacheRows(str(caches["top16"])), StreamOrder(0, 4, True, batch_size=2), 64), 0))
    torch.multiprocessing.spawn(two_rank_steps, args=(str(tmp_path / "store"), batch, str(tmp_path), False), nprocs=2)
    first = [2 * 2 * float(batch.targets.sum()), 2 * 2 * float(batch.tokens)]  # 2 micro-batches × 2 ranks
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero[0] == one[0] == first
    assert one[1].startswith("bad shard ") and len(one) == 2
    assert zero[1].startswith("rank 0: another rank could not read its training data") and len(zero) == 2


@pytest.mark.distributed
def test_a_signal_one_rank_recorded_stops_every_rank_before_the_same_step(caches, tmp_path) -> None:
    """Rank 1 records a signal after the first step: both ranks stop before the second (none waits in a
    collective the other never joins), with the first step's global counts on both."""
    batch = next(micro_batches(CacheStream(CacheRows(str(caches["top16"])), StreamOrder(0, 4, True, batch_size=2), 64), 0))
    torch.multiprocessing.spawn(two_rank_steps, args=(str(tmp_path / "store"), batch, str(tmp_path), True), nprocs=2)
    first = [2 * 2 * float(batch.targets.sum()), 2 * 2 * float(batch.tokens)]
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero == one == [first, "interrupted"]
