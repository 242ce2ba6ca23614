"""Held-out evaluation during training, against the held-out cache's own teacher (so `eval_kl_cache`: the KL to
the rebuilt or estimated teacher, not to the real one — make reproduce measures that)."""

from __future__ import annotations

import itertools
import math

import torch

from ..losses import ChunkLoss, LossConfig, chunk_loss, cross_entropy, distillation
from ..shards.contract import CacheRecord
from .data import CacheRows, CacheStream, StreamOrder, collate
from .distributed import Dist, all_reduce_sum
from .student import LossModel
from .teacher import cached_teacher


@torch.no_grad()
def evaluate(model: LossModel, rows: CacheRows, env: Dist, batch_size: int, max_length: int, pack: bool, tail: str,
             objective: LossConfig | None = None, t: float = 1.0) -> dict[str, float]:
    """Held-out CE on the data, KL(teacher‖student) against the rebuilt teacher, top-1 agreement, and with an
    `objective`, that loss at TAID's current `t` (`eval_loss`, the Hugging Face path's). Never touches t.
    `rows`: the eval cache, verified at the start of the run."""
    records = rows.manifest.records
    order = StreamOrder(shuffle=False, buffer=1, limit=records, rank=env.rank, world=env.world, batch_size=batch_size)
    data = CacheStream(rows, order, max_length, pack)
    # Every rank must run as many forwards as the busiest one (FSDP all-gathers in each): ranks with fewer
    # records finish with forwards over an empty micro-batch that selects no position.
    busiest = math.ceil(math.ceil(records / env.world) / batch_size)
    sums = torch.zeros(5, device=env.device)  # ce, kl, top1, count, objective
    model.eval()
    settings = rows.manifest.settings  # the held-out cache's own (its k, its kind of tail)
    kl = LossConfig("fkl")  # against a sampled tail: Σ ŵ (ℓ − log q), an unbiased estimate of the KL
    empty = collate([CacheRecord.empty(settings)], 2)  # one two-token row with no target: a forward that adds nothing
    learned = objective is not None and objective.spec.learns_temperature
    for mb in itertools.islice(itertools.chain(data, itertools.repeat(empty)), busiest):
        teacher = cached_teacher(mb, settings, tail, env)
        labels = mb.labels[mb.targets].to(env.device)

        def fn(logits: torch.Tensor, sl: slice, *temperature: torch.Tensor) -> ChunkLoss:
            chunk = teacher[sl]
            sums[0] += cross_entropy(logits, labels[sl]).sum()
            sums[1] += distillation(kl, chunk, logits, 1.0).sum()
            sums[2] += (logits.argmax(-1) == chunk.top1()).sum()
            sums[3] += logits.shape[0]
            if objective is not None:
                sums[4] += chunk_loss(objective, chunk, logits, labels[sl], t, *temperature).train
            return ChunkLoss(logits.new_zeros(()), logits.new_zeros(()))

        model(mb.model_inputs(env.device), mb.targets.to(env.device), fn, 0.0 if learned else None)
    model.train()
    sums = all_reduce_sum(sums, env)
    n = max(sums[3].item(), 1.0)
    scores = {"eval_ce": sums[0].item() / n, "eval_kl_cache": sums[1].item() / n, "eval_top1": sums[2].item() / n}
    return {**scores, "eval_loss": sums[4].item() / n} if objective is not None else scores
