"""What a cache costs the student, per byte: top-k caches at several k against head + sampled tail caches
(prints a table, saves bench/results/fidelity-NAME.{json,md} and a plot of the KL gap against bytes per token).

Runs on a `make reproduce` output that got past its student initialisation (its teacher, student initialisation, chat data, held-out cache and
settings). For each cache:
- bytes per token and captured mass (`inspect`);
- the angle and norm ratio of the student's parameter gradient against full distillation's (the teacher's
  whole distribution), at the student initialisation and at the online TAID student, summed over the first training sequences' loss positions,
  for TAID at t = 0.4 and 0.7 and for FKL (t = 1); one stored draw per position, nothing averaged;
- cached `taid` and `fkl` students trained with the reproduction's settings, evaluated against the real teacher
  on the held-out pairs, beside `taid-online` and `fkl-online` (teacher in the loop).

Usage: python bench/fidelity.py [--out runs/reproduce] [--k 16 64 256] [--sampled 16:32 16:64 0:64] [--name default] [--plot-only]
(`--sampled K:N`: the top-K head and N draws off it per position.)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from taid_cache.errors import UserError
from taid_cache.losses import LossConfig, SampledTeacher, TopKTeacher, distillation, taid
from taid_cache.reproduce.config import ReproduceConfig, load_config
from taid_cache.reproduce.pipeline import dump_caches, evaluate_runs, student_init, train_method
from taid_cache.provenance import machine
from taid_cache.shards import read_cache
from taid_cache.shards.contract import CacheRecord
from taid_cache.shards.inspect import cache_stats
from taid_cache.shards.manifest import load_manifest

from publish import ROOT, publish

ANGLE_T = (0.4, 0.7, 1.0)  # TAID's t at its default start, midway, and 1 (= FKL)
ANGLE_SEQUENCES = 24


@dataclasses.dataclass
class Variant:
    name: str
    top_k: int
    tail_samples: int = 0

    @property
    def sampled(self) -> bool:
        return self.tail_samples > 0

    @property
    def slug(self) -> str:
        return f"k{self.top_k}" + (f"-n{self.tail_samples}" if self.sampled else "")


def parse_variants(ks: list[int], sampled: list[str]) -> list[Variant]:
    variants = [Variant(f"top-{k}", k) for k in ks]
    for spec in sampled:
        k, n = (int(x) for x in spec.split(":"))
        variants.append(Variant(f"top-{k} + {n} draws", k, n))
    return variants


def cache_loss(variant: Variant, logits: torch.Tensor, rec: CacheRecord, targets: torch.Tensor, t: float, valid: int) -> torch.Tensor:
    """The trainer's per-position loss against this cache's teacher at the record's loss positions (summed)."""
    keys = ("topk_ids", "topk_logprobs", "tail_logmass", "sample_ids", "sample_draws", "sample_logprobs")
    present = rec.as_dict()
    pick = [torch.from_numpy(present[key][: len(targets)])[targets] for key in keys if key in present]
    teacher = SampledTeacher(*pick, valid) if variant.sampled else TopKTeacher(*pick, valid)
    return distillation(LossConfig("taid"), teacher, logits, t).sum()


def gradient_angles(teacher_dir: Path, student_dir: Path, caches: dict[str, Path], variants: list[Variant], valid: int,
                    max_length: int) -> dict[str, dict[str, float]]:
    """Per variant and t: the angle (degrees) and norm ratio of its parameter gradient to full distillation's."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    params = [p for p in student.parameters() if p.requires_grad]
    grads = {(name, t): torch.zeros(sum(p.numel() for p in params), dtype=torch.float64) for name in ["full", *caches] for t in ANGLE_T}
    streams = {v.name: itertools.islice(read_cache(caches[v.name]), ANGLE_SEQUENCES) for v in variants}
    for records in zip(*streams.values()):
        assert len({r.sample_id for r in records}) == 1  # the same sequence in every cache
        ids = torch.from_numpy(records[0].input_ids[:max_length])
        targets = torch.from_numpy(records[0].loss_mask[1 : len(ids)])
        if not targets.any():
            continue
        with torch.no_grad():
            full = F.log_softmax(teacher(ids[None]).logits[0, :-1].float(), -1)[targets]
        for t in ANGLE_T:
            for variant, rec in [(None, None), *zip(variants, records)]:
                logits = student(ids[None]).logits[0, :-1][targets].float()
                loss = taid(logits, full, t).sum() if variant is None else cache_loss(variant, logits, rec, targets, t, valid)
                grads[("full" if variant is None else variant.name, t)] += torch.cat(
                    [g.flatten().double() for g in torch.autograd.grad(loss, params)])
    out: dict[str, dict[str, float]] = {}
    for v in variants:
        for t in ANGLE_T:
            g, ref = grads[(v.name, t)], grads[("full", t)]
            cos = float(torch.dot(g, ref) / (g.norm() * ref.norm()))
            out.setdefault(v.name, {})[f"angle_t{t}"] = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
            out[v.name][f"norm_ratio_t{t}"] = float(g.norm() / ref.norm())
    return out


def plot(rows: list[dict], online: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    # Labels above the fkl points and below the taid ones, so the two lines' labels never overlap.
    offsets = {"taid": (4, -11), "fkl": (4, 5)}
    for method, colour in (("taid", "#3b6ea8"), ("fkl", "#c0504d")):
        gap = lambda r: 100 * (r[f"{method}_kl"] / online[method]["kl"] - 1)  # noqa: E731
        top = sorted((r for r in rows if not r["tail_samples"]), key=lambda r: r["bytes_per_token"])
        ax.plot([r["bytes_per_token"] for r in top], [gap(r) for r in top], "o-", color=colour, label=f"{method}: top-k cache")
        sampled = [r for r in rows if r["tail_samples"]]
        ax.plot([r["bytes_per_token"] for r in sampled], [gap(r) for r in sampled], "s", color=colour, mfc="none", ms=8,
                label=f"{method}: head + sampled tail")
        for r in top + sampled:
            name = f"{r['top_k']}+{r['tail_samples']}" if r["tail_samples"] else f"k={r['top_k']}"
            ax.annotate(f"{name}: {gap(r):+.1f}%", (r["bytes_per_token"], gap(r)), fontsize=7, color=colour,
                        xytext=offsets[method], textcoords="offset points")
    ax.axhline(5, color="k", lw=0.8, ls="--")
    ax.annotate("5% above the online student", (0.01, 5), xycoords=("axes fraction", "data"), xytext=(0, 3),
                textcoords="offset points", fontsize=7)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_xticks([32, 64, 128, 256, 512], ["32", "64", "128", "256", "512"])
    ax.minorticks_off()
    ax.set_xlabel("cache bytes per token (log scale)")
    ax.set_ylabel("held-out KL(teacher‖student), % above online")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce", help="a finished `make reproduce` output")
    parser.add_argument("--k", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--sampled", nargs="*", default=["16:32", "16:64", "0:64"], help="K:N head + sampled tail caches")
    parser.add_argument("--name", default="default", help="results are saved as bench/results/fidelity-NAME.*")
    parser.add_argument("--plot-only", action="store_true", help="redraw bench/results/fidelity-NAME.png from its saved JSON")
    args = parser.parse_args()
    out, console = args.out, Console(stderr=True)
    results = ROOT / "bench" / "results"
    if args.plot_only:
        saved = json.loads((results / f"fidelity-{args.name}.json").read_text())
        plot(saved["rows"], saved["online"], results / f"fidelity-{args.name}.png",
             f"cache vs online teacher ({args.name}, {saved['steps']} steps)")
        return
    needed = [out / "settings.json", out / "teacher", out / "cache-heldout" / "manifest.json", out / "data" / "chat-heldout.jsonl"]
    if not all(p.exists() for p in needed):
        sys.exit(f"{out} holds no reproduction past its caches; run `make reproduce` first")
    try:
        cfg: ReproduceConfig = load_config(out / "settings.json")  # JSON is YAML
    except UserError as exc:
        sys.exit(f"{exc} (made by another version of taid-cache?)")
    seed = cfg.seeds[0]
    teacher, heldout = out / "teacher", out / "cache-heldout"
    student = student_init(cfg, out, teacher, seed)
    variants = parse_variants(args.k, args.sampled)
    sweep = out / "fidelity"

    # The reproduction's own caches where they are the same; the others dumped through one engine start.
    own = {(cfg.top_k, 0): out / "cache-train", (cfg.sampled_top_k, cfg.tail_samples): out / "cache-train-sampled"}
    caches = {v.name: own[key] for v in variants if (key := (v.top_k, v.tail_samples)) in own and (own[key] / "manifest.json").exists()}
    caches.update(dump_caches(cfg, teacher, {v.name: (out / "data" / "chat-train.jsonl", sweep / f"cache-{v.slug}", v.top_k, v.tail_samples)
                                             for v in variants if v.name not in caches}, console))
    valid = load_manifest(str(caches[variants[0].name])).settings.tokenizer_size
    console.rule("gradient angles")
    angles = gradient_angles(teacher, student, caches, variants, valid, cfg.max_length)

    # Cached students in the sweep's own folder (the reproduction's `taid` and `fkl` read the cache its config
    # names, not each of these); the online ones are the reproduction's.
    runs: dict[str, Path] = {}
    for v in variants:
        for method in ("taid", "fkl"):
            console.rule(f"{v.name}: {method}")
            runs[f"{v.name}/{method}"] = train_method(cfg, method, seed, sweep / v.slug, student, teacher, caches[v.name], heldout, console)
    for method in ("taid-online", "fkl-online"):
        console.rule(method)
        runs[method] = train_method(cfg, method, seed, out, student, teacher, caches[variants[0].name], heldout, console)
    # Late in training the student is near the teacher and t near 1: the same angles at the online TAID student.
    trained = gradient_angles(teacher, runs["taid-online"], caches, variants, valid, cfg.max_length)
    evaluation = evaluate_runs(cfg, sweep, runs, teacher, out / "data" / "chat-heldout.jsonl", heldout, console)
    online = {"taid": evaluation["taid-online"], "fkl": evaluation["fkl-online"]}

    rows = []
    for v in variants:
        stats, _ = cache_stats(caches[v.name])
        row = {"cache": v.name, "top_k": v.top_k, "tail_samples": v.tail_samples, "bytes_per_token": stats["bytes_per_token"],
               "captured_mass_mean": stats["captured_mass_mean"], "sampled_ids_per_position": stats.get("sampled_ids_per_position", 0.0),
               **angles[v.name], **{f"trained_{key}": value for key, value in trained[v.name].items()}}
        for method in ("taid", "fkl"):
            for key, value in evaluation[f"{v.name}/{method}"].items():
                row[f"{method}_{key}"] = value
        rows.append(row)

    steps = cfg.max_steps
    lines = [f"What a cache costs the student per byte ({args.name}): {steps} steps, held-out chat pairs, reproduction in {out}. "
             f"Gradient angle / norm ratio: parameter gradient at the student initialisation over {ANGLE_SEQUENCES} training sequences "
             f"against full distillation's (one stored draw, nothing averaged). KL gap: held-out KL(teacher‖student) of the cached "
             f"student over the online one's, minus 1. Machine: {machine()}.", "",
             "| cache | bytes/token | captured mass | sampled ids/pos | angle t=0.4 / 0.7 / FKL (°), initial student | "
             "norm ratio t=0.4 / FKL | angle t=0.4 / 0.7 / FKL (°), trained student | TAID KL (gap) | FKL KL (gap) | TAID CE / top-1 | FKL CE / top-1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = {m: 100 * (r[f"{m}_kl"] / online[m]["kl"] - 1) for m in ("taid", "fkl")}
        lines.append(f"| {r['cache']} | {r['bytes_per_token']:.0f} | {r['captured_mass_mean']:.3f} | {r['sampled_ids_per_position']:.1f} | "
                     f"{r['angle_t0.4']:.1f} / {r['angle_t0.7']:.1f} / {r['angle_t1.0']:.1f} | {r['norm_ratio_t0.4']:.2f} / {r['norm_ratio_t1.0']:.2f} | "
                     f"{r['trained_angle_t0.4']:.1f} / {r['trained_angle_t0.7']:.1f} / {r['trained_angle_t1.0']:.1f} | "
                     f"{r['taid_kl']:.4f} ({gap['taid']:+.1f}%) | {r['fkl_kl']:.4f} ({gap['fkl']:+.1f}%) | "
                     f"{r['taid_ce']:.3f} / {r['taid_top1']:.3f} | {r['fkl_ce']:.3f} / {r['fkl_top1']:.3f} |")
    for m in ("taid", "fkl"):
        lines.append(f"| online teacher ({m}) | – | 1 | – | 0 | 1 | 0 | {online[m]['kl']:.4f} | | {online[m]['ce']:.3f} / {online[m]['top1']:.3f} | |")
    results.mkdir(parents=True, exist_ok=True)
    plot(rows, online, results / f"fidelity-{args.name}.png", f"cache vs online teacher ({args.name}, {steps} steps)")
    publish(f"fidelity-{args.name}", "\n".join(lines), {"reproduction": str(out), "steps": steps, "rows": rows, "online": online,
                                                        "teacher_ce": evaluation["teacher"]["ce"]})


if __name__ == "__main__":
    main()
