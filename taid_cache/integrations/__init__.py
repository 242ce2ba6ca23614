"""A cache in your own training code: a stream of its records in train-student's order (`CacheDataset`), a
collator into micro-batch tensors (`DistillationCollator`), and a Hugging Face `Trainer` that distils from it
(`DistillationTrainer`, with TAID's t moved once per optimizer step). docs/API.md shows each in use."""

from .cache_dataset import CacheDataset
from .collator import DistillationCollator
from .hf_trainer import DistillationModel, DistillationTrainer, TaidCallback

__all__ = ["CacheDataset", "DistillationCollator", "DistillationModel", "DistillationTrainer", "TaidCallback"]
