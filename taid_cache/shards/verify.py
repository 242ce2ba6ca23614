"""`verify`: a cache is complete and every shard is intact (checksum, schema, counts, the invariants of what it
holds), its shards cover the kept dataset rows each once in the writers' order, wherever it is stored."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pyarrow as pa

from ..errors import UserError
from ..storage import Store, open_store, remote_errors
from ..inputs.dataset import worker_slice
from .contract import CacheSettings, Cursor, Manifest, ShardEntry
from .integrity import InvariantBroken, check_invariants, invariant_error
from .manifest import load_manifest
from .reader import ShardFiles
from .schema import shard_schema


def verify_cache(location: str | Path, local_dir: str | None = None) -> Manifest:
    """Return the manifest of a sound cache; raise UserError naming the first bad shard otherwise. A remote
    cache's shards are fetched one ahead, and kept in `local_dir` when given (what training then reads)."""
    cache = open_store(str(location))
    manifest = load_manifest(cache)
    settings = manifest.settings
    expected = shard_schema(settings.vocab_size, settings.top_k, settings.precision, settings.tail_samples,
                            settings.target_logprobs)
    # Every byte from the store itself (a local copy is refreshed with what was checked, never trusted instead).
    files = ShardFiles(cache, manifest, read_ahead=1, local_dir=Path(local_dir) if local_dir else None, reuse_local=False)
    try:
        for index, shard in enumerate(manifest.shards):
            check_shard(cache, files, index, shard, expected, settings)
    finally:
        files.close()
    expected_rows = settings.dataset_rows - manifest.dropped
    if manifest.records != expected_rows:
        raise UserError(f"{cache.url} is incomplete: {manifest.records} records for {expected_rows} kept dataset rows")
    check_coverage(manifest, cache.url)
    return manifest


def verify_teacher(manifest: Manifest, model: str, url: str) -> None:
    """The cache is `model`'s: the model's weights and config hash to the manifest's teacher_hash, and its tokenizer
    to its tokenizer_hash (both as the dump computed them: fingerprints.model_hash, tokenizer_hash). The manifest is
    not signed, and the shards' checksums do not cover it: an edited teacher or teacher_hash passes every other
    check (and lets another teacher's eval cache into a run), so only hashing the real model tells."""
    from transformers import AutoTokenizer

    from ..errors import first_line
    from ..fingerprints import model_hash, resolve_model, tokenizer_hash

    settings = manifest.settings
    folder = resolve_model(model, "--model")
    actual = model_hash(folder)
    if actual != settings.teacher_hash:
        raise UserError(f"{url} is not {model}'s cache: its manifest records teacher {settings.teacher!r} with teacher_hash "
                        f"{settings.teacher_hash[:16]}…, {model} hashes to {actual[:16]}… (another teacher, other weights, "
                        "or an edited manifest)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise UserError(f"cannot load the tokenizer of --model {model}: {first_line(exc)}") from None
    if tokenizer_hash(tokenizer) != settings.tokenizer_hash:
        raise UserError(f"{url} is not {model}'s cache: its manifest's tokenizer_hash is not {model}'s tokenizer's (another "
                        "tokenizer, or an edited manifest)")


SHARD_NAME = re.compile(r"shard-w(\d{5})-(\d{5})")  # the worker, the shard's number in its order


def check_coverage(manifest: Manifest, url: str) -> None:
    """The shards hold exactly the kept dataset rows, each once, in reading order. What the manifest records
    says so without reading a row: worker w wrote the rows of its slice (inputs/dataset.worker_slice) in order,
    and each shard's cursor is where the worker stood once that shard was in. So the entries come worker by
    worker (the worker its file name says, by the shard numbers it holds), each file once; within a worker the
    cursors' rows strictly increase inside its slice, their dropped and truncated counts never fall, and each shard holds the rows its cursor
    moved over less those dropped (the truncated ones among them); the rows past a worker's last shard were all
    dropped (a batch of only dropped rows writes no shard), and the dropped and truncated counts add up to the
    manifest's. Entries in any other order are refused, not re-sorted: the order is the cache's reading order
    and part of its identity (the manifest's hash), so another order is another cache that no writer made."""
    settings = manifest.settings
    workers = manifest.num_workers
    seen: set[str] = set()
    last = -1
    numbers = dict.fromkeys(range(workers), -1)
    stands = {w: Cursor(worker_slice(settings.dataset_rows, workers, w)[0]) for w in range(workers)}

    def refuse(shard: ShardEntry, what: str) -> UserError:
        return UserError(f"{url} does not cover its dataset: shard {shard.file} {what}; the manifest is not one the "
                         "dump wrote (dump the teacher again)")

    for shard in manifest.shards:
        if shard.file in seen:
            raise refuse(shard, "is listed twice")
        seen.add(shard.file)
        named = SHARD_NAME.match(shard.file)
        worker, number = (int(named.group(1)), int(named.group(2))) if named else (-1, -1)
        if not 0 <= worker < workers:
            raise refuse(shard, f"is not a shard of any of the cache's {workers} workers")
        if worker < last:
            raise refuse(shard, f"(worker {worker}) is listed after a shard of worker {last}: entries out of reading order")
        if worker == last and number <= numbers[worker]:
            raise refuse(shard, f"is listed after shard {numbers[worker]} of worker {worker}: entries out of reading order")
        last, numbers[worker] = worker, number
        start, end = worker_slice(settings.dataset_rows, workers, worker)
        before, after = stands[worker], shard.cursor
        if not before.next_row < after.next_row <= end:
            raise refuse(shard, f"ends at row {after.next_row}, not past row {before.next_row} within worker {worker}'s "
                         f"slice [{start}, {end}): entries out of order, repeated or from another dataset")
        dropped, truncated = after.dropped - before.dropped, after.truncated - before.truncated
        consumed = after.next_row - before.next_row
        if dropped < 0 or truncated < 0 or shard.records != consumed - dropped or truncated > shard.records:
            raise refuse(shard, f"holds {shard.records} records for rows [{before.next_row}, {after.next_row}) of which "
                         f"{dropped} dropped and {truncated} truncated (an entry out of order, repeated or missing)")
        stands[worker] = after
    # Past a worker's last shard: rows that were all dropped.
    dropped = sum(c.dropped + worker_slice(settings.dataset_rows, workers, w)[1] - c.next_row for w, c in stands.items())
    truncated = sum(c.truncated for c in stands.values())
    if (dropped, truncated) != (manifest.dropped, manifest.truncated):
        raise UserError(f"{url} does not cover its dataset: its shards' cursors leave {dropped} rows dropped and "
                        f"{truncated} truncated, the manifest says {manifest.dropped} and {manifest.truncated}")


def check_shard(cache: Store, files: ShardFiles, index: int, shard: ShardEntry, expected: pa.Schema, settings: CacheSettings) -> None:
    """One shard against its manifest entry: present, its bytes' size and sha256, readable, its schema and rows, and
    every record batch's invariants."""
    with remote_errors(cache.url):
        try:
            if cache.is_local:
                with cache.open_input(shard.file) as source:  # memory-mapped: hashed without a copy
                    data = source.read_buffer()
            else:
                data = pa.py_buffer(files.fetched(index))
        except FileNotFoundError:
            raise UserError(f"bad shard {shard.file}: file is missing") from None
    if data.size != shard.bytes or hashlib.sha256(memoryview(data)).hexdigest() != shard.sha256:
        raise UserError(f"bad shard {shard.file}: checksum does not match the manifest")
    try:
        reader = pa.ipc.open_file(pa.BufferReader(data))
        batches = [reader.get_batch(b) for b in range(reader.num_record_batches)]
    except pa.ArrowException as exc:
        raise UserError(f"bad shard {shard.file}: not readable as Arrow IPC ({exc})") from None
    if not reader.schema.equals(expected, check_metadata=True):
        raise UserError(f"bad shard {shard.file}: schema differs from the cache's settings")
    rows = sum(batch.num_rows for batch in batches)
    if rows != shard.records:
        raise UserError(f"bad shard {shard.file}: {rows} records, manifest says {shard.records}")
    for b, batch in enumerate(batches):  # what the records hold (shards/integrity.check_invariants)
        try:
            check_invariants(batch, settings)
        except InvariantBroken as broken:
            raise invariant_error(batch, broken, f"{shard.file} (record batch {b})") from None
