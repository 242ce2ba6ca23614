"""train-student: cached = online with a lossless cache, 2 gloo ranks = 1 rank, kill -9 + resume =
uninterrupted, every loss learns, the saved student loads, evaluation numbers, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from conftest import CACHE_LOSSES, ROOT, STUDENT, run_cli, write_jsonl
from taid_cache.cli import app
from taid_cache.config import TrainConfig, to_json
from taid_cache.errors import UserError
from taid_cache.pipelines.train_student import train_student
from taid_cache.training.metrics import read_metrics
from taid_cache.reproduce.models import new_llama
from taid_cache.reproduce.tokenizer import train_tokenizer
from taid_cache.shards import read_cache
from taid_cache.packing import keeps_sequences_apart, pack_rows
from taid_cache.training.data import collate

metrics = read_metrics


def steps(out: Path) -> list[dict]:
    return [m for m in metrics(out) if "loss" in m]


def train(student: Path, cache: Path, out: Path, **kw) -> list[dict]:
    cfg = TrainConfig(student=str(student), cache=cache, output=out, progress=False,
                      **{"max_steps": 4, "batch_size": 4, "lr": 3e-3, "max_length": 256, **kw})
    train_student(cfg)
    return steps(out)


def test_cached_lossless_cache_equals_online_teacher(student_dir, teacher_dir, caches, tmp_path) -> None:
    cached = train(student_dir, caches["full"], tmp_path / "cached", max_steps=3)
    online = train(student_dir, caches["full"], tmp_path / "online", max_steps=3, teacher_model=str(teacher_dir))
    for a, b in zip(cached, online):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 and a["t"] == pytest.approx(b["t"], abs=1e-6)
    assert len(cached) == len(online) == 3


# One rank and two see the same global batches; in bf16 the ranks' smaller matrix products round differently.
RANK_TOLERANCE = {"fp32": 1e-5, "bf16": 2e-3}
# The two runs' weights differ by this share of how far training moved them (per tensor, Frobenius norms). Not
# elementwise: Adam turns a near-zero gradient whose sign differs between the layouts into a full lr-sized step.
WEIGHT_SHARE = {"fp32": 0.01, "bf16": 0.1}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_gloo_ranks_equal_one_rank(student_dir, caches, tmp_path, precision: str) -> None:
    args = ["--student", str(student_dir), "--cache", str(caches["top16"]), "--max-steps", "4", "--lr", "3e-3",
            "--max-length", "256", "--taid-alpha", "0.2", "--no-progress", "--precision", precision]
    run_cli("train-student", *args, "--output", str(tmp_path / "one"), "--batch-size", "4")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "taid_cache.cli",
                           "train-student", *args, "--output", str(tmp_path / "two"), "--batch-size", "2", "--save-every", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = steps(tmp_path / "one"), steps(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=RANK_TOLERANCE[precision])
        assert b["t"] == pytest.approx(a["t"], abs=RANK_TOLERANCE[precision] / 10) and b["tokens"] == a["tokens"]
        assert b["t_rank_spread"] == 0.0  # both ranks hold the same t
    assert one[-1]["t"] > one[0]["t"]  # t really moved
    model_one = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    model_two = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    initial = AutoModelForCausalLM.from_pretrained(student_dir).state_dict()
    for name, weight in model_one.items():
        assert weight.dtype == torch.float32  # master weights stay float32 in bf16 runs
        moved = (weight - initial[name]).norm()
        assert moved > 0, name  # it trained
        assert (model_two[name] - weight).norm() <= WEIGHT_SHARE[precision] * moved, name
    # The two-rank run's checkpoint cannot be resumed by one process: its items would be split otherwise.
    for f in (tmp_path / "two").iterdir():
        if f.is_file() and f.name != "metrics.jsonl":
            f.unlink()
    proc = run_cli("train-student", *args, "--output", str(tmp_path / "two"), "--batch-size", "2", "--save-every", "2",
                   "--resume", check=False)
    assert proc.returncode == 2 and "world_size" in proc.stderr, proc.stderr
    if precision == "fp32":  # two ranks resume their own shards (torch.distributed.checkpoint) exactly
        # ... started the way make reproduce starts ranks: a saved TrainConfig, whose settings must equal the CLI's
        config = TrainConfig(student=str(student_dir), cache=caches["top16"], output=tmp_path / "two", max_steps=4, lr=3e-3,
                             max_length=256, taid_alpha=0.2, progress=False, precision=precision, batch_size=2, save_every=2,
                             resume=True)
        (tmp_path / "run.json").write_text(json.dumps(to_json(config)))
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                               "taid_cache.pipelines.train_student", str(tmp_path / "run.json")], cwd=ROOT, capture_output=True,
                              text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        resumed = steps(tmp_path / "two")
        assert [m["step"] for m in resumed] == [1, 2, 3, 4]
        for a, b in zip(two, resumed):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
        for name, weight in model_two.items():
            torch.testing.assert_close(again[name], weight, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(student_dir, caches, tmp_path) -> None:
    args = ["train-student", "--student", str(student_dir), "--cache", str(caches["top16"]), "--max-steps", "30",
            "--batch-size", "2", "--lr", "3e-3", "--max-length", "256", "--save-every", "4", "--taid-alpha", "0.3", "--no-progress"]
    run_cli(*args, "--output", str(tmp_path / "clean"))
    crashed = tmp_path / "crashed"
    for wanted in ("step-00000004", "step-00000012"):
        proc = subprocess.Popen([sys.executable, "-m", "taid_cache.cli", *args, "--output", str(crashed), *(["--resume"] if crashed.exists() else [])],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not (crashed / "checkpoints" / wanted).exists():
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (crashed / "model.safetensors").exists()  # nothing that looks finished
    run_cli(*args, "--output", str(crashed), "--resume")
    clean, resumed = steps(tmp_path / "clean"), steps(crashed)
    assert [m["step"] for m in resumed] == list(range(1, 31))
    for a, b in zip(clean, resumed):
        assert a["loss"] == b["loss"] and a["t"] == b["t"] and a["tokens"] == b["tokens"]  # bitwise


@pytest.mark.parametrize("loss", CACHE_LOSSES)
def test_every_loss_lowers_its_own_loss(loss: str, student_dir, caches, tmp_path) -> None:
    extra = {"taid_t_start": 0.9, "taid_t_end": 1.0, "taid_disable_adaptive": True} if loss == "taid" else {}
    # The whole cache in every step, so successive losses are comparable.
    log = train(student_dir, caches["top16"], tmp_path / loss, loss=loss, batch_size=24, max_steps=6, lr=1e-2, **extra)
    if loss == "ctkd":  # the student descends the loss and its temperature ascends it (the gradient reversal)
        assert log[-1]["temperature"] > log[0]["temperature"], [m["temperature"] for m in log]
    else:
        assert log[-1]["loss"] < log[0]["loss"] * 0.98, [m["loss"] for m in log]


def test_distil_ratio_mixes_in_cross_entropy(student_dir, caches, tmp_path) -> None:
    a = train(student_dir, caches["top16"], tmp_path / "a", loss="fkl", max_steps=2)
    b = train(student_dir, caches["top16"], tmp_path / "b", loss="fkl", max_steps=2, distil_ratio=0.5)
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-6)  # reported loss is the distillation term
    assert abs(a[1]["loss"] - b[1]["loss"]) > 1e-4 * a[1]["loss"]  # the CE part changed the update
    # The ends of the mix: r = 0 trains exactly as plain cross-entropy (`sft`, its own code path) while still
    # reporting the distillation term; r = 1 is distillation alone.
    ce = train(student_dir, caches["top16"], tmp_path / "ce", loss="fkl", max_steps=2, distil_ratio=0.0)
    train(student_dir, caches["top16"], tmp_path / "sft", loss="sft", max_steps=2)
    assert ce[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-6)
    for name, weight in AutoModelForCausalLM.from_pretrained(tmp_path / "sft").state_dict().items():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "ce").state_dict()[name], weight, rtol=1e-5, atol=1e-6)


def bucket_kl(rec: dict, length: int, target: np.ndarray, log_q: torch.Tensor) -> float:
    """KL(teacher‖student) of the `student` tail as k + 1 buckets (docs/LOSSES.md), summed over the positions:
    the stored entries rescaled to hold 1 − m, and the mass m off them against the student's mass there."""
    ids = torch.from_numpy(rec.topk_ids[:length][target]).long()
    lps = torch.from_numpy(rec.topk_logprobs[:length][target]).double()
    log_m = torch.from_numpy(rec.tail_logmass[:length][target]).double()
    head = torch.log_softmax(lps, -1) + torch.log1p(-log_m.exp())[:, None]
    log_q_head = log_q.gather(1, ids)
    log_q_tail = torch.log1p(-log_q_head.exp().sum(-1))
    return ((head.exp() * (head - log_q_head)).sum(-1) + log_m.exp() * (log_m - log_q_tail)).sum().item()


def test_saved_student_loads_and_evaluation_is_right(student_dir, caches, tmp_path) -> None:
    out = tmp_path / "run"
    train(student_dir, caches["top16"], out, max_steps=3, eval_cache=caches["top16"], eval_every=3)
    evals = [m for m in metrics(out) if "eval_ce" in m]
    assert [m["step"] for m in evals] == [3]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    initial = AutoModelForCausalLM.from_pretrained(student_dir)
    assert not torch.equal(model.lm_head.weight, initial.lm_head.weight)
    ce, top1, kl, n = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for rec in read_cache(caches["top16"]):
            ids = torch.from_numpy(rec.input_ids[:256])
            logits = model(ids[None]).logits[0, :-1]
            target = torch.from_numpy(rec.loss_mask[1 : len(ids)])
            lp = torch.log_softmax(logits.double(), -1)[target]
            ce -= lp.gather(1, ids[1:][target][:, None]).sum().item()
            top1 += (lp.argmax(-1) == torch.from_numpy(rec.topk_ids[: len(ids) - 1][target.numpy(), 0])).sum().item()
            kl += bucket_kl(rec, len(ids) - 1, target.numpy(), lp)
            n += int(target.sum())
    assert evals[0]["eval_ce"] == pytest.approx(ce / n, rel=1e-4)
    assert evals[0]["eval_top1"] == pytest.approx(top1 / n, abs=1e-9)
    assert evals[0]["eval_kl_cache"] == pytest.approx(kl / n, rel=1e-4)


def test_padded_student_vocabulary_and_dataloader_workers(student_dir, caches, tmp_path) -> None:
    """An LM head padded past the tokenizer (520 rows, 512 tokens) trains; worker processes change nothing."""
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    new_llama(STUDENT, 520, tokenizer, seed=1, out=tmp_path / "padded")
    base = train(tmp_path / "padded", caches["top16"], tmp_path / "w0", max_steps=3, batch_size=2)
    workers = train(tmp_path / "padded", caches["top16"], tmp_path / "w2", max_steps=3, batch_size=2, num_workers=2)
    assert [m["loss"] for m in base] == [m["loss"] for m in workers]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "w0").lm_head.weight.shape[0] == 520


def test_packing_lays_out_the_same_targets(caches) -> None:
    """Packed rows hold every sequence once, positions restart per sequence, and the selected targets (labels and
    teacher rows) are the padded layout's, in fewer rows."""
    records = list(read_cache(caches["top16"]))[:12]
    padded, packed = collate(records, 256), collate(records, 256, pack=True)
    rows, width = packed.inputs["input_ids"].shape
    assert rows < padded.inputs["input_ids"].shape[0] and width <= 256 and set(packed.inputs) == {"input_ids", "position_ids"}
    assert packed.tokens == padded.tokens == sum(min(len(r.input_ids), 256) for r in records)

    def selected(mb) -> list[tuple]:
        rows = zip(mb.labels[mb.targets].tolist(), mb.topk_ids[mb.targets].tolist(), mb.topk_logprobs[mb.targets].tolist())
        return sorted((label, tuple(ids), tuple(lps)) for label, ids, lps in rows)

    assert selected(packed) == selected(padded) and len(selected(packed)) > 0
    lengths = [min(len(r.input_ids), 256) for r in records]
    for positions, tokens, members in zip(packed.inputs["position_ids"], packed.inputs["input_ids"], pack_rows(lengths, 256)):
        used = sum(lengths[i] for i in members)
        expected = torch.cat([torch.arange(lengths[i]) for i in members] + [torch.arange(width - used)])
        assert torch.equal(positions, expected)
        # the row's tokens are its members' tokens, in first-fit-decreasing order
        assert tokens[:used].tolist() == [int(t) for i in members for t in records[i].input_ids[:lengths[i]]]


def test_packing_check_catches_a_model_that_attends_across_sequences(student_dir) -> None:
    lm = AutoModelForCausalLM.from_pretrained(student_dir)
    assert keeps_sequences_apart(lm.get_decoder(), torch.device("cpu"))

    class Leaky(torch.nn.Module):  # a running mean over the row: every position sees all earlier tokens
        def forward(self, input_ids, use_cache=False, **_):
            x = torch.nn.functional.one_hot(input_ids, 16).float() + 1
            return SimpleNamespace(last_hidden_state=x.cumsum(1) / torch.arange(1, x.shape[1] + 1)[:, None])

    assert not keeps_sequences_apart(Leaky(), torch.device("cpu"))


def test_packed_training_equals_padded(student_dir, caches, tmp_path) -> None:
    """Attention stays inside each packed sequence: losses, t and held-out numbers match the padded run."""
    kw = {"max_steps": 3, "taid_alpha": 0.2, "eval_cache": caches["top16"], "eval_every": 3}
    train(student_dir, caches["top16"], tmp_path / "padded", **kw)
    train(student_dir, caches["top16"], tmp_path / "packed", pack=True, **kw)
    padded, packed = metrics(tmp_path / "padded"), metrics(tmp_path / "packed")
    assert len(padded) == len(packed) == 4
    for a, b in zip(padded, packed):
        for key in ("loss", "t", "eval_ce", "eval_kl_cache", "eval_top1"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
        if "tokens" in a:
            assert a["tokens"] == b["tokens"]


# ---- bad input -------------------------------------------------------------------------------------------

def invoke(student: Path, cache: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["train-student", "--student", str(student), "--cache", str(cache), "--output", str(out),
                                    "--max-steps", "2", "--no-progress", *extra])


def assert_user_error(result, out: Path, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for w in words:
        assert w in lines[0], lines[0]
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("extra,words", [
    (("--loss", "kl-magic"), ("--loss", "kl-magic", "taid, fkl")),
    (("--taid-t-start", "0.9", "--taid-t-end", "0.5"), ("--taid-t-start",)),
    (("--taid-alpha", "1.5"), ("--taid-alpha",)),
    (("--tail", "zero"), ("--tail",)),
])
def test_bad_options(extra, words, student_dir, caches, tmp_path) -> None:
    assert_user_error(invoke(student_dir, caches["top16"], tmp_path / "o", *extra), tmp_path / "o", *words)


def test_cache_failing_verification(student_dir, caches, tmp_path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(caches["top16"], bad)
    shard = next(bad.glob("*.arrow"))
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert_user_error(invoke(student_dir, bad, tmp_path / "o"), tmp_path / "o", shard.name)


def test_student_with_another_tokenizer_or_too_few_rows(student_dir, caches, texts, tmp_path) -> None:
    other_tok = train_tokenizer(texts[10:20], 400, tmp_path / "tok")
    new_llama(STUDENT, len(other_tok), other_tok, out=tmp_path / "other")
    assert_user_error(invoke(tmp_path / "other", caches["top16"], tmp_path / "o"), tmp_path / "o", "tokenizer differs")
    same_tok = AutoTokenizer.from_pretrained(student_dir)
    new_llama(STUDENT, 300, same_tok, out=tmp_path / "small")
    assert_user_error(invoke(tmp_path / "small", caches["top16"], tmp_path / "o2"), tmp_path / "o2", "300 vocabulary rows")


def test_empty_cache(teacher_dir, student_dir, data_dir, tmp_path) -> None:
    write_jsonl(tmp_path / "long.jsonl", [{"input_ids": list(range(100))}])
    run_cli("dump-teacher", "--model", str(teacher_dir), "--data", str(tmp_path / "long.jsonl"), "--output", str(tmp_path / "empty"),
            "--engine", "hf", "--max-length", "50", "--overlong", "drop", "--no-progress")
    assert_user_error(invoke(student_dir, tmp_path / "empty", tmp_path / "o"), tmp_path / "o", "no sequences")


def test_resume_with_nothing_or_changed_settings(student_dir, caches, tmp_path) -> None:
    assert_user_error(invoke(student_dir, caches["top16"], tmp_path / "o", "--resume"), tmp_path / "o", "no checkpoint")
    run = tmp_path / "run"
    assert invoke(student_dir, caches["top16"], run, "--save-every", "1", "--max-steps", "3").exit_code == 0
    (run / "model.safetensors").unlink(missing_ok=True)
    result = invoke(student_dir, caches["top16"], run, "--resume", "--max-steps", "3", "--lr", "0.5")
    assert result.exit_code == 2 and "changed settings" in result.output and "lr" in result.output
    result = invoke(student_dir, caches["top16"], tmp_path / "run")
    assert result.exit_code == 2 and "not empty" in result.output


@pytest.mark.distributed
def test_evaluation_with_uneven_records_on_two_ranks(teacher_dir, student_dir, data_dir, tmp_path) -> None:
    """5 held-out records, 2 ranks, batch 2: rank 0 has two micro-batches, rank 1 one. Both must run the same
    number of forwards (else FSDP's all-gather hangs), and the numbers must equal one process's."""
    rows = [json.loads(line) for line in (data_dir / "chat.jsonl").read_text().splitlines()][:5]
    write_jsonl(tmp_path / "five.jsonl", rows)
    run_cli("dump-teacher", "--model", str(teacher_dir), "--data", str(tmp_path / "five.jsonl"), "--output", str(tmp_path / "five"),
            "--engine", "hf", "--top-k", "16", "--max-length", "256", "--no-progress")
    args = ["train-student", "--student", str(student_dir), "--cache", str(tmp_path / "five"), "--eval-cache", str(tmp_path / "five"),
            "--max-steps", "1", "--lr", "1e-9", "--max-length", "256", "--batch-size", "2", "--no-progress"]
    run_cli(*args, "--output", str(tmp_path / "one"), "--grad-accum", "2")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "taid_cache.cli",
                           *args, "--output", str(tmp_path / "two")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = ([m for m in metrics(tmp_path / d) if "eval_kl_cache" in m] for d in ("one", "two"))
    assert len(one) == len(two) == 1
    for key in ("eval_ce", "eval_kl_cache", "eval_top1"):
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-5), key


def test_a_checkpoint_of_a_release_without_an_option_resumes_at_its_default(student_dir, caches, tmp_path) -> None:
    """A run checkpointed by a release before --mix and --on-policy existed records none of their settings: it ran
    as their defaults do, so it resumes (and equals the uninterrupted run); one recorded at another value does not."""
    import json
    import shutil

    clean = train(student_dir, caches["top16"], tmp_path / "clean", save_every=2)
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "clean", old)
    for name in ("config.json", *(p.name for p in old.glob("model*.safetensors"))):
        (old / name).unlink()
    meta_file = old / "checkpoints" / "step-00000002" / "meta.json"
    meta = json.loads(meta_file.read_text())
    for name in ("mix_weights", "on_policy", "mixed_alpha", "replay_capacity", "max_new_tokens"):
        del meta["settings"][name]
    meta_file.write_text(json.dumps(meta))
    lines = (old / "metrics.jsonl").read_text().splitlines()
    (old / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line).get("step", 0) <= 2))
    resumed = train(student_dir, caches["top16"], old, save_every=2, resume=True)
    assert [(m["step"], m["loss"]) for m in resumed] == [(m["step"], m["loss"]) for m in clean]
    newest = sorted((old / "checkpoints").glob("step-*"))[-1] / "meta.json"
    meta = json.loads(newest.read_text())
    meta["settings"]["mixed_alpha"] = 0.9  # recorded, and not what this run asks
    newest.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="mixed_alpha"):
        train(student_dir, caches["top16"], old, save_every=2, resume=True)
