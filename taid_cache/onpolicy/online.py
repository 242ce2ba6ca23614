"""Online on-policy training (the original's set-up): the sampler's choice per micro-batch, the student answering
the micro-batch's prompts inside the training loop, and the answers turned into a micro-batch that the online
teacher (`--teacher-model`) scores like any other.

Every rank generates, or none (`OnPolicySampler`'s shared draws): through FSDP the student's forwards are
collective. The answers of all ranks are gathered into one replay buffer, the same on every rank, so a buffer
draw is one global draw of which each rank takes its share, and the buffer is checkpointed once."""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import numpy as np
from ..evaluation.generation import GenerationSettings, answer_ids
from ..shards.contract import CacheRecord, CacheSettings
from ..training.data import MicroBatch, collate
from ..training.distributed import Dist, all_gather_object
from .sampler import Answer, Choice, OnPolicySampler


def answer_record(answer: Answer, settings: CacheSettings) -> CacheRecord:
    """An answer as a record without teacher values (the online teacher scores it): the answer is the loss mask."""
    mask = np.zeros(len(answer.ids), bool)
    mask[answer.prompt_length:] = True
    return CacheRecord.unscored(settings, np.asarray(answer.ids, np.int64), mask)


class ShardedGenerator:
    """The sharded student as `answer_ids` sees a model: its `generate` runs inside the FSDP root's forward
    (`LossModel.forward(generate=...)`), the one place FSDP holds the root's own parameters whole."""

    def __init__(self, model) -> None:
        self.model, self.generation_config = model, model.lm.generation_config

    def parameters(self):
        return self.model.parameters()

    def eval(self) -> None:
        self.model.eval()

    def generate(self, input_ids, attention_mask, **settings):
        return self.model({"input_ids": input_ids, "attention_mask": attention_mask}, None, None, generate=settings)


class OnPolicyBatches:
    """The trainer's micro-batches with the sampler's choices applied. The dataset's micro-batch is read whatever the
    choice, so the data cursor stays the step (a resumed run skips integers) and the prompts are its rows'."""

    def __init__(self, data: Iterator[MicroBatch], sampler: OnPolicySampler, model, tokenizer, generation: GenerationSettings,
                 settings: CacheSettings, max_length: int, pack: bool, env: Dist) -> None:
        self.data, self.sampler, self.model, self.tokenizer, self.generation = data, sampler, model, tokenizer, generation
        self.settings, self.max_length, self.pack, self.env = settings, max_length, pack, env
        self.step, self.total = 0, 1  # the trainer's position, set before each optimizer step (`at`)
        self.made = 0  # micro-batches generated or replayed since the last `taken`

    def at(self, step: int, total: int) -> None:
        self.step, self.total = step, total

    def taken(self) -> int:
        made, self.made = self.made, 0
        return made

    def __iter__(self) -> OnPolicyBatches:
        return self

    def __next__(self) -> MicroBatch:
        mb = next(self.data)
        choice = self.sampler.decide(self.step, self.total)
        if choice is Choice.DATA:
            return mb
        self.made += 1
        size = len(mb.prompts)
        if choice is Choice.REPLAY:
            mine = self.replayed(size)
        else:
            fresh = self.answer(mb.prompts)
            if self.sampler.replays:
                self.sampler.buffer.add([a for rank in all_gather_object(fresh, self.env) for a in rank])
            mine = fresh if choice is Choice.GENERATE else self.replayed(size)
        return collate([answer_record(a, self.settings) for a in mine], self.max_length, self.pack)

    def replayed(self, size: int) -> list[Answer]:
        drawn = self.sampler.buffer.draw(size * self.env.world, self.sampler.rng)
        return drawn[self.env.rank * size : (self.env.rank + 1) * size]

    def answer(self, prompts: list[np.ndarray]) -> list[Answer]:
        """The student's answers to `prompts`, each at most what --max-length leaves after the longest prompt."""
        room = self.max_length - max(len(p) for p in prompts)
        # Seeded by the step and the micro-batch's place in it: a resumed run draws the same answers.
        seed = int(np.random.SeedSequence([self.generation.seed, self.step, self.made, self.env.rank]).generate_state(1, np.uint64)[0] >> 2)
        settings = replace(self.generation, max_new_tokens=max(1, min(self.generation.max_new_tokens, room)),
                           batch_size=len(prompts), seed=seed)
        try:
            answers = answer_ids(ShardedGenerator(self.model), self.tokenizer, [p.tolist() for p in prompts], settings,
                                 synced=self.env.active)
        finally:
            self.model.train()
        return [Answer(tuple(int(t) for t in p) + tuple(a), len(p)) for p, a in zip(prompts, answers)]
