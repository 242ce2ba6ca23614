"""The one head path: an engine's hidden states -> everything a cache holds, the same for every engine.

Chunk by chunk of positions (so a [positions, vocab] float32 tensor never exists for a whole batch): the LM head
(`heads.LmHead`: bias, scale, soft-cap), the log-softmax, the top-k, cut per position by --top-p, the exact mass
off the stored entries, the teacher's entropy at loss positions (the fidelity report), for a
--tail-samples cache the draws off the head (`tail_sampling.py`) and, for a --target-logprobs cache, the log-prob
of each position's actual next token (gathered from the same float32 log-softmax: no further [P, V] pass). The results stay on the device until the
writer thread copies them out (`HeadBatch.materialize`), so the engine computes the next batch meanwhile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..heads import LmHead
from ..inputs import Sequence
from ..shards.record import TeacherRecord
from .base import Engine
from .tail_sampling import distinct_draws, draw_off_head, sequence_uniforms

# The default chunk keeps each [chunk, vocab] float32 buffer within 128 MiB (about three are alive at once).
CHUNK_ELEMENTS = 2**25


@dataclass(frozen=True)
class HeadSettings:
    top_k: int
    top_p: float | None = None  # keep the fewest of the top-k whose mass reaches top_p
    tail_samples: int = 0  # draws off the head per position
    seed: int = 0  # of those draws
    chunk: int | None = None  # positions per LM-head chunk; None: CHUNK_ELEMENTS // vocab
    target_logprobs: bool = False  # also the log-prob of each position's actual next token

    def positions_per_chunk(self, vocab: int) -> int:
        return self.chunk or max(1, CHUNK_ELEMENTS // vocab)


def log_softmax_and_probs(logits: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[P, V] logits -> (log-probs, overwriting `logits`; probabilities, into the buffer `probs`): one exp pass
    for both, and no fresh [P, V] allocation."""
    top = logits.amax(-1, keepdim=True)
    probs = torch.sub(logits, top, out=probs).exp_()
    total = probs.sum(-1, keepdim=True)
    return logits.sub_(top + total.log()), probs.div_(total)


def tail_and_entropy(logprobs: torch.Tensor, probs: torch.Tensor, indices: torch.Tensor, targets: torch.Tensor,
                     kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From [P, V] log-probs ℓ, their probabilities p (overwritten: they become the draws' weights) and the
    stored head (`indices` [P, k], of which `kept` [P, k] when --top-p cuts it: the others stay in the tail),
    three things:
    - the log of the mass m off the stored entries, summed directly over the other ids (1 − Σ head cancels
      catastrophically for a confident teacher); rows where that float32 sum nears underflow (m < 1e-30, where
      the summed terms lose their relative precision) are redone as a log-sum-exp of ℓ;
    - the entropy −Σ p ℓ at the `targets` rows (NaN elsewhere): the fidelity report covers loss positions
      only, so only they pay for it. A batched BLAS dot: several times faster on CPU than `vecdot`;
    - the off-head weights (p with the stored head zeroed; ∝ p for the underflow rows) that the draws need.
    Returns (log m, entropy, off-head weights); `logprobs` is left as it is."""
    every = bool(targets.all())
    picked_p, picked_l = (probs, logprobs) if every else (probs[targets], logprobs[targets])  # text rows: no copy
    picked_entropy = -torch.bmm(picked_p[:, None, :], picked_l[:, :, None]).flatten()
    odd = picked_entropy.isnan()  # rows with a −inf logit (0 · −inf): rare, so redone with 0 · log 0 = 0
    if bool(odd.any()):
        picked_entropy[odd] = torch.special.entr(picked_p[odd]).sum(-1)
    entropy = torch.full(logprobs.shape[:1], math.nan, device=logprobs.device)
    entropy[targets] = picked_entropy
    # log p the head's slots keep in the tail: −inf (removed) for a stored entry, its own for one top-p dropped.
    off_head = None if kept is None else torch.where(kept, -math.inf, logprobs.gather(-1, indices))
    weights = probs.scatter_(-1, indices, 0.0) if off_head is None else probs.scatter_(-1, indices, off_head.exp())
    tail = weights.sum(-1).log()
    small = tail < math.log(1e-30)
    if bool(small.any()):
        off = logprobs[small].scatter(-1, indices[small], -math.inf if off_head is None else off_head[small])
        tail[small] = off.logsumexp(-1)
        scale = torch.where(torch.isfinite(tail[small]), tail[small], torch.zeros_like(tail[small]))
        weights[small] = torch.exp(off - scale[:, None])
    return tail, entropy, weights


def top_p_kept(values: torch.Tensor, top_p: float) -> torch.Tensor:
    """[P, k] log-probs sorted descending -> which entries to keep: the fewest per row whose mass reaches top_p
    (all k where it never does), summed in float64."""
    cum = values.double().exp().cumsum(-1)
    counts = ((cum < top_p).sum(-1, keepdim=True) + 1).clamp(max=values.shape[1])
    return torch.arange(values.shape[1], device=values.device) < counts


@dataclass
class HeadBatch:
    """One batch's head results, concatenated over its positions and still on the device."""

    sequences: list[Sequence]
    ids: torch.Tensor  # [P, k] by descending log-prob; −1 past what --top-p keeps
    logprobs: torch.Tensor  # [P, k] normalised over the full vocabulary; −inf past what --top-p keeps
    tail_logmass: torch.Tensor  # [P] log of the exact mass off the stored entries
    entropy: torch.Tensor  # [P] at loss positions, NaN elsewhere
    sample_ids: torch.Tensor  # [P, N] draws off the head (N = --tail-samples, may be 0)
    sample_logprobs: torch.Tensor  # [P, N] their log-probs under the full distribution
    target_logprob: torch.Tensor | None = None  # [P] (--target-logprobs) log p of the actual next token

    def materialize(self) -> list[TeacherRecord]:
        """Copy out and split into one record per sequence (runs in the writer thread)."""
        ids, lps, tails, entropy, sample_ids, sample_lps = (x.cpu().numpy() for x in (
            self.ids, self.logprobs, self.tail_logmass, self.entropy, self.sample_ids, self.sample_logprobs))
        targets = None if self.target_logprob is None else self.target_logprob.cpu().numpy()
        records, at = [], 0
        for seq in self.sequences:
            n = len(seq.input_ids) - 1
            samples = distinct_draws(sample_ids[at : at + n], sample_lps[at : at + n]) if sample_ids.shape[1] else None
            records.append(TeacherRecord(seq.sample_id, seq.input_ids, seq.loss_mask, ids[at : at + n], lps[at : at + n],
                                         tails[at : at + n], entropy[at : at + n], samples,
                                         None if targets is None else targets[at : at + n]))
            at += n
        return records


@torch.inference_mode()
def apply_head(head: LmHead, hidden: torch.Tensor, sequences: list[Sequence], settings: HeadSettings) -> HeadBatch:
    """The head path over a batch: `hidden` [P, H] holds, sequence after sequence, the final hidden state at each
    position that predicts a token of its own sequence (P = Σ (len − 1)), as `Engine.hidden_states` gives it."""
    device = head.weight.device
    targets = torch.from_numpy(np.concatenate([s.loss_mask[1:] for s in sequences]).astype(bool)).to(device)
    n = settings.tail_samples
    # Per-sequence generators only when there is something to draw: a plain top-k dump pays nothing for them.
    uniforms = torch.from_numpy(np.concatenate([sequence_uniforms(settings.seed, s.sample_id, len(s.input_ids) - 1, n)
                                                for s in sequences])) if n else torch.zeros(hidden.shape[0], 0)
    uniforms = uniforms.to(device)
    # The token each position predicts (row j: input_ids[j+1]), for --target-logprobs only.
    next_ids = torch.from_numpy(np.concatenate([np.asarray(s.input_ids[1:], dtype=np.int64) for s in sequences])).to(device) \
        if settings.target_logprobs else torch.zeros(hidden.shape[0], 0, dtype=torch.int64, device=device)
    columns: tuple[list[torch.Tensor], ...] = ([], [], [], [], [], [], [])  # HeadBatch's tensors, one entry per chunk
    vocab = head.weight.shape[0]
    size = settings.positions_per_chunk(vocab)
    # Two [chunk, V] buffers reused by every chunk of the batch: the logits (then log-probs) and the probabilities.
    logits_buffer, probs_buffer = (torch.empty(min(size, len(hidden)), vocab, device=device) for _ in range(2))
    for chunk, chunk_targets, chunk_uniforms, chunk_next in zip(hidden.split(size), targets.split(size), uniforms.split(size),
                                                                next_ids.split(size)):
        rows = len(chunk)
        logprobs, probs = log_softmax_and_probs(head.logits(chunk, logits_buffer[:rows]), probs_buffer[:rows])
        # The float32 log-prob of the actual next token, from the values the tail mass is summed from: P gathers.
        target = logprobs.gather(-1, chunk_next[:, None]).squeeze(-1) if settings.target_logprobs else None
        values, indices = logprobs.topk(settings.top_k, dim=-1, sorted=True)
        kept = None if settings.top_p is None else top_p_kept(values, settings.top_p)
        tail, entropy, weights = tail_and_entropy(logprobs, probs, indices, chunk_targets, kept)
        sample_ids, sample_lps = draw_off_head(weights, logprobs, tail, chunk_uniforms) if n else (indices[:, :0], values[:, :0])
        if kept is not None:
            indices, values = indices.masked_fill(~kept, -1), values.masked_fill(~kept, -math.inf)
        for column, value in zip(columns, (indices, values, tail, entropy, sample_ids, sample_lps, target)):
            if value is not None:
                column.append(value)
    return HeadBatch(sequences, *(torch.cat(column) if column else None for column in columns))


def teacher_batch(engine: Engine, sequences: list[Sequence], settings: HeadSettings) -> HeadBatch:
    """A batch through the engine's backbone, then the head path."""
    return apply_head(engine.head, engine.hidden_states(sequences), sequences, settings)
