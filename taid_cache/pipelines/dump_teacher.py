"""Stage one: run the teacher over a dataset once and store its top-k next-token log-probs.

One obvious path: check every input before anything is written, reopen this worker's part of the cache
(or start it), then tokenize -> batch -> engine -> writer thread, committing shards as they fill.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from rich.console import Console
from rich.progress import Progress, TextColumn

from ..config import DumpConfig, check_fields
from ..engines.base import (
    Engine, EngineConfig, check_parallelism, engine_class, open_engine, parse_engine_args, resolve_engine,
)
from ..engines.head_path import HeadSettings, teacher_batch
from ..errors import Interrupted, UserError, first_line, interrupts_at_safe_points, write_errors
from ..fingerprints import model_hash, resolve_model, tokenizer_hash
from ..inputs.generated import lineage_of
from ..inputs import (
    RowTokenizer, Sequence, check_rows, dataset_fingerprint, detect_kind, load_rows, resolve_data, source_tag, worker_slice,
)
from ..settings import describe_differences
from ..shards.contract import CacheSettings, Cursor, ShardEntry, WorkerPart, build_settings
from ..shards.manifest import (
    check_compatible, layout_lease, load_parts, remove_orphans, remove_part, save_part, try_finalize, worker_lease,
)
from ..progress import step_bar
from ..shards.record import TeacherRecord
from ..shards.writer import BackgroundWriter, ShardWriter
from ..storage import Store, open_store, remote_errors


RERUN = "rerun the same command to resume"


def check_options(cfg: DumpConfig) -> None:
    """Each field's declared range (config.py), then the ones that depend on each other."""
    check_fields(cfg)
    if cfg.top_k < (0 if cfg.tail_samples else 1):  # a sampled tail may stand alone
        raise UserError(f"--top-k must be at least {0 if cfg.tail_samples else 1}, not {cfg.top_k}")
    if cfg.tail_samples and cfg.top_p is not None:
        raise UserError(f"--tail-samples {cfg.tail_samples} draws off the whole top-k: it cannot be combined with --top-p "
                        "(the default dump draws 32: add --tail-samples 0 for a top-p cache)")
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


def batches(rows, part: WorkerPart, to_sequence: RowTokenizer, batch_tokens: int):
    """Yield (sequences, cursor) in source order, each batch holding about `batch_tokens` tokens."""
    cursor = part.cursor
    batch: list[Sequence] = []
    tokens = 0
    start = cursor.next_row
    for index, row in enumerate(rows.select(range(start, part.row_end)), start=start):
        seq, change = to_sequence(row, index)
        cursor = cursor.after(index, change)
        if seq is not None:
            batch.append(seq)
            tokens += len(seq.input_ids)
        if tokens >= batch_tokens:
            yield batch, cursor
            batch, tokens = [], 0
    yield batch, cursor


def drive(engine: Engine, settings: HeadSettings, batch_stream: Iterable[tuple[list[Sequence], Cursor]],
          background: BackgroundWriter, cursor: Cursor) -> Cursor:
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
    return cursor


def progress_bar(console: Console, enabled: bool) -> Progress:
    return step_bar("dump-teacher", console, enabled, TextColumn("sequences"), TextColumn("{task.fields[tokens]:,} tokens"),
                    TextColumn("{task.fields[rate]:,.0f} tok/s"))


def head_settings(cfg: DumpConfig) -> HeadSettings:
    return HeadSettings(cfg.top_k, cfg.top_p, cfg.tail_samples, cfg.seed, cfg.lm_head_chunk, cfg.target_logprobs)


def run_engine(cfg: DumpConfig, cache: Store, part: WorkerPart, engine: Engine, rows, to_sequence: RowTokenizer,
               vocab_size: int) -> Cursor:
    """The hot loop: the engine's batches through the background writer, each committed shard recorded in the
    worker's part file (which makes it part of the cache). Returns the final cursor."""

    def on_commit(entry: ShardEntry) -> None:
        part.shards.append(entry)
        part.cursor = entry.cursor
        save_part(cache, part)

    writer = ShardWriter(cache, cfg.worker_index, len(part.shards), vocab_size, cfg.top_k, cfg.precision,
                         int(cfg.shard_size_mb * 2**20), cfg.zstd_level, on_commit, cfg.tail_samples, cfg.target_logprobs)
    with progress_bar(cfg.console, cfg.progress) as progress:
        task = progress.add_task("dump", total=part.row_end - part.row_start, tokens=0, rate=0.0)
        done = {"rows": part.cursor.next_row - part.row_start, "tokens": 0}
        progress.update(task, completed=done["rows"])

        def on_written(records: list[TeacherRecord]) -> None:
            done["tokens"] += sum(len(r.input_ids) for r in records)
            elapsed = progress.tasks[task].elapsed or 1e-9
            progress.update(task, advance=len(records), tokens=done["tokens"], rate=done["tokens"] / elapsed)

        return drive(engine, head_settings(cfg), batches(rows, part, to_sequence, cfg.batch_tokens),
                     BackgroundWriter(writer, on_written), part.cursor)


def dump_engine(cfg: DumpConfig) -> tuple[str, str]:
    """The engine this dump runs, and why when `--engine auto` chose it."""
    return resolve_engine(cfg.engine, cfg.tensor_parallel_size > 1 or cfg.pipeline_parallel_size > 1)


def dump_teacher(cfg: DumpConfig, engine: Engine | None = None) -> dict:
    """Run (or resume) this worker's share of the dump. Returns a summary of what the cache holds.

    `engine`: one already open on this teacher with the settings this dump needs (`engine_config`), to dump
    several caches (top-k and sampled, train and held-out) for one start-up; the caller closes it. Without it,
    the engine is opened here and closed at the end."""
    check_options(cfg)
    engine_name, why = dump_engine(cfg)
    if engine is None and why:
        cfg.console.print(f"engine: {engine_name} (--engine auto: {why})")
    cache = open_store(cfg.output)
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
    if engine is None:  # the engine's own checks of its settings (vLLM's: --vllm-args, the parallel sizes)
        engine_class(engine_name).check_config(wanted)
    # The output is checked (and created, empty) only once the options, the teacher and the engine's settings
    # passed: a refused one leaves no folder behind. Still before the dataset is read and the engine starts.
    with remote_errors(cache.url, "--output"):
        cache.check_writable("--output")
    data = resolve_data(cfg.data)
    rows = load_rows(data, cfg.split)
    if len(rows) == 0:
        raise UserError(f"the dataset {', '.join(cfg.data)} (split {cfg.split}) has no rows")
    kind = detect_kind(rows.column_names, cfg.input_kind)
    check_rows(rows, kind, vocab_size)
    to_sequence = RowTokenizer(tokenizer, kind, max_length, cfg.overlong, source_tag(data))
    to_sequence.check_renders(rows, *worker_slice(len(rows), cfg.num_workers, cfg.worker_index))
    settings = build_settings(
        teacher=cfg.model, teacher_hash=model_hash(folder), tokenizer_hash=tokenizer_hash(tokenizer), vocab_size=vocab_size,
        tokenizer_size=len(tokenizer), top_k=cfg.top_k, top_p=cfg.top_p, tail_samples=cfg.tail_samples, seed=cfg.seed,
        target_logprobs=cfg.target_logprobs,
        precision=cfg.precision, dataset=cfg.data, split=cfg.split, dataset_fingerprint=dataset_fingerprint(data, rows),
        dataset_rows=len(rows), input_kind=kind, max_length=max_length, overlong=cfg.overlong, engine=engine_name,
        dtype=wanted.dtype, engine_args=wanted.engine_args, num_workers=cfg.num_workers, lineage=lineage_of(data))
    with remote_errors(cache.url, "--output"):
        check_compatible(cache, settings)
    # Everything that can fail on a typo or a bad model fails here, before this worker writes anything.
    owned = engine is None
    engine = open_engine(engine_name, wanted) if owned else engine
    try:
        rows_of_head = engine.head.weight.shape[0]
        if cfg.top_k > rows_of_head:
            raise UserError(f"--top-k {cfg.top_k} is above the teacher's LM head of {rows_of_head} rows")
        leases, lease = worker_lease(cache, cfg.worker_index)
        with (leases.lease(lease, f"worker {cfg.worker_index} of {cfg.num_workers} in {cache.url}"),
              write_errors(cache.url, lambda: RERUN)):
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


def claim_part(cfg: DumpConfig, cache: Store, settings: CacheSettings, num_rows: int) -> WorkerPart:
    """This worker's part (resumed, or new), once the folder's other parts agree with it."""
    check_compatible(cache, settings)  # again, under the locks: another process may have committed meanwhile
    # A part with other settings committed nothing (check_compatible refuses otherwise). If its worker is alive,
    # the folder belongs to a running dump of other settings (another worker count: whatever the order, the
    # second refuses). If not, it is left from a run that died before its first shard, holds no data, and would
    # keep the manifest from ever being written: start over it.
    for other in (p for p in load_parts(cache) if p.settings != settings):
        leases, lease = worker_lease(cache, other.worker_index)
        if other.worker_index != cfg.worker_index and leases.is_leased(lease):
            diff = describe_differences(other.settings.to_json(), settings.to_json(), "there", "now")
            raise UserError(f"{cache.url} is being dumped by another running process with other settings ({diff}): "
                            "wait for it to finish, or use another --output")
        remove_part(cache, other)
    part = next((p for p in load_parts(cache) if p.worker_index == cfg.worker_index), None)
    if part is None:
        start, end = worker_slice(num_rows, cfg.num_workers, cfg.worker_index)
        part = WorkerPart(settings, cfg.worker_index, cfg.num_workers, start, end, cursor=Cursor(start))
        save_part(cache, part)
    return part


def finish_worker(cfg: DumpConfig, cache: Store, settings: CacheSettings, engine: Engine, rows, to_sequence: RowTokenizer,
                  vocab_size: int, max_length: int) -> dict:
    """This worker's share, under its lock: start or resume its part, run the engine, mark it done."""
    # Which parts the folder holds is decided by one process at a time: two dumps started together with
    # different settings (another worker count) must not both see an empty folder.
    leases, lease = layout_lease(cache)
    with leases.lease(lease, f"the parts of {cache.url}", wait=True):
        part = claim_part(cfg, cache, settings, len(rows))
    if part.done:
        complete = try_finalize(cache)
        cfg.console.print(f"worker {cfg.worker_index} of {cfg.num_workers} already finished in {cache.url}: nothing to do"
                          + ("" if complete else " (other workers still missing)"))
        return {"complete": complete, "resumed": False, "nothing_to_do": True}
    resumed = bool(part.shards)
    remove_orphans(cache, part)
    final = run_engine(cfg, cache, part, engine, rows, to_sequence, vocab_size)
    part.cursor, part.done = final, True
    save_part(cache, part)
    complete = try_finalize(cache)
    records = part.records
    cfg.console.print(
        f"worker {cfg.worker_index} of {cfg.num_workers}: {records} sequences, {part.tokens:,} tokens "
        f"in {len(part.shards)} shards ({'resumed' if resumed else 'fresh run'}); "
        f"dropped {final.dropped}, truncated {final.truncated} to {max_length} tokens; "
        + ("cache complete" if complete else "waiting for other workers")
    )
    return {"complete": complete, "resumed": resumed, "nothing_to_do": False, "records": records}
