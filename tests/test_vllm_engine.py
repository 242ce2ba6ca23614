"""The vLLM engine writes every cache the transformers engine writes: on the same teacher and data, top-k,
--top-p, a head + sampled tail, the exact tail mass and the full fidelity report agree with the hf engine's, at
tensor parallel 1 and 2 and pipeline parallel 2, for float32 and bf16 teachers; a killed sampled dump leaves none
of vLLM's processes behind and resumes record-identical; two single-core vLLM workers make one worker's cache.

One vLLM engine is started for the module and reused by the in-process dumps (`dump_teacher(cfg, engine)`); the
parallel and bf16 cases run the command in this process (their engines start their own processes, but vLLM is
imported once), the kill -9 and multi-worker cases start commands of their own. `enforce_eager` skips vLLM's
compilation at start-up, which on CPU changes start-up time only (docs/BENCHMARKS.md)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, TIE_NATS, assert_same_up_to_ties, kill_group, run_cli, write_jsonl
from taid_cache.config import DumpConfig
from taid_cache.engines.base import EngineConfig, open_engine
from taid_cache.engines.tail_sampling import sequence_uniforms
from taid_cache.pipelines.dump_teacher import dump_teacher
from taid_cache.shards import read_cache
from taid_cache.shards.codec import LOGPROB_STEP
from taid_cache.shards.manifest import load_parts
from taid_cache.storage import open_store
from test_dump_teacher import reference_logprobs

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
              pytest.mark.vllm, pytest.mark.slow]

EAGER = '{"enforce_eager": true}'
MAX_LENGTH = 256


@pytest.fixture(scope="module")
def vllm_engine(teacher_dir):
    engine = open_engine("vllm", EngineConfig(str(teacher_dir), MAX_LENGTH, "float32", engine_args=json.loads(EAGER)))
    yield engine
    engine.close()


def dump_summary(engine_name: str, teacher: Path, data: Path, out: Path, engine=None, **options) -> dict:
    """One in-process dump (what dump_teacher returns); `engine`: the module's open vLLM engine."""
    return dump_teacher(DumpConfig(model=str(teacher), data=[str(data)], output=out, engine=engine_name, max_length=MAX_LENGTH,
                                   progress=False, vllm_args=EAGER if engine_name == "vllm" else None, **options), engine)


def dump(engine_name: str, teacher: Path, data: Path, out: Path, engine=None, **options) -> Path:
    dump_summary(engine_name, teacher, data, out, engine, **options)
    return out


def cli_args(teacher: Path, data: Path, out: Path, *extra: str, eager: bool = True) -> list[str]:
    return ["dump-teacher", "--model", str(teacher), "--data", str(data), "--output", str(out), "--engine", "vllm",
            "--max-length", str(MAX_LENGTH), *(["--vllm-args", EAGER] if eager else []), "--no-progress", *extra]


def fidelity(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())["fidelity"]


def assert_same_cache(vllm: Path, hf: Path, lp_bound: float) -> None:
    """Top-k ids equal but at float32 near-ties, stored log-probs within `lp_bound`, the tail mass within 1e-5
    relative, the fidelity report (captured mass, hits, entropy, KL of the reconstruction) within 1e-4."""
    a, b = list(read_cache(vllm)), list(read_cache(hf))
    assert [r.sample_id for r in a] == [r.sample_id for r in b] and len(a) > 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.loss_mask, y.loss_mask)
        used = (x.topk_ids >= 0) & (y.topk_ids >= 0)
        assert np.abs(np.where(used, x.topk_logprobs, 0) - np.where(used, y.topk_logprobs, 0)).max() <= lp_bound
        assert_same_up_to_ties(x.topk_ids, np.where(used, x.topk_logprobs, -99), y.topk_ids,
                               np.where(used, y.topk_logprobs, -99), atol=lp_bound)
        ratio = np.exp(x.tail_logmass.astype(np.float64) - y.tail_logmass.astype(np.float64))
        assert np.abs(ratio - 1).max() <= 1e-5
    report_a, report_b = fidelity(vllm), fidelity(hf)
    assert report_a.keys() == report_b.keys() and report_a["teacher_entropy_mean"] > 0
    for key in report_a:
        assert report_a[key] == pytest.approx(report_b[key], abs=1e-4), key


def near_a_cdf_boundary(logprobs: np.ndarray, head: np.ndarray, uniforms: np.ndarray, noise: float = 1e-5) -> bool:
    """Whether one of a position's uniforms lies within float noise of a boundary of its off-head CDF (float64,
    from the reference): only there may two engines' float32 CDFs send a draw to neighbouring ids."""
    p = np.exp(logprobs.astype(np.float64))
    p[head[head >= 0]] = 0.0
    cdf = np.cumsum(p) / p.sum()
    at = np.clip(np.searchsorted(cdf, uniforms), 1, len(cdf) - 1)
    return bool(np.minimum(np.abs(cdf[at] - uniforms), np.abs(cdf[at - 1] - uniforms)).min() <= noise)


def assert_same_draws(vllm: Path, hf: Path, teacher_dir: Path, seed: int, draws: int) -> None:
    """The tail draws equal at >= 99% of positions (the same uniforms from (seed, sample id)); every position
    where they differ has a uniform at a CDF boundary within float noise, counted here."""
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    differing = explained = total = 0
    for x, y in zip(read_cache(vllm), read_cache(hf)):
        same = ((x.sample_ids == y.sample_ids) & (x.sample_draws == y.sample_draws)).all(1)
        total += len(same)
        if same.all():
            continue
        reference = reference_logprobs(teacher_dir, x.input_ids, model)[:-1]
        uniforms = sequence_uniforms(seed, x.sample_id, len(same), draws)
        for j in np.flatnonzero(~same):
            differing += 1
            explained += near_a_cdf_boundary(reference[j], y.topk_ids[j], uniforms[j])
    assert differing <= 0.01 * total, (differing, total)
    assert explained == differing, f"{differing - explained} of {differing} differing positions are not float-noise ties"


def test_top_k_and_fidelity_equal_hf(vllm_engine, teacher_dir, data_dir, caches, tmp_path) -> None:
    """Compact top-16 (both within half a step of the same value, so codes differ by at most one step)."""
    vllm = dump("vllm", teacher_dir, data_dir / "chat.jsonl", tmp_path / "vllm", vllm_engine, top_k=16)
    assert_same_cache(vllm, caches["top16"], LOGPROB_STEP + 1e-6)


def test_top_p_in_fp32_equals_hf(vllm_engine, teacher_dir, data_dir, tmp_path) -> None:
    options = dict(top_k=16, top_p=0.8, tail_samples=0, precision="fp32")
    hf = dump("hf", teacher_dir, data_dir / "chat.jsonl", tmp_path / "hf", **options)
    vllm = dump("vllm", teacher_dir, data_dir / "chat.jsonl", tmp_path / "vllm", vllm_engine, **options)
    assert_same_cache(vllm, hf, TIE_NATS)  # fp32 storage: two decoders' float rounding, at logits of ~40 nats
    kept = np.concatenate([(r.topk_ids >= 0).sum(1) for r in read_cache(vllm)])
    assert len(set(kept.tolist())) > 3  # the cut really varies per position


@pytest.fixture(scope="module")
def sampled_hf(teacher_dir, data_dir, tmp_path_factory) -> Path:
    return dump("hf", teacher_dir, data_dir / "chat.jsonl", tmp_path_factory.mktemp("sampled") / "hf", top_k=4, tail_samples=24,
                seed=3)


def test_head_and_sampled_tail_equal_hf(vllm_engine, teacher_dir, data_dir, sampled_hf, tmp_path) -> None:
    vllm = dump("vllm", teacher_dir, data_dir / "chat.jsonl", tmp_path / "vllm", vllm_engine, top_k=4, tail_samples=24, seed=3)
    assert_same_cache(vllm, sampled_hf, LOGPROB_STEP + 1e-6)
    assert_same_draws(vllm, sampled_hf, teacher_dir, seed=3, draws=24)


def test_tensor_parallel_2_sampled_and_pipeline_parallel_2(teacher_dir, data_dir, sampled_hf, caches, tmp_path, capfd) -> None:
    """The command in this process (vLLM is imported already); its engine's processes write to this one's output.
    What vLLM's start writes into the environment is put back: a later test, or a process it starts, sees none."""
    environment = dict(os.environ)
    run_cli(*cli_args(teacher_dir, data_dir / "chat.jsonl", tmp_path / "tp2", "--tensor-parallel-size", "2",
                      "--top-k", "4", "--tail-samples", "24", "--seed", "3"))
    output = "".join(capfd.readouterr())
    assert "Worker_TP1" in output, output[-3000:]  # a second tensor-parallel rank really ran
    assert_same_cache(tmp_path / "tp2", sampled_hf, LOGPROB_STEP + 1e-6)
    assert_same_draws(tmp_path / "tp2", sampled_hf, teacher_dir, seed=3, draws=24)
    # Compiled, as by default: vLLM 0.32's CPU runner fails pipeline parallelism under enforce_eager.
    run_cli(*cli_args(teacher_dir, data_dir / "chat.jsonl", tmp_path / "pp2", "--pipeline-parallel-size", "2", "--top-k", "16",
                      eager=False))
    output = "".join(capfd.readouterr())
    assert "Worker_PP1" in output, output[-3000:]  # the second pipeline stage really ran
    assert dict(os.environ) == environment
    assert_same_cache(tmp_path / "pp2", caches["top16"], LOGPROB_STEP + 1e-6)


def test_a_bf16_teacher(teacher_dir, data_dir, tmp_path) -> None:
    """A teacher saved in bf16 runs in bf16 in both engines (`--dtype auto`). Their decoders round differently
    (different kernels), so the caches agree to bf16 noise, not to float32's: the fidelity report within 1e-3
    relative, the stored top-1 the same at nearly every position, every stored log-prob within bf16's step of
    logits this large (the fixture's head is scaled 20x: logits of ~40 nats, a bf16 step of ~0.25)."""
    folder = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(folder)
    hf = dump("hf", folder, data_dir / "chat.jsonl", tmp_path / "hf", top_k=16, tail_samples=16)
    run_cli(*cli_args(folder, data_dir / "chat.jsonl", tmp_path / "vllm", "--top-k", "16", "--tail-samples", "16"))
    assert json.loads((tmp_path / "vllm" / "manifest.json").read_text())["settings"]["dtype"] == "bfloat16"
    a, b = list(read_cache(tmp_path / "vllm")), list(read_cache(hf))
    top1 = np.concatenate([x.topk_ids[:, 0] == y.topk_ids[:, 0] for x, y in zip(a, b)])
    assert top1.mean() >= 0.97
    for x, y in zip(a, b):
        common = x.topk_ids[:, :1] == y.topk_ids[:, :1]
        assert np.abs(np.where(common, x.topk_logprobs[:, :1] - y.topk_logprobs[:, :1], 0)).max() <= 0.5
    for key, value in fidelity(tmp_path / "vllm").items():
        assert value == pytest.approx(fidelity(hf)[key], rel=1e-3, abs=2e-3), key


@pytest.fixture(scope="module")
def many_rows(data_dir, texts) -> Path:
    rows = [{"text": t[i : i + 300]} for t in texts[:20] for i in range(0, 3000, 300) if len(t[i : i + 300]) > 50]
    return write_jsonl(data_dir / "many-vllm.jsonl", rows[:120])


SMALL_SHARDS = ["--top-k", "8", "--tail-samples", "16", "--batch-tokens", "400", "--shard-size-mb", "0.001"]


def committed(out: Path) -> int:
    try:
        return sum(len(p.shards) for p in load_parts(open_store(str(out))))
    except Exception:  # a part file being replaced at this instant
        return 0


def alive(process: psutil.Process) -> bool:
    """`process` still runs (not a zombie; not another process under its pid: psutil checks its start time)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_kill_9_of_a_sampled_dump_leaves_none_of_its_processes_and_resumes_record_identical(vllm_engine, teacher_dir, many_rows,
                                                                                            tmp_path) -> None:
    """The dump alone is killed (not its process group), after vLLM's engine core has started its worker and some
    shards are committed. Every process it started must go with it: vLLM's engine core and worker once outlived a
    kill -9 (re-parented to init, minutes later still there, holding the memory the resumed dump needs). The resumed
    run then redoes only the uncommitted batches, on the same batch boundaries, and redraws the same tail from
    (seed, sample id): the finished cache equals an uninterrupted one record for record. The deadlines only guard a
    hang; nothing is asserted about how fast."""
    small_shards = {"top_k": 8, "tail_samples": 16, "batch_tokens": 400, "shard_size_mb": 0.001}  # SMALL_SHARDS
    clean = dump("vllm", teacher_dir, many_rows, tmp_path / "clean", vllm_engine, **small_shards)
    crashed = tmp_path / "crashed"
    log = tmp_path / "killed-dump.log"  # its output, vLLM's timestamped start-up included: shown if the kill missed
    seen: dict[int, tuple[psutil.Process, str]] = {}  # every descendant of the dump: pid -> (process, command line)

    def record(parent: psutil.Process) -> None:
        for child in parent.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                seen.setdefault(child.pid, (child, " ".join(child.cmdline())[:160]))

    def vllm_runs() -> bool:
        """vLLM's engine core has started its worker: a descendant of the dump with a child of its own."""
        with contextlib.suppress(psutil.NoSuchProcess):  # one that ends between the two calls
            return any(alive(p) and p.children() for p, _ in seen.values())
        return False

    with log.open("w") as output:
        proc = subprocess.Popen([sys.executable, "-m", "taid_cache.cli", *cli_args(teacher_dir, many_rows, crashed, *SMALL_SHARDS)],
                                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, process_group=0)
    parent = psutil.Process(proc.pid)
    try:
        # However slowly vLLM starts on a loaded machine: wait for its worker (a descendant with a child) and the
        # commits (the deadline only guards a hang, under pytest's 900 s per test).
        hang_guard = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < hang_guard:
            record(parent)
            if vllm_runs() and committed(crashed) >= 3:
                break
            time.sleep(0.05)
        record(parent)
        assert proc.poll() is None, "the dump ended before it could be killed:\n" + log.read_text(errors="replace")[-3000:]
        os.kill(proc.pid, signal.SIGKILL)  # the dump only
        proc.wait()
        hang_guard = time.monotonic() + 300
        while any(alive(p) for p, _ in seen.values()) and time.monotonic() < hang_guard:
            time.sleep(0.2)
        survivors = [f"{pid}: {cmd}" for pid, (p, cmd) in seen.items() if alive(p)]
        assert len(seen) >= 2 and not survivors, "\n".join(["outlived the dump:", *survivors])
    finally:
        # Whatever survived is not left running.
        for p in [p for p, _ in seen.values() if alive(p)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        kill_group(proc, signal.SIGKILL)
        proc.wait()
    total = len(json.loads((clean / "manifest.json").read_text())["shards"])
    assert 3 <= committed(crashed) < total and not (crashed / "manifest.json").exists(), log.read_text(errors="replace")[-3000:]
    # Resumed on the module's engine (one vLLM start fewer): the same settings as the killed command's.
    assert dump_summary("vllm", teacher_dir, many_rows, crashed, vllm_engine, **small_shards)["resumed"]
    a, b = list(read_cache(crashed)), list(read_cache(clean))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        mine, theirs = x.as_dict(), y.as_dict()
        assert mine.keys() == theirs.keys()
        for key in mine:
            np.testing.assert_array_equal(mine[key], theirs[key], err_msg=key)


def test_two_single_core_vllm_workers_make_one_workers_cache(vllm_engine, teacher_dir, many_rows, tmp_path) -> None:
    """`--num-workers 2`, each a vLLM process with tensor parallel 1 pinned to its own core."""
    single = dump("vllm", teacher_dir, many_rows, tmp_path / "single", vllm_engine, top_k=8, precision="fp32")
    cores = sorted(os.sched_getaffinity(0))[:2]
    procs = [subprocess.Popen([sys.executable, "-m", "taid_cache.cli", *cli_args(teacher_dir, many_rows, tmp_path / "multi",
                                                                                "--top-k", "8", "--precision", "fp32",
                                                                                "--num-workers", "2", "--worker-index", str(i))],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda core=cores[i % len(cores)]: os.sched_setaffinity(0, {core})) for i in (0, 1)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    assert run_cli("verify", str(tmp_path / "multi")).returncode == 0
    a, b = list(read_cache(tmp_path / "multi")), list(read_cache(single))
    assert [r.sample_id for r in a] == [r.sample_id for r in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        # One core or two, other batch neighbours: float rounding differs, values agree within float noise.
        assert_same_up_to_ties(x.topk_ids, x.topk_logprobs, y.topk_ids, y.topk_logprobs, atol=TIE_NATS)


@pytest.mark.parametrize("extra, words", [
    (["--vllm-args", "[1]"], "must be a JSON object"),
    (["--vllm-args", "{oops"], "not JSON"),
    (["--vllm-args", '{"tensor_parallel_size": 2}'], "sets tensor_parallel_size itself"),
    (["--vllm-args", '{"no_such_argument": 1}'], "no argument no_such_argument"),
])
def test_bad_vllm_arguments_are_one_line_before_any_write(teacher_dir, data_dir, tmp_path, extra: list[str], words: str) -> None:
    proc = run_cli("dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--output",
                   str(tmp_path / "o"), "--engine", "vllm", "--no-progress", *extra, check=False)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not any((tmp_path / "o").rglob("*.json"))
