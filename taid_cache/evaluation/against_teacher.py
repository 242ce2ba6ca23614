"""Held-out evaluation of students against the real teacher (full vocabulary, not the cache), streamed: one
held-out sequence at a time goes through the teacher once and then every student, so memory holds one
sequence's [positions, vocabulary] log-probs (not the whole held-out set's) and the teacher runs once."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def against_teacher(teacher, students: dict[str, torch.nn.Module], sequences: Iterable[tuple[np.ndarray, np.ndarray]],
                    max_length: int) -> dict[str, dict[str, float]]:
    """For each student: CE on the data, KL(teacher‖student) over the full vocabulary and top-1 agreement with
    the teacher, averaged over the held-out loss-mask positions of `sequences` ((input ids, loss mask) pairs)
    within their first `max_length` tokens; plus the teacher's own CE (key "teacher"). Every entry also counts
    the loss positions scored (`scored_positions`) and those past `max_length`, not scored (`unscored_positions`);
    with none scored, the metrics are absent, not 0 (prompts longer than --max-length gave CE, KL and top-1 of
    0.000 for every model)."""
    sums = {name: {"ce": 0.0, "kl": 0.0, "top1": 0.0} for name in ["teacher", *students]}
    n = unscored = 0
    for input_ids, loss_mask in sequences:
        ids = torch.from_numpy(np.asarray(input_ids[:max_length], dtype=np.int64))
        mask = torch.from_numpy(np.asarray(loss_mask[1 : len(ids)], dtype=bool))
        unscored += int(np.count_nonzero(np.asarray(loss_mask[1:], dtype=bool))) - int(mask.sum())
        if not mask.any():
            continue
        labels = ids[1:][mask]
        t_lp = F.log_softmax(teacher(ids[None]).logits[0, :-1].float(), -1)[mask]
        sums["teacher"]["ce"] -= t_lp.gather(1, labels[:, None]).sum().item()
        for name, model in students.items():
            s_lp = F.log_softmax(model(ids[None]).logits[0, :-1].float(), -1)[mask][:, : t_lp.shape[1]]
            sums[name]["ce"] -= s_lp.gather(1, labels[:, None]).sum().item()
            sums[name]["kl"] += (t_lp.exp() * (t_lp - s_lp)).sum().item()
            sums[name]["top1"] += (s_lp.argmax(-1) == t_lp.argmax(-1)).sum().item()
        n += len(labels)
    counts = {"scored_positions": n, "unscored_positions": unscored}
    out = {"teacher": {**({"ce": sums["teacher"]["ce"] / n} if n else {}), **counts}}
    out.update({name: {**({key: value / n for key, value in s.items()} if n else {}), **counts}
                for name, s in sums.items() if name != "teacher"})
    return out
