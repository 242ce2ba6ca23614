"""Records -> one micro-batch of tensors, as train-student builds it (`training.data.collate`), keyed for a
model's forward and for a Hugging Face Trainer: `shift_labels` holds each position's next token where it is a
training target and −100 elsewhere, so the Trainer counts the loss tokens of a step (`num_items_in_batch`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..shards.contract import CacheRecord
from ..training.data import MicroBatch, collate


@dataclass
class DistillationCollator:
    max_length: int = 2048  # longer sequences are cut
    pack: bool = False  # several sequences per row (attention kept within each), or one per row, padded

    def __call__(self, records: list[CacheRecord]) -> dict[str, Any]:
        mb = collate(records, self.max_length, self.pack)
        batch: dict[str, Any] = {
            "inputs": mb.inputs, "shift_labels": torch.where(mb.targets, mb.labels, -100),
            "topk_ids": mb.topk_ids, "topk_logprobs": mb.topk_logprobs, "tail_logmass": mb.tail_logmass, "tokens": mb.tokens,
        }
        # Trainer looks for "labels" before it counts `shift_labels`; the model reads only the latter.
        batch["labels"] = batch["shift_labels"]
        if mb.samples is not None:
            batch["sample_ids"], batch["sample_draws"], batch["sample_logprobs"] = mb.samples
        if mb.target_logprob is not None:  # a --target-logprobs cache (what opd reads)
            batch["target_logprob"] = mb.target_logprob
        return batch


def micro_batch(batch: dict[str, Any]) -> MicroBatch:
    """The collator's output (on any device) back as train-student's `MicroBatch`."""
    shift = batch["shift_labels"]
    samples = tuple(batch[k] for k in ("sample_ids", "sample_draws", "sample_logprobs")) if "sample_ids" in batch else None
    return MicroBatch(batch["inputs"], shift != -100, shift.clamp(min=0), batch["topk_ids"], batch["topk_logprobs"],
                      batch["tail_logmass"], int(batch["tokens"]), samples, target_logprob=batch.get("target_logprob"))
