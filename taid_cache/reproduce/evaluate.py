"""Held-out evaluation of students against the real teacher (full vocabulary, not the cache), streamed: one
held-out sequence at a time goes through the teacher once and then every student, so memory holds one
sequence's [positions, vocabulary] log-probs (not the whole held-out set's) and the teacher runs once."""

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

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    models = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() for name, path in students.items()}
    sums = {name: {"ce": 0.0, "kl": 0.0, "top1": 0.0} for name in ["teacher", *models]}
    n = 0
    for record in read_cache(heldout_cache):
        ids = torch.from_numpy(record["input_ids"][:max_length])
        mask = torch.from_numpy(record["loss_mask"][1 : len(ids)])
        if not mask.any():
            continue
        labels = ids[1:][mask]
        t_lp = F.log_softmax(teacher(ids[None]).logits[0, :-1].float(), -1)[mask]
        sums["teacher"]["ce"] -= t_lp.gather(1, labels[:, None]).sum().item()
        for name, model in models.items():
            s_lp = F.log_softmax(model(ids[None]).logits[0, :-1].float(), -1)[mask][:, : t_lp.shape[1]]
            sums[name]["ce"] -= s_lp.gather(1, labels[:, None]).sum().item()
            sums[name]["kl"] += (t_lp.exp() * (t_lp - s_lp)).sum().item()
            sums[name]["top1"] += (s_lp.argmax(-1) == t_lp.argmax(-1)).sum().item()
        n += len(labels)
    n = max(n, 1)
    out = {"teacher": {"ce": sums["teacher"]["ce"] / n}}
    out.update({name: {key: value / n for key, value in s.items()} for name, s in sums.items() if name != "teacher"})
    return out
