"""What the per-batch crc32 costs a reader: decoding every record batch of a shard with and without the check.

A synthetic shard shaped like a real cache (vocabulary 49,152, top-64, compact precision, 512-token sequences)
is written with the project's writer; reading it back is timed both ways, alternating, best of several rounds.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from publish import publish
from taid_cache.shards.contract import Cursor, build_settings
from taid_cache.shards.integrity import batch_crc32
from taid_cache.shards.reader import decode_batch
from taid_cache.shards.record import TeacherRecord
from taid_cache.shards.writer import ShardWriter
from taid_cache.storage import open_store

VOCAB, K, T, SEQS, PER_BATCH = 49152, 64, 512, 256, 16


def records(rng: np.random.Generator, n: int) -> list[TeacherRecord]:
    out = []
    for i in range(n):
        ids = np.stack([rng.choice(VOCAB, K, replace=False) for _ in range(T - 1)])
        lps = np.sort(np.log(rng.dirichlet(np.full(VOCAB // 256, 0.1), size=T - 1)[:, :K] + 1e-9), axis=1)[:, ::-1].astype(np.float32)
        tail = np.log1p(-np.exp(lps.astype(np.float64)).sum(1)).astype(np.float32)
        entropy = np.full(T - 1, 2.0, np.float32)  # any finite value: the fidelity sums are not what this measures
        out.append(TeacherRecord(f"s{i}", rng.integers(0, VOCAB, T), np.ones(T, bool), ids, np.ascontiguousarray(lps), tail, entropy))
    return out


def synthetic_settings():
    """The settings record `decode_batch` reads (the head's width, the tail, the precision) for the synthetic shard;
    the provenance fields are placeholders."""
    return build_settings(teacher="synthetic", teacher_hash="", tokenizer_hash="", vocab_size=VOCAB, tokenizer_size=VOCAB, top_k=K,
                          top_p=None, tail_samples=0, seed=0, precision="compact", dataset=["synthetic"], split="train",
                          dataset_fingerprint="", dataset_rows=SEQS, input_kind="tokens", max_length=T, overlong="truncate",
                          engine="hf", dtype="float32", engine_args={}, num_workers=1)


def main() -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        entries = []
        writer = ShardWriter(open_store(tmp), 0, 0, VOCAB, K, "compact", 1 << 40, 3, entries.append)
        for start in range(0, SEQS, PER_BATCH):
            writer.write(records(rng, PER_BATCH), Cursor(start + PER_BATCH))
        writer.commit()
        settings = synthetic_settings()
        path = Path(tmp) / entries[0].file
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_file(source)
            batches = [reader.get_batch(b) for b in range(reader.num_record_batches)]

            def decode(check: bool) -> float:
                start = time.perf_counter()
                for batch in batches:
                    if check:
                        batch_crc32(batch)
                    for _ in decode_batch(batch, settings):
                        pass
                return time.perf_counter() - start

            plain, checked = [], []
            for _ in range(5):
                plain.append(decode(False))
                checked.append(decode(True))
    overhead = min(checked) / min(plain) - 1
    table = (f"| reader, {SEQS} sequences x {T} tokens, top-{K} | seconds (best of 5) |\n|---|---|\n"
             f"| decode only | {min(plain):.3f} |\n| crc32 check + decode | {min(checked):.3f} |\n"
             f"| overhead of the check | {100 * overhead:.1f}% |")
    publish("reader_checksum", table, {"decode_s": min(plain), "checked_s": min(checked), "overhead": overhead})


if __name__ == "__main__":
    main()
