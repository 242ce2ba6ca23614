"""Sparse teachers, as a cache holds them, and the losses that read them without a dense [N, V] teacher.

`TopKTeacher`: the top-k log-probs and the exact mass off them; `rebuild_teacher` spreads that mass by a tail
mode into dense log-probs for any loss of dense.py. `SampledTeacher`: a head plus N draws off it, an unbiased
estimate of the rest (`--tail-samples`), read by every loss a sampled tail serves through one helper,
`SampledTeacher.weights`. `taid_sparse` is TAID in closed form against either (value and gradient, one exp pass
over [N, V]). docs/LOSSES.md has the maths."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F

def rows_of(teacher, rows: slice):
    """The same teacher at a slice of its positions (every tensor field sliced along its first axis)."""
    return replace(teacher, **{f.name: v[rows] for f in fields(teacher) if isinstance(v := getattr(teacher, f.name), torch.Tensor)})


@dataclass
class DenseTeacher:
    """Full teacher log-probs [N, V] (a teacher run in-process)."""

    logprobs: torch.Tensor

    def __getitem__(self, rows: slice) -> DenseTeacher:
        return rows_of(self, rows)

    def top1(self) -> torch.Tensor:
        return self.logprobs.argmax(-1)


@dataclass
class TopKTeacher:
    """A cached top-k teacher at N positions: ids [N, k] (−1 where unused), log-probs [N, k], the exact log of the
    mass off them [N] (None: taken as 1 − Σ top-k), the vocabulary rows the student shares with it, the
    mode `tail` that spreads the missing mass (`rebuild_teacher`), and the exact log-prob of each position's actual
    next token [N] (a --target-logprobs cache; None without: what opd reads)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logmass: torch.Tensor | None
    valid_vocab: int
    tail: str = "student"
    target_logprob: torch.Tensor | None = None

    def __getitem__(self, rows: slice) -> TopKTeacher:
        return rows_of(self, rows)

    def dense(self, student_logits: torch.Tensor) -> torch.Tensor:
        return rebuild_teacher(student_logits, self.ids, self.logprobs, self.tail, self.valid_vocab, self.tail_logmass)

    def top1(self) -> torch.Tensor:
        return self.ids[:, 0]


@dataclass
class SampledTeacher:
    """A head + sampled tail at N positions: the head as in `TopKTeacher` ([N, k], with its exact tail mass m), and
    the draws off it ([N, S]: distinct ids, −1 where unused; how often each was drawn; their exact log-probs); the
    actual next token's exact log-prob as in `TopKTeacher`."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logmass: torch.Tensor
    sample_ids: torch.Tensor
    sample_draws: torch.Tensor
    sample_logprobs: torch.Tensor
    valid_vocab: int
    target_logprob: torch.Tensor | None = None

    def __getitem__(self, rows: slice) -> SampledTeacher:
        return rows_of(self, rows)

    def estimate(self, temperature: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher as one sparse estimate p̂: (ids, log ŵ, ℓ), each [N, k + S].

        ŵ: the head's exact p (rescaled to 1 − m, `split_teacher`) and m·c/N for a token drawn c of N times, so
        E[ŵ_v] = p_v for every token and Σ ŵ = 1. ℓ: each entry's exact log p (equal to log ŵ on the head).
        Unused slots: id −1, −inf.

        At temperature τ, of p_τ ∝ p^(1/τ): the head's p^(1/τ) exactly, and m·c/N · p^(1/τ − 1) at a draw, an
        unbiased estimate of p_v^(1/τ) (E[c_v] = N p_v / m), so their sum estimates Σ_v p_v^(1/τ) without bias;
        both are then divided by that sum (ℓ likewise), which is consistent, not unbiased (docs/LOSSES.md)."""
        head, _ = split_teacher(self.logprobs, self.ids >= 0, self.tail_logmass)
        draws = self.sample_draws.float()
        total = draws.sum(-1, keepdim=True).clamp(min=1e-30)
        sampled = torch.where(draws > 0, self.tail_logmass.float()[:, None] + draws.log() - total.log(), -math.inf)
        ids = torch.cat([self.ids.long(), self.sample_ids.long()], -1)
        log_w, ell = torch.cat([head, sampled], -1), torch.cat([head, self.sample_logprobs.float()], -1)
        if isinstance(temperature, (int, float)) and temperature == 1:
            return ids, log_w, ell
        inverse = 1.0 / temperature
        log_w = torch.where(torch.isfinite(log_w), log_w + (inverse - 1.0) * ell.nan_to_num(neginf=0.0), log_w)
        log_z = log_w.logsumexp(-1, keepdim=True).nan_to_num(0.0, neginf=0.0)
        return ids, log_w - log_z, ell * inverse - log_z

    def weights(self, temperature: float | torch.Tensor = 1.0) -> Weights:
        """The estimate at `temperature` as the losses read it: its entries' weights normalised over the usable ones
        (an id below `valid_vocab` with a finite ŵ; 0 elsewhere, and in a row with none), with their exact log-probs
        ℓ. The one gather and softmax over the cache that the sampled FKL, DKD and CTKD share."""
        ids, log_w, ell = self.estimate(temperature)
        usable = (ids >= 0) & (ids < self.valid_vocab) & torch.isfinite(log_w)
        has_any = usable.any(-1, keepdim=True)
        w = torch.where(has_any, torch.softmax(torch.where(has_any, log_w.masked_fill(~usable, -math.inf), 0.0), -1), 0.0)
        return Weights(ids, w, ell, usable)

    def top1(self) -> torch.Tensor:
        """The estimate's largest entry: the head's first (a head of 0 entries: the most drawn token)."""
        ids, log_w, _ = self.estimate()
        return ids.gather(1, log_w.argmax(-1, keepdim=True))[:, 0]


class Weights(NamedTuple):
    """`SampledTeacher.weights`: per entry [N, k + S] its id (−1 unused), normalised weight, exact log-prob ℓ, and
    whether it is usable."""

    ids: torch.Tensor
    w: torch.Tensor
    ell: torch.Tensor
    usable: torch.Tensor

    def at(self, values: torch.Tensor) -> torch.Tensor:
        """`values` [N, V] (the student's log-probs, say) at each entry's id; unused entries read a column to mask."""
        return values.gather(1, self.ids.clamp(0, values.shape[1] - 1))


SparseTeacher = Union[TopKTeacher, SampledTeacher]


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x ≤ 0, accurate at both ends (−inf at x = 0)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def head_logprobs(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Stored log-probs as a head whose mass is at most 1: rounding (a quantised cache, a bf16 teacher) can make
    a confident teacher's entries sum past 1, and the tail and every loss need 1 − Σ ≥ 0. Such rows are
    renormalised; −inf (unused) entries stay −inf."""
    lps = topk_logprobs.float()
    excess = torch.logsumexp(lps, -1, keepdim=True).clamp(min=0.0).nan_to_num(0.0)  # NaN only for all −inf rows
    return lps - excess


def split_teacher(topk_logprobs: torch.Tensor, usable: torch.Tensor, tail_logmass: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse teacher as (head log-probs [N, k], −inf where not usable; log of the mass off the head [N]),
    the two summing to 1.

    With the cache's exact tail mass m (`tail_logmass`, log m), the tail is m and the stored entries are
    rescaled to hold 1 − m together (their quantisation error moves into the head, never into the tail).
    Without it (a caller's own top-k), the tail is 1 − Σ stored, after `head_logprobs`. Entries that are not
    usable (unused slots, ids the student lacks) join the tail."""
    lps = topk_logprobs.float()
    if tail_logmass is None:
        lps = head_logprobs(lps)
        log_tail = log1mexp(torch.logsumexp(lps, -1).clamp(max=0.0))
    else:
        log_tail = tail_logmass.float()
        stored = torch.logsumexp(lps, -1)
        # Rescale to 1 − m: where m = 1 the shift is +inf and the head holds nothing (never more than 1 in all);
        # a row with no stored entry has nothing to rescale.
        shift = torch.where(torch.isfinite(stored), stored - log1mexp(log_tail), torch.zeros_like(stored))
        lps = lps - shift[:, None]
    dropped = lps.masked_fill(usable, -math.inf)
    log_tail = torch.logaddexp(log_tail, torch.logsumexp(dropped, -1))
    return lps.masked_fill(~usable, -math.inf), log_tail


def rebuild_teacher(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, tail: str, valid_vocab: int,
    tail_logmass: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense teacher log-probs [N, V] (V = student rows) from top-k [N, k] (id −1 / −inf where unused).

    The missing mass m (the cache's exact `tail_logmass` = log m, else 1 − Σ top-k probs; `split_teacher`)
    goes to the other tokens below `valid_vocab`:
    `student`: in proportion to the student's detached probabilities; `uniform`: evenly; `renorm`: nowhere
    (the top-k are renormalised). Rows at or beyond `valid_vocab` (an LM head padded past the tokenizer, or
    ids the student does not have) get no teacher mass.
    """
    n, vocab = student_logits.shape
    ids = topk_ids.long()
    usable = (ids >= 0) & (ids < valid_vocab)
    lps, log_tail = split_teacher(topk_logprobs, usable, tail_logmass)
    log_tail = log_tail[:, None]  # −inf when the head holds everything
    ids = torch.where(usable, ids, torch.full_like(ids, vocab))  # parked in an extra column, dropped below
    in_vocab = torch.arange(vocab + 1, device=student_logits.device) < valid_vocab
    if tail == "renorm":
        dense = torch.full((n, vocab + 1), -math.inf, device=student_logits.device)
        return dense.scatter(1, ids, lps - torch.logsumexp(lps, -1, keepdim=True))[:, :vocab]
    if tail == "uniform":
        others = (valid_vocab - usable.sum(-1, keepdim=True)).clamp(min=1)
        background = (log_tail - others.float().log()).expand(n, vocab + 1)
    else:
        log_q = F.log_softmax(student_logits.detach().float().masked_fill(~in_vocab[:vocab], -math.inf), -1)
        log_q = F.pad(log_q, (0, 1), value=-math.inf)
        q_topk = log_q.gather(1, ids).exp().sum(-1, keepdim=True)
        background = log_tail + log_q - torch.log1p(-q_topk.clamp(max=1 - 1e-7))
    dense = torch.where(in_vocab, background, torch.full_like(background, -math.inf))
    return dense.scatter(1, ids, lps)[:, :vocab]


def taid_sparse(student_logits: torch.Tensor, teacher: SparseTeacher, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TAID per position against a sparse teacher, in closed form: (loss, its gradient with respect to the logits).

    The target keeps TAID's geometric interpolation p_t ∝ q^(1−t) p^t where the cache is exact: over the head
    tokens and over the tail's total, the bucket m^t Q^(1−t) (m the teacher's mass off the head, Q the
    student's). Inside the bucket the tail's shape is the student's, q/Q, for a `TopKTeacher` (its `student`
    tail mode: exactly `taid(s, rebuild_teacher(s, ..., "student"), t)`), and (1−t)·q/Q + t·r̂ for a
    `SampledTeacher`, r̂ the draws' shape: linear in the draws, so estimated without bias; exact at t = 1 (FKL's
    estimate) and wherever the teacher's tail is shaped like the student's (docs/LOSSES.md). Off the head the
    student part is c·q_v with one c per row, so only the head, the draws and a few per-row sums need their own
    maths: one exp pass over [N, V] besides the log-sum-exp, like CE. Loss −Σ target·log q, gradient q − target.
    """
    if isinstance(teacher, TopKTeacher) and teacher.tail != "student":
        raise ValueError(f"taid_sparse spreads the tail like the student; the tail mode {teacher.tail!r} needs rebuild_teacher")
    s = student_logits.detach().float()
    n, vocab = s.shape
    valid = teacher.valid_vocab
    ids = teacher.ids.long()
    usable = (ids >= 0) & (ids < valid)
    lps, log_tail = split_teacher(teacher.logprobs, usable, teacher.tail_logmass)
    rows = torch.arange(n, device=s.device)[:, None].expand_as(ids)[usable]
    cols = ids[usable]

    lse = torch.logsumexp(s, -1)
    q = s.sub(lse[:, None]).exp_()  # the student's probabilities; becomes the gradient in place
    gather_at = ids.clamp(0, vocab - 1)  # unusable entries read a harmless column and are masked
    q_k = q.gather(1, gather_at).masked_fill(~usable, 0.0)
    s_k = s.gather(1, gather_at)
    q[rows, cols] = 0.0  # q now holds the student's mass off the head
    off = q[:, :valid]
    q_off = off.sum(-1)  # Q: the student's mass off the head, below valid_vocab
    dot_off = torch.linalg.vecdot(off, s[:, :valid])

    # The draws' shape r̂ (counts over the usable draws) and its weight in the tail's shape: t where there is one.
    if isinstance(teacher, SampledTeacher):
        draw_ids = teacher.sample_ids.long()
        drawn = (draw_ids >= 0) & (draw_ids < valid) & (teacher.sample_draws > 0) & torch.isfinite(teacher.tail_logmass.float())[:, None]
        counts = teacher.sample_draws.float().masked_fill(~drawn, 0.0)
        has_draws = drawn.any(-1)
        r_hat = counts / counts.sum(-1, keepdim=True).clamp(min=1e-30)
        draw_at = draw_ids.clamp(0, vocab - 1)
        mix = torch.where(has_draws, t, 0.0)
    else:
        has_draws, mix = torch.zeros(n, dtype=torch.bool, device=s.device), torch.zeros(n, device=s.device)

    # Unnormalised log p_t relative to the student's log-sum-exp: the bucket t·log m + (1−t)·log Q (log Q over the
    # valid rows, shifted consistently); on the head, (1−t)·s_k + t·ℓ_k. A bucket needs a shape to fill: the
    # student's (Q > 0), or the draws' alone at t = 1.
    has_off = q_off > 0
    log_q_off = torch.log(torch.where(has_off, q_off, torch.ones_like(q_off)))
    log_bucket = (t * log_tail if t > 0 else 0.0) + (1 - t) * (lse + log_q_off)
    log_bucket = torch.where(has_off | (has_draws & (t == 1)), log_bucket, -math.inf)
    z_k = ((1 - t) * s_k + (t * lps if t > 0 else 0.0)).masked_fill(~usable, -math.inf)
    lse_z = torch.logaddexp(log_bucket, torch.logsumexp(z_k, -1))
    p_k = torch.exp(z_k - lse_z[:, None])  # p_t on the head (0 where unused)
    bucket = torch.exp(log_bucket - lse_z).nan_to_num(0.0)
    c = torch.where(has_off, bucket * (1 - mix) / torch.where(has_off, q_off, torch.ones_like(q_off)), 0.0)  # target = c·q off the head

    loss = lse - c * dot_off - (p_k * s_k.masked_fill(~usable, 0.0)).sum(-1)
    off.mul_(1 - c[:, None])  # the gradient q − target: off the head; rows past valid_vocab keep q (no target there)
    q[rows, cols] = (q_k - p_k)[usable]
    if isinstance(teacher, SampledTeacher):
        to_draws = (bucket * mix)[:, None] * r_hat
        loss = loss - (to_draws * s.gather(1, draw_at)).sum(-1)
        q.scatter_add_(1, draw_at, -to_draws)
    return loss, q
