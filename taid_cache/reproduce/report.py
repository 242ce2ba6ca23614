"""The reproduction's results: results.json, results.md (also printed) and PNG plots. Each method's metrics are
the mean ± standard deviation over its seeds; the differences between methods that exceed two standard errors
are listed, and the ranking set beside the paper's."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from ..atomic import write_json
from ..losses.schedule import TaidSchedule
from ..provenance import commit, machine
from ..training.metrics import read_metrics
from .config import ReproduceConfig, is_rounds


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    digits: int


METRICS = [Metric("ce", "held-out CE (nats)", False, 4), Metric("kl", "KL(teacher‖student)", False, 4),
           Metric("top1", "top-1 agreement", True, 4), Metric("rouge_l", "ROUGE-L", True, 2),
           Metric("exact_match", "exact match (%)", True, 1), Metric("teacher_nll", "teacher NLL of answers", False, 3),
           Metric("blank_answers", "blank answers (share)", False, 2)]
# Per run, beside the metrics: train wall seconds, the teacher's tokens scored for it (its FLOPs ≈ 2 × its
# parameters × these) and the seconds a round-cached run's generations and dumps took.
COSTS = {"wall_s": "train wall s", "teacher_tokens": "teacher tokens (M)", "rounds_s": "rounds s"}
PLOTS = {"heldout_metrics.png": "held-out metrics", "heldout_kl.png": "held-out KL during training",
         "loss_curves.png": "training losses", "taid_t.png": "TAID's t", "costs.png": "what each method cost",
         "cache-mass.png": "the cache's captured mass"}
# The paper's MT-Bench order (TAID first); the generation metric nearest to a judge here is the teacher's NLL.
PAPER_ORDER = ["taid", "fkl", "rkl", "tvd", "distillm", "gkd", "ctkd", "dkd"]


def split_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    """A run's training steps and its evaluations."""
    rows = read_metrics(run)
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_ce" in r]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per method (in run order): its seed count and each metric's mean and standard deviation."""
    methods: dict[str, list[dict]] = {}
    for row in rows:
        methods.setdefault(row["method"], []).append(row)
    out = []
    for method, runs in methods.items():
        entry = {"method": method, "seeds": [r["seed"] for r in runs], "mean": {}, "std": {}}
        for key in [m.key for m in METRICS] + list(COSTS):
            entry["mean"][key], entry["std"][key] = mean_std([r[key] for r in runs])
        out.append(entry)
    return out


def significant(methods: list[dict]) -> list[dict]:
    """Every pair of methods with at least two seeds each whose means differ by more than two standard errors of
    the difference (√(s₁²/n₁ + s₂²/n₂)), per metric, the better one first."""
    seeded = [m for m in methods if len(m["seeds"]) > 1]
    out = []
    for metric in METRICS:
        for i, a in enumerate(seeded):
            for b in seeded[i + 1:]:
                diff = a["mean"][metric.key] - b["mean"][metric.key]
                se = math.sqrt(a["std"][metric.key] ** 2 / len(a["seeds"]) + b["std"][metric.key] ** 2 / len(b["seeds"]))
                if abs(diff) > 2 * se:
                    better, worse = (a, b) if (diff > 0) == metric.higher_is_better else (b, a)
                    out.append({"metric": metric.key, "better": better["method"], "worse": worse["method"],
                                "difference": abs(diff), "two_se": 2 * se})
    return out


def ranking(methods: list[dict], key: str) -> list[str]:
    metric = next(m for m in METRICS if m.key == key)
    return [m["method"] for m in sorted(methods, key=lambda m: m["mean"][key], reverse=metric.higher_is_better)]


def paper_comparison(methods: list[dict]) -> str:
    """Where TAID stands among the paper's compared methods that ran, by the teacher's NLL and by ROUGE-L."""
    compared = [m for m in methods if m["method"] in PAPER_ORDER]
    if not any(m["method"] == "taid" for m in compared) or len(compared) < 2:
        return "The paper's comparison needs taid and at least one of its baselines among the methods."
    lines = []
    for key in ("teacher_nll", "rouge_l"):
        order = ranking(compared, key)
        lines.append(f"By {next(m.label for m in METRICS if m.key == key)}: {' > '.join(order)} "
                     f"(taid {order.index('taid') + 1} of {len(order)}).")
    return (" ".join(lines) + " The paper ranks TAID first of " + ", ".join(m for m in PAPER_ORDER if m in {c["method"] for c in compared})
            + " on MT-Bench.")


def cell(entry: dict, metric: Metric) -> str:
    mean, std = entry["mean"][metric.key], entry["std"][metric.key]
    return f"{mean:.{metric.digits}f}" + (f" ± {std:.{metric.digits}f}" if len(entry["seeds"]) > 1 else "")


def plots(out: Path, runs: dict[str, Path], rows: list[dict], methods: list[dict], teacher: dict, cfg: ReproduceConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    first = {}  # method -> its first seed's run
    for row in rows:
        first.setdefault(row["method"], runs[row["run"]])
    colours = {m: plt.cm.tab20(i % 20) for i, m in enumerate(first)}

    # Each method's own loss in a panel of its own: the losses are different quantities, not one scale.
    cols = min(4, len(first))
    fig, axes = plt.subplots(-(-len(first) // cols), cols, figsize=(3.2 * cols, 2.2 * -(-len(first) // cols)), squeeze=False)
    for ax, (method, run) in zip(axes.flat, first.items()):
        steps, _ = split_metrics(run)
        ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], color=colours[method], lw=1)
        ax.set_title(method, fontsize=8), ax.tick_params(labelsize=6)
    for ax in axes.flat[len(first):]:
        ax.set_visible(False)
    fig.supxlabel("optimizer step", fontsize=8), fig.supylabel("its own training loss (first seed)", fontsize=8)
    fig.tight_layout(), fig.savefig(out / "loss_curves.png", dpi=110), plt.close(fig)

    # During training the held-out KL is to the teacher as the run's cache holds it (a top-k cache's
    # reconstruction reads closer than a sampled one's); the stars are the table's KL, to the real teacher.
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for method in first:
        curves = [split_metrics(runs[r["run"]])[1] for r in rows if r["method"] == method]
        steps = [e["step"] for e in curves[0]]
        values = np.array([[e["eval_kl_cache"] for e in c[: len(steps)]] for c in curves if len(c) >= len(steps)])
        mean = values.mean(0)
        ax.plot(steps, mean, marker="o", ms=3, lw=1, label=f"{method} (n={len(values)})", color=colours[method])
        if len(values) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), alpha=0.15, color=colours[method])
        real = next(m for m in methods if m["method"] == method)["mean"]["kl"]
        ax.scatter([steps[-1]], [real], marker="*", s=70, color=colours[method], edgecolors="k", linewidths=0.4, zorder=3)
    ax.scatter([], [], marker="*", s=70, color="w", edgecolors="k", label="★ end: KL to the real teacher (the table's)")
    ax.set_xlabel("optimizer step"), ax.set_ylabel("held-out KL(teacher as cached‖student), nats"), ax.set_yscale("log")
    ax.set_title("lines: KL to the teacher as each run's cache holds it, mean over seeds (band: min to max); "
                 "stars: to the real teacher", fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no line hidden under it
    fig.tight_layout(), fig.savefig(out / "heldout_kl.png", dpi=120), plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    total = 0
    for method, run in first.items():
        steps, _ = split_metrics(run)
        if "t" in steps[0]:
            ax.plot([s["step"] for s in steps], [s["t"] for s in steps], label=method, color=colours[method])
            total = max(total, steps[-1]["step"])
    if total:  # the floor of the t each step trained with, from the schedule itself (one update behind the step)
        floor = TaidSchedule(cfg.taid_t_start, total_steps=total, adaptive=False)
        ts = []
        for _ in range(total):
            ts.append(floor.t)
            floor.update(0.0)
        ax.plot(range(1, total + 1), ts, "k--", lw=1, label="linear floor: t never falls below it")
    ax.set_xlabel("optimizer step"), ax.set_ylabel("TAID t (the step's)"), ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(out / "taid_t.png", dpi=120), plt.close(fig)

    fig, axes = plt.subplots(2, (len(METRICS) + 1) // 2, figsize=(4.7 * ((len(METRICS) + 1) // 2), 0.9 + 0.32 * len(methods) * 2))
    for ax in axes.flat[len(METRICS):]:
        ax.set_visible(False)
    names = [m["method"] for m in methods]
    for ax, metric in zip(axes.flat, METRICS):
        # Bars: min to max over a method's seeds (within the metric's range, unlike mean ± std).
        seen = [[r[metric.key] for r in rows if r["method"] == n] for n in names]
        means = [m["mean"][metric.key] for m in methods]
        low, high = [mean - min(v) for mean, v in zip(means, seen)], [max(v) - mean for mean, v in zip(means, seen)]
        ax.barh(names, means, xerr=[low, high], color=[colours[n] for n in names], capsize=2)
        for y, (mean, top) in enumerate(zip(means, high)):
            ax.text(mean + top, y, f" {mean:.{metric.digits}f}", va="center", fontsize=6)
        if metric.key in teacher:
            ax.axvline(teacher[metric.key], color="k", ls="--", lw=1, label=f"teacher {teacher[metric.key]:.{metric.digits}f}")
            ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False)  # above: no bar under it
        if not any(any(v) for v in seen) and not teacher.get(metric.key):
            ax.text(0.5, 0.5, "0 for every method and the teacher", transform=ax.transAxes, ha="center", va="center", fontsize=9,
                    bbox={"facecolor": "w", "edgecolor": "0.6"})
        ax.set_xlabel(metric.label + (" ↑" if metric.higher_is_better else " ↓")), ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis(), ax.margins(x=0.15)
    fig.suptitle("held-out metrics: mean over seeds; bars: min to max", fontsize=10)
    fig.tight_layout(), fig.savefig(out / "heldout_metrics.png", dpi=120), plt.close(fig)

    # What each method cost: training, the rounds' generations and dumps, and the teacher's tokens (online: every
    # step's; cached: the one dump, shared by every run that reads it).
    fig, (wall, tokens) = plt.subplots(1, 2, figsize=(10, 0.9 + 0.3 * len(methods)), sharey=True)
    trained, rounds = [m["mean"]["wall_s"] for m in methods], [m["mean"]["rounds_s"] for m in methods]
    wall.barh(names, trained, color=[colours[n] for n in names])
    wall.barh(names, rounds, left=trained, color="0.75", hatch="//", label="the rounds' generations and dumps")
    wall.set_xlabel("wall seconds: training" + (" + rounds (hatched)" if any(rounds) else "") + ", mean over seeds")
    wall.invert_yaxis()
    tokens.barh(names, [m["mean"]["teacher_tokens"] / 1e6 for m in methods], color=[colours[n] for n in names])
    tokens.set_xlabel("teacher tokens scored, millions (cached: the shared dump's)")
    for ax in (wall, tokens):
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout(), fig.savefig(out / "costs.png", dpi=120), plt.close(fig)


def write_report(cfg: ReproduceConfig, out: Path, runs: dict[str, Path], evaluation: dict, stats: dict, sampled: dict | None,
                 costs: dict[str, dict[str, float]], console: Console) -> dict[str, Any]:
    """results.json, results.md and the plots. `runs`: "method/seed-s" -> run folder; `stats`: the top-k train
    cache's `inspect`; `sampled`: the head + sampled tail cache's, when a method read it; `costs`: each run's
    teacher tokens and rounds seconds (pipeline.teacher_costs)."""
    rows = []
    for name, run in runs.items():
        method, seed = name.rsplit("/seed-", 1)
        steps, _ = split_metrics(run)
        last = steps[-1]
        rows.append({"run": name, "method": method, "seed": int(seed), **evaluation[name], "wall_s": last["elapsed_s"], **costs[name],
                     "steps": last["step"], "final_train_loss": last["loss"],
                     **{f"final_{key}": last[key] for key in ("t", "temperature") if key in last}})
    methods = aggregate(rows)
    differences = significant(methods)
    teacher = evaluation["teacher"]
    report = {"runs": rows, "methods": methods, "significant": differences, "teacher": teacher, "machine": machine(),
              "commit": commit(), "settings": cfg.to_dict(), "cache": stats, "sampled_cache": sampled}
    write_json(out / "results.json", report)
    lines = [f"Held-out results ({cfg.name}; machine: {report['machine']}; commit {report['commit']})", "",
             f"Teacher: CE {teacher['ce']:.4f} nats, ROUGE-L {teacher['rouge_l']:.2f}, exact match {teacher['exact_match']:.1f} %, "
             f"NLL of its own answers {teacher['teacher_nll']:.3f}. Cache: top-{cfg.top_k}, {stats['bytes_per_token']:.1f} bytes/token, "
             f"captured mass {stats['captured_mass_mean']:.3f}; at its loss positions the next token is stored at "
             f"{stats['fidelity_next_token_hit_rate']:.3f}, KL(teacher‖cache with a uniform tail) "
             f"{stats['fidelity_kl_uniform_tail_mean']:.4f} nats, teacher entropy {stats['fidelity_teacher_entropy_mean']:.4f} nats."
             + ("" if sampled is None else
                f" Sampled cache: top-{cfg.sampled_top_k} head and {cfg.tail_samples} draws off it, "
                f"{sampled['bytes_per_token']:.1f} bytes/token, {sampled['sampled_ids_per_position']:.1f} distinct ids drawn per position, "
                f"KL(teacher‖cache with a uniform tail) {sampled['fidelity_kl_uniform_tail_mean']:.4f} nats.")
             + f" Methods without a cache of their own read the {cfg.cache} cache; `*-top-k` and the losses that need "
               "every token's log-prob read the top-k one, `*-sampled` the sampled one. Generation: greedy answers to "
               f"{cfg.generation_prompts} held-out prompts, at most {cfg.max_new_tokens} new tokens. Teacher tokens: what the "
               "teacher scored for a run (online: every trained token; cached: its train cache's, paid once for every run "
               "that reads it; round-cached: its rounds' caches, and the train cache where the recipe mixes it in); "
               "rounds s: a round-cached run's generations and dumps"
             + (f" ({cfg.rounds} rounds, each answering {cfg.round_prompts} train prompts; a round two runs share, "
                "made once, counts in each)." if any(is_rounds(m) for m in cfg.methods) else "."), "",
             "| method | seeds | " + " | ".join(m.label + (" ↑" if m.higher_is_better else " ↓") for m in METRICS) + " | " + " | ".join(COSTS.values()) + " |",
             "|---" * (len(METRICS) + 2 + len(COSTS)) + "|"]
    lines += [f"| {m['method']} | {len(m['seeds'])} | " + " | ".join(cell(m, metric) for metric in METRICS)
              + f" | {m['mean']['wall_s']:.0f} | {m['mean']['teacher_tokens'] / 1e6:.2f} | {m['mean']['rounds_s']:.0f} |"
              for m in methods]
    lines += ["", "Differences beyond two standard errors (methods with several seeds): "
              + ("; ".join(f"{d['metric']}: {d['better']} over {d['worse']} by {d['difference']:.4g} (2 SE {d['two_se']:.2g})"
                           for d in differences) or "none") + ".", ""]
    if teacher.get("blank_answers", 0) >= 1:
        lines += ["The teacher answers every held-out prompt with a blank, so the generation columns and the ranking "
                  "by them below compare students against a teacher that says nothing (QUICK's teacher is too small "
                  "to answer); the held-out CE, KL and top-1 are the measures here.", ""]
    lines += [paper_comparison(methods), "", "Plots: " + ", ".join(f"[{text}]({name})" for name, text in PLOTS.items()) + "."]
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    plots(out, runs, rows, methods, teacher, cfg)
    console.print(table, markup=False, highlight=False)
    return report
