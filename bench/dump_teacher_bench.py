"""Stage-one benchmark (prints a table and saves bench/results/dump_teacher.{json,md}).

(a) Throughput: on a randomly initialised teacher of >= 50M parameters, tokens/s of the dump hot loop
    (engine + top-k + writer thread, the pipeline's own `drive`) divided by the same engine's bare forward
    tokens/s on the same batches. Target >= 0.90 for each engine.
(b) Size and error: a teacher trained here on standard-library source (peaked, realistic distributions);
    bytes per stored entry and the largest log-prob error of the compact format at k = 64, against a plain
    zstd'd int32-id / float16-log-prob layout. Target <= (log2 V + 3) / 8 bytes per entry, error <= 0.01 nats.
(c) The same with --top-p 0.99.

Usage: python bench/dump_teacher_bench.py [--quick] [--work runs/bench]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import zstandard

from taid_cache.engines import EngineConfig, make_engine
from taid_cache.inputs import Sequence
from taid_cache.config import DumpConfig
from taid_cache.pipelines.dump_teacher import drive, dump_teacher
from taid_cache.reproduce.corpus import chat_pairs, split_of, stdlib_files
from taid_cache.reproduce.models import LlamaSize, new_llama
from taid_cache.provenance import commit, machine
from taid_cache.reproduce.pretrain import PretrainConfig, pack_blocks, pretrain
from taid_cache.reproduce.tokenizer import train_tokenizer
from taid_cache.shards import read_cache
from taid_cache.shards.writer import BackgroundWriter, ShardWriter

from publish import ROOT, publish

VOCAB = 8192
BIG = LlamaSize(hidden=640, layers=10, heads=10, intermediate=1728, max_positions=1024)  # ~60M parameters
TRAINED = LlamaSize(hidden=256, layers=4, heads=4, intermediate=768, max_positions=1024)


def build_tokenizer(work: Path, files: list[Path]):
    from transformers import AutoTokenizer

    folder = work / "tokenizer"
    if not (folder / "tokenizer.json").exists():
        train_tokenizer((p.read_text(errors="ignore") for p in files), VOCAB, folder)
    return AutoTokenizer.from_pretrained(folder)


def forward_only(engine, sequences: list[Sequence], all_logits: bool) -> None:
    """The references without any top-k: the engine's own forward with logits at every position, or prefill
    alone (logits at the last position only)."""
    if hasattr(engine, "llm"):  # vLLM: its bare generate; the smallest all-position request is prompt_logprobs=0
        from vllm import SamplingParams

        extra = {"prompt_logprobs": 0, "flat_logprobs": True} if all_logits else {}
        engine.llm.generate(engine.prompts(sequences), SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, **extra),
                            use_tqdm=False)
        return
    _, inputs = engine.layout(sequences)
    with torch.inference_mode():
        engine.model(**inputs, logits_to_keep=0 if all_logits else 1).logits.sum().item()


def rate(n_tokens: int, run: Callable[[], object]) -> float:
    t = time.perf_counter()
    run()
    return n_tokens / (time.perf_counter() - t)


def speed(work: Path, tokenizer, texts: list[str], engines: list[str], tokens: int, reps: int = 3) -> list[dict]:
    """(a) on the random-initialised BIG teacher."""
    folder = work / "big-teacher"
    if not (folder / "config.json").exists():
        new_llama(BIG, VOCAB, tokenizer, seed=0, out=folder)
    return engine_speed(work, folder, VOCAB, batches_of(tokenizer, texts, tokens), engines, reps)


def batches_of(tokenizer, texts: list[str], tokens: int) -> list[list[Sequence]]:
    """512-token sequences cut from the texts, 32 to a call (16,384 tokens, the CLI's default)."""
    ids = np.concatenate([np.asarray(tokenizer(t)["input_ids"]) for t in texts])
    seqs = [Sequence(f"s{i}", ids[i * 512 : (i + 1) * 512], np.ones(512, bool)) for i in range(tokens // 512)]
    return [seqs[i : i + 32] for i in range(0, len(seqs), 32)]


def engine_speed(work: Path, folder: Path, vocab: int, batches: list[list[Sequence]], engines: list[str], reps: int) -> list[dict]:
    """The dump hot loop against plain forwards on identical batches, interleaved `reps` times (medians).

    Two references: the forward with logits at every position (what a teacher dump needs at the least, and what
    a transformers user runs) and prefill alone (vLLM's bare `generate`, logits at the last position only).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).parameters())
    n_tokens = sum(len(s.input_ids) for b in batches for s in b)
    rows = []
    for name in engines:
        engine = make_engine(name, EngineConfig(str(folder), 64, 600, "float32", 1))
        forward_only(engine, batches[0], all_logits=True)  # warm-up
        runs: dict[str, list[float]] = {"prefill": [], "all_logits": [], "topk": [], "dump": []}

        def dump() -> None:
            out = Path(tempfile.mkdtemp(dir=work))
            writer = ShardWriter(out, "shard", 0, vocab, 64, None, "compact", 256 << 20, 3, lambda entry: None)
            drive(engine, ((b, {"next_row": 0}) for b in batches), BackgroundWriter(writer, lambda r: None), {})
            shutil.rmtree(out)

        for _ in range(reps):
            runs["prefill"].append(rate(n_tokens, lambda: [forward_only(engine, b, all_logits=False) for b in batches]))
            runs["all_logits"].append(rate(n_tokens, lambda: [forward_only(engine, b, all_logits=True) for b in batches]))
            # The engine's top-k path alone, results discarded: what the writer adds is the rest.
            runs["topk"].append(rate(n_tokens, lambda: [engine.submit(b, {}) for b in batches]))
            runs["dump"].append(rate(n_tokens, dump))
        med = {key: float(np.median(v)) for key, v in runs.items()}
        rows.append({"engine": name, "params": params, "tokens": n_tokens, "reps": reps, "prefill_tok_s": med["prefill"],
                     "all_logits_tok_s": med["all_logits"], "topk_only_tok_s": med["topk"], "dump_tok_s": med["dump"],
                     "ratio": med["dump"] / med["all_logits"], "ratio_vs_prefill": med["dump"] / med["prefill"], "runs": runs})
        engine.close()
    return rows


def packing_gain(work: Path, chat_cache: Path, tokens: int, reps: int = 2) -> dict:
    """The transformers engine on uneven chat rows (the sequences of a chat cache): its top-k path with the
    batch's sequences packed into rows no wider than the longest, against one right-padded row each."""
    engine = make_engine("hf", EngineConfig(str(work / "big-teacher"), 64, 600, "float32", 1))
    seqs, total = [], 0
    for rec in read_cache(chat_cache):
        if total >= tokens:
            break
        seqs.append(Sequence(rec["sample_id"], rec["input_ids"], rec["loss_mask"]))
        total += len(rec["input_ids"])
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
            runs[pack].append(rate(total, lambda: [engine.top_k(b) for b in batches]))
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
        ids.append(rec["topk_ids"].astype(np.int32))
        lps.append(rec["topk_logprobs"].astype(np.float16))
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
            dump_teacher(DumpConfig(model=str(teacher), data=[str(chat_file)], output=out, engine="hf", top_k=64,
                                    max_length=512, progress=False, **extra))
        results[name] = out
    exact = {r["sample_id"]: r for r in read_cache(results["fp32"])}
    rows = []
    for name, out in results.items():
        manifest = json.loads((out / "manifest.json").read_text())
        err, captured = 0.0, []
        for rec in read_cache(out):
            captured.append(-np.expm1(rec["tail_logmass"].astype(np.float64)))
            ref = exact[rec["sample_id"]]
            kept = rec["topk_ids"] >= 0
            assert (rec["topk_ids"][kept] == ref["topk_ids"][kept]).all()
            err = max(err, float(np.abs(rec["topk_logprobs"][kept] - ref["topk_logprobs"][kept]).max()))
        positions = manifest["tokens"] - manifest["records"]
        rows.append({"layout": f"taid-cache {name}", "bytes_per_entry": manifest["bytes"] / manifest["entries"],
                     "bytes_per_token": manifest["bytes"] / manifest["tokens"], "entries_per_position": manifest["entries"] / positions,
                     "max_abs_error_nats": err, "entries": manifest["entries"], "tokens": manifest["tokens"],
                     "captured_mass_mean": float(np.concatenate(captured).mean())})
    base, entries = plain_zstd_bytes(results["fp32"])
    manifest = json.loads((results["fp32"] / "manifest.json").read_text())
    rows.append({"layout": "plain zstd int32 ids + float16 log-probs", "bytes_per_entry": base / entries,
                 "bytes_per_token": base / manifest["tokens"], "entries_per_position": 64.0, "max_abs_error_nats": None,
                 "entries": entries, "tokens": manifest["tokens"], "captured_mass_mean": rows[0]["captured_mass_mean"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    files = stdlib_files()
    train_files = [p for p in files if split_of(p) == "train"]
    tokenizer = build_tokenizer(args.work, train_files[: 60 if args.quick else 300])
    texts = [p.read_text(errors="ignore") for p in train_files]
    engines = ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    speed_rows = speed(args.work, tokenizer, texts[:80], engines, 16384 if args.quick else 32768)
    teacher, final_loss = train_teacher(args.work, tokenizer, texts, 22 if args.quick else 220)
    chat_file = args.work / "chat.jsonl"
    convs = [c for t in texts for c in chat_pairs(t)][: 100 if args.quick else 600]
    chat_file.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    size_rows = size_and_error(args.work, teacher, chat_file)
    packing = packing_gain(args.work, args.work / "caches" / "fp32", 8192 if args.quick else 24576)

    target = (math.log2(VOCAB) + 3) / 8
    lines = [f"machine: {machine()}; commit {commit()}; vocabulary V = {VOCAB}", "",
             "(a) dump throughput / bare forward throughput (same engine, same batches, medians of "
             f"{speed_rows[0]['reps']} interleaved runs; target >= 0.90)", "",
             "| engine | teacher params | tokens | forward, all-position logits tok/s | prefill, last-position logits tok/s | "
             "engine top-k only tok/s | full dump tok/s | dump / all-position forward | dump / prefill |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['engine']} | {r['params'] / 1e6:.1f}M | {r['tokens']} | {r['all_logits_tok_s']:.0f} | {r['prefill_tok_s']:.0f} | "
              f"{r['topk_only_tok_s']:.0f} | {r['dump_tok_s']:.0f} | {r['ratio']:.3f} | {r['ratio_vs_prefill']:.3f} |" for r in speed_rows]
    lines += ["", f"hf engine on uneven chat rows ({packing['sequences']} sequences, {packing['tokens']} tokens, same teacher): "
                  f"packed {packing['packed_tok_s']:.0f} tok/s, padded {packing['padded_tok_s']:.0f} tok/s ({packing['speedup']:.2f}x)"]
    lines += ["", f"(b, c) k = 64 on a teacher trained here (final train loss {final_loss:.2f} nats); "
                  f"target <= {target:.2f} bytes per entry, error <= 0.01 nats", "",
              "| layout | bytes / entry | bytes / token | entries / position | captured mass | max log-prob error (nats) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['bytes_per_entry']:.3f} | {r['bytes_per_token']:.1f} | {r['entries_per_position']:.1f} | {r['captured_mass_mean']:.3f} | "
              f"{'-' if r['max_abs_error_nats'] is None else format(r['max_abs_error_nats'], '.4f')} |" for r in size_rows]
    suffix = "-quick" if args.quick else ""
    publish(f"dump_teacher{suffix}", "\n".join(lines), {"vocab_size": VOCAB, "target_bytes_per_entry": target, "speed": speed_rows,
                                                        "hf_packing": packing, "size": size_rows, "teacher_final_loss": final_loss})


if __name__ == "__main__":
    main()
