"""Train a Llama from scratch on plain text for a fixed number of steps (the embedded default's teacher).

A step budget, not a time budget, so the same settings give the same teacher on any machine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..progress import step_bar


@dataclass
class PretrainConfig:
    block: int = 256
    batch_size: int = 16
    lr: float = 3e-3
    steps: int = 200
    seed: int = 0


def pack_blocks(token_lists: list[list[int]], block: int) -> np.ndarray:
    """Concatenate documents and cut them into [N, block] training rows."""
    flat = np.concatenate([np.asarray(t, dtype=np.int64) for t in token_lists])
    n = len(flat) // block
    return flat[: n * block].reshape(n, block)


def pretrain(model, blocks: np.ndarray, cfg: PretrainConfig, console=None) -> list[float]:
    """AdamW with a cosine schedule over cfg.steps; returns the loss per step."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    schedule = get_cosine_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=cfg.steps)
    model.train()
    losses: list[float] = []
    bar = step_bar("pre-training teacher", console, console is not None)
    task = bar.add_task("pretrain", total=cfg.steps, info="")
    bar.start()
    for step in range(cfg.steps):
        batch = torch.from_numpy(blocks[rng.integers(0, len(blocks), cfg.batch_size)])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.item())
        bar.update(task, completed=step + 1, info=f"loss {losses[-1]:.3f}")
    bar.stop()
    model.eval()
    return losses
