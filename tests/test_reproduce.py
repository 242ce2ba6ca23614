"""`make reproduce QUICK=1` end to end, its restartability, and the config mechanism on tiny local models."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT
from taid_cache.reproduce.config import method_seeds, quick
from taid_cache.reproduce.corpus import chat_pairs, split_of, stdlib_files
from taid_cache.reproduce.models import LlamaSize, new_llama
from taid_cache.reproduce.pretrain import PretrainConfig, pack_blocks, pretrain
from taid_cache.shards.manifest import load_manifest
from taid_cache.training.metrics import read_metrics

QUICK = quick()
QUICK_METHODS = QUICK.methods
FILES = ["results.json", "results.md", "loss_curves.png", "heldout_kl.png", "taid_t.png", "heldout_metrics.png", "costs.png",
         "cache-mass.png"]
GENERATION = ["rouge_l", "exact_match", "teacher_nll", "answer_tokens", "answers_ended", "blank_answers"]


def reproduce_config(config: dict, tmp_path: Path, timeout: int) -> Path:
    """`python -m taid_cache.reproduce --config` on `config` (written as YAML); its OUT, the run having succeeded."""
    path, out = tmp_path / f"{config['name']}.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "taid_cache.reproduce", "--config", str(path), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def random_student(teacher_dir: Path, **over) -> dict:
    """A config of a given teacher, a random student of student_size with its tokenizer, and the standard-library
    chat pairs cut to train_pairs / heldout_pairs (what configs/smollm2-135m.yaml does with the real teacher)."""
    return {"teacher": str(teacher_dir), "student_size": {"hidden": 64, "layers": 1, "heads": 1, "intermediate": 96, "tie_embeddings": True},
            "train_pairs": 12, "heldout_pairs": 4, "max_length": 128, "max_prompt": 96, "max_response": 64, "engine": "hf",
            "top_k": 8, "seeds": [0], **over}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reproduce") / "quick"
    # -o: never remakes .venv/ (the other xdist worker imports from it), whatever make thinks of the stamp's age
    proc = subprocess.run(["make", "-o", ".venv/.setup-stamp", "reproduce", "QUICK=1", f"OUT={out}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_quick_reproduce_writes_every_result(quick_run) -> None:
    out = quick_run
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    for png in [f for f in FILES if f.endswith(".png")]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "results.json").read_text())
    # Each seeded method once per seed, the diagnostic rows once, in method order.
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [(m, s) for m in QUICK_METHODS for s in method_seeds(QUICK, m)]
    assert [m["method"] for m in results["methods"]] == QUICK_METHODS
    for run in results["runs"]:
        assert run["ce"] > 0 and run["kl"] >= 0 and 0 <= run["top1"] <= 1 and run["wall_s"] > 0
        assert 0 <= run["rouge_l"] <= 100 and 0 <= run["exact_match"] <= 100 and run["teacher_nll"] > 0
        assert 0 < run["answer_tokens"] <= QUICK.max_new_tokens and 0 <= run["answers_ended"] <= 1
    assert results["teacher"]["ce"] < min(r["ce"] for r in results["runs"])  # the teacher is the stronger model
    assert all(key in results["teacher"] for key in GENERATION)
    # The mean and standard deviation are those of the seeds' own numbers.
    for method in results["methods"]:
        values = [r["rouge_l"] for r in results["runs"] if r["method"] == method["method"]]
        assert method["seeds"] == [r["seed"] for r in results["runs"] if r["method"] == method["method"]]
        assert method["mean"]["rouge_l"] == pytest.approx(statistics.mean(values))
        assert method["std"]["rouge_l"] == pytest.approx(statistics.stdev(values) if len(values) > 1 else 0.0)
    # Seeds differ in their student's initialisation, not only in the data order.
    inits = [AutoModelForCausalLM.from_pretrained(out / f"student-init-seed{s}").model.embed_tokens.weight for s in QUICK.seeds]
    assert not torch.equal(inits[0], inits[1])
    assert results["machine"] and results["commit"] and results["settings"]["methods"] == QUICK_METHODS
    assert json.loads((out / "teacher" / "pretrain.json").read_text())["steps"] == results["settings"]["pretrain_steps"]
    table = (out / "results.md").read_text()
    assert all(f"| {m} |" in table for m in QUICK_METHODS) and "ROUGE-L" in table and "two standard errors" in table
    assert results["sampled_cache"]["tail_samples"] == QUICK.tail_samples and "Sampled cache" in table
    # taid and ctkd read the default (sampled) cache; taid-top-k and rkl (which needs every token's log-prob) the
    # top-k one.
    for method, cache in (("taid", "cache-train-sampled"), ("ctkd", "cache-train-sampled"), ("taid-top-k", "cache-train"), ("rkl", "cache-train")):
        meta = json.loads(sorted((out / "runs" / method / "seed-0" / "checkpoints").glob("step-*/meta.json"))[-1].read_text())
        assert meta["settings"]["cache_identity"] == load_manifest(str(out / cache)).identity
    distilled = {m["method"]: m["mean"]["kl"] for m in results["methods"]}
    assert min(distilled["fkl"], distilled["taid"]) < distilled["sft"]  # distillation moves the student toward the teacher
    # The report links every plot it wrote, and says when the teacher's answers are all blank.
    assert all(f"]({name})" in table and (out / name).exists() for name in FILES if name.endswith(".png"))
    assert ("answers every held-out prompt with a blank" in table) == (results["teacher"]["blank_answers"] >= 1)
    # taid_t.png's floor: the linear schedule from t_start to 1, one update behind the step that trains with it.
    taid = [m for m in read_metrics(out / "runs" / "taid" / "seed-0") if "loss" in m]
    total, start = len(taid), QUICK.taid_t_start
    floor = [start if k < 2 else start + (1 - start) * min(k / total, 1.0) for k in range(total)]  # k updates before step k+1
    assert all(m["t"] >= f - 1e-12 for m, f in zip(taid, floor)) and taid[0]["t"] == start


@pytest.mark.slow
def test_the_quick_students_generation_stops_at_the_turn_end(quick_run) -> None:
    """The trained student's own files (tokenizer, generation config) make `generate` stop at the end of the
    assistant turn: with the turn end made its first choice, the answer is that one token."""
    folder = quick_run / "runs" / "fkl" / "seed-0"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    student = AutoModelForCausalLM.from_pretrained(folder).eval()
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert tokenizer.eos_token_id == end and student.generation_config.eos_token_id in (end, [end])
    messages = [json.loads(line)["messages"] for line in (quick_run / "data" / "chat-heldout.jsonl").read_text().splitlines()[:1]][0]
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    width = prompt["input_ids"].shape[1]
    ended = student.generate(**prompt, max_new_tokens=8, do_sample=False, sequence_bias={(end,): 100.0})
    assert ended[0, width:].tolist() == [end]  # one token, not eight: generation stopped at the turn end


@pytest.mark.slow
def test_rerun_reuses_finished_stages(quick_run) -> None:
    out = quick_run
    teacher = (out / "teacher" / "model.safetensors").stat().st_mtime
    kept = (out / "runs" / "fkl" / "seed-0" / "model.safetensors").stat().st_mtime
    # An interruption that lost one student and the evaluation: only those are redone.
    (out / "runs" / "taid" / "seed-1" / "model.safetensors").unlink()
    (out / "eval.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "taid_cache.reproduce", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Reuse is shown by what was not redone (unchanged files, one student trained), not by how long it took.
    assert (out / "teacher" / "model.safetensors").stat().st_mtime == teacher
    assert (out / "runs" / "fkl" / "seed-0" / "model.safetensors").stat().st_mtime == kept
    assert (out / "runs" / "taid" / "seed-1" / "model.safetensors").exists()
    assert "trained" in proc.stderr and proc.stderr.count("student saved") == 1


@pytest.mark.slow
def test_config_with_tiny_local_models(teacher_dir, data_dir, tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    new_llama(LlamaSize(hidden=64, layers=1, heads=1, intermediate=128), len(tokenizer), tokenizer, seed=3, out=tmp_path / "student")
    chat = str(data_dir / "chat.jsonl")
    reproduce_config({"name": "tiny", "teacher": str(teacher_dir), "student": str(tmp_path / "student"), "train_data": [chat],
                      "heldout_data": [chat], "heldout_rows": 5, "max_length": 256, "max_prompt": 200, "max_response": 200,
                      "engine": "hf", "top_k": 8, "methods": ["sft", "taid", "taid-tail-renorm"], "seeds": [0], "max_steps": 3,
                      "batch_size": 4}, tmp_path, timeout=600)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["sft", "taid", "taid-tail-renorm"]
    heldout = (tmp_path / "out" / "data" / "chat-heldout.jsonl").read_text().splitlines()
    assert len(heldout) == 5
    train = (tmp_path / "out" / "data" / "chat-train.jsonl").read_text().splitlines()
    kept = [json.loads(line)["messages"] for line in train]
    assert all(len(tokenizer.apply_chat_template(m, tokenize=False)) > 0 for m in kept) and 0 < len(kept) <= 24
    for m in kept:  # the length filter held
        assert len(tokenizer(tokenizer.apply_chat_template(m, tokenize=False), add_special_tokens=False)["input_ids"]) <= 256


@pytest.mark.slow
def test_config_with_a_random_student_and_the_builtin_chat_pairs(teacher_dir, tmp_path) -> None:
    out = reproduce_config(random_student(teacher_dir, name="random-student", methods=["fkl"], max_steps=2, batch_size=4),
                           tmp_path, timeout=900)
    student = AutoModelForCausalLM.from_pretrained(out / "student-init-seed0")
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    assert (student.config.hidden_size, student.config.num_hidden_layers, student.config.vocab_size) == (64, 1, len(teacher_tokenizer))
    assert AutoTokenizer.from_pretrained(out / "student-init-seed0").get_vocab() == teacher_tokenizer.get_vocab()
    rows = {split: [json.loads(line)["messages"] for line in (out / "data" / f"chat-{split}.jsonl").read_text().splitlines()]
            for split in ("train", "heldout")}
    assert (len(rows["train"]), len(rows["heldout"])) == (12, 4)
    # The pairs are the standard library's documented functions, held-out ones from held-out files.
    heldout_bodies = {c[1]["content"] for p in stdlib_files() if split_of(p) == "heldout" for c in chat_pairs(p.read_text(errors="ignore"))}
    assert all(m[1]["content"] in heldout_bodies for m in rows["heldout"])
    assert not any(m[1]["content"] in heldout_bodies for m in rows["train"])
    assert json.loads((out / "results.json").read_text())["runs"][0]["steps"] == 2


@pytest.mark.slow
def test_round_cached_methods_run_as_rows_and_share_their_first_round(teacher_dir, tmp_path) -> None:
    # gkd, distillm and opd through distil-on-policy's rounds: gkd and distillm start from the same student with
    # the same greedy generation and dump settings, so their first round is made once; opd samples (another round).
    out = reproduce_config(random_student(teacher_dir, name="rounds", max_response=24, methods=["fkl", "gkd", "distillm", "opd"],
                                          max_steps=4, rounds=2, round_prompts=5, batch_size=2, generation_prompts=2,
                                          max_new_tokens=4), tmp_path, timeout=900)
    results = {r["method"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert list(results) == ["fkl", "gkd", "distillm", "opd"] and all(r["steps"] == 4 for r in results.values())
    used = {m: json.loads((out / "runs" / m / "seed-0" / "round-caches.json").read_text()) for m in ("gkd", "distillm", "opd")}
    assert used["gkd"][0] == used["distillm"][0] and used["gkd"][1] != used["distillm"][1]
    assert not set(used["opd"]) & set(used["gkd"] + used["distillm"])
    assert len(list((out / "rounds").iterdir())) == 5
    prompts = (out / "data" / "round-prompts.jsonl").read_text().splitlines()
    assert prompts == (out / "data" / "chat-train.jsonl").read_text().splitlines()[:5]
    for cache in used["opd"]:  # every round answers the round prompts
        assert load_manifest(cache).records == 5
    # The teacher's tokens: the train cache's for a cached run; gkd mixes it with its rounds; opd trains on its own.
    train_tokens = load_manifest(out / "cache-train").tokens
    assert results["fkl"]["teacher_tokens"] == train_tokens
    assert results["gkd"]["teacher_tokens"] == train_tokens + sum(load_manifest(c).tokens for c in used["gkd"])
    assert results["opd"]["teacher_tokens"] == sum(load_manifest(c).tokens for c in used["opd"])
    assert results["fkl"]["rounds_s"] == 0 and all(results[m]["rounds_s"] > 0 for m in used)
    assert "| opd | 1 |" in (out / "results.md").read_text()


def test_pretraining_runs_its_step_budget_and_repeats_exactly() -> None:
    # The teacher depends on settings only, not on how fast the machine is.
    blocks = pack_blocks([[(7 * i) % 97 for i in range(600)], [(3 * i) % 89 for i in range(300)]], 32)
    cfg = PretrainConfig(block=32, batch_size=4, steps=6, lr=1e-2)
    runs = [pretrain(new_llama(LlamaSize(hidden=64, layers=1, heads=1, intermediate=128), 128, seed=5), blocks, cfg) for _ in range(2)]
    assert len(runs[0]) == 6 and runs[0] == runs[1]
    assert runs[0][-1] < runs[0][0]


@pytest.mark.parametrize("text,named", [("teacher: x\nstudnet: y\n", "studnet"), ("pretrain_steps: 0\n", "pretrain_steps"),
                                        ("teacher: x\nstudent_size: {hiden: 64}\n", "hiden"), ("student: y\n", "needs a teacher"),
                                        ("teacher: package:no_such_package_here/m.gguf\n", "no installed package"),
                                        ("cache: top_k\n", "cache must be one of"),
                                        ("methods: [gkd]\nmax_steps: 3\n", "need max_steps of at least rounds")])
def test_bad_config_is_one_line(commands, tmp_path, text: str, named: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    proc = commands.run("taid_cache.reproduce", "--config", str(config), "--out", str(tmp_path / "o"), cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and named in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "settings.json").exists()  # so the corrected config is not refused as "other settings"


def test_streamed_evaluation_equals_a_direct_computation(teacher_dir, student_dir, caches) -> None:
    """against_teacher (one sequence at a time, teacher once) against KL / CE / top-1 computed here with torch's
    own kl_div over the whole held-out set at once."""
    import torch.nn.functional as F

    from taid_cache.evaluation.against_teacher import against_teacher
    from taid_cache.shards import read_cache

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    got = against_teacher(teacher, {"s": student}, ((r.input_ids, r.loss_mask) for r in read_cache(caches["top16"])), 256)
    t_all, s_all, labels = [], [], []
    with torch.no_grad():
        for r in read_cache(caches["top16"]):
            ids = torch.from_numpy(r.input_ids[:256])
            mask = torch.from_numpy(r.loss_mask[1 : len(ids)])
            t_all.append(F.log_softmax(teacher(ids[None]).logits[0, :-1], -1)[mask])
            s_all.append(F.log_softmax(student(ids[None]).logits[0, :-1], -1)[mask])
            labels.append(ids[1:][mask])
    t, s, y = torch.cat(t_all), torch.cat(s_all), torch.cat(labels)
    assert got["s"]["kl"] == pytest.approx(F.kl_div(s, t, log_target=True, reduction="batchmean").item(), rel=1e-4)
    assert got["s"]["ce"] == pytest.approx(F.nll_loss(s, y).item(), rel=1e-4)
    assert got["teacher"]["ce"] == pytest.approx(F.nll_loss(t, y).item(), rel=1e-4)
    assert got["s"]["top1"] == pytest.approx((s.argmax(-1) == t.argmax(-1)).float().mean().item(), abs=1e-9)
