"""The LM head and a loss applied chunk by chunk of positions, gradients computed chunk by chunk, so no float32
[positions, V] tensor exists for all positions at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..heads import PLAIN, LogitMap, head_logits
from .objective import ChunkFn


class _ChunkedLoss(torch.autograd.Function):
    """Σ over chunks of f(head(hidden_chunk), chunk, *extra); gradients are computed chunk by chunk in the forward
    pass and kept (one [N, H], one [V, H] and one [V] tensor, and one per extra input: a learned temperature), so
    logits exist for one chunk at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, fn, chunk, mapping, *extra):
        # Gradients accumulate in float32 whatever the parameters' dtype (bf16 sums over chunks lose bits).
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_b = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        leaves = [x.detach().requires_grad_(x.requires_grad) for x in extra]
        grad_extra = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in extra]
        totals = torch.zeros(2, dtype=torch.float32, device=hidden.device)
        w = weight.detach().requires_grad_(weight.requires_grad)
        b = None if bias is None else bias.detach().requires_grad_(bias.requires_grad)
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, min(start + chunk, hidden.shape[0]))
            h = hidden[sl].detach().requires_grad_(hidden.requires_grad)
            wanted = [x for x in (h, w, b, *leaves) if x is not None and x.requires_grad]
            with torch.enable_grad():
                raw = F.linear(h, w, b)
                out = fn(mapping(raw), sl, *leaves)
                if not wanted:
                    grads = ()
                elif out.grad is not None:  # the loss gave d(train)/d(logits) itself: matrix products finish it
                    g = mapping.grad_raw(raw.detach(), out.grad).to(w.dtype)  # products in the weight's dtype
                    grads = [g @ w.detach() if x is h else g.t() @ h.detach() if x is w else g.float().sum(0) if x is b
                             else torch.zeros_like(x) for x in wanted]
                else:
                    grads = torch.autograd.grad(out.train, wanted, allow_unused=True)
            for x, g in zip(wanted, grads):
                if g is None:
                    continue
                if x is h:
                    grad_h[sl] = g
                elif x is w:
                    grad_w += g
                elif x is b:
                    grad_b += g
                else:
                    grad_extra[next(i for i, leaf in enumerate(leaves) if leaf is x)] += g
            totals += torch.stack([out.train.detach(), out.report.detach()])
        ctx.save_for_backward(grad_h, grad_w, grad_b, *grad_extra)
        ctx.in_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype, *(x.dtype for x in extra))
        ctx.mark_non_differentiable(totals)
        combined_total = totals[0].clone()
        return combined_total, totals[1].clone()

    @staticmethod
    def backward(ctx, grad_combined, _grad_reported):
        grad_h, grad_w, grad_b, *grad_extra = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype, *extra_dtypes = ctx.in_dtypes
        scaled = [None if g is None else (g * grad_combined).to(d) for g, d in ((grad_h, h_dtype), (grad_w, w_dtype), (grad_b, b_dtype))]
        return (scaled[0], scaled[1], scaled[2], None, None, None,
                *((g * grad_combined).to(d) for g, d in zip(grad_extra, extra_dtypes)))


def chunked_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    fn: ChunkFn,
    chunk: int = 1024,
    bias: torch.Tensor | None = None,
    mapping: LogitMap = PLAIN,
    extra: tuple[torch.Tensor, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the LM head (`weight` [V, H], optional `bias` [V], then `mapping`: scaling, soft-capping) to
    `hidden` [N, H] chunk by chunk and sum `fn(logits, slice, *extra)`; logits are float32.

    `fn` returns a `ChunkLoss` for its slice of positions (`chunk_loss` builds one for a config and a teacher).
    `extra`: more tensors the loss depends on (ctkd's learned temperature). Returns the sums of its `train` and
    `report`; only the first carries gradients (to `hidden`, `weight`, `bias` and `extra`).
    """
    needs_grad = any(x is not None and x.requires_grad for x in (hidden, weight, bias, *extra))
    if torch.is_grad_enabled() and needs_grad:
        return _ChunkedLoss.apply(hidden, weight, bias, fn, chunk, mapping, *extra)
    totals = torch.zeros(2, dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, min(start + chunk, hidden.shape[0]))
            out = fn(head_logits(hidden[sl], weight, bias, mapping), sl, *extra)
            totals += torch.stack([out.train, out.report])
    return totals[0], totals[1]
