"""How faithful a cache is to its teacher, measured at dump time from the full distribution the engine holds:
what a user sees before training on it (manifest `fidelity`, `inspect`).

Per loss position (a position whose next token is a training target) of every record:
- captured mass: the stored entries' true share, 1 − m (m the exact tail mass);
- next-token hit: whether the actual next token is among the stored entries;
- teacher entropy H (from the engine's full distribution);
- KL(p ‖ p̂) of the stored reconstruction with the student-free `uniform` tail: the decoded head rescaled to
  1 − m (what the readers do) and m spread evenly over the other V − n ids. With H it is exact:
      KL = Σ_T p (ℓ − ℓ̂) + Σ_off p ℓ − m log(m / (V − n)),   Σ_off p ℓ = −H − Σ_T p ℓ.
The shard writer keeps sums per shard; the manifest adds them up and reports means.
"""

from __future__ import annotations

import numpy as np

SUMS = ("positions", "captured", "hits", "entropy", "kl_uniform_tail")


def record_sums(input_ids: np.ndarray, loss_mask: np.ndarray, ids: np.ndarray, exact: np.ndarray, decoded: np.ndarray,
                tail_logmass: np.ndarray, entropy: np.ndarray, vocab_size: int) -> dict[str, float]:
    """Sums over one record's loss positions. `ids`, `exact`, `decoded`: [T−1, k] stored ids (−1 unused), the
    engine's log-probs and the decoded stored ones (−inf unused); `tail_logmass` [T−1] off the stored ids."""
    targets = loss_mask[1:].astype(bool)
    ids, exact, decoded = ids[targets], exact[targets].astype(np.float64), decoded[targets].astype(np.float64)
    log_m = tail_logmass[targets].astype(np.float64)
    m = np.exp(log_m)
    used = ids >= 0
    h = entropy[targets].astype(np.float64)
    exact_, decoded_ = np.where(used, exact, 0.0), np.where(used, decoded, 0.0)  # finite everywhere: no 0 · ∞
    p = np.where(used, np.exp(exact_), 0.0)
    head_lse = np.logaddexp.reduce(np.where(used, decoded, -np.inf), axis=1)
    with np.errstate(divide="ignore"):  # m = 1 only where nothing is stored (--top-k 0), and p is 0 there
        rebuilt = decoded_ - head_lse[:, None] + np.log1p(-m)[:, None]  # the readers' head: rescaled to 1 − m
    head_term = (p * (exact_ - rebuilt)).sum(axis=1)
    off_plogp = -h - (p * exact_).sum(axis=1)
    others = np.maximum(vocab_size - used.sum(axis=1), 1)
    tail_term = off_plogp - m * (np.where(m > 0, log_m, 0.0) - np.log(others))
    return {"positions": float(targets.sum()), "captured": float((1 - m).sum()),
            "hits": float((ids == input_ids[1:][targets][:, None]).any(axis=1).sum()),
            "entropy": float(h.sum()), "kl_uniform_tail": float((head_term + tail_term).sum())}


def add(total: dict[str, float], part: dict[str, float]) -> dict[str, float]:
    return {key: total[key] + part[key] for key in SUMS}


def empty() -> dict[str, float]:
    return {key: 0.0 for key in SUMS}


def means(sums: list[dict[str, float]]) -> dict[str, float]:
    """The manifest's report: per-loss-position means over every shard's sums."""
    total = empty()
    for part in sums:
        total = add(total, part)
    n = max(total["positions"], 1.0)
    return {"loss_positions": int(total["positions"]),
            "captured_mass_mean": total["captured"] / n,
            "next_token_hit_rate": total["hits"] / n,
            "teacher_entropy_mean": total["entropy"] / n,
            "kl_uniform_tail_mean": total["kl_uniform_tail"] / n}
