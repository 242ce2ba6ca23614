"""Held-out evaluation during training, against the held-out cache's own teacher (so `eval_kl_cache`: the KL to
the rebuilt or estimated teacher, not to the real one — make reproduce measures that)."""

from __future__ import annotations

import itertools
import math

import torch

from ..config import TrainConfig
from ..losses import ChunkLoss, LossConfig, cross_entropy, distillation
from ..shards.contract import CacheRecord
from .data import CacheRows, CacheStream, StreamOrder, collate
from .distributed import Dist, all_reduce_sum
from .student import LossModel
from .teacher import cached_teacher


@torch.no_grad()
def evaluate(model: LossModel, cfg: TrainConfig, rows: CacheRows, env: Dist) -> dict[str, float]:
    """Held-out CE on the data, KL(teacher‖student) against the rebuilt teacher, top-1 agreement. Never touches t.
    `rows`: the eval cache, verified at the start of the run."""
    records = rows.manifest.records
    order = StreamOrder(shuffle=False, buffer=1, limit=records, rank=env.rank, world=env.world, batch_size=cfg.batch_size)
    data = CacheStream(rows, order, cfg.max_length, cfg.pack)
    # Every rank must run as many forwards as the busiest one (FSDP all-gathers in each): ranks with fewer
    # records finish with forwards over an empty micro-batch that selects no position.
    busiest = math.ceil(math.ceil(records / env.world) / cfg.batch_size)
    sums = torch.zeros(4, device=env.device)  # ce, kl, top1, count
    model.eval()
    settings = rows.manifest.settings  # the held-out cache's own (its k, its kind of tail)
    kl = LossConfig("fkl")  # against a sampled tail: Σ ŵ (ℓ − log q), an unbiased estimate of the KL
    empty = collate([CacheRecord.empty(settings)], 2)  # one two-token row with no target: a forward that adds nothing
    for mb in itertools.islice(itertools.chain(data, itertools.repeat(empty)), busiest):
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
