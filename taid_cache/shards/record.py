"""What the shard writer consumes (an engine's output): one sequence with its teacher's top-k (and, for a --tail-samples
cache, the draws off it; for a --target-logprobs cache, the log-prob of each actual next token), as numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TailSamples:
    """Draws from the teacher off the head (`--tail-samples`, engines/tail_sampling.py), flat over positions."""

    counts: np.ndarray  # [T-1] distinct ids drawn at each position (0 where the head holds all the mass)
    ids: np.ndarray  # [Σ counts] the distinct ids, position after position
    draws: np.ndarray  # [Σ counts] how often each was drawn: they sum to N at every position that drew
    logprobs: np.ndarray  # [Σ counts] float32 log p under the full distribution, descending within a position


@dataclass
class TeacherRecord:
    """One sequence with its teacher's top-k: row j of the top-k arrays is the distribution of token j+1."""

    sample_id: str
    input_ids: np.ndarray  # [T] int
    loss_mask: np.ndarray  # [T] bool
    topk_ids: np.ndarray  # [T-1, k] int, by descending log-prob; −1 past the entries --top-p keeps
    topk_logprobs: np.ndarray  # [T-1, k] float32, normalised over the full vocabulary; −inf past the kept entries
    tail_logmass: np.ndarray  # [T-1] float32: log of the mass off the kept entries (−inf when they hold it all)
    entropy: np.ndarray  # [T-1] the teacher's entropy at loss positions (NaN elsewhere): the fidelity report
    samples: TailSamples | None = None  # the sampled tail of a --tail-samples cache
    # [T-1] float32 (--target-logprobs): the exact log-prob of the actual next token input_ids[j+1], in or off the head
    target_logprob: np.ndarray | None = None
