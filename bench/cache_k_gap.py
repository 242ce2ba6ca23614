"""What the top-k cache costs the student, as a function of k (prints a table and saves
bench/results/cache_k_gap.{json,md}).

Runs on a finished `make reproduce` output, with its teacher, student initialisation, chat data, held-out cache
and settings: for each k, dump the train split at top-k, train `taid` (student tail) with the reproduction's
settings, and evaluate the student against the real teacher on the held-out pairs. Beside those rows, the
reproduction's own `taid-online` (teacher in the loop: the full distribution, nothing cached). The
reproduction's own k reuses its cache and its `taid` student.

Usage: python bench/cache_k_gap.py [--out runs/reproduce] [--k 16 64 256 1024]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from taid_cache.errors import UserError
from taid_cache.reproduce.config import load_config
from taid_cache.reproduce.evaluate import evaluate_students
from taid_cache.reproduce.pipeline import dump_cache, train_method
from taid_cache.reproduce.report import machine, read_metrics
from taid_cache.shards.inspect import cache_stats

from publish import ROOT, publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce", help="a finished `make reproduce` output")
    parser.add_argument("--k", type=int, nargs="+", default=[16, 64, 256, 1024])
    args = parser.parse_args()
    out, console = args.out, Console(stderr=True)
    if not (out / "results.json").exists():
        sys.exit(f"{out} holds no finished reproduction (results.json); run `make reproduce` first")
    try:
        cfg = load_config(out / "settings.json")  # JSON is YAML
    except UserError as exc:
        sys.exit(f"{exc} (made by another version of taid-cache?)")
    reproduced = json.loads((out / "results.json").read_text())
    online = next(r for r in reproduced["runs"] if r["method"] == "taid-online")
    teacher, student, heldout = out / "teacher", out / "student-init", out / "cache-heldout"

    rows, runs = [], {}
    for k in args.k:
        if k == cfg.top_k:
            cache, run_root = out / "cache-train", out
        else:
            console.rule(f"k = {k}")
            cache = dump_cache(cfg, teacher, out / "data" / "chat-train.jsonl", out / "k-sweep" / f"cache-k{k}", k, console)
            run_root = out / "k-sweep" / f"k{k}"
        runs[f"k{k}"] = train_method(cfg, "taid", run_root, student, teacher, cache, heldout, console)
        stats, _ = cache_stats(cache)
        steps, _ = read_metrics(runs[f"k{k}"])
        rows.append({"k": k, "captured_mass_mean": stats["captured_mass_mean"], "captured_mass_p5": stats["captured_mass_p5"],
                     "cache_bytes": stats["bytes_on_disk"], "bytes_per_token": stats["bytes_per_token"], "train_s": steps[-1]["elapsed_s"]})
    evaluation = evaluate_students(teacher, runs, heldout, cfg.max_length)
    for row in rows:
        row.update(evaluation[f"k{row['k']}"])

    lines = [f"What the top-k cache costs: cached `taid` (student tail) vs `taid-online`, {cfg.max_steps} steps, vocabulary "
             f"{cfg.vocab_size}, held-out chat pairs; reproduction in {out} (commit {reproduced['commit']}). Machine: {machine()}.", "",
             "| teacher signal | captured mass (mean / 5th pct) | cache MB | bytes/token | train s | CE | KL(teacher‖student) | top-1 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| top-{r['k']} cache | {r['captured_mass_mean']:.3f} / {r['captured_mass_p5']:.3f} | {r['cache_bytes'] / 1e6:.1f} | "
                     f"{r['bytes_per_token']:.0f} | {r['train_s']:.1f} | {r['ce']:.4f} | {r['kl']:.4f} | {r['top1']:.4f} |")
    lines.append(f"| online teacher | 1 | – | – | {online['wall_s']:.1f} | {online['ce']:.4f} | {online['kl']:.4f} | {online['top1']:.4f} |")
    publish("cache_k_gap", "\n".join(lines), {"reproduction": str(out), "rows": rows, "online": online})


if __name__ == "__main__":
    main()
