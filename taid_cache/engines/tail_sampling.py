"""Draws from the teacher's distribution off the stored head: the sampled tail of a `--tail-samples N` cache.

At each position, N tokens are drawn with replacement from r_v = p_v / m over the ids outside the top-k head
(m: the mass there), by inverse CDF from uniforms that depend only on (dump seed, sample id, position): a
resumed dump, another batch size or another worker count draws the same tokens. The cache keeps each position's
distinct ids, their counts c_v and exact log-probs ℓ_v = log p_v; p̂_v = m · c_v / N is then an unbiased
estimate of p_v off the head (E[c_v] = N r_v), and the head is exact (docs/LOSSES.md).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..shards.record import TailSamples


def sequence_uniforms(seed: int, sample_id: str, positions: int, draws: int) -> np.ndarray:
    """[positions, draws] uniforms in [0, 1) for one sequence, from the dump seed and its sample id only."""
    key = int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, key]).random((positions, draws), dtype=np.float32)


def draw_off_head(weights: torch.Tensor, logprobs: torch.Tensor, log_tail: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws [P, N] token ids from each row's off-head distribution and their log-probs under the full one.

    `weights` [P, V]: proportional to the teacher's probabilities off the head, 0 on it (overwritten: it becomes
    its running sum); `logprobs` [P, V]: the full log-probs; `log_tail` [P]: log m. Rows with no mass off the
    head (m = 0) draw id −1 and log-prob −inf."""
    has_tail = torch.isfinite(log_tail)
    cdf = weights.cumsum_(-1)  # in place: one [P, V] buffer
    ids = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True)
    # Rounding can put u·total at the very end: such a draw belongs to the last id with mass.
    last = (cdf < cdf[:, -1:]).sum(-1, keepdim=True).clamp(max=logprobs.shape[1] - 1)
    ids = torch.minimum(ids, last)
    drawn = logprobs.gather(1, ids)
    ids = torch.where(has_tail[:, None], ids, torch.full_like(ids, -1))
    return ids, torch.where(has_tail[:, None], drawn, torch.full_like(drawn, -torch.inf))


def distinct_draws(ids: np.ndarray, logprobs: np.ndarray) -> TailSamples:
    """[P, N] draws -> each position's distinct ids with their counts, sorted by descending log-prob (the
    order the compact codec needs); positions that drew nothing (id −1) keep no entries."""
    positions, n = ids.shape
    order = np.lexsort((ids, -logprobs.astype(np.float64)), axis=1) if n else np.zeros((positions, 0), np.int64)
    ids, logprobs = np.take_along_axis(ids, order, 1), np.take_along_axis(logprobs, order, 1)
    new = np.ones_like(ids, dtype=bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    new &= ids >= 0
    runs = np.flatnonzero(new.ravel())
    # A run of equal ids ends at the next run's start or at its row's end, whichever comes first (rows that drew
    # nothing have no runs, so the next start may lie rows further on).
    row_ends = (runs // max(n, 1) + 1) * n
    draws = np.minimum(np.append(runs[1:], ids.size), row_ends) - runs
    return TailSamples(counts=new.sum(1).astype(np.int64), ids=ids.ravel()[runs], draws=draws,
                       logprobs=logprobs.ravel()[runs].astype(np.float32))
