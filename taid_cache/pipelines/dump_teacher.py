"""Stage one: run the teacher over a dataset once and store its top-k next-token log-probs.

One obvious path: check every input before anything is written, reopen this worker's part of the cache
(or start it), then tokenize -> batch -> engine -> writer thread, committing shards as they fill.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from rich.console import Console
from rich.progress import Progress, TextColumn

from ..config import DumpConfig, check_fields
from ..engines.base import Engine, EngineConfig, check_parallelism, open_engine, parse_engine_args, resolve_engine
from ..engines.head_path import HeadSettings, teacher_batch
from ..errors import Interrupted, UserError, first_line, interrupts_at_safe_points, write_errors
from ..fingerprints import model_hash, resolve_model, tokenizer_hash
from ..atomic import check_writable_folder, exclusive_lock, is_locked
from ..inputs import (
    RowTokenizer, Sequence, check_rows, dataset_fingerprint, detect_kind, load_rows, resolve_data, source_tag, worker_slice,
)
from ..shards.codec import LOGPROB_STEP, id_dtype
from ..settings import describe_differences
from ..shards.manifest import (
    PARTS_DIR, WorkerPart, check_compatible, load_parts, part_path, save_part, shard_prefix, try_finalize, worker_lock,
)
from ..shards.schema import FORMAT_VERSION
from ..progress import step_bar
from ..shards.record import TeacherRecord
from ..shards.writer import BackgroundWriter, ShardWriter


RERUN = "rerun the same command to resume"


def check_options(cfg: DumpConfig) -> None:
    """Each field's declared range (config.py), then the ones that depend on each other."""
    check_fields(cfg)
    if cfg.top_k < (0 if cfg.tail_samples else 1):  # a sampled tail may stand alone
        raise UserError(f"--top-k must be at least {0 if cfg.tail_samples else 1}, not {cfg.top_k}")
    if cfg.tail_samples and cfg.top_p is not None:
        raise UserError("--tail-samples draws off the whole top-k: it cannot be combined with --top-p")
    if cfg.worker_index >= cfg.num_workers:
        raise UserError(f"--worker-index must be in [0, --num-workers); got {cfg.worker_index} of {cfg.num_workers}")
    parse_engine_args(cfg.vllm_args, "--vllm-args")


@dataclass
class TeacherFacts:
    tokenizer: object
    vocab_size: int  # rows of the LM head: the range of token ids
    context: int | None  # positions the model was built for
    dtype: str  # the dtype it was saved in: what `--dtype auto` means for both engines


def teacher_facts(folder: Path) -> TeacherFacts:
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:
        raise UserError(f"cannot load model {folder}: {first_line(exc)}") from None
    text = config.get_text_config()
    if not getattr(text, "vocab_size", None):
        raise UserError(f"cannot load model {folder}: its config has no vocab_size")
    saved = getattr(config, "dtype", None) or "float32"
    return TeacherFacts(tokenizer, int(text.vocab_size), getattr(text, "max_position_embeddings", None),
                        str(saved).removeprefix("torch."))


def remove_orphans(cache: Path, part: WorkerPart) -> None:
    """Shards of this worker that a killed run wrote but never recorded, and temporary files."""
    listed = {s["file"] for s in part.shards}
    for f in cache.glob(f"{shard_prefix(part.worker_index)}-*.arrow"):
        if f.name not in listed:
            f.unlink()
    for f in cache.glob(f".{shard_prefix(part.worker_index)}-*.tmp*"):
        f.unlink()


def batches(rows, part: WorkerPart, to_sequence: RowTokenizer, batch_tokens: int):
    """Yield (sequences, cursor) in source order, each batch holding about `batch_tokens` tokens."""
    cursor = dict(part.cursor)
    batch: list[Sequence] = []
    tokens = 0
    start = cursor["next_row"]
    for index, row in enumerate(rows.select(range(start, part.row_end)), start=start):
        seq, change = to_sequence(row, index)
        if change:
            cursor[change] += 1
        cursor["next_row"] = index + 1
        if seq is not None:
            batch.append(seq)
            tokens += len(seq.input_ids)
        if tokens >= batch_tokens:
            yield batch, dict(cursor)
            batch, tokens = [], 0
    yield batch, dict(cursor)


def drive(engine: Engine, settings: HeadSettings, batch_stream: Iterable[tuple[list[Sequence], dict[str, int]]],
          background: BackgroundWriter, cursor: dict[str, int]) -> dict[str, int]:
    """The hot loop: the engine and the head path compute batch i+1 while the writer thread encodes and writes
    batch i. Returns the cursor after the last batch."""
    with interrupts_at_safe_points() as stop_if_interrupted:
        try:
            for sequences, cursor in batch_stream:
                stop_if_interrupted()
                if sequences:
                    background.put(teacher_batch(engine, sequences, settings), cursor)
        finally:
            background.close()
    return dict(cursor)


def progress_bar(console: Console, enabled: bool) -> Progress:
    return step_bar("dump-teacher", console, enabled, TextColumn("sequences"), TextColumn("{task.fields[tokens]:,} tokens"),
                    TextColumn("{task.fields[rate]:,.0f} tok/s"))


def head_settings(cfg: DumpConfig) -> HeadSettings:
    return HeadSettings(cfg.top_k, cfg.top_p, cfg.tail_samples, cfg.seed, cfg.lm_head_chunk)


def run_engine(cfg: DumpConfig, cache: Path, part: WorkerPart, engine: Engine, rows, to_sequence: RowTokenizer,
               vocab_size: int) -> dict[str, int]:
    """The hot loop: the engine's batches through the background writer, each committed shard recorded in the
    worker's part file. Returns the final cursor."""

    def on_commit(entry) -> None:
        part.shards.append(asdict(entry))
        part.cursor = dict(entry.cursor)
        save_part(cache, part)

    writer = ShardWriter(cache, shard_prefix(cfg.worker_index), len(part.shards), vocab_size, cfg.top_k, cfg.precision,
                         int(cfg.shard_size_mb * 2**20), cfg.zstd_level, on_commit, cfg.tail_samples)
    with progress_bar(cfg.console, cfg.progress) as progress:
        task = progress.add_task("dump", total=part.row_end - part.row_start, tokens=0, rate=0.0)
        done = {"rows": part.cursor["next_row"] - part.row_start, "tokens": 0}
        progress.update(task, completed=done["rows"])

        def on_written(records: list[TeacherRecord]) -> None:
            done["tokens"] += sum(len(r.input_ids) for r in records)
            elapsed = progress.tasks[task].elapsed or 1e-9
            progress.update(task, advance=len(records), tokens=done["tokens"], rate=done["tokens"] / elapsed)

        return drive(engine, head_settings(cfg), batches(rows, part, to_sequence, cfg.batch_tokens),
                     BackgroundWriter(writer, on_written), part.cursor)


def dump_teacher(cfg: DumpConfig, engine: Engine | None = None) -> dict:
    """Run (or resume) this worker's share of the dump. Returns a summary of what the cache holds.

    `engine`: one already open on this teacher with the settings this dump needs (`engine_config`), to dump
    several caches (top-k and sampled, train and held-out) for one start-up; the caller closes it. Without it,
    the engine is opened here and closed at the end."""
    check_options(cfg)
    engine_name = resolve_engine(cfg.engine)
    check_writable_folder(cfg.output, "--output")
    folder = resolve_model(cfg.model)
    teacher = teacher_facts(folder)
    tokenizer, vocab_size = teacher.tokenizer, teacher.vocab_size
    if cfg.top_k > vocab_size:
        raise UserError(f"--top-k {cfg.top_k} is larger than the vocabulary ({vocab_size} tokens)")
    if teacher.context is not None and cfg.max_length is not None and cfg.max_length > teacher.context:
        raise UserError(f"--max-length {cfg.max_length} is beyond the teacher's context of {teacher.context} positions")
    max_length = cfg.max_length or teacher.context or 2048
    wanted = engine_config(cfg, folder, teacher, max_length)
    check_parallelism(engine_name, wanted)
    if engine is not None and (engine.name, engine.config) != (engine_name, wanted):
        raise UserError(f"the open {engine.name} engine runs {engine.config}; this dump needs {engine_name} with {wanted}")
    data = resolve_data(cfg.data)
    rows = load_rows(data, cfg.split)
    if len(rows) == 0:
        raise UserError(f"the dataset {', '.join(cfg.data)} (split {cfg.split}) has no rows")
    kind = detect_kind(rows.column_names, cfg.input_kind)
    check_rows(rows, kind, vocab_size)
    to_sequence = RowTokenizer(tokenizer, kind, max_length, cfg.overlong, source_tag(data))
    to_sequence.check_renders(rows, *worker_slice(len(rows), cfg.num_workers, cfg.worker_index))
    settings = {
        "format_version": FORMAT_VERSION, "teacher": cfg.model, "teacher_hash": model_hash(folder),
        "tokenizer_hash": tokenizer_hash(tokenizer), "vocab_size": vocab_size, "tokenizer_size": len(tokenizer),
        "top_k": cfg.top_k, "top_p": cfg.top_p, "tail_samples": cfg.tail_samples, "seed": cfg.seed, "precision": cfg.precision,
        "logprob_step": LOGPROB_STEP if cfg.precision == "compact" else None, "id_dtype": id_dtype(vocab_size).name,
        "dataset": cfg.data, "split": cfg.split, "dataset_fingerprint": dataset_fingerprint(data, rows),
        "dataset_rows": len(rows), "input_kind": kind, "max_length": max_length, "overlong": cfg.overlong,
        "engine": engine_name, "dtype": wanted.dtype, "engine_args": wanted.engine_args, "num_workers": cfg.num_workers,
    }

    cache = cfg.output
    check_compatible(cache, settings)
    # Everything that can fail on a typo or a bad model fails here, before this worker writes anything.
    owned = engine is None
    engine = open_engine(engine_name, wanted) if owned else engine
    try:
        rows_of_head = engine.head.weight.shape[0]
        if cfg.top_k > rows_of_head:
            raise UserError(f"--top-k {cfg.top_k} is above the teacher's LM head of {rows_of_head} rows")
        with (exclusive_lock(worker_lock(cache, cfg.worker_index), f"worker {cfg.worker_index} of {cfg.num_workers} in {cache}"),
              write_errors(cache, lambda: RERUN)):
            try:
                return finish_worker(cfg, cache, settings, engine, rows, to_sequence, vocab_size, max_length)
            except KeyboardInterrupt:
                raise Interrupted(f"interrupted: the committed shards are kept; {RERUN}") from None
    finally:
        if owned:
            engine.close()


def engine_config(cfg: DumpConfig, folder: Path, teacher: TeacherFacts, max_length: int) -> EngineConfig:
    """The backbone a dump needs: `--dtype auto` is the dtype the teacher was saved in."""
    return EngineConfig(str(folder), max_length, teacher.dtype if cfg.dtype == "auto" else cfg.dtype, cfg.tensor_parallel_size,
                        cfg.pipeline_parallel_size, cfg.distributed_backend, parse_engine_args(cfg.vllm_args, "--vllm-args"))


def claim_part(cfg: DumpConfig, cache: Path, settings: dict, num_rows: int) -> WorkerPart:
    """This worker's part (resumed, or new), once the folder's other parts agree with it."""
    check_compatible(cache, settings)  # again, under the locks: another process may have committed meanwhile
    # A part with other settings committed nothing (check_compatible refuses otherwise). If its worker is alive,
    # the folder belongs to a running dump of other settings (another worker count: whatever the order, the
    # second refuses). If not, it is left from a run that died before its first shard, holds no data, and would
    # keep the manifest from ever being written: start over it.
    for other in (p for p in load_parts(cache) if p.settings != settings):
        if other.worker_index != cfg.worker_index and is_locked(worker_lock(cache, other.worker_index)):
            diff = describe_differences(other.settings, settings, "there", "now")
            raise UserError(f"{cache} is being dumped by another running process with other settings ({diff}): "
                            "wait for it to finish, or use another --output")
        part_path(cache, other.worker_index, other.num_workers).unlink(missing_ok=True)
    part = next((p for p in load_parts(cache) if p.worker_index == cfg.worker_index), None)
    if part is None:
        start, end = worker_slice(num_rows, cfg.num_workers, cfg.worker_index)
        part = WorkerPart(settings, cfg.worker_index, cfg.num_workers, start, end,
                          cursor={"next_row": start, "dropped": 0, "truncated": 0})
        save_part(cache, part)
    return part


def finish_worker(cfg: DumpConfig, cache: Path, settings: dict, engine: Engine, rows, to_sequence: RowTokenizer,
                  vocab_size: int, max_length: int) -> dict:
    """This worker's share, under its lock: start or resume its part, run the engine, mark it done."""
    # Which parts the folder holds is decided by one process at a time: two dumps started together with
    # different settings (another worker count) must not both see an empty folder.
    with exclusive_lock(cache / PARTS_DIR / "layout.lock", f"the parts of {cache}", wait=True):
        part = claim_part(cfg, cache, settings, len(rows))
    if part.done:
        complete = try_finalize(cache)
        cfg.console.print(f"worker {cfg.worker_index} of {cfg.num_workers} already finished in {cache}: nothing to do"
                          + ("" if complete else " (other workers still missing)"))
        return {"complete": complete, "resumed": False, "nothing_to_do": True}
    resumed = bool(part.shards)
    remove_orphans(cache, part)
    final = run_engine(cfg, cache, part, engine, rows, to_sequence, vocab_size)
    part.cursor, part.done = final, True
    save_part(cache, part)
    complete = try_finalize(cache)
    records = sum(s["records"] for s in part.shards)
    cfg.console.print(
        f"worker {cfg.worker_index} of {cfg.num_workers}: {records} sequences, {sum(s['tokens'] for s in part.shards):,} tokens "
        f"in {len(part.shards)} shards ({'resumed' if resumed else 'fresh run'}); "
        f"dropped {final['dropped']}, truncated {final['truncated']} to {max_length} tokens; "
        + ("cache complete" if complete else "waiting for other workers")
    )
    return {"complete": complete, "resumed": resumed, "nothing_to_do": False, "records": records}
