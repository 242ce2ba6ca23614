"""dump-teacher with the transformers engine: stored rows against an independent forward pass, masks of
each row kind, top-p, and the cache tools (inspect, verify)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import assert_top_k_of, run_cli
from taid_cache.engines import EngineConfig
from taid_cache.engines.hf_engine import HfEngine
from taid_cache.shards import read_cache
from taid_cache.shards.codec import LOGPROB_STEP

K = 16


@pytest.fixture(scope="session")
def chat_cache(teacher_dir, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("caches") / "chat-hf"
    run_cli("dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--output", str(out),
            "--engine", "hf", "--top-k", str(K), "--batch-tokens", "1500", "--no-progress")
    return out


def reference_logprobs(teacher_dir: Path, input_ids: np.ndarray, model=None) -> np.ndarray:
    """log_softmax of a plain full-vocabulary forward pass of one sequence alone, in float64: [T, V]."""
    model = model or AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(input_ids)[None]).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def test_stored_rows_equal_an_independent_forward_pass(chat_cache, teacher_dir) -> None:
    """Every row, though the engine packed the batches' sequences several to a row."""
    assert HfEngine(EngineConfig(str(teacher_dir), K, 256, "float32")).pack
    records = list(read_cache(chat_cache))
    assert len(records) == 24
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    for rec in records:
        ref = reference_logprobs(teacher_dir, rec["input_ids"], model)[:-1]  # row j: distribution of token j+1
        assert rec["topk_ids"].shape == (len(rec["input_ids"]) - 1, K)
        assert_top_k_of(rec["topk_ids"], rec["topk_logprobs"], ref, LOGPROB_STEP / 2)
        assert (np.diff(rec["topk_logprobs"], axis=1) <= 0).all()


def test_chat_mask_covers_assistant_turns_only(chat_cache, data_dir, teacher_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    convs = [json.loads(line)["messages"] for line in (data_dir / "chat.jsonl").read_text().splitlines()]
    for rec, conv in zip(read_cache(chat_cache), convs):
        ids, mask = rec["input_ids"], rec["loss_mask"]
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(conv, tokenize=False)
        answer, prompt = conv[1]["content"], conv[0]["content"]
        masked = tokenizer.decode(ids[mask])
        unmasked = tokenizer.decode(ids[~mask])
        # The masked run is the answer and its end marker (a token straddling the turn header may be left out).
        assert masked.endswith("<|end|>\n") and (answer + "<|end|>\n").endswith(masked)
        assert len(masked) >= len(answer) - 16
        assert prompt in unmasked and "<|assistant|>" in unmasked and "<|user|>" in unmasked
        runs = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(int), [0]))) == 1)
        assert len(runs) == 1  # one assistant turn, one contiguous run


def test_text_and_token_rows(teacher_dir, data_dir, tmp_path) -> None:
    run_cli("dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "text.jsonl"), "--output", str(tmp_path / "t"),
            "--engine", "hf", "--top-k", "4", "--max-length", "64", "--no-progress")
    text_rows = [json.loads(line) for line in (data_dir / "text.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    got = list(read_cache(tmp_path / "t"))
    assert [r["sample_id"] for r in got] == [row["id"] for row in text_rows]
    for rec, row in zip(got, text_rows):
        expected = tokenizer(row["text"])["input_ids"][:64]
        assert rec["input_ids"].tolist() == expected and rec["loss_mask"].all()
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["truncated"] == sum(len(tokenizer(r["text"])["input_ids"]) > 64 for r in text_rows) > 0

    run_cli("dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "tokens.jsonl"), "--output", str(tmp_path / "k"),
            "--engine", "hf", "--top-k", "4", "--max-length", "45", "--overlong", "drop", "--no-progress")
    token_rows = [json.loads(line) for line in (data_dir / "tokens.jsonl").read_text().splitlines()]
    kept = [r for r in token_rows if len(r["input_ids"]) <= 45]
    got = list(read_cache(tmp_path / "k"))
    assert [r["input_ids"].tolist() for r in got] == [r["input_ids"] for r in kept]
    assert [r["loss_mask"].tolist() for r in got] == [r["loss_mask"] for r in kept]
    assert json.loads((tmp_path / "k" / "manifest.json").read_text())["dropped"] == len(token_rows) - len(kept) > 0


def test_top_p_keeps_the_fewest_entries_reaching_p(teacher_dir, data_dir, tmp_path) -> None:
    p = 0.8
    run_cli("dump-teacher", "--model", str(teacher_dir), "--data", str(data_dir / "chat.jsonl"), "--output", str(tmp_path / "p"),
            "--engine", "hf", "--top-k", str(K), "--top-p", str(p), "--precision", "fp32", "--no-progress")
    counts_seen = set()
    for rec in list(read_cache(tmp_path / "p"))[:4]:
        ref = reference_logprobs(teacher_dir, rec["input_ids"])[:-1]
        sorted_p = np.exp(-np.sort(-ref, axis=1)[:, :K])
        expected = np.minimum((np.cumsum(sorted_p, axis=1) < p).sum(axis=1) + 1, K)
        kept = (rec["topk_ids"] >= 0).sum(axis=1)
        np.testing.assert_array_equal(kept, expected)
        counts_seen.update(kept.tolist())
        for row_ids, row_lp, n in zip(rec["topk_ids"], rec["topk_logprobs"], kept):
            assert (row_ids[n:] == -1).all() and np.isneginf(row_lp[n:]).all()
    assert len(counts_seen) > 3  # the rule really varies per position


def test_inspect_reports_sizes_and_captured_mass(chat_cache, tmp_path) -> None:
    proc = run_cli("inspect", str(chat_cache), "--json", "--plot", str(tmp_path / "mass.png"))
    stats = json.loads(proc.stdout)
    records = list(read_cache(chat_cache))
    captured = np.concatenate([np.exp(r["topk_logprobs"].astype(np.float64)).sum(1) for r in records])
    assert stats["sequences"] == len(records)
    assert stats["tokens"] == sum(len(r["input_ids"]) for r in records)
    assert stats["positions"] == captured.size and stats["stored_entries"] == captured.size * K
    assert stats["bytes_on_disk"] == sum(f.stat().st_size for f in chat_cache.glob("*.arrow"))
    assert stats["captured_mass_mean"] == pytest.approx(captured.mean(), rel=1e-9)
    assert stats["captured_mass_p50"] == pytest.approx(np.median(captured), rel=1e-9)
    assert (tmp_path / "mass.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shards_are_plain_arrow_with_documented_schema(chat_cache) -> None:
    shard = next(chat_cache.glob("*.arrow"))
    with pa.memory_map(str(shard)) as source:
        table = pa.ipc.open_file(source).read_all()
    assert table.schema.field("topk_ids").type == pa.list_(pa.uint16())  # 512-token vocabulary
    assert table.schema.field("topk_logprobs").type == pa.list_(pa.uint16())
    assert table.schema.metadata[b"taid_cache.top_k"] == str(K).encode()


def test_verify_catches_a_flipped_byte(chat_cache, tmp_path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(chat_cache, copy)
    assert run_cli("verify", str(copy)).returncode == 0
    shard = sorted(copy.glob("*.arrow"))[-1]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    proc = run_cli("verify", str(copy), check=False)
    assert proc.returncode != 0
    assert shard.name in proc.stderr and "Traceback" not in proc.stderr
