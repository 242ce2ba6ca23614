"""`taid-cache generate`: a student's answers to a prompt set as token rows (prompt + answer, the answer as the
loss mask), resumable, and `dump-teacher --data GEN/` on them recording the student as the cache's lineage."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from conftest import SignalInFinalizer, assert_one_line, run_cli, without_chat_template, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from taid_cache.evaluation.generation import end_tokens
from taid_cache.fingerprints import model_hash
from taid_cache.shards.contract import Lineage
from taid_cache.shards.manifest import load_manifest
from taid_cache.shards.reader import read_cache

PROMPTS = 5


@pytest.fixture(scope="module")
def prompts(data_dir, tmp_path_factory) -> Path:
    """A few chat rows: the first with an id, one a prompt without its answer (it ends with a user turn)."""
    rows = [json.loads(line) for line in (data_dir / "chat.jsonl").read_text().splitlines()[:PROMPTS]]
    rows[0]["id"] = "first"
    rows[1]["messages"] = [m for m in rows[1]["messages"] if m["role"] != "assistant"][:1]
    for row in rows[2:]:
        row["id"] = None
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


def common(student_dir: Path, prompts: Path, output: Path | str, *extra: str) -> list[str]:
    return ["generate", "--student", str(student_dir), "--data", str(prompts), "--output", str(output), "--max-new-tokens", "8",
            "--batch-size", "2", "--rows-per-part", "2", "--engine", "hf", "--no-progress", *extra]


@pytest.fixture(scope="module")
def greedy(student_dir, prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "greedy"
    run_cli(*common(student_dir, prompts, out))
    return out


def files_of(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.name.startswith(("rows-", "generation"))}


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(folder.glob("rows-*.jsonl")) for line in p.read_text().splitlines()]


def test_rows_are_the_prompt_and_the_students_own_greedy_answer(greedy, student_dir, prompts) -> None:
    record = json.loads((greedy / "generation.json").read_text())
    assert record["done"] is True and record["summary"]["rows"] == PROMPTS
    settings = record["settings"]
    assert settings["student_hash"] == model_hash(student_dir) and settings["temperature"] == 0.0
    assert (settings["max_new_tokens"], settings["top_p"], settings["seed"], settings["engine"]) == (8, 1.0, 0, "hf")
    assert settings["engine_args"] == {}
    assert sorted(p.name for p in greedy.glob("rows-*.jsonl")) == ["rows-000000000.jsonl", "rows-000000002.jsonl",
                                                                   "rows-000000004.jsonl"]
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    stop = end_tokens(model, tokenizer)
    source = [json.loads(line) for line in prompts.read_text().splitlines()]
    rows = rows_of(greedy)
    assert [r["id"] for r in rows] == ["first", "prompts-000000001", "prompts-000000002", "prompts-000000003", "prompts-000000004"]
    for row, src in zip(rows, source):
        messages = src["messages"]
        if messages[-1]["role"] == "assistant":
            messages = messages[: max(i for i, m in enumerate(messages) if m["role"] == "assistant")]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=stop,
                                 pad_token_id=stop[0])[0, len(prompt):].tolist()
        answer = out[: next((j + 1 for j, t in enumerate(out) if t in stop), len(out))]
        assert row["input_ids"] == prompt + answer
        assert row["loss_mask"] == [False] * len(prompt) + [True] * len(answer) and answer


def test_seeded_sampling_is_reproducible(student_dir, prompts, tmp_path, greedy) -> None:
    for name in ("a", "b"):
        run_cli(*common(student_dir, prompts, tmp_path / name, "--temperature", "1", "--seed", "3"))
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    assert rows_of(tmp_path / "a") != rows_of(greedy)


def test_a_nucleus_of_one_token_samples_the_greedy_answer(student_dir, prompts, tmp_path, greedy) -> None:
    """--top-p reaches the sampler: at p = 1e-9 the nucleus is the most likely token alone, so sampling at
    temperature 1 gives the greedy answers."""
    run_cli(*common(student_dir, prompts, tmp_path / "p", "--temperature", "1", "--top-p", "1e-9", "--seed", "3"))
    assert rows_of(tmp_path / "p") == rows_of(greedy)


def test_a_rerun_after_a_kill_between_parts_writes_the_same_files(student_dir, prompts, tmp_path) -> None:
    first = tmp_path / "first"
    run_cli(*common(student_dir, prompts, first, "--temperature", "1"))
    expected = files_of(first)
    # What a kill after the first part leaves: generation.json not done, the later parts absent.
    record = json.loads((first / "generation.json").read_text())
    (first / "generation.json").write_text(json.dumps({"settings": record["settings"], "done": False}))
    for name in ("rows-000000002.jsonl", "rows-000000004.jsonl"):
        (first / name).unlink()
    assert_one_line(run_cli("dump-teacher", "--model", str(student_dir), "--data", str(first), "--output", str(tmp_path / "c"),
                            "--engine", "hf", "--no-progress", check=False), "not finished")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())  # dump-teacher's write probe: gone
    run_cli(*common(student_dir, prompts, first, "--temperature", "1"))
    resumed = files_of(first)
    assert {k: v for k, v in resumed.items() if k != "generation.json"} == {k: v for k, v in expected.items() if k != "generation.json"}
    assert json.loads(resumed["generation.json"])["summary"]["resumed"] is True
    again = run_cli(*common(student_dir, prompts, first, "--temperature", "1"))
    assert "nothing to do" in again.stderr and files_of(first) == resumed


def test_a_signal_stops_generation_after_the_part_it_came_in(student_dir, prompts, greedy, tmp_path, monkeypatch) -> None:
    """A Ctrl-C that lands in a finalizer while the second part is answered (dropped there before): that part is
    written, the third is not begun, one line says how to continue, and the rerun finishes the same files."""
    from taid_cache.pipelines import generate

    calls, real = [], generate.HfAnswerer.answers

    def signalled_in_part_two(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            SignalInFinalizer()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(generate.HfAnswerer, "answers", signalled_in_part_two)
    out = tmp_path / "gen"
    result = run_cli(*common(student_dir, prompts, out), check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 130 and len(lines) == 1 and lines[0].startswith("interrupted: the written parts are kept"), result.stderr
    assert sorted(p.name for p in out.glob("rows-*")) == ["rows-000000000.jsonl", "rows-000000002.jsonl"]
    monkeypatch.setattr(generate.HfAnswerer, "answers", real)
    run_cli(*common(student_dir, prompts, out))
    assert {k: v for k, v in files_of(out).items() if k != "generation.json"} == \
        {k: v for k, v in files_of(greedy).items() if k != "generation.json"}


def test_a_moved_student_and_prompts_resume_and_other_weights_are_refused(student_dir, prompts, greedy, tmp_path) -> None:
    # What distil-on-policy needs of a run folder moved elsewhere: the student and the prompts are known by content.
    out = tmp_path / "gen"
    shutil.copytree(greedy, out)
    record = json.loads((out / "generation.json").read_text())
    (out / "generation.json").write_text(json.dumps({"settings": record["settings"], "done": False}))
    (out / "rows-000000004.jsonl").unlink()
    student, moved = shutil.copytree(student_dir, tmp_path / "moved" / "student"), tmp_path / "moved" / "prompts.jsonl"
    shutil.copy(prompts, moved)
    run_cli(*common(student, moved, out))
    assert {k: v for k, v in files_of(out).items() if k != "generation.json"} == \
        {k: v for k, v in files_of(greedy).items() if k != "generation.json"}
    other = tmp_path / "other"
    shutil.copytree(student_dir, other)
    weights = next(other.glob("model*.safetensors"))
    tensors = load_file(weights)
    save_file({k: v + 1e-3 if k.endswith("norm.weight") else v for k, v in tensors.items()}, weights, metadata={"format": "pt"})
    before = files_of(out)
    assert_one_line(run_cli(*common(other, moved, out), check=False), "other settings", "student_hash")
    assert files_of(out) == before


def test_changed_settings_are_refused_before_any_write(student_dir, prompts, greedy) -> None:
    before = files_of(greedy)
    for extra, word in ((["--temperature", "0.5"], "temperature"), (["--seed", "1"], "seed"),
                        (["--max-new-tokens", "9"], "max_new_tokens")):
        args = common(student_dir, prompts, greedy, *extra)  # the last --max-new-tokens given wins
        assert_one_line(run_cli(*args, check=False), "other settings", word)
    assert files_of(greedy) == before


def test_auto_says_which_engine_it_picked_and_why(student_dir, data_dir, tmp_path) -> None:
    """One line before anything else: vLLM only where it imports and a GPU is present (its start-up on CPU costs
    more than generating a few hundred short answers). Text rows then stop the command before any engine starts."""
    proc = run_cli(*common(student_dir, data_dir / "text.jsonl", tmp_path / "a", "--engine", "auto"), check=False)
    lines = proc.stderr.splitlines()
    if importlib.util.find_spec("vllm") is None:
        assert lines[0].startswith("engine: hf (--engine auto: vLLM is not installed")
    elif not torch.cuda.is_available():
        assert lines[0].startswith("engine: hf (--engine auto: no GPU here") and "start-up" in lines[0]
    else:
        assert lines[0].startswith("engine: vllm (--engine auto: vLLM imports and a GPU is present")
    assert proc.returncode == 2 and len(lines) == 2 and lines[1].startswith("error: ") and "needs prompts" in lines[1]


def test_prompts_need_chat_rows_and_a_chat_template(student_dir, data_dir, prompts, tmp_path) -> None:
    assert_one_line(run_cli(*common(student_dir, data_dir / "text.jsonl", tmp_path / "t"), check=False), "needs prompts", "text")
    bare = without_chat_template(student_dir, tmp_path / "bare")
    assert_one_line(run_cli(*common(bare, prompts, tmp_path / "n"), check=False), "no chat template")
    assert_one_line(run_cli(*common(student_dir, prompts, tmp_path / "v", "--engine", "hf", "--vllm-args", '{"enforce_eager": true}'),
                            check=False),
                    "--vllm-args", "the engine is hf")
    assert not any((tmp_path / name).exists() for name in ("t", "n", "v"))


def test_dump_teacher_of_a_generation_records_the_student_as_lineage(greedy, teacher_dir, student_dir, tmp_path) -> None:
    cache = tmp_path / "cache"
    run_cli("dump-teacher", "--model", str(teacher_dir), "--data", str(greedy), "--output", str(cache), "--engine", "hf",
            "--top-k", "4", "--no-progress")
    settings = load_manifest(cache).settings
    assert settings.lineage == Lineage("student", str(student_dir), model_hash(student_dir))
    assert settings.input_kind == "tokens"
    records = list(read_cache(cache))
    assert [(r.sample_id, r.input_ids.tolist(), r.loss_mask.tolist()) for r in records] == \
        [(r["id"], r["input_ids"], r["loss_mask"]) for r in rows_of(greedy)]
    # Its parts named one by one carry the student too; plain data keeps the dataset's lineage.
    parts = [a for p in sorted(greedy.glob("rows-*.jsonl")) for a in ("--data", str(p))]
    run_cli("dump-teacher", "--model", str(teacher_dir), *parts, "--output", str(tmp_path / "parts"), "--engine", "hf",
            "--top-k", "4", "--no-progress")
    assert load_manifest(tmp_path / "parts").settings.lineage.kind == "student"


def test_generate_writes_to_object_storage(student_dir, prompts, greedy, s3_bucket) -> None:
    import fsspec

    url = f"{s3_bucket}/gen"
    run_cli(*common(student_dir, prompts, url))
    fs = fsspec.filesystem("s3")
    remote = {p.rsplit("/", 1)[-1]: fs.cat_file(p).decode() for p in fs.ls(url.removeprefix("s3://"), detail=False)}
    local = files_of(greedy)
    assert {k: v for k, v in remote.items() if k.startswith("rows-")} == {k: v for k, v in local.items() if k.startswith("rows-")}
    assert json.loads(remote["generation.json"])["done"] is True


def test_vllm_args_may_not_set_what_generate_sets(student_dir, prompts, tmp_path) -> None:
    """generate runs the student on one vLLM rank: --vllm-args setting the parallel sizes (or the model, dtype,
    seed, ...) is refused in one line before vLLM starts or anything is written."""
    pytest.importorskip("vllm")
    for i, args in enumerate(('{"tensor_parallel_size": 2}', '{"pipeline_parallel_size": 2}', '{"seed": 3}')):
        key = next(iter(json.loads(args)))
        assert_one_line(run_cli(*common(student_dir, prompts, tmp_path / f"v{i}", "--engine", "vllm", "--vllm-args", args),
                                check=False), "--vllm-args", "taid-cache sets", key)
        assert not (tmp_path / f"v{i}").exists()
