"""Reliability, round three: the attacks a new user tried that still failed, one test each. Every test here
fails on the code before this round (two runs in one folder, blocked reruns, full disks, tracebacks, silent
wrong results) and holds now."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, SignalInFinalizer, kill_group, run_cli, write_jsonl
from taid_cache.config import LOSSES, TrainConfig
from taid_cache.errors import interrupts_at_safe_points
from taid_cache.losses import LossConfig, TopKTeacher, distillation
from taid_cache.shards import read_cache
from taid_cache.shards.manifest import load_parts
from taid_cache.storage import open_store
from test_attacks import assert_one_line, cli, dump, finished_run, losses_of, nothing_written, train


def start(*args: str) -> subprocess.Popen:
    """The CLI in a process group of its own (so a signal reaches it and its children alone). Not a session of
    its own: beside busy loops, a process pinned to one core got about a quarter of the CPU in a new session
    that it got in the suite's (docs/BENCHMARKS.md)."""
    return subprocess.Popen([sys.executable, "-m", "taid_cache.cli", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONFAULTHANDLER": "1"})


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the process ended first ({proc.returncode}): {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> tuple[int, str]:
    if proc.poll() is None:
        kill_group(proc, sig)
    try:
        _, err = proc.communicate(timeout=600)  # a hang guard (under pytest's 900 s per test), not a speed bound
    except subprocess.TimeoutExpired:  # hung: SIGABRT makes faulthandler print every thread's stack
        kill_group(proc, signal.SIGABRT)
        raise AssertionError(f"still running 600 s after signal {sig}:\n{proc.communicate()[1][-6000:]}") from None
    return proc.returncode, err


@pytest.fixture(scope="module")
def long_text(data_dir, texts) -> Path:
    """Enough rows that a dump in small batches runs for many seconds."""
    rows = [{"text": t[i : i + 400]} for t in texts for i in range(0, len(t), 400) if len(t[i : i + 400]) > 100]
    return write_jsonl(data_dir / "long.jsonl", rows[:3000])


# ---------------------------------------------------------------- silent wrong results and data loss


def test_a_second_training_into_a_running_runs_folder_is_refused(student_dir, caches, tmp_path) -> None:
    """One process per run folder: the second stops in one line and touches nothing; the first keeps every line
    of its metrics; SIGTERM stops it in one line that says how to continue."""
    out = tmp_path / "run"
    first = start("train-student", "--student", str(student_dir), "--cache", str(caches["top16"]), "--output", str(out),
                  "--loss", "taid", "--max-steps", "100000", "--save-every", "10", "--batch-size", "4", "--max-length", "128",
                  "--no-progress")
    wait_for(lambda: (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*")), first)
    second = train(student_dir, caches["top16"], out, "--loss", "fkl", "--max-steps", "40", "--save-every", "10")
    assert_one_line(second, "another process", str(out))
    code, err = stop(first, signal.SIGTERM)
    assert code == 130 and len(err.strip().splitlines()) == 1, err
    assert "interrupted at step" in err and "--resume" in err
    steps = [r["step"] for r in losses_of(out)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 10  # every line the first run wrote, once
    # Rerun without --resume: refused (its checkpoints are worth keeping), not cleared.
    assert_one_line(train(student_dir, caches["top16"], out, "--loss", "taid", "--max-steps", "100000", "--save-every", "10"),
                    "--resume")
    assert [r["step"] for r in losses_of(out)] == steps


@pytest.mark.parametrize("first_workers", [1, 2])
def test_dumps_with_another_worker_count_refuse_a_running_folder(teacher_dir, long_text, tmp_path, first_workers: int) -> None:
    """Whichever starts first, the second dump into the folder (other --num-workers) refuses, whatever the
    first has committed yet."""
    out = tmp_path / "cache"
    common = ["--model", str(teacher_dir), "--data", str(long_text), "--output", str(out), "--engine", "hf", "--top-k", "4",
              "--max-length", "64", "--batch-tokens", "64", "--no-progress"]
    workers = {1: ["--num-workers", "1"], 2: ["--num-workers", "2", "--worker-index", "1"]}
    first = start("dump-teacher", *common, *workers[first_workers])
    wait_for(lambda: bool(load_parts(open_store(str(out)))), first)
    second = cli("dump-teacher", *common, *workers[3 - first_workers])
    stop(first)
    assert_one_line(second, "another running process", "num_workers")


def test_a_data_path_is_itself_even_when_it_looks_like_a_pattern(teacher_dir, tmp_path) -> None:
    write_jsonl(tmp_path / "data*.jsonl", [{"text": f"star row {i} " * 3} for i in range(10)])
    write_jsonl(tmp_path / "data1.jsonl", [{"text": f"one row {i} " * 3} for i in range(10)])
    write_jsonl(tmp_path / "data[1].jsonl", [{"text": f"bracket row {i} " * 3} for i in range(7)])
    # A path that exists is that file; one that does not is a pattern (`data?.jsonl`: the file named with a
    # star and data1.jsonl, one character each).
    for i, (name, rows) in enumerate((("data*.jsonl", 10), ("data[1].jsonl", 7), ("dat?1.jsonl", 10), ("data?.jsonl", 20))):
        out = tmp_path / f"out-{i}"
        assert dump(teacher_dir, tmp_path / name, out, "--top-k", "4").exit_code == 0, name
        assert json.loads((out / "manifest.json").read_text())["records"] == rows, name
    assert_one_line(dump(teacher_dir, tmp_path / "nothing*.jsonl", tmp_path / "o"), "nothing*.jsonl", "matches")
    assert "pattern" in cli("dump-teacher", "--help").output


def test_an_eval_cache_of_another_teacher_is_refused(teacher_dir, student_dir, data_dir, caches, tmp_path) -> None:
    """Same tokenizer, other weights: its KL would be against the wrong teacher."""
    other = tmp_path / "other-teacher"
    shutil.copytree(teacher_dir, other)
    weights = load_file(other / "model.safetensors")
    weights["lm_head.weight"] *= 0.5
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    assert dump(other, data_dir / "chat.jsonl", tmp_path / "eval", "--top-k", "16", "--max-length", "256").exit_code == 0
    result = train(student_dir, caches["top16"], tmp_path / "run", "--eval-cache", str(tmp_path / "eval"))
    assert_one_line(result, "--eval-cache", "another teacher")
    assert nothing_written(tmp_path / "run")


@pytest.mark.parametrize("head", [1, 4])
def test_no_loss_goes_negative_when_all_the_mass_is_off_the_head(head: int) -> None:
    """tail_logmass = 0 (all of the teacher's mass off a non-empty head) is a cache the readers accept: the head
    then holds nothing, and every loss is a divergence or a cross-entropy of distributions that sum to 1."""
    torch.manual_seed(0)
    n, vocab = 16, 40
    logits = torch.randn(n, vocab) * 2
    ids = torch.stack([torch.randperm(vocab)[:head] for _ in range(n)])
    head_lps = torch.log(torch.full((n, head), 0.3 / head))
    labels, learned = torch.randint(0, vocab, (n,)), torch.tensor([3.0])  # dkd reads the labels, ctkd a temperature
    for name in (loss for loss in LOSSES if loss not in ("sft", "opd")):  # opd: an estimate, not a divergence
        for tail in ("student", "uniform"):
            value = distillation(LossConfig(name), TopKTeacher(ids, head_lps, torch.zeros(n), vocab, tail), logits, 0.5, labels, learned)
            assert torch.isfinite(value).all() and (value >= -1e-5).all(), (name, tail, value.min().item())


# ---------------------------------------------------------------- leftovers that block the corrected command


BAD_CONFIGS = {
    "missing data file": ("teacher: {teacher}\ntrain_data: [{tmp}/none.jsonl]\n", "none.jsonl"),
    "negative batch size": ("batch_size: -1\n", "batch-size"),
    "top_k 0": ("top_k: 0\n", "top_k"),
    "missing teacher": ("teacher: {tmp}/no-teacher\n", "no-teacher"),
    "steps as a word": ("max_steps: three\n", "max_steps"),
    "no ranks": ("nproc_per_node: 0\n", "nproc_per_node"),
    "a list": ("- a\n- b\n", "mapping of keys"),
    "a scalar": ("42\n", "mapping of keys"),
    "a string": ("hello world\n", "mapping of keys"),
    "methods not a list": ("methods: fkl\n", "methods must be a list"),
    "negative draws": ("tail_samples: -3\n", "tail_samples"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_reproduce_config_writes_nothing_before_it_is_refused(teacher_dir, commands, tmp_path, case: str) -> None:
    text, named = BAD_CONFIGS[case]
    config = tmp_path / "bad.yaml"
    config.write_text(text.format(teacher=teacher_dir, tmp=tmp_path))
    out = tmp_path / "o"
    proc = commands.run("taid_cache.reproduce", "--config", str(config), "--out", str(out), cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and named in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists() or not any(out.rglob("*.json*"))  # no settings.json, no data: the corrected config runs


# ---------------------------------------------------------------- full disks


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root only; skipped elsewhere): a real full disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def ballast(disk: Path, leave: int) -> Path:
    """Fill the disk until `leave` bytes are free."""
    path = disk / "ballast"
    path.write_bytes(b"\0" * max(shutil.disk_usage(disk).free - leave, 0))
    return path


def test_a_full_disk_during_a_dump_is_one_line_and_the_rerun_finishes(teacher_dir, data_dir, small_disk, tmp_path) -> None:
    args = ["--top-k", "64", "--precision", "fp32", "--max-length", "256", "--batch-tokens", "300", "--shard-size-mb", "0.05"]
    assert dump(teacher_dir, data_dir / "chat.jsonl", tmp_path / "clean", *args).exit_code == 0
    fill = ballast(small_disk, 150_000)
    result = dump(teacher_dir, data_dir / "chat.jsonl", small_disk / "cache", *args)
    assert_one_line(result, "no space left on", str(small_disk), "rerun the same command")
    assert not (small_disk / "cache" / "manifest.json").exists()
    fill.unlink()
    assert dump(teacher_dir, data_dir / "chat.jsonl", small_disk / "cache", *args).exit_code == 0
    for x, y in zip(read_cache(small_disk / "cache"), read_cache(tmp_path / "clean"), strict=True):
        mine, theirs = x.as_dict(), y.as_dict()
        assert mine.keys() == theirs.keys()
        for key in mine:
            np.testing.assert_array_equal(mine[key], theirs[key])


@pytest.mark.parametrize("where", ["checkpoint", "final save"])
def test_a_full_disk_while_training_is_one_line_and_the_run_continues(student_dir, caches, small_disk, tmp_path, where: str) -> None:
    out = small_disk / "run"
    every = ["--save-every", "2"] if where == "checkpoint" else []
    clean = train(student_dir, caches["top16"], tmp_path / "clean", "--max-steps", "4", *every)
    assert clean.exit_code == 0, clean.output
    fill = ballast(small_disk, 200_000)
    result = train(student_dir, caches["top16"], out, "--max-steps", "4", *every)
    assert_one_line(result, "no space left on", str(small_disk), "rerun the same command")
    fill.unlink()
    again = train(student_dir, caches["top16"], out, "--max-steps", "4", *every)
    assert again.exit_code == 0, again.output
    assert load_file(out / "model.safetensors").keys() == load_file(tmp_path / "clean" / "model.safetensors").keys()
    for name, value in load_file(out / "model.safetensors").items():
        torch.testing.assert_close(value, load_file(tmp_path / "clean" / "model.safetensors")[name], rtol=0, atol=0)


# ---------------------------------------------------------------- tracebacks instead of one line


def test_seeds_take_one_range_in_both_stages(teacher_dir, student_dir, data_dir, caches, tmp_path) -> None:
    huge = str(2**70)
    assert_one_line(train(student_dir, caches["top16"], tmp_path / "a", "--seed", huge), "--seed", "2^64")
    assert_one_line(dump(teacher_dir, data_dir / "chat.jsonl", tmp_path / "b", "--seed", huge, "--tail-samples", "4"), "--seed", "2^64")
    top = str(2**64 - 1)
    assert train(student_dir, caches["top16"], tmp_path / "c", "--seed", top, "--max-steps", "1").exit_code == 0
    assert dump(teacher_dir, data_dir / "chat.jsonl", tmp_path / "d", "--seed", top, "--tail-samples", "4", "--top-k", "2").exit_code == 0


def test_sizes_beyond_what_the_run_holds_are_refused_at_once(student_dir, caches, tmp_path) -> None:
    assert_one_line(train(student_dir, caches["top16"], tmp_path / "a", "--batch-size", "1000000000000"), "--batch-size",
                    "24 sequences")
    assert_one_line(train(student_dir, caches["top16"], tmp_path / "b", "--grad-accum", "1000000"), "--grad-accum")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"student": str(student_dir), "cache": str(caches["top16"]), "output": str(tmp_path / "c"),
                                  "max_steps": 2, "batch_size": 1e40}))
    proc = subprocess.run([sys.executable, "-m", "taid_cache.pipelines.train_student", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "batch_size must be int" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert nothing_written(tmp_path / "a") and nothing_written(tmp_path / "c")


@pytest.mark.parametrize("drop", [("shards", "batch_crc32"), ("settings", "top_k"), ("manifest", "records")])
def test_a_manifest_missing_a_field_is_one_line_everywhere(student_dir, caches, tmp_path, drop) -> None:
    copy = tmp_path / "cache"
    shutil.copytree(caches["top16"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    where, field = drop
    target = manifest["shards"][0] if where == "shards" else manifest["settings"] if where == "settings" else manifest
    del target[field]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    for result in (cli("verify", str(copy)), cli("inspect", str(copy)), train(student_dir, copy, tmp_path / "run")):
        assert_one_line(result, field, "corrupt")


# ---------------------------------------------------------------- messages


def test_a_teacher_with_nan_weights_says_its_logits_are_not_finite(teacher_dir, data_dir, tmp_path) -> None:
    bad = tmp_path / "nan-teacher"
    shutil.copytree(teacher_dir, bad)
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "o"
    assert_one_line(dump(bad, data_dir / "chat.jsonl", out), "not finite", "probe")
    assert nothing_written(out)


def test_files_of_two_row_kinds_are_named(teacher_dir, data_dir, tmp_path) -> None:
    result = cli("dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--data",
                 str(data_dir / "text.jsonl"), "--output", str(tmp_path / "o"), "--engine", "hf", "--no-progress")
    assert_one_line(result, "different row kinds", "chat.jsonl", "text.jsonl")


def test_a_tail_mode_on_a_sampled_cache_is_refused(teacher_dir, student_dir, data_dir, tmp_path) -> None:
    cache = tmp_path / "sampled"
    assert dump(teacher_dir, data_dir / "chat.jsonl", cache, "--top-k", "2", "--tail-samples", "8", "--max-length", "256").exit_code == 0
    assert_one_line(train(student_dir, cache, tmp_path / "run", "--tail", "uniform"), "--tail uniform", "draws")
    assert "--tail-samples cache" in TrainConfig.__dataclass_fields__["tail"].metadata["help"]  # what --help shows


def test_inspect_plot_takes_a_png_or_a_folder(caches, tmp_path) -> None:
    folder = tmp_path / "plots"
    folder.mkdir()
    assert cli("inspect", str(caches["top16"]), "--plot", str(folder)).exit_code == 0
    assert (folder / "cache-mass.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for bad in ("mass.txt", "mass"):
        assert_one_line(cli("inspect", str(caches["top16"]), "--plot", str(tmp_path / bad)), "--plot", ".png")
        assert not list(tmp_path.glob(f"{bad}*"))


# ---------------------------------------------------------------- interruptions and odd states


def test_sigint_during_a_dump_says_how_to_continue(teacher_dir, long_text, tmp_path) -> None:
    out = tmp_path / "cache"
    args = ["dump-teacher", "--model", str(teacher_dir), "--data", str(long_text), "--output", str(out), "--engine", "hf",
            "--top-k", "4", "--max-length", "64", "--batch-tokens", "64", "--shard-size-mb", "0.001", "--no-progress"]
    proc = start(*args)
    wait_for(lambda: sum(len(p.shards) for p in load_parts(open_store(str(out)))) >= 2, proc)
    code, err = stop(proc, signal.SIGINT)
    assert code == 130 and err.strip().splitlines() == ["interrupted: the committed shards are kept; rerun the same command to resume"], err
    assert not (out / "manifest.json").exists()
    # The same command resumes; larger batches and shards (not settings of the cache) finish the 3000 rows in
    # bounded time on a loaded machine.
    faster = args.copy()
    faster[args.index("--batch-tokens") + 1], faster[args.index("--shard-size-mb") + 1] = "4096", "16"
    resumed = run_cli(*faster)
    assert "resumed" in resumed.stderr and (out / "manifest.json").exists()


def test_a_signal_in_the_dump_loop_stops_it_at_the_next_safe_point() -> None:
    """The first Ctrl-C or SIGTERM is recorded and raised where the loop checks (never inside the writer
    queue's locking); a second stops at once; a failure after the signal (vLLM's engine core stopped by the same
    Ctrl-C) is the interruption; the handlers are restored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        reached = False
        with pytest.raises(KeyboardInterrupt):
            with interrupts_at_safe_points() as stop_if_interrupted:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler has run by now (at the kill's return at the latest), and raised nothing
                reached = True
                stop_if_interrupted()
        assert reached
        after_second = False
        with pytest.raises(KeyboardInterrupt):
            with interrupts_at_safe_points():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                after_second = True
        assert not after_second
        with pytest.raises(KeyboardInterrupt):
            with interrupts_at_safe_points():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                raise RuntimeError("engine core died")
        for failure in (RuntimeError("a real failure"), OSError(28, "No space left on device")):
            with pytest.raises(type(failure)):  # with no signal, a failure is itself; after one, our own failures too
                with interrupts_at_safe_points():
                    if isinstance(failure, OSError):
                        os.kill(os.getpid(), signal.SIGINT)
                        time.sleep(0.05)
                    raise failure
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (signal.default_int_handler, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # started as `nohup cmd &`: SIGINT stays ignored
        with interrupts_at_safe_points() as stop_if_interrupted:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            stop_if_interrupted()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_a_signal_that_lands_in_a_finalizer_still_stops_training(student_dir, caches, tmp_path, monkeypatch) -> None:
    """torch runs many finalizers. A KeyboardInterrupt that the signal's handler raised inside one was dropped,
    and the run trained on as if no signal came (CI: still training 600 s after SIGTERM). Recorded instead, the
    signal stops the run before the next step, in the one line that says how to continue."""
    import taid_cache.training.trainer as trainer

    calls, real = [], trainer.micro_batch_loss

    def signalled_in_step_three(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            SignalInFinalizer()  # dropped at once: its __del__ runs here, and the handler inside it
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "micro_batch_loss", signalled_in_step_three)
    out = tmp_path / "run"
    result = train(student_dir, caches["top16"], out, "--loss", "fkl", "--max-steps", "8", "--save-every", "2")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 130 and lines == [f"interrupted at step 3: {lines[0].split(': ', 1)[1]}"], result.output
    assert "--resume" in lines[0]
    assert [r["step"] for r in losses_of(out)] == [1, 2, 3]  # step 3 finished; step 4 never began
    resumed = train(student_dir, caches["top16"], out, "--loss", "fkl", "--max-steps", "8", "--save-every", "2", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert [r["step"] for r in losses_of(out)] == list(range(1, 9))


def test_a_newest_checkpoint_without_its_meta_or_rng_falls_back(student_dir, caches, tmp_path) -> None:
    for lost in ("meta.json", "rng-00000.pt"):
        run = finished_run(student_dir, caches["top16"], tmp_path / lost, steps=4)
        newest = sorted((run / "checkpoints").glob("step-*"))[-1]
        (newest / lost).unlink()
        result = train(student_dir, caches["top16"], run, "--resume", "--save-every", "1", "--max-steps", "4")
        assert result.exit_code == 0, result.output
        assert newest.name in result.output and "trying the one before it" in result.output, result.output
        assert (run / "model.safetensors").exists()
        assert [m["step"] for m in losses_of(run)] == [1, 2, 3, 4]


def test_training_on_a_cache_whose_every_row_was_dropped(teacher_dir, student_dir, tmp_path) -> None:
    write_jsonl(tmp_path / "long.jsonl", [{"input_ids": list(range(3, 60))}] * 3)
    assert dump(teacher_dir, tmp_path / "long.jsonl", tmp_path / "cache", "--max-length", "10", "--overlong", "drop").exit_code == 0
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["records"] == 0
    assert_one_line(train(student_dir, tmp_path / "cache", tmp_path / "run"), "holds no sequences")
    assert nothing_written(tmp_path / "run")


@pytest.mark.parametrize("name", ["new\nline", "-leading-dash"])
def test_output_paths_with_odd_names(teacher_dir, student_dir, data_dir, tmp_path, monkeypatch, name: str) -> None:
    monkeypatch.chdir(tmp_path)  # relative names: "-leading-dash-cache" is what the command line sees
    cache, run = Path(f"{name}-cache"), Path(f"{name}-run")
    assert dump(teacher_dir, data_dir / "chat.jsonl", cache, "--top-k", "4", "--max-length", "128").exit_code == 0
    assert train(student_dir, cache, run, "--max-steps", "1").exit_code == 0
    assert (run / "model.safetensors").exists() and len(list(read_cache(cache))) == 24
    assert_one_line(dump(teacher_dir, data_dir / "text.jsonl", cache, "--top-k", "4"), "other settings")  # a newline shown as \n
    proc = subprocess.run([sys.executable, "-m", "taid_cache.cli", "verify", "--", str(cache)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok:")


def test_a_non_utf8_output_path_is_refused_in_one_line(teacher_dir, student_dir, data_dir, caches, tmp_path) -> None:
    """Arrow and safetensors take UTF-8 names only: refused before anything is written, named readably."""
    bad = tmp_path / "caf\udce9"
    assert_one_line(dump(teacher_dir, data_dir / "chat.jsonl", bad), "not a UTF-8 path", "\\udce9")
    assert_one_line(train(student_dir, caches["top16"], bad), "not a UTF-8 path")
    assert not os.path.exists(os.fsencode(str(bad)))
