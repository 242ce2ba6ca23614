"""`inspect`: what a cache holds and what it costs on disk, and how much teacher mass its top-k captures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .reader import read_cache
from .verify import verify_cache

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def cache_stats(path: str | Path) -> tuple[dict, np.ndarray]:
    """Summary numbers (with a sampled tail: the distinct ids drawn per position), and the captured mass (1 − the exact tail mass: the stored entries' true share) at every
    position."""
    manifest = verify_cache(path)  # refuse a corrupt cache as `verify` does, rather than summarise it
    captured, distinct = [np.zeros(0)], 0
    for record in read_cache(path):
        captured.append(-np.expm1(record.tail_logmass.astype(np.float64)))
        distinct += int((record.sample_draws > 0).sum()) if record.sampled else 0
    captured = np.concatenate(captured)
    settings = manifest.settings
    stats = {
        "sequences": manifest.records,
        "tokens": manifest.tokens,
        "positions": int(captured.size),
        "stored_entries": manifest.entries,
        "bytes_on_disk": manifest.bytes,
        "bytes_per_token": manifest.bytes / max(manifest.tokens, 1),
        "bytes_per_entry": manifest.bytes / max(manifest.entries, 1),
        "entries_per_position": manifest.entries / max(captured.size, 1),
        "captured_mass_mean": float(captured.mean()) if captured.size else float("nan"),
        **{f"captured_mass_p{p}": float(np.percentile(captured, p)) if captured.size else float("nan") for p in PERCENTILES},
        **{f"fidelity_{k}": v for k, v in manifest.fidelity.items()},
        "dropped": manifest.dropped,
        "truncated": manifest.truncated,
        "teacher": settings.teacher, "vocab_size": settings.vocab_size, "top_k": settings.top_k, "top_p": settings.top_p,
        "precision": settings.precision, "engine": settings.engine,
        "tail_samples": settings.tail_samples,  # draws off the head per position (0: none)
        **({"sampled_ids_per_position": distinct / max(captured.size, 1)} if settings.sampled else {}),
    }
    return stats, captured


def plot_captured_mass(captured: np.ndarray, stats: dict, out: Path) -> None:
    """Histogram of the captured mass at every position, with the dump-time fidelity report beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(captured, bins=50, range=(0.0, 1.0), color="#3b6ea8")
    ax.set_xlabel(f"teacher probability mass captured by the stored top-{stats['top_k']}")
    ax.set_ylabel("positions")
    ax.set_title(f"captured mass: mean {captured.mean():.3f}, median {np.median(captured):.3f}")
    report = [f"loss positions: {stats['fidelity_loss_positions']:,}",
              f"next token stored: {stats['fidelity_next_token_hit_rate']:.3f}"]
    for key, label in (("fidelity_kl_uniform_tail_mean", "KL(p‖p̂), uniform tail"), ("fidelity_teacher_entropy_mean", "teacher entropy")):
        if stats[key] is not None:
            report.append(f"{label}: {stats[key]:.4f} nats")
    ax.text(0.02, 0.97, "\n".join(report), transform=ax.transAxes, va="top", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
