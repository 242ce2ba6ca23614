"""Can vLLM feed a sampled tail? Its only way to hand out the whole next-token distribution at prompt positions is
`prompt_logprobs` = the vocabulary size, which moves [positions, V] log-probs through Python. This measures that
path against the top-64 the cache normally asks for, on the same sequences (prints a table, saves
bench/results/vllm_full_vocab.{json,md}).

Usage: python bench/vllm_full_vocab.py --model runs/smollm2-135m/teacher --data chat.jsonl [--rows 4]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from taid_cache.engines import EngineConfig
from taid_cache.engines.vllm_engine import VllmEngine
from taid_cache.inputs import RowTokenizer, detect_kind, load_rows, source_tag
from taid_cache.provenance import machine

from publish import publish


def timed_dump(model: str, sequences: list, top_k: int, vocab: int | None, max_length: int) -> dict[str, float]:
    """Seconds for vLLM to return (and our engine to slice) `top_k` prompt log-probs per position, start-up excluded."""
    engine = VllmEngine(EngineConfig(model, top_k, max_length, "float32"))
    try:
        engine.submit(sequences[:1], {}).materialize()  # warm-up
        start = time.perf_counter()
        records = engine.submit(sequences, {}).materialize()
        seconds = time.perf_counter() - start
    finally:
        engine.close()
    tokens = sum(len(s.input_ids) for s in sequences)
    return {"top_k": top_k, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "values_moved": sum(r.topk_ids.size for r in records), "full_vocabulary": vocab == top_k}


def main() -> None:
    from transformers import AutoConfig, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Hugging Face folder (e.g. the converted SmolLM2)")
    parser.add_argument("--data", required=True, help="chat jsonl")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    vocab = AutoConfig.from_pretrained(args.model).get_text_config().vocab_size
    rows = load_rows([args.data], "train").select(range(args.rows))
    to_sequence = RowTokenizer(tokenizer, detect_kind(rows.column_names, "auto"), args.max_length, "truncate", source_tag([args.data]))
    sequences = [s for i, row in enumerate(rows) if (s := to_sequence(row, i)[0]) is not None]
    results = [timed_dump(args.model, sequences, k, vocab, args.max_length) for k in (64, vocab)]
    ratio = results[0]["tokens_per_s"] / results[1]["tokens_per_s"]
    lines = [f"vLLM prompt log-probs: top-64 against the whole vocabulary ({vocab:,}) on {len(sequences)} chat rows "
             f"({results[0]['tokens']:,} tokens) of {Path(args.model).name}, float32, start-up excluded. Machine: {machine()}.", "",
             "| prompt_logprobs | seconds | tokens/s | log-probs moved through Python |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['top_k']:,} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | {r['values_moved']:,} |")
    lines += ["", f"The whole distribution is {ratio:.0f}× slower than top-64 here."]
    publish("vllm_full_vocab", "\n".join(lines), {"model": args.model, "rows": len(sequences), "results": results, "slowdown": ratio})


if __name__ == "__main__":
    main()
