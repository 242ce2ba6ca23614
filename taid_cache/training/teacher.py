"""The teacher of a training step: read from the cache's records (top-k, or head + sampled tail), or a model run
in-process (online mode, the original set-up, for comparison). Either way it comes out as one of the loss
layer's teacher types (losses/sparse.py), sliced chunk by chunk by the chunked loss."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..heads import LmHead, model_head
from ..shards.contract import CacheSettings
from ..losses import DenseTeacher, SampledTeacher, TopKTeacher
from .data import MicroBatch
from .distributed import Dist
from .student import attention_implementation, check_packing, check_vocabulary, load_causal_lm


def cached_teacher(mb: MicroBatch, settings: CacheSettings, tail: str, env: Dist) -> Union[TopKTeacher, SampledTeacher]:
    """The cache's teacher at the micro-batch's target positions (with the actual next tokens' log-probs of a
    --target-logprobs cache)."""

    def at_targets(x: torch.Tensor) -> torch.Tensor:
        return x[mb.targets].to(env.device)

    head = [at_targets(x) for x in (mb.topk_ids, mb.topk_logprobs, mb.tail_logmass)]
    target = None if mb.target_logprob is None else at_targets(mb.target_logprob)
    if mb.samples is None:
        return TopKTeacher(*head, settings.tokenizer_size, tail, target)
    return SampledTeacher(*head, *(at_targets(x) for x in mb.samples), settings.tokenizer_size, target)


@dataclass
class OnlineTeacher:
    """A teacher model's last hidden states at N target positions; a slice of them becomes dense log-probs
    through its LM head (one chunk of [positions, V] at a time, like the student's)."""

    hidden: torch.Tensor
    head: LmHead
    valid_vocab: int
    student_rows: int

    def __getitem__(self, rows: slice) -> DenseTeacher:
        logits = self.head.logits(self.hidden[rows])[:, : self.valid_vocab]
        return DenseTeacher(F.pad(F.log_softmax(logits, -1), (0, self.student_rows - self.valid_vocab), value=-math.inf))


class TeacherSource:
    """Where a run's teacher comes from: the training cache, or `--teacher-model` loaded once, checked against the
    cache's tokenizer and its own logits, and frozen."""

    def __init__(self, settings: CacheSettings, tail: str, student_rows: int, env: Dist, model: Optional[str] = None, pack: bool = False) -> None:
        self.settings, self.tail, self.student_rows, self.model = settings, tail, student_rows, None
        if model is not None:
            lm, tokenizer = load_causal_lm(model, "teacher", torch.float32, attention_implementation())
            check_vocabulary(lm, tokenizer, settings, "teacher")
            check_packing(lm, pack, "teacher")
            self.model = lm.to(env.device).eval().requires_grad_(False)
            self.head = model_head(self.model, "teacher")

    @property
    def sampled(self) -> bool:
        """The cache's head + sampled tail: every loss on it is an estimate."""
        return self.model is None and self.settings.sampled

    def for_batch(self, mb: MicroBatch, env: Dist) -> Union[TopKTeacher, SampledTeacher, OnlineTeacher]:
        if self.model is None:
            return cached_teacher(mb, self.settings, self.tail, env)
        with torch.no_grad():
            out = self.model.get_decoder()(**mb.model_inputs(env.device))
        hidden = out.last_hidden_state[:, :-1][mb.targets.to(env.device)]
        return OnlineTeacher(hidden, self.head, self.settings.tokenizer_size, self.student_rows)
