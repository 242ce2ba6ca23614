"""A cache in your own training code: a stream of its records in train-student's order (`CacheDataset`), a
collator into micro-batch tensors (`DistillationCollator`), and a Hugging Face `Trainer` that distils from it
(`CacheDistillationTrainer` with its `CacheDistillationConfig`, TRL's shape; t moved once per optimizer step by
train-student's step policy). docs/API.md shows each in use."""

from .cache_dataset import CacheDataset
from .collator import DistillationCollator
from .hf_trainer import CacheDistillationConfig, CacheDistillationTrainer, DistillationModel, PolicyCallback

__all__ = ["CacheDataset", "CacheDistillationConfig", "CacheDistillationTrainer", "DistillationCollator", "DistillationModel",
           "PolicyCallback"]
