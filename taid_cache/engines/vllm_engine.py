"""The vLLM engine: the offline `LLM` over pre-tokenized prompts, asking only for prompt log-probs.

vLLM returns, for each prompt position i >= 1, k+1 candidates for token i: the actual token first, then the
top-k by rank. With flat log-probs these are plain lists, sliced here with numpy (no per-position dicts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError, first_line
from ..inputs import Sequence
from ..shards.codec import tail_from_head
from .record import TeacherRecord
from . import EngineConfig


def cpu_thread_binding(tensor_parallel_size: int) -> str:
    """vLLM's CPU backend wants each rank's cores named ('0|1' for two ranks on two cores)."""
    cores = sorted(os.sched_getaffinity(0))
    per_rank = max(1, len(cores) // tensor_parallel_size)
    groups = [cores[r * per_rank : (r + 1) * per_rank] for r in range(tensor_parallel_size)]
    return "|".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)


# vLLM hands back only the top-k, so the tail is 1 − Σ of its float32 log-probs: their rounding (about 1e-6 of
# mass for logits of magnitude ~10) bounds what it resolves; the hf engine sums the tail itself.
TAIL_FLOOR = 2.0**-20


@dataclass
class VllmPending:
    sequences: list[Sequence]
    outputs: list[Any]  # vllm RequestOutput, one per sequence
    top_k: int
    cursor: dict[str, int]

    def materialize(self) -> list[TeacherRecord]:
        records = []
        for seq, out in zip(self.sequences, self.outputs):
            flat = out.prompt_logprobs
            positions = len(seq.input_ids) - 1
            # Position 0 has no candidates; positions 1..T-1 have k+1 each, the actual token first.
            first = flat.start_indices[1]
            width = self.top_k + 1
            ids = np.asarray(flat.token_ids[first:], dtype=np.int64).reshape(positions, width)[:, 1:]
            lps = np.asarray(flat.logprobs[first:], dtype=np.float32).reshape(positions, width)[:, 1:]
            records.append(TeacherRecord(seq.sample_id, seq.input_ids, seq.loss_mask, ids, lps, tail_from_head(lps, TAIL_FLOOR)))
        return records


class VllmEngine:
    name = "vllm"

    def __init__(self, config: EngineConfig) -> None:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_thread_binding(config.tensor_parallel_size))
        from vllm import LLM, SamplingParams

        self.config = config
        try:
            self.llm = LLM(
                model=config.model,
                tensor_parallel_size=config.tensor_parallel_size,
                dtype=config.dtype,
                max_model_len=config.max_length + 1,  # the prompt plus the one token vLLM insists on sampling
                max_logprobs=config.top_k,
                enable_prefix_caching=False,  # prompt log-probs bypass it, and it can reorder results
                logprobs_mode="raw_logprobs",
                seed=0,
            )
        except Exception as exc:
            raise UserError(f"vLLM could not start on {config.model}: {first_line(exc)}") from None
        self.max_top_k = self.llm.llm_engine.model_config.get_vocab_size()
        self._params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=config.top_k, detokenize=False, flat_logprobs=True
        )

    def prompts(self, sequences: list[Sequence]) -> list[Any]:
        from vllm.inputs import TokensPrompt

        return [TokensPrompt(prompt_token_ids=[int(t) for t in s.input_ids]) for s in sequences]

    def submit(self, sequences: list[Sequence], cursor: dict[str, int]) -> VllmPending:
        outputs = self.llm.generate(self.prompts(sequences), self._params, use_tqdm=False)
        return VllmPending(sequences, outputs, self.config.top_k, dict(cursor))

    def close(self) -> None:
        """Stop vLLM's engine-core and worker processes now, not in interpreter teardown, where their
        shutdown races the exit (seen as an abort after a finished tensor-parallel dump)."""
        self.llm.llm_engine.engine_core.shutdown()
