"""The engine contract. An engine is a backbone: it turns a batch of token sequences into the teacher's final
hidden state at every position that predicts a token of its own sequence, and hands over the LM head that turns
those into logits. Everything after that — the chunked head, top-k, top-p, the exact tail mass, the entropy and
the draws — is one function for every engine (`head_path.py`), so two engines over one teacher write one cache.

What differs between engines is declared, not tested by name: `capabilities` (what parallelism it offers) and
`check_available` (what it needs installed), both readable before the engine is built, so a wrong option is
refused before anything is loaded or written.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from ..errors import UserError
from ..heads import LmHead
from ..inputs import Sequence

_MODULES = {"hf": ("hf_engine", "HfEngine"), "vllm": ("vllm_engine", "VllmEngine")}


@dataclass(frozen=True)
class Capabilities:
    tensor_parallel: bool  # each layer split over devices (--tensor-parallel-size)
    pipeline_parallel: bool  # the layers split over devices or nodes (--pipeline-parallel-size)


@dataclass(frozen=True)
class EngineConfig:
    """What the backbone needs: the model and how to run it. The head path's settings (top-k, draws) are not
    here, so one loaded engine serves caches of any head settings."""

    model: str
    max_length: int  # longest sequence it will be given
    dtype: str = "float32"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_backend: str = "mp"
    engine_args: dict[str, Any] = field(default_factory=dict)  # more keyword arguments of the engine's own constructor


class Engine(Protocol):
    """What a new engine implements (docs/ARCHITECTURE.md, "a new engine")."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    config: EngineConfig  # what it was opened with
    head: LmHead  # on the device where the head path runs, its map checked against the model's own logits

    @classmethod
    def check_available(cls) -> None:
        """Raise a UserError naming what to install if this engine cannot run here."""

    @classmethod
    def check_config(cls, config: EngineConfig) -> None:
        """Raise a UserError for what this engine would refuse of `config` at its start (its arguments, the
        parallel sizes against the model): called before the dump writes anything or starts a process."""

    def hidden_states(self, sequences: list[Sequence]) -> torch.Tensor:
        """[Σ (len − 1), hidden] on `head.weight.device`: for each sequence in order, the final hidden state
        (after the last norm) at positions 0 … len − 2, each predicting the next token of its own sequence."""

    def close(self) -> None:
        """Release the model now (a pipeline may train a student next in the same process)."""


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def torch_dtype(name: str) -> torch.dtype:
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
    value = getattr(torch, aliases.get(name, name), None)
    if not isinstance(value, torch.dtype):
        raise UserError(f"--dtype {name} is not a torch dtype (float32, bfloat16, float16)")
    return value


def engine_class(name: str) -> type[Engine]:
    module, cls = _MODULES[name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


def choose_engine(name: str, parallel: bool = False) -> tuple[str, str]:
    """The engine `--engine name` runs, and why when `auto` chose it ('' otherwise): vLLM when it imports and a GPU
    is present (or a parallel size above 1, which only vLLM offers, was asked for), else transformers. On CPU,
    vLLM's start-up of about a minute outweighs its speed: at most 17% above hf's on the bench teachers
    (bench/results/dump_teacher.md), while 40 rows took 108 s through vLLM against about 1 s through hf."""
    if name != "auto":
        return name, ""
    if importlib.util.find_spec("vllm") is None:
        return "hf", "vLLM is not installed"
    if parallel:
        return "vllm", "a parallel size above 1, which only vLLM offers"
    if not torch.cuda.is_available():
        return "hf", ("no GPU here, and on CPU vLLM's start-up of about a minute outweighs its speed (at most 17% above "
                      "hf's); --engine vllm runs it anyway")
    return "vllm", "vLLM imports and a GPU is present"


def resolve_engine(name: str, parallel: bool = False) -> tuple[str, str]:
    """The engine `choose_engine` picks (and why), its prerequisites checked."""
    name, why = choose_engine(name, parallel)
    engine_class(name).check_available()
    return name, why


def check_parallelism(name: str, config: EngineConfig) -> None:
    """The parallel sizes asked for are ones this engine offers."""
    caps = engine_class(name).capabilities
    for size, offered, flag in ((config.tensor_parallel_size, caps.tensor_parallel, "--tensor-parallel-size"),
                                (config.pipeline_parallel_size, caps.pipeline_parallel, "--pipeline-parallel-size")):
        if size > 1 and not offered:
            raise UserError(f"{flag} {size}: the {name} engine runs the teacher on one device; use --engine vllm")
    if config.distributed_backend != "mp" and not (caps.tensor_parallel or caps.pipeline_parallel):
        raise UserError(f"--distributed-backend {config.distributed_backend}: the {name} engine runs on one device")


def parse_engine_args(text: str | None, flag: str) -> dict[str, Any]:
    """A JSON object of keyword arguments, or a one-line error."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{flag} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object of keyword arguments, not {text!r}")
    return value


def open_engine(name: str, config: EngineConfig) -> Engine:
    return engine_class(name)(config)
