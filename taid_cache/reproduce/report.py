"""The reproduction's results: results.json, results.md (also printed) and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from ..atomic import write_json
from ..provenance import commit, machine
from ..training.metrics import read_metrics
from .config import ReproduceConfig


def split_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    """A run's training steps and its evaluations."""
    rows = read_metrics(run)
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_ce" in r]


def plots(out: Path, runs: dict[str, Path], results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, run in runs.items():
        steps, _ = split_metrics(run)
        ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], label=method)
    ax.set_xlabel("optimizer step"), ax.set_ylabel("training loss (each method's own)"), ax.set_yscale("log")
    ax.legend(fontsize=7), fig.tight_layout(), fig.savefig(out / "loss_curves.png", dpi=120), plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, run in runs.items():
        steps, _ = split_metrics(run)
        if "t" in steps[0]:
            ax.plot([s["step"] for s in steps], [s["t"] for s in steps], label=method)
    ax.set_xlabel("optimizer step"), ax.set_ylabel("TAID t"), ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(out / "taid_t.png", dpi=120), plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    names = [r["method"] for r in results]
    for ax, key, label in zip(axes, ("ce", "kl", "top1"), ("held-out CE (nats)", "KL(teacher‖student)", "top-1 agreement")):
        ax.barh(names, [r[key] for r in results], color="#3b6ea8")
        ax.set_xlabel(label)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout(), fig.savefig(out / "heldout_metrics.png", dpi=120), plt.close(fig)


def write_report(cfg: ReproduceConfig, out: Path, runs: dict[str, Path], evaluation: dict, stats: dict, sampled: dict | None,
                 console: Console) -> dict[str, Any]:
    """results.json, results.md and the plots. `stats`: the top-k train cache's `inspect`; `sampled`: the head +
    sampled tail cache's, when a `*-sampled` method ran."""
    results = []
    for method, run in runs.items():
        steps, _ = split_metrics(run)
        results.append({"method": method, **evaluation[method], "wall_s": steps[-1]["elapsed_s"], "steps": steps[-1]["step"],
                        "final_train_loss": steps[-1]["loss"], **({"final_t": steps[-1]["t"]} if "t" in steps[-1] else {})})
    report = {"runs": results, "teacher": evaluation["teacher"], "machine": machine(), "commit": commit(),
              "settings": cfg.to_dict(), "cache": stats, "sampled_cache": sampled}
    write_json(out / "results.json", report)
    lines = [f"Held-out results ({cfg.name}; machine: {report['machine']}; commit {report['commit']})", "",
             f"Teacher CE on the held-out data: {evaluation['teacher']['ce']:.4f} nats. Cache: top-{cfg.top_k}, "
             f"{stats['bytes_per_token']:.1f} bytes/token, captured mass {stats['captured_mass_mean']:.3f}; at its loss positions "
             f"the next token is stored at {stats['fidelity_next_token_hit_rate']:.3f}"
             + ("" if stats["fidelity_kl_uniform_tail_mean"] is None else
                f", KL(teacher‖cache with a uniform tail) {stats['fidelity_kl_uniform_tail_mean']:.4f} nats, "
                f"teacher entropy {stats['fidelity_teacher_entropy_mean']:.4f} nats") + "."
             + ("" if sampled is None else
                f" Sampled cache: top-{cfg.sampled_top_k} head and {cfg.tail_samples} draws off it, "
                f"{sampled['bytes_per_token']:.1f} bytes/token, {sampled['sampled_ids_per_position']:.1f} distinct ids drawn per position.")
             + f" Methods without a cache of their own read the {cfg.cache} cache; `*-top-k` and the losses that need "
               "every token's log-prob read the top-k one, `*-sampled` the sampled one.",
             "",
             "| method | CE (nats) | KL(teacher‖student) | top-1 agreement | train wall s |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['ce']:.4f} | {r['kl']:.4f} | {r['top1']:.4f} | {r['wall_s']:.1f} |" for r in results]
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    plots(out, runs, results)
    console.print(table)
    return report
