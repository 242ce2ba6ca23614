"""The transformers engine: a plain forward pass, then top-k of the log-softmax, with the LM head applied
to chunks of positions so a full [tokens, vocab] float32 tensor never exists for a whole batch. A batch's
sequences are packed into rows no wider than its longest one, so uneven lengths cost little padding."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError, first_line
from ..heads import check_head, head_logits
from ..inputs import Sequence
from ..packing import RowLayout, keeps_sequences_apart, lay_out
from .record import TeacherRecord
from . import EngineConfig
from .tail_sampling import distinct_draws, draw_off_head, sequence_uniforms


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def torch_dtype(name: str) -> torch.dtype:
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
    value = getattr(torch, aliases.get(name, name), None)
    if not isinstance(value, torch.dtype):
        raise UserError(f"--dtype {name} is not a torch dtype (float32, bfloat16, float16)")
    return value


def tail_and_entropy(logprobs: torch.Tensor, indices: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From [P, V] log-probs ℓ and their top-k `indices`, one exp pass p = exp(ℓ) serves three things:
    - the log of the mass m off the top-k, summed directly over those ids (1 − Σ top-k cancels catastrophically
      for a confident teacher); rows where that float32 sum nears underflow (m < 1e-30, where the summed terms
      lose their relative precision) are redone as a log-sum-exp of ℓ;
    - the entropy −Σ p ℓ at the `targets` rows (NaN elsewhere): the fidelity report covers loss positions
      only, so only they pay for it. A batched BLAS dot: several times faster on CPU than `vecdot`;
    - the off-head weights (p with the head zeroed; ∝ p for the underflow rows) that the tail draws need.
    Returns (log m, entropy, off-head weights); `logprobs` is left as it is."""
    probs = logprobs.exp()
    every = bool(targets.all())
    picked_p, picked_l = (probs, logprobs) if every else (probs[targets], logprobs[targets])  # text rows: no copy
    picked_entropy = -torch.bmm(picked_p[:, None, :], picked_l[:, :, None]).flatten()
    odd = picked_entropy.isnan()  # rows with a −inf logit (0 · −inf): rare, so redone with 0 · log 0 = 0
    if bool(odd.any()):
        picked_entropy[odd] = torch.special.entr(picked_p[odd]).sum(-1)
    entropy = torch.full(logprobs.shape[:1], math.nan, device=logprobs.device)
    entropy[targets] = picked_entropy
    weights = probs.scatter_(-1, indices, 0.0)
    tail = weights.sum(-1).log()
    small = tail < math.log(1e-30)
    if bool(small.any()):
        off = logprobs[small].scatter(-1, indices[small], -math.inf)
        tail[small] = off.logsumexp(-1)
        scale = torch.where(torch.isfinite(tail[small]), tail[small], torch.zeros_like(tail[small]))
        weights[small] = torch.exp(off - scale[:, None])
    return tail, entropy, weights


@dataclass
class TopK:
    """Every position's top-k, still on the device."""

    ids: torch.Tensor  # [positions, k]
    logprobs: torch.Tensor  # [positions, k]
    tail_logmass: torch.Tensor  # [positions]: log of the mass off the k entries, from the full float32 log-softmax
    entropy: torch.Tensor  # [positions]: the teacher's entropy at loss positions, NaN elsewhere (the fidelity report)
    sample_ids: torch.Tensor  # [positions, N]: draws off the top-k (N = --tail-samples, may be 0)
    sample_logprobs: torch.Tensor  # [positions, N]: their log-probs under the full distribution


@dataclass
class HfPending:
    """Top-k still on the device; `materialize` (in the writer thread) copies it out and splits it."""

    sequences: list[Sequence]
    top: TopK
    cursor: dict[str, int]

    def materialize(self) -> list[TeacherRecord]:
        top = self.top
        ids, lps, tails, entropy, sample_ids, sample_lps = (x.cpu().numpy() for x in (
            top.ids, top.logprobs, top.tail_logmass, top.entropy, top.sample_ids, top.sample_logprobs))
        records, at = [], 0
        for seq in self.sequences:
            n = len(seq.input_ids) - 1
            samples = distinct_draws(sample_ids[at : at + n], sample_lps[at : at + n]) if sample_ids.shape[1] else None
            records.append(TeacherRecord(seq.sample_id, seq.input_ids, seq.loss_mask, ids[at : at + n], lps[at : at + n],
                                         tails[at : at + n], entropy[at : at + n], samples))
            at += n
        return records


class HfEngine:
    name = "hf"

    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoModelForCausalLM

        self.config = config
        self.device = pick_device()
        try:
            self.model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch_dtype(config.dtype))
        except Exception as exc:
            raise UserError(f"cannot load model {config.model}: {first_line(exc)}") from None
        self.model.to(self.device).eval()
        self.decoder = self.model.get_decoder()
        self.head = self.model.get_output_embeddings()
        self.mapping = check_head(self.model, "teacher")
        self.max_top_k = self.head.weight.shape[0]
        self.pack = keeps_sequences_apart(self.decoder, self.device)

    def layout(self, sequences: list[Sequence]) -> tuple[RowLayout, dict[str, torch.Tensor]]:
        """Rows no wider than the longest sequence: packed when the model keeps packed sequences apart (less
        padding on uneven lengths), else one per row, right-padded."""
        lengths = [len(s.input_ids) for s in sequences]
        layout = lay_out(lengths, max(lengths), self.pack)
        inputs = layout.model_inputs(layout.grid([s.input_ids.astype(np.int64) for s in sequences], 0))
        return layout, {**{k: v.to(self.device) for k, v in inputs.items()}, "use_cache": False}

    @torch.inference_mode()
    def top_k(self, sequences: list[Sequence]) -> TopK:
        """Top-k for every position j < T-1 of every sequence, concatenated in order."""
        layout, inputs = self.layout(sequences)
        hidden = self.decoder(**inputs).last_hidden_state
        # Positions that predict a token of their own sequence: all but each sequence's last, in sequence order.
        hidden = hidden.flatten(0, 1)[layout.flat_positions(drop_last=True).to(self.device)]
        targets = torch.from_numpy(np.concatenate([s.loss_mask[1:] for s in sequences]).astype(bool)).to(self.device)
        n = self.config.tail_samples
        # Per-sequence generators only when there is something to draw: a plain top-k dump pays nothing for them.
        uniforms = torch.from_numpy(np.concatenate([sequence_uniforms(self.config.seed, s.sample_id, len(s.input_ids) - 1, n)
                                                    for s in sequences])) if n else torch.zeros(hidden.shape[0], 0)
        uniforms = uniforms.to(self.device)
        columns: tuple[list[torch.Tensor], ...] = ([], [], [], [], [], [])  # TopK's fields, one entry per chunk
        chunk_size = self.config.lm_head_chunk
        for chunk, chunk_targets, chunk_uniforms in zip(hidden.split(chunk_size), targets.split(chunk_size), uniforms.split(chunk_size)):
            logprobs = torch.log_softmax(head_logits(chunk, self.head.weight, self.head.bias, self.mapping), dim=-1)
            values, indices = logprobs.topk(self.config.top_k, dim=-1, sorted=True)
            tail, entropy, weights = tail_and_entropy(logprobs, indices, chunk_targets)
            sample_ids, sample_lps = draw_off_head(weights, logprobs, tail, chunk_uniforms) if n else (indices[:, :0], values[:, :0])
            for column, value in zip(columns, (indices, values, tail, entropy, sample_ids, sample_lps)):
                column.append(value)
        return TopK(*(torch.cat(column) for column in columns))

    def submit(self, sequences: list[Sequence], cursor: dict[str, int]) -> HfPending:
        return HfPending(sequences, self.top_k(sequences), dict(cursor))

    def close(self) -> None:
        """Release the teacher's memory now (a pipeline may train a student next in the same process)."""
        del self.model, self.decoder, self.head
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
