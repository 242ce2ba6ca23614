"""Held-out evaluation during training, against the held-out cache's own teacher (so `eval_kl_cache`: the KL to
the rebuilt or estimated teacher, not to the real one — make reproduce measures that)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from ..config import TrainConfig
from ..losses import ChunkLoss, LossConfig, cross_entropy, distillation
from .data import CacheStream, MicroBatch, collate
from .distributed import Dist, all_reduce_sum
from .student import LossModel
from .teacher import cached_teacher


@torch.no_grad()
def evaluate(model: LossModel, cfg: TrainConfig, manifest: dict, env: Dist) -> dict[str, float]:
    """Held-out CE on the data, KL(teacher‖student) against the rebuilt teacher, top-1 agreement. Never touches t.
    `manifest`: the eval cache's, verified at the start of the run."""
    data = CacheStream(cfg.eval_cache, cfg.batch_size, env.rank, env.world, cfg.max_length, 0, 1, False, limit=manifest["records"], pack=cfg.pack)
    # Every rank must run as many forwards as the busiest one (FSDP all-gathers in each): ranks with fewer
    # records finish with forwards over an empty micro-batch that selects no position.
    busiest = math.ceil(math.ceil(manifest["records"] / env.world) / cfg.batch_size)
    sums = torch.zeros(4, device=env.device)  # ce, kl, top1, count
    model.eval()
    settings = manifest["settings"]  # the held-out cache's own (its k, its kind of tail)
    kl = LossConfig("fkl")  # against a sampled tail: Σ ŵ (ℓ − log q), an unbiased estimate of the KL
    for mb in itertools.islice(itertools.chain(data, itertools.repeat(empty_micro_batch(settings))), busiest):
        teacher = cached_teacher(mb, settings, cfg.tail, env)
        labels = mb.labels[mb.targets].to(env.device)

        def fn(logits: torch.Tensor, sl: slice) -> ChunkLoss:
            chunk = teacher[sl]
            sums[0] += cross_entropy(logits, labels[sl]).sum()
            sums[1] += distillation(kl, chunk, logits, 1.0).sum()
            sums[2] += (logits.argmax(-1) == chunk.top1()).sum()
            sums[3] += logits.shape[0]
            return ChunkLoss(logits.new_zeros(()), logits.new_zeros(()))

        model(mb.model_inputs(env.device), mb.targets.to(env.device), fn)
    model.train()
    sums = all_reduce_sum(sums, env)
    n = max(sums[3].item(), 1.0)
    return {"eval_ce": sums[0].item() / n, "eval_kl_cache": sums[1].item() / n, "eval_top1": sums[2].item() / n}


def empty_micro_batch(settings: dict) -> MicroBatch:
    """One two-token row with no target: a forward that contributes nothing."""
    def unused(width: int) -> dict[str, np.ndarray]:
        return {"ids": np.full((1, width), -1, np.int64), "logprobs": np.full((1, width), -np.inf, np.float32)}

    head, drawn = unused(settings["top_k"]), unused(settings.get("tail_samples", 0))
    record = {"input_ids": np.zeros(2, np.int64), "loss_mask": np.zeros(2, bool), "topk_ids": head["ids"],
              "topk_logprobs": head["logprobs"], "tail_logmass": np.zeros(1, np.float32)}
    if settings.get("tail_samples"):
        record.update(sample_ids=drawn["ids"], sample_logprobs=drawn["logprobs"], sample_draws=np.zeros_like(drawn["ids"]))
    return collate([record], 2)
