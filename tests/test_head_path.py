"""The one head path every engine's hidden states go through (engines/head_path.py), against dense float64
references: top-k, the --top-p cut, the exact tail mass, the entropy and the draws, chunk size irrelevant."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from taid_cache.engines.head_path import HeadSettings, apply_head, log_softmax_and_probs, tail_and_entropy, top_p_kept
from taid_cache.engines.tail_sampling import sequence_uniforms
from taid_cache.heads import LmHead, LogitMap
from taid_cache.inputs import Sequence



@pytest.mark.parametrize("every_position", [True, False])
@pytest.mark.parametrize("top_p", [None, 0.7])
def test_tail_and_entropy_against_float64(every_position: bool, top_p: float | None) -> None:
    torch.manual_seed(0)
    logits = torch.randn(12, 300, dtype=torch.float64) * 4
    logits[3, 7] = -torch.inf  # a token the model rules out: 0 · log 0 counts 0
    logits[6, 8:] = logits[6, :8].min() - 200  # a tail of e^-200: its terms underflow float32
    reference = torch.log_softmax(logits, -1)
    targets = torch.ones(12, dtype=torch.bool) if every_position else torch.arange(12) % 3 == 0
    values, indices = reference.topk(8, -1)
    kept = None if top_p is None else top_p_kept(values.float(), top_p)
    tail, entropy, weights = tail_and_entropy(reference.float(), reference.float().exp(), indices, targets, kept)
    stored = indices if kept is None else indices.masked_fill(~kept, -1)
    off = reference.clone()
    for row, ids in enumerate(stored.tolist()):
        off[row, [i for i in ids if i >= 0]] = -torch.inf
    expected_tail = off.logsumexp(-1)
    expected_entropy = -(reference.exp() * reference.nan_to_num(neginf=0.0)).sum(-1)
    torch.testing.assert_close(tail.double(), expected_tail, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy[targets].double(), expected_entropy[targets], atol=1e-5, rtol=1e-5)
    assert entropy[~targets].isnan().all()
    # The draws' weights: the distribution off the stored entries up to a factor per row, nothing on them.
    expected_r = (off - expected_tail[:, None]).exp()
    torch.testing.assert_close((weights / weights.sum(-1, keepdim=True)).double(), expected_r, atol=1e-6, rtol=1e-4)
    if kept is not None:
        assert (~kept).any() and kept[:, 0].all()  # the cut varies and never drops the top entry


def test_log_softmax_and_probs_in_place() -> None:
    logits = torch.randn(5, 40) * 6
    logits[1, 3] = -torch.inf  # a token the model rules out
    expected = torch.log_softmax(logits, -1)
    buffer = torch.empty(5, 40)
    logprobs, probs = log_softmax_and_probs(logits.clone(), buffer)
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(probs, expected.exp(), atol=1e-7, rtol=1e-6)
    assert probs.data_ptr() == buffer.data_ptr()  # written into the buffer, not a fresh block


def test_top_p_keeps_the_fewest_entries_reaching_p() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=rng.uniform(0.5, 8.0, size=(200, 1)), size=(200, 40))
    lp = np.sort(logits - np.logaddexp.reduce(logits, axis=1, keepdims=True), axis=1)[:, ::-1][:, :16].astype(np.float32)
    for p in (0.3, 0.9, 0.99, 1.0):
        got = top_p_kept(torch.from_numpy(lp.copy()), p).sum(1).numpy()
        for row, n in zip(lp, got):
            total, expected = 0.0, len(row)
            for i, v in enumerate(row):  # a direct scan in float64
                total += float(np.exp(np.float64(v)))
                if total >= p:
                    expected = i + 1
                    break
            assert n == expected


def random_batch(vocab: int, hidden: int) -> tuple[LmHead, torch.Tensor, list[Sequence]]:
    """A soft-capped head with a bias over peaked logits, and three sequences' hidden states."""
    gen = torch.Generator().manual_seed(3)
    head = LmHead(torch.randn(vocab, hidden, generator=gen) * 2.5, torch.randn(vocab, generator=gen), LogitMap(0.5, 30.0))
    lengths = [9, 2, 14]
    sequences = [Sequence(f"s{i}", np.arange(n) % vocab, np.arange(n) % 3 != 0) for i, n in enumerate(lengths)]
    return head, torch.randn(sum(n - 1 for n in lengths), hidden, generator=gen), sequences


@pytest.mark.parametrize("top_p", [None, 0.8])
def test_apply_head_against_a_dense_reference(top_p: float | None) -> None:
    vocab, k, draws = 300, 6, 0 if top_p else 32
    head, hidden, sequences = random_batch(vocab, 16)
    settings = HeadSettings(k, top_p, draws, seed=5, chunk=7)  # chunks straddle the sequences
    out = apply_head(head, hidden, sequences, settings)
    z = hidden.double() @ head.weight.double().T + head.bias.double()
    reference = torch.log_softmax(30.0 * torch.tanh(0.5 * z / 30.0), -1)
    values, indices = reference.topk(k, -1)
    kept = torch.ones_like(indices, dtype=torch.bool) if top_p is None else top_p_kept(values, top_p)
    assert out.ids.shape == (len(hidden), k)
    np.testing.assert_array_equal(out.ids.numpy(), indices.masked_fill(~kept, -1).numpy())
    torch.testing.assert_close(out.logprobs.double(), values.masked_fill(~kept, -math.inf), atol=2e-5, rtol=0)
    p = reference.exp()
    expected_tail = (p.sum(-1) - torch.where(kept, values.exp(), 0.0).sum(-1)).log()
    torch.testing.assert_close(out.tail_logmass.double(), expected_tail, atol=1e-5, rtol=1e-5)
    targets = torch.from_numpy(np.concatenate([s.loss_mask[1:] for s in sequences]))
    torch.testing.assert_close(out.entropy[targets].double(), -(p * reference).sum(-1)[targets], atol=1e-4, rtol=1e-5)
    assert out.entropy[~targets].isnan().all()
    # The same batch in one chunk gives the same results: the chunking is only about memory.
    whole = apply_head(head, hidden, sequences, HeadSettings(k, top_p, draws, seed=5))
    for a, b in zip((out.ids, out.sample_ids), (whole.ids, whole.sample_ids)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    if draws:
        # Each draw is the inverse CDF of the off-head distribution at the uniform of (seed, sample, position).
        uniforms = np.concatenate([sequence_uniforms(5, s.sample_id, len(s.input_ids) - 1, draws) for s in sequences])
        off = p.scatter(1, indices, 0.0)
        cdf = (off.cumsum(-1) / off.sum(-1, keepdim=True)).numpy()
        expected = np.stack([np.searchsorted(row, u.astype(np.float64), side="right") for row, u in zip(cdf, uniforms)])
        assert (out.sample_ids.numpy() == expected).mean() >= 0.99
        torch.testing.assert_close(out.sample_logprobs.double(), reference.gather(1, out.sample_ids), atol=2e-5, rtol=0)


def test_materialize_splits_per_sequence() -> None:
    head, hidden, sequences = random_batch(200, 8)
    out = apply_head(head, hidden, sequences, HeadSettings(4, None, 8, seed=0))
    records = out.materialize()
    assert [r.sample_id for r in records] == [s.sample_id for s in sequences]
    at = 0
    for rec, seq in zip(records, sequences):
        n = len(seq.input_ids) - 1
        np.testing.assert_array_equal(rec.topk_ids, out.ids[at : at + n].numpy())
        np.testing.assert_array_equal(rec.tail_logmass, out.tail_logmass[at : at + n].numpy())
        assert rec.samples.counts.shape == (n,) and (rec.samples.draws.sum() == 8 * n)
        at += n


def test_a_top_k_only_dump_never_runs_the_draw_code(monkeypatch) -> None:
    """Without --tail-samples, no chunk calls `draw_off_head` (its in-place [P, V] cumsum and searchsorted): a
    local reused for the chunk's length once made every non-empty chunk draw nothing at that cost."""
    from taid_cache.engines import head_path

    calls = []
    real = head_path.draw_off_head
    monkeypatch.setattr(head_path, "draw_off_head", lambda *args: calls.append(1) or real(*args))
    head, hidden, sequences = random_batch(300, 16)
    plain = apply_head(head, hidden, sequences, HeadSettings(6, None, 0, seed=5, chunk=7))
    assert calls == [] and plain.sample_ids.shape == (len(hidden), 0)
    apply_head(head, hidden, sequences, HeadSettings(6, None, 8, seed=5, chunk=7))
    assert len(calls) == math.ceil(len(hidden) / 7)  # with draws: once per chunk
