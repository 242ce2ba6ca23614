"""`inspect`: what a cache holds and what it costs on disk, and how much teacher mass its top-k captures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .reader import read_cache
from .verify import verify_cache

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def cache_stats(path: str | Path) -> tuple[dict, np.ndarray]:
    """Summary numbers, and the captured mass (sum of stored probabilities) at every position."""
    cache = Path(path)
    manifest = verify_cache(cache)  # refuse a corrupt cache as `verify` does, rather than summarise it
    captured = np.concatenate(
        [np.exp(r["topk_logprobs"].astype(np.float64)).sum(axis=1) for r in read_cache(cache)] or [np.zeros(0)]
    )
    stats = {
        "sequences": manifest["records"],
        "tokens": manifest["tokens"],
        "positions": int(captured.size),
        "stored_entries": manifest["entries"],
        "bytes_on_disk": manifest["bytes"],
        "bytes_per_token": manifest["bytes"] / max(manifest["tokens"], 1),
        "bytes_per_entry": manifest["bytes"] / max(manifest["entries"], 1),
        "entries_per_position": manifest["entries"] / max(captured.size, 1),
        "captured_mass_mean": float(captured.mean()) if captured.size else float("nan"),
        **{f"captured_mass_p{p}": float(np.percentile(captured, p)) if captured.size else float("nan") for p in PERCENTILES},
        "dropped": manifest["dropped"],
        "truncated": manifest["truncated"],
        **{k: manifest["settings"][k] for k in ("teacher", "vocab_size", "top_k", "top_p", "precision", "engine")},
    }
    return stats, captured


def plot_captured_mass(captured: np.ndarray, top_k: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(captured, bins=50, range=(0.0, 1.0), color="#3b6ea8")
    ax.set_xlabel(f"teacher probability mass captured by the stored top-{top_k}")
    ax.set_ylabel("positions")
    ax.set_title(f"captured mass: mean {captured.mean():.3f}, median {np.median(captured):.3f}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
