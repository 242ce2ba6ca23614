"""`dump-teacher --launcher ray`: the --num-workers workers of one dump as Ray tasks, on the cluster at RAY_ADDRESS
(or one started here). Each task is an ordinary `dump_teacher` worker: the cache folder's own leases, part files
and manifest coordinate them, so a rerun resumes exactly as with a SLURM job array."""

from __future__ import annotations

import dataclasses
import io

from rich.console import Console

from ..config import DumpConfig, from_json, to_json
from ..errors import Interrupted, UserError
from ..progress import only_our_bars
from .dump_teacher import RERUN, check_options, dump_teacher


def run_worker(options: dict, index: int) -> dict:
    """One worker inside a Ray task. Its console is its own (a Console does not pickle), kept to return its
    summary line to the driver instead of interleaving with the other tasks' logs."""
    only_our_bars()  # a fresh process: the CLI's setting did not travel
    said = io.StringIO()
    cfg = dataclasses.replace(from_json(DumpConfig, options), worker_index=index, progress=False,
                              console=Console(file=said, soft_wrap=True))
    return {"worker": index, **dump_teacher(cfg), "said": said.getvalue().strip()}


def dump_with_ray(cfg: DumpConfig) -> dict:
    """Run workers 0..N-1 as Ray tasks and wait for all; a worker's mistake is one line naming it."""
    check_options(cfg)
    if cfg.worker_index != 0:
        raise UserError(f"--launcher ray runs all {cfg.num_workers} workers itself: drop --worker-index {cfg.worker_index}")
    try:
        import ray
    except ImportError:
        raise UserError("--launcher ray needs ray: pip install 'taid-cache[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init()  # connects to RAY_ADDRESS (or a `ray start` cluster on this node), else starts a local one
    try:
        # Ray hides the GPUs from a task that reserves none; vLLM's own Ray executor reserves its GPUs itself.
        own_gpus = cfg.distributed_backend == "mp" and ray.cluster_resources().get("GPU", 0) > 0
        gpus = cfg.tensor_parallel_size * cfg.pipeline_parallel_size if own_gpus else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(run_worker)
        options, n = to_json(cfg), cfg.num_workers
        pending = {task.remote(options, i): i for i in range(n)}
        cfg.console.print(f"dump-teacher: {n} workers started as Ray tasks")
        results: dict[int, dict] = {}
        failures: dict[int, UserError] = {}
        try:
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                index = pending.pop(ref)
                try:
                    results[index] = ray.get(ref)
                    cfg.console.print(results[index]["said"])
                except ray.exceptions.RayTaskError as exc:
                    if not isinstance(exc.cause, UserError):
                        raise
                    failures[index] = exc.cause  # the others go on: what they commit is kept for the rerun
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: the committed shards are kept; {RERUN}") from None
        finally:
            for ref in pending:  # a driver that stops early stops its workers (each keeps its committed shards)
                ray.cancel(ref)
        if failures:
            first = min(failures)
            more = f" ({len(failures)} of {n} workers failed)" if len(failures) > 1 else ""
            raise UserError(f"worker {first} of {n}: {failures[first]}{more}")
        return {"complete": any(r["complete"] for r in results.values()), "workers": [results[i] for i in range(n)]}
    finally:
        if started:
            ray.shutdown()
