"""Held-out evaluation of a student against the real teacher (full vocabulary, not the cache)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..shards import read_cache


@torch.no_grad()
def evaluate_students(teacher_dir: Path, students: dict[str, Path], heldout_cache: Path, max_length: int) -> dict[str, dict[str, float]]:
    """For each student: CE on the data, KL(teacher‖student) over the full vocabulary and top-1 agreement with
    the teacher, averaged over the held-out loss-mask positions; plus the teacher's own CE (key "teacher")."""
    from transformers import AutoModelForCausalLM

    records = list(read_cache(heldout_cache))
    inputs = [torch.from_numpy(r["input_ids"][:max_length]) for r in records]
    targets = [torch.from_numpy(r["loss_mask"][1 : len(ids)]) for r, ids in zip(records, inputs)]
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    teacher_lp = [F.log_softmax(teacher(ids[None]).logits[0, :-1].float(), -1)[m] for ids, m in zip(inputs, targets)]
    labels = [ids[1:][m] for ids, m in zip(inputs, targets)]
    n = sum(len(l) for l in labels)
    out = {"teacher": {"ce": -sum(lp.gather(1, l[:, None]).sum().item() for lp, l in zip(teacher_lp, labels)) / n}}
    for name, path in students.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ce = kl = top1 = 0.0
        for ids, m, t_lp, lab in zip(inputs, targets, teacher_lp, labels):
            s_lp = F.log_softmax(model(ids[None]).logits[0, :-1].float(), -1)[m][:, : t_lp.shape[1]]
            ce -= s_lp.gather(1, lab[:, None]).sum().item()
            kl += (t_lp.exp() * (t_lp - s_lp)).sum().item()
            top1 += (s_lp.argmax(-1) == t_lp.argmax(-1)).sum().item()
        out[name] = {"ce": ce / n, "kl": kl / n, "top1": top1 / n}
    return out
