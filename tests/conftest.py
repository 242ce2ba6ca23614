"""Shared fixtures: a tiny Llama teacher with a tokenizer trained here on standard-library text, and small
datasets of each row kind. Nothing comes from a hub."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# Before torch loads its OpenMP (it reads this then), for this process and every one the suite starts: an idle
# worker thread sleeps at once instead of spinning, which on busy cores holds the one its sibling needs to reach
# the barrier. Half the time beside busy loops, a quarter more on idle cores; results unchanged (docs/BENCHMARKS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from taid_cache.cli import app
from taid_cache.losses.registry import REGISTRY
from taid_cache.reproduce.corpus import chat_pairs, stdlib_files
from taid_cache.reproduce.models import LlamaSize, new_llama
from taid_cache.reproduce.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# A suite started as `cmd &` from a script inherits SIGINT ignored, and so would every CLI process it starts
# (Python keeps an ignored SIGINT ignored): handled here, it is back at its default in each child, as in a
# terminal's foreground, so the Ctrl-C tests send what a user's Ctrl-C is.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
VOCAB = 512

# `make test` runs the suite in two pytest-xdist workers (pyproject.toml). Each worker's torchrun calls take their
# own rendezvous port (torchrun reads PET_MASTER_PORT), so two workers' rank tests never meet on torchrun's default.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if WORKER.startswith("gw"):
    os.environ.setdefault("PET_MASTER_PORT", str(29500 + 17 * (int(WORKER[2:]) + 1)))


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected: the order of the tests that run
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The order `--dist loadfile` hands modules to the workers: the longest first (those with slow vLLM tests, then
    those with the most slow tests, then those with the most tests, xdist's own rule), so that none starts last and
    leaves the other worker idle. A stable sort: within a module, the tests keep their order."""
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)

    def longest_first(tests: list[pytest.Item]) -> tuple[bool, int, int]:
        slow = [t for t in tests if t.get_closest_marker("slow")]
        return (not any(t.get_closest_marker("vllm") for t in slow), -len(slow), -len(tests))

    items[:] = [item for tests in sorted(modules.values(), key=longest_first) for item in tests]


# The losses the `caches` fixture's dumps serve: all but those reading the teacher at the next token only (opd
# reads a --target-logprobs cache; tests/test_opd.py runs it).
CACHE_LOSSES = tuple(name for name, loss in REGISTRY.items() if not loss.next_token_only)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return [p.read_text(errors="ignore") for p in stdlib_files()[:40]]


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, texts) -> Path:
    """A 2-layer Llama (hidden 128, head dimension 64) with a 512-token BPE tokenizer and chat template.
    Its LM head is scaled up so its next-token distributions are peaked like a trained model's (the stored
    top-16 then holds ~90% of the mass, and top-p has something to cut)."""
    root = tmp_path_factory.mktemp("teacher")
    tokenizer = train_tokenizer(texts, VOCAB, root / "tokenizer")
    model = new_llama(LlamaSize(), len(tokenizer), tokenizer, seed=0)
    model.lm_head.weight.data.mul_(20.0)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, texts) -> Path:
    root = tmp_path_factory.mktemp("data")
    convs = [c for t in texts for c in chat_pairs(t)][:24]
    write_jsonl(root / "chat.jsonl", [{"messages": c} for c in convs])
    snippets = [s for t in texts[:8] for i in range(0, 3000, 600) if len(s := t[i : i + 600]) > 100]
    write_jsonl(root / "text.jsonl", [{"text": s, "id": f"doc{i}"} for i, s in enumerate(snippets)])
    write_jsonl(root / "tokens.jsonl", [{"input_ids": list(range(3 + i, 40 + 3 * i)), "loss_mask": [i % 2 == 0] * (37 + 2 * i)} for i in range(6)])
    write_jsonl(root / "empty.jsonl", [])
    write_jsonl(root / "nocolumn.jsonl", [{"question": "a", "answer": "b"}])
    return root


STUDENT = LlamaSize(hidden=64, layers=1, heads=1, intermediate=128)


@pytest.fixture(scope="session")
def student_dir(teacher_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student") / "model"
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    new_llama(STUDENT, len(tokenizer), tokenizer, seed=1, out=out)
    return out


@pytest.fixture(scope="session")
def caches(teacher_dir, data_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-caches")
    common = ["--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--engine", "hf", "--max-length", "256", "--tail-samples", "0",
              "--no-progress"]
    run_cli("dump-teacher", *common, "--output", str(root / "top16"), "--top-k", "16")
    run_cli("dump-teacher", *common, "--output", str(root / "full"), "--top-k", "512", "--precision", "fp32")
    return {"top16": root / "top16", "full": root / "full"}


def without_chat_template(model: Path, copy: Path) -> Path:
    """A copy of `model` whose tokenizer has no chat template (neither the .jinja file nor the config's entry)."""
    import shutil

    shutil.copytree(model, copy)
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    return copy


def kill_group(proc: subprocess.Popen, sig: int) -> None:
    """`sig` to the process group `proc` leads (started with `process_group=0`); none left to signal is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


class SignalInFinalizer:
    """An object whose finalizer takes a Ctrl-C (made and dropped in one expression: its __del__ runs at once).
    Python prints a KeyboardInterrupt raised inside a finalizer and drops it; torch runs many finalizers, so a
    signal whose handler raises can land in one and be lost."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The CLI in this process (the import cost of torch and transformers is paid once per suite, not per call).
    Tests that need a process of their own (kill -9, torchrun, several workers) start `python -m taid_cache.cli`
    themselves; a vLLM engine's processes write to this process's file descriptors (read them with `capfd`)."""
    result = CliRunner().invoke(app, list(args), env={"TOKENIZERS_PARALLELISM": "false"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if check and result.exit_code != 0:
        raise AssertionError(f"taid-cache {' '.join(args)} failed ({result.exit_code}):\n{result.stderr[-3000:]}")
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def assert_one_line(result, *words: str) -> None:
    """A CLI result (CliRunner's or a process's): exit status 2 and exactly one line, `error: ...`, naming every word."""
    code, text = (result.exit_code, result.output) if hasattr(result, "exit_code") else (result.returncode, result.stderr)
    assert code == 2, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    for word in words:
        assert word in lines[0], lines[0]


def run_process(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh process: for what only a process shows (everything it writes to
    stderr, libraries' own logging included)."""
    proc = subprocess.run([sys.executable, "-m", "taid_cache.cli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"taid-cache {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


# Bytes of address space for the command server: far above what a refused command needs, so a config loader that
# expanded a YAML bomb fails by a MemoryError there instead of taking the machine's memory.
COMMAND_MEMORY = 2 * 1024**3


def limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (COMMAND_MEMORY, COMMAND_MEMORY))


class CommandServer:
    """`python -m MODULE ARGS` for many quick cases, run one after another by one process (tests/command_server.py)
    so that the interpreter and its imports start once, under COMMAND_MEMORY. A server that dies is started again
    for the next case; the case it died in fails."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        read, write = os.pipe()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "command_server.py"), str(write)], stdin=subprocess.PIPE,
                                     text=True, pass_fds=(write,), preexec_fn=limit_address_space, cwd=tempfile.gettempdir(),
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        os.close(write)
        self.replies = os.fdopen(read)

    def run(self, module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps({"module": module, "args": list(args), "cwd": str(cwd)}) + "\n")
        self.proc.stdin.flush()
        line = self.replies.readline()
        if not line:
            code = self.proc.wait()
            self.close()
            raise AssertionError(f"the command server died (exit status {code}) running python -m {module} {' '.join(args)}")
        reply = json.loads(line)
        return subprocess.CompletedProcess([module, *args], reply["code"], reply["stdout"], reply["stderr"])

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait()
            self.replies.close()
            self.proc = None


@pytest.fixture(scope="session")
def commands():
    """One command server for the suite's quick refusal cases that want a process's view (stderr whole, exit status)."""
    server = CommandServer()
    yield server
    server.close()


# Two forwards of one model that batch differently (packed vs alone, two engines) round differently: log-probs
# closer than this are ties whose order is noise.
TIE_NATS = 1e-4


def assert_top_k_of(ids: np.ndarray, logprobs: np.ndarray, reference: np.ndarray, bound: float) -> None:
    """`ids`/`logprobs` [P, k] are a top-k of `reference` [P, V] (true log-probs) up to float noise: each stored
    log-prob is within `bound` of the reference's value for its id, ids are distinct, in descending reference
    order, and none is beaten by an unstored id by more than TIE_NATS. So ids may differ from an exact sort only
    where two candidates are tied to float noise."""
    k = ids.shape[1]
    true = np.take_along_axis(reference, ids, axis=1)
    assert np.abs(logprobs - true).max() <= bound + 1e-5
    assert all(len(set(row)) == k for row in ids.tolist())
    assert (np.diff(true, axis=1) <= TIE_NATS).all()
    kth = -np.partition(-reference, k - 1, axis=1)[:, k - 1]  # the k-th largest reference value per row
    assert (true.min(axis=1) >= kth - TIE_NATS).all()


def true_tail_mass(ids: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Σ of the reference probabilities off each row's stored ids (−1: none), summed where it lies in float64."""
    p = np.exp(reference.astype(np.float64))
    rows = np.arange(len(ids))[:, None].repeat(ids.shape[1], 1)
    p[rows[ids >= 0], ids[ids >= 0]] = 0.0
    return p.sum(axis=1)


def assert_tail_of(ids: np.ndarray, tail_logmass: np.ndarray, reference: np.ndarray, relative: float) -> None:
    """The stored log tail mass is the reference's mass off the stored ids, within `relative`."""
    true = true_tail_mass(ids, reference)
    assert (true > 0).all()
    assert np.abs(np.exp(tail_logmass.astype(np.float64)) / true - 1).max() <= relative


def assert_same_up_to_ties(ids_a: np.ndarray, lps_a: np.ndarray, ids_b: np.ndarray, lps_b: np.ndarray, atol: float) -> None:
    """Two top-k tables of one teacher computed in different batches: the sorted log-probs agree within `atol`,
    an id present in both has the same log-prob within `atol`, and an id present in only one sits at that
    row's cut-off (a tie with the id the other kept)."""
    np.testing.assert_allclose(lps_a, lps_b, atol=atol)
    for ia, la, ib, lb in zip(ids_a.tolist(), lps_a.tolist(), ids_b.tolist(), lps_b.tolist()):
        a, b = dict(zip(ia, la)), dict(zip(ib, lb))
        for token in a.keys() & b.keys():
            assert abs(a[token] - b[token]) <= atol
        for token, lp in [(t, a[t]) for t in a.keys() - b.keys()] + [(t, b[t]) for t in b.keys() - a.keys()]:
            assert lp <= min(la[-1], lb[-1]) + atol + TIE_NATS


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on loopback (a free port), its endpoint and test credentials in os.environ so s3fs,
    boto3 and every subprocess the suite starts reach it; yields the endpoint."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the test server, as `s3://<bucket>`."""
    import uuid

    import boto3

    name = f"taid-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"
