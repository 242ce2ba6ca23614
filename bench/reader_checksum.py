"""What a reader's checks cost: decoding every record batch of a shard with and without the per-batch crc32 and
the invariant checks (integrity.check_invariants, run by `decode_batch` unless `checked=False`).

A synthetic shard shaped like a real cache (vocabulary 49,152, top-64, compact precision, 512-token sequences)
is written with the project's writer; reading it back is timed three ways, interleaved, over several rounds:
the medians are reported (the machine may be shared: the load average is reported with them).
"""

from __future__ import annotations

import os
import statistics
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
ROUNDS = 7


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

            def decode(crc: bool, invariants: bool) -> float:
                start = time.perf_counter()
                for batch in batches:
                    if crc:
                        batch_crc32(batch)
                    for _ in decode_batch(batch, settings, checked=invariants):
                        pass
                return time.perf_counter() - start

            modes = {"decode only": (False, False), "crc32 + decode": (True, False), "crc32 + invariants + decode": (True, True)}
            times: dict[str, list[float]] = {name: [] for name in modes}
            for _ in range(ROUNDS):
                for name, mode in modes.items():
                    times[name].append(decode(*mode))
    load = os.getloadavg()[0]
    median = {name: statistics.median(t) for name, t in times.items()}
    crc_share = median["crc32 + decode"] / median["decode only"] - 1
    invariant_share = median["crc32 + invariants + decode"] / median["crc32 + decode"] - 1
    rows = "".join(f"| {name} | {median[name]:.3f} |\n" for name in modes)
    table = (f"| reader, {SEQS} sequences x {T} tokens, top-{K} | seconds (median of {ROUNDS}, interleaved) |\n|---|---|\n{rows}"
             f"| overhead of the crc32 check | {100 * crc_share:.1f}% |\n"
             f"| overhead of the invariant checks (over crc32 + decode) | {100 * invariant_share:.1f}% |\n"
             f"| load average (1 min) at the end | {load:.2f} |")
    publish("reader_checksum", table, {"decode_s": median["decode only"], "checked_s": median["crc32 + decode"],
                                       "invariants_s": median["crc32 + invariants + decode"], "overhead": crc_share,
                                       "invariant_overhead": invariant_share, "loadavg": load})


if __name__ == "__main__":
    main()
