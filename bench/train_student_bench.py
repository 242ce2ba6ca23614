"""Stage-two benchmark (prints a table and saves bench/results/train_student.{json,md}).

(a) Step time training from the cache (TAID, top-64) vs a plain `sft` step, same student and batches.
    Target: distillation overhead <= 10% of the SFT step.
(b) Cached vs online (teacher run in-process) step time with a teacher >= 8x the student's parameters,
    beside the FLOP-model bound (3S + T) / (3S), S and T the forward FLOPs per token of student and teacher.
(c) Peak memory of loss forward+backward at 8192 positions x V = 32768: chunked vs naive (each in a fresh
    process, peak RSS above the inputs), and the largest difference of values and gradients.
Uses the models and tokenizer of bench/dump_teacher_bench.py (run that first; it caches them in --work).

Usage: python bench/train_student_bench.py [--work runs/bench]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from taid_cache.heads import check_head
from taid_cache.losses import LossConfig
from taid_cache.config import DumpConfig
from taid_cache.pipelines.dump_teacher import dump_teacher
from taid_cache.training.loss_step import micro_batch_loss
from taid_cache.training.teacher import TeacherSource
from taid_cache.reproduce.models import LlamaSize, new_llama
from taid_cache.provenance import machine
from taid_cache.shards.manifest import load_manifest
from taid_cache.training.data import CacheRows, CacheStream, StreamOrder
from taid_cache.training.distributed import Dist
from taid_cache.training.student import LossModel

from publish import ROOT, publish  # bench/ is on the path when this runs as a script

STUDENT = LlamaSize(hidden=192, layers=3, heads=3, intermediate=576, max_positions=1024)  # >= 8x below the teacher, for (b)
MID_STUDENT = LlamaSize(hidden=512, layers=6, heads=8, intermediate=1536, max_positions=1024)  # a body that is not dwarfed by the loss
N_POS, VOCAB_MEM, HIDDEN_MEM, K_MEM = 8192, 32768, 256, 64


def forward_flops_per_token(model) -> float:
    """2 x parameters that take part in a token's forward (everything but the embedding lookup)."""
    embed = model.get_input_embeddings().weight.numel()
    return 2.0 * (sum(p.numel() for p in model.parameters()) - embed)


# name: (loss, teacher online, packed rows)
VARIANTS = {"sft": ("sft", False, False), "taid-cached": ("taid", False, False), "taid-online": ("taid", True, False),
            "taid-cached-packed": ("taid", False, True)}


def step_times(student_dir: Path, cache: Path, teacher_dir: Path, steps: int, variants: list[str]) -> dict[str, float]:
    """Median seconds per optimizer step (forward, backward, AdamW) for each variant on the same batches.
    Variants take turns batch by batch, so machine drift hits them alike."""
    from transformers import AutoModelForCausalLM

    env = Dist()
    # The same sequences each step, padded or packed into rows of 512 tokens.
    rows = CacheRows(str(cache))
    order = StreamOrder(seed=0, buffer=64, shuffle=True, batch_size=8)
    batches = {pack: list(itertools.islice(iter(CacheStream(rows, order, 512, pack=pack)), steps + 2)) for pack in (False, True)}
    settings = load_manifest(str(cache)).settings
    runners = {}
    for name in variants:
        loss, online, _ = VARIANTS[name]
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_pretrained(student_dir)
        model = LossModel(lm, 1024, check_head(lm, "student"))
        teacher = TeacherSource(settings, "student", model.lm.get_output_embeddings().weight.shape[0], env,
                                str(teacher_dir) if online else None)
        runners[name] = (model, teacher, LossConfig(loss), torch.optim.AdamW(model.parameters(), lr=1e-4))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(steps + 2):
        for name, (model, teacher, loss_cfg, opt) in runners.items():
            mb = batches[VARIANTS[name][2]][i]
            t0 = time.perf_counter()
            combined, _ = micro_batch_loss(model, teacher, mb, loss_cfg, 0.5, env)
            (combined / max(int(mb.targets.sum()), 1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t0)
    out = {name: sorted(ts[2:])[len(ts[2:]) // 2] for name, ts in times.items()}
    for pack, key in ((False, "padded_fill"), (True, "packed_fill")):  # real tokens / tensor slots
        out[key] = sum(mb.tokens for mb in batches[pack]) / sum(mb.inputs["input_ids"].numel() for mb in batches[pack])
    return out


MEMORY_CHILD = r"""
import json, sys, torch
from taid_cache.losses import ChunkLoss, chunked_lm_loss, per_position_fn, rebuild_teacher, LossConfig
mode, n, v, h, k = sys.argv[1], *map(int, sys.argv[2:6])
torch.manual_seed(0)
hidden = torch.randn(n, h).requires_grad_()
weight = (torch.randn(v, h) * 0.05).requires_grad_()
ids = torch.randint(0, v, (n, k)); lps = torch.log_softmax(torch.randn(n, k), -1) - 0.5
fn = per_position_fn(LossConfig("taid"))
def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096
base = rss()
def per_position(logits, sl):
    return fn(logits, rebuild_teacher(logits, ids[sl], lps[sl], "student", v), 0.5)
if mode == "naive":
    loss = per_position(hidden @ weight.t(), slice(None)).sum() / n
else:
    def summed(logits, sl):
        value = per_position(logits, sl).sum()
        return ChunkLoss(value, value)
    loss = chunked_lm_loss(hidden, weight, summed, 1024)[0] / n
loss.backward()
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
torch.save({"loss": loss.detach(), "gh": hidden.grad, "gw": weight.grad}, sys.argv[6])
print(json.dumps({"peak_bytes": peak - base}))
"""


def memory(work: Path, repeats: int = 3) -> dict[str, float]:
    """Peak RSS (VmHWM: this address space's high-water mark; ru_maxrss would carry the forked parent's RSS
    across exec) above the inputs, median over `repeats` fresh processes per variant."""
    out = {}
    for mode in ("naive", "chunked"):
        peaks = []
        for _ in range(repeats):
            res = subprocess.run([sys.executable, "-c", MEMORY_CHILD, mode, str(N_POS), str(VOCAB_MEM), str(HIDDEN_MEM), str(K_MEM),
                                  str(work / f"mem-{mode}.pt")], capture_output=True, text=True, check=True, cwd=ROOT)
            peaks.append(json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"])
        out[mode] = sorted(peaks)[len(peaks) // 2]
    a, b = torch.load(work / "mem-naive.pt"), torch.load(work / "mem-chunked.pt")
    diff = max((a[key] - b[key]).abs().max().item() for key in ("loss", "gh", "gw"))
    return {"naive_peak_gib": out["naive"] / 2**30, "chunked_peak_gib": out["chunked"] / 2**30,
            "ratio": out["chunked"] / out["naive"], "max_abs_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir, trained = args.work / "big-teacher", args.work / "trained-teacher"
    if not (teacher_dir / "config.json").exists() or not (trained / "config.json").exists():
        sys.exit("run bench/dump_teacher_bench.py first (it builds the tokenizer and teachers)")
    student_dir, mid_dir = args.work / "student", args.work / "student-mid"
    for folder, size in ((student_dir, STUDENT), (mid_dir, MID_STUDENT)):
        if not (folder / "config.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
            new_llama(size, len(tokenizer), tokenizer, seed=1, out=folder)
    cache = args.work / "train-cache"
    if not (cache / "manifest.json").exists():
        shutil.rmtree(cache, ignore_errors=True)
        # Any teacher with this tokenizer gives the same shapes; the small trained one dumps quickly.
        dump_teacher(DumpConfig(model=str(trained), data=[str(args.work / "chat.jsonl")], output=str(cache), engine="hf",
                                top_k=64, max_length=512, progress=False))
    s_flops = forward_flops_per_token(AutoModelForCausalLM.from_pretrained(student_dir))
    t_flops = forward_flops_per_token(AutoModelForCausalLM.from_pretrained(teacher_dir))
    params = {name: sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(d).parameters())
              for name, d in (("student", student_dir), ("student-mid", mid_dir), ("teacher", teacher_dir))}
    times = step_times(student_dir, cache, teacher_dir, args.steps, ["sft", "taid-cached", "taid-online", "taid-cached-packed"])
    mid_times = step_times(mid_dir, cache, teacher_dir, args.steps, ["sft", "taid-cached"])
    mem = memory(args.work)
    bound = (3 * s_flops + t_flops) / (3 * s_flops)
    lines = [f"machine: {machine()}", "",
             f"(a, b) seconds per optimizer step (median), 8 sequences x <=512 tokens, top-64 cache, V = 8192; "
             f"teacher {params['teacher'] / 1e6:.1f}M", "",
             "| student | sft | taid cached | taid online | cached overhead vs sft (target <= +10%) |", "|---|---|---|---|---|",
             f"| {params['student'] / 1e6:.1f}M ({params['teacher'] / params['student']:.1f}x below the teacher) | {times['sft']:.3f} | "
             f"{times['taid-cached']:.3f} | {times['taid-online']:.3f} | {times['taid-cached'] / times['sft'] - 1:+.1%} |",
             f"| {params['student-mid'] / 1e6:.1f}M | {mid_times['sft']:.3f} | {mid_times['taid-cached']:.3f} | - | "
             f"{mid_times['taid-cached'] / mid_times['sft'] - 1:+.1%} |", "",
             f"cached vs online speed-up ({params['student'] / 1e6:.1f}M student): {times['taid-online'] / times['taid-cached']:.2f}x; "
             f"FLOP-model bound (3S+T)/(3S) = {bound:.2f}x", "",
             f"--pack ({params['student'] / 1e6:.1f}M student, taid cached, same sequences): {times['taid-cached-packed']:.3f} s/step "
             f"vs {times['taid-cached']:.3f} padded ({times['taid-cached'] / times['taid-cached-packed']:.2f}x); real tokens fill "
             f"{times['packed_fill']:.0%} of the packed tensors vs {times['padded_fill']:.0%} padded", "",
              f"(c) loss forward+backward, {N_POS} positions x V = {VOCAB_MEM} (TAID, top-{K_MEM}, student tail)", "",
              "| variant | peak memory above inputs (GiB) |", "|---|---|",
              f"| naive | {mem['naive_peak_gib']:.2f} |", f"| chunked (1024 positions) | {mem['chunked_peak_gib']:.2f} |", "",
              f"chunked / naive = {mem['ratio']:.3f} (target <= 0.25); largest |difference| of loss and gradients: {mem['max_abs_diff']:.2e}"]
    publish("train_student", "\n".join(lines), {"step_seconds": times, "mid_student_step_seconds": mid_times, "flop_bound": bound,
                                                  "params": params, "memory": mem})

if __name__ == "__main__":
    main()
