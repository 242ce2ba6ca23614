"""bf16 as an explicit choice: the chunked loss (closed form included) in bf16, every loss trains in bf16, and
bf16 per-step losses track fp32's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import CACHE_LOSSES
from taid_cache.config import TrainConfig
from taid_cache.losses import ChunkLoss, TopKTeacher, chunked_lm_loss, taid_sparse
from taid_cache.pipelines.train_student import train_student
from taid_cache.training.metrics import read_metrics

# bf16 keeps 8 bits of mantissa: one rounding is 2^-9 relative; sums of many such errors partly cancel.
BF16_GRAD_REL = 2e-2
# Per-step losses of a bf16 and an fp32 run of the same 20 steps: measured at most 4e-5 relative here (the
# loss averages rounding errors over ~2,000 positions a step); the bound leaves 25x room for other CPUs.
BF16_LOSS_REL = 1e-3


def closed_form(ids: torch.Tensor, lps: torch.Tensor, vocab: int):
    def fn(logits: torch.Tensor, sl: slice):
        value, grad = taid_sparse(logits, TopKTeacher(ids[sl], lps[sl], None, vocab), 0.6)
        return ChunkLoss(value.sum(), value.sum(), grad)

    return fn


@pytest.mark.parametrize("chunk", [7, 64])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])])
def test_chunked_closed_form_taid_in_bf16_matches_fp32(chunk: int, device: str) -> None:
    torch.manual_seed(0)
    n, hidden, vocab, k = 50, 32, 300, 8
    h32 = torch.randn(n, hidden).to(device)
    w32 = (torch.randn(vocab, hidden) * 0.3).to(device)
    lps, ids = (x.to(device) for x in torch.log_softmax(torch.randn(n, vocab) * 4, -1).topk(k, -1))
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        h = h32.to(dtype).clone().requires_grad_()
        w = w32.to(dtype).clone().requires_grad_()
        combined, _ = chunked_lm_loss(h, w, closed_form(ids, lps, vocab), chunk)
        combined.backward()
        assert h.grad.dtype == dtype and w.grad.dtype == dtype
        grads[dtype] = (combined.item(), h.grad.float(), w.grad.float())
    (v32, gh32, gw32), (v16, gh16, gw16) = grads[torch.float32], grads[torch.bfloat16]
    assert v16 == pytest.approx(v32, rel=BF16_GRAD_REL)
    assert (gh16 - gh32).norm() <= BF16_GRAD_REL * gh32.norm()
    assert (gw16 - gw32).norm() <= BF16_GRAD_REL * gw32.norm()


def run(student: Path, cache: Path, out: Path, **kw) -> list[dict]:
    train_student(TrainConfig(student=str(student), cache=cache, output=out, progress=False, batch_size=4,
                              max_length=128, **kw))
    return read_metrics(out)


@pytest.mark.parametrize("loss", CACHE_LOSSES)
def test_every_loss_trains_in_bf16(student_dir, caches, tmp_path, loss: str) -> None:
    records = run(student_dir, caches["top16"], tmp_path / "o", loss=loss, max_steps=6, lr=3e-3, precision="bf16")
    values = [r["loss"] for r in records]
    assert all(torch.isfinite(torch.tensor(values)))
    if loss == "ctkd":  # its temperature ascends the loss (the gradient reversal), so the loss need not fall
        assert records[-1]["temperature"] > records[0]["temperature"]
    else:
        assert values[-1] < values[0], values  # it learns
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "o" / "model.safetensors")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())


def test_bf16_losses_track_fp32_over_20_steps(student_dir, caches, tmp_path) -> None:
    common = dict(loss="taid", max_steps=20, lr=1e-3, taid_alpha=0.2)
    fp32 = run(student_dir, caches["top16"], tmp_path / "fp32", precision="fp32", **common)
    bf16 = run(student_dir, caches["top16"], tmp_path / "bf16", precision="bf16", **common)
    gaps = [abs(b["loss"] - a["loss"]) / a["loss"] for a, b in zip(fp32, bf16)]
    assert len(gaps) == 20 and max(gaps) <= BF16_LOSS_REL, gaps
    assert fp32[-1]["loss"] < fp32[0]["loss"]
