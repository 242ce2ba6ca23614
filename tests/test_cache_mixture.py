"""Several caches of one teacher as one training stream (training/data.py's `CacheMixture`): each global item's
source drawn by its weight from (seed, position) alone, each source read in its own stream's order, a resumed
stream equal to the uninterrupted one, the partition over ranks × workers unchanged, each source's read-ahead
starting where that source stands, and the refusal of caches that cannot be mixed. The caches are written here
with the shard writer, without a model; each record's sample_id names its cache, shard and row."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from taid_cache.errors import UserError
from taid_cache.shards.codec import LOGPROB_STEP
from taid_cache.shards.contract import Cursor, Lineage, Manifest, WorkerPart, build_settings
from taid_cache.shards.manifest import load_manifest, save_part, try_finalize
from taid_cache.shards.record import TeacherRecord
from taid_cache.shards.writer import ShardWriter
from taid_cache.storage import open_store
from taid_cache.training import data
from taid_cache.training.metrics import read_metrics
from taid_cache.training.data import (CacheMixture, CacheRows, MixSchedule, StreamOrder, check_mixable, mixed_stream, partition,
                                      shard_sequence, source_counts, source_seed, stream)
from test_read_ahead import CountingRemote

SHARDS = [5, 1, 7, 4]  # rows per shard: uneven, one of a single row
MANY = [3, 2, 4, 3, 1, 5, 2, 3, 4, 3]
VOCAB, K, PER_BATCH = 16, 2, 3


def record(sample_id: str) -> TeacherRecord:
    """A three-token sequence whose head and tail sum to one (log-probs on the compact grid: exact either way)."""
    head = np.array([-44, -89], np.float32) * LOGPROB_STEP
    tail = np.float32(np.log1p(-np.exp(head.astype(np.float64)).sum()))
    return TeacherRecord(sample_id, np.array([1, 2, 3]), np.ones(3, bool), np.array([[0, 1], [2, 3]]), np.tile(head, (2, 1)),
                         np.full(2, tail, np.float32), np.ones(2, np.float32))


def write_cache(folder: Path, tag: str, shards: list[int] = SHARDS, per_batch: int = PER_BATCH, **settings) -> Path:
    """A finished cache of `shards` (rows per shard, in record batches of `per_batch`), record `tag/shard/row`."""
    cache = open_store(str(folder))
    recorded = build_settings(**{**dict(teacher="tiny", teacher_hash="t", tokenizer_hash="tok", vocab_size=VOCAB, tokenizer_size=VOCAB,
                                        top_k=K, top_p=None, tail_samples=0, seed=0, precision="compact", dataset=[tag], split="train",
                                        dataset_fingerprint=tag, dataset_rows=sum(shards), input_kind="tokens", max_length=8,
                                        overlong="truncate", engine="hf", dtype="float32", engine_args={}, num_workers=1), **settings})
    entries: list = []
    writer = ShardWriter(cache, 0, 0, VOCAB, K, recorded.precision, 1 << 30, 1, entries.append)
    for s, n in enumerate(shards):
        for first in range(0, n, per_batch):
            writer.write([record(f"{tag}/{s}/{r}") for r in range(first, min(first + per_batch, n))], Cursor(0))
        writer.commit()
    rows = sum(shards)
    save_part(cache, WorkerPart(recorded, 0, 1, 0, rows, Cursor(rows), entries, done=True))
    assert try_finalize(cache)
    return folder


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, CacheRows]:
    """A, and B of equal shards from other data, another lineage, dump seed and precision (all mixable)."""
    root = tmp_path_factory.mktemp("mixture")
    b = dict(dataset=["b"], seed=9, precision="fp32", lineage=Lineage("student", "round-1", "f1"))
    return {tag: CacheRows(str(write_cache(root / tag, tag, **extra)), read_ahead=1) for tag, extra in (("A", {}), ("B", b))}


def ids(runs) -> list[str]:
    return [r.sample_id for run in runs for r in run]


def refs_of(tag: str, chunks) -> list[str]:
    return [f"{tag}/{s}/{r}" for chunk in chunks for s, r in chunk]


def test_each_source_gives_its_weight_within_binomial_error() -> None:
    weights, n = [1.0, 3.0, 0.5], 200_000

    def counters() -> list:  # source i's references (i, 0), (i, 1), ...
        return [zip(itertools.repeat(i), itertools.count()) for i in range(len(weights))]

    sources = [source for source, _ in itertools.islice(mixed_stream(counters(), MixSchedule.of(weights), 11), n)]
    got = Counter(sources)
    for i, w in enumerate(weights):
        p = w / sum(weights)
        assert abs(got[i] - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)), (i, got[i], n * p)
    # What a resumed run counts without reading: the stream's own prefix, at block edges and between them.
    for stop in (0, 1, 4095, 4096, 4097, 12_345, n):
        assert source_counts(MixSchedule.of(weights), 11, stop).tolist() == [sources[:stop].count(i) for i in range(len(weights))]
    # The source's k-th item is its own k-th reference, whatever the others.
    seen: Counter = Counter()
    for source, (i, k) in itertools.islice(mixed_stream(counters(), MixSchedule.of(weights), 11), 1000):
        assert (i, k) == (source, seen[source])
        seen[source] += 1


def test_a_grown_mixture_keeps_the_draws_before_it_grew(monkeypatch) -> None:
    monkeypatch.setattr(data, "MIX_BLOCK", 7)  # phases that start inside blocks and span several
    seed, n = 3, 200
    schedule = MixSchedule.of([2.0])
    schedule.grow(30, [2.0, 1.0])
    schedule.grow(30, [2.0, 1.0])  # the weights that already hold: nothing changes
    schedule.grow(64, [1.0, 1.0, 4.0])
    assert schedule.phases == [(0, [2.0]), (30, [2.0, 1.0]), (64, [1.0, 1.0, 4.0])]

    def reference(phases: list[tuple[int, list[float]]]) -> list[int]:
        """Item j: the first source whose cumulative share under j's phase exceeds j's uniform number."""
        out = []
        for j in range(n):
            u = np.random.default_rng([seed, data._MIX_KEY, j // 7]).random(7)[j % 7]
            weights = [w for start, w in phases if start <= j][-1]
            shares = np.cumsum(weights) / sum(weights)
            out.append(next((i for i, c in enumerate(shares) if u < c), len(weights) - 1))
        return out

    def counters() -> list:
        return [zip(itertools.repeat(i), itertools.count()) for i in range(3)]

    got = [source for source, _ in itertools.islice(mixed_stream(counters(), schedule, seed), n)]
    assert got == reference(schedule.phases)
    assert set(got[:30]) == {0} and set(got[30:64]) == {0, 1} and set(got[64:]) == {0, 1, 2}
    for stop in (0, 29, 30, 31, 64, 65, n):
        assert source_counts(schedule, seed, stop).tolist() == [got[:stop].count(i) for i in range(3)]
    # Regrown at an earlier item: the later phases give way, and a phase is added only where the weights change.
    schedule.grow(40, [1.0, 1.0])
    assert schedule.phases == [(0, [2.0]), (30, [2.0, 1.0]), (40, [1.0, 1.0])]
    restored = MixSchedule.of([9.0])
    restored.load_state_dict(json.loads(json.dumps(schedule.state_dict())))  # as meta.json keeps it
    assert restored == schedule
    schedule.grow(35, [1.0, 1.0])
    assert schedule.phases == [(0, [2.0]), (30, [2.0, 1.0]), (35, [1.0, 1.0])]
    schedule.grow(31, [2.0, 1.0])
    assert schedule.phases == [(0, [2.0]), (30, [2.0, 1.0])]
    # What no run can hold: a first phase after item 0, phases out of order, a cache dropped.
    for phases in ([(5, [1.0])], [(0, [1.0]), (9, [1.0, 1.0]), (9, [1.0, 2.0])], [(0, [1.0, 1.0]), (9, [1.0])]):
        with pytest.raises(UserError, match="never drop a cache"):
            MixSchedule(phases)
    with pytest.raises(UserError, match="never drop a cache"):
        schedule.grow(50, [1.0])


def test_a_resumed_run_whose_mixture_grew_reads_each_source_on(caches, monkeypatch) -> None:
    monkeypatch.setattr(data, "MIX_BLOCK", 5)
    grown = MixSchedule.of([1.0])
    grown.grow(17, [1.0, 3.0])
    mixture = CacheMixture([caches["A"], caches["B"]], grown)
    whole = ids(mixture.runs(StreamOrder(seed=2, buffer=4, limit=80)))
    # Before the growth: A alone, exactly as the run of A alone read it.
    assert whole[:17] == ids(caches["A"].runs(StreamOrder(seed=2, buffer=4, limit=17)))
    # After: each source on from where it stood, A's stream continued, B's from its first item.
    for tag, source in (("A", 0), ("B", 1)):
        own = [f"{tag}/{s}/{r}" for s, r in itertools.islice(stream(SHARDS, source_seed(2, source), 4, True), 80)]
        mine = [i for i in whole if i.startswith(tag)]
        assert mine == own[: len(mine)]
    assert {i[0] for i in whole[17:]} == {"A", "B"}
    for start in (17, 18, 33):
        assert ids(mixture.runs(StreamOrder(seed=2, buffer=4, start=start, limit=80 - start))) == whole[start:]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("start,rank,world,batch", [(0, 0, 1, 4), (13, 1, 2, 3)])
def test_a_mixture_of_one_is_the_single_cache_order(caches, shuffle, start, rank, world, batch) -> None:
    order = StreamOrder(seed=5, buffer=4, shuffle=shuffle, start=start, limit=3 * sum(SHARDS), rank=rank, world=world, batch_size=batch)
    expected = refs_of("A", partition(stream(SHARDS, 5, 4, shuffle), start, order.limit, rank, world, batch, 0, 1))
    assert ids(CacheMixture([caches["A"]], [2.5]).runs(order)) == expected
    assert ids(caches["A"].runs(order)) == expected


def test_each_source_reads_in_its_own_stream_order(caches) -> None:
    order = StreamOrder(seed=4, buffer=3, limit=4 * sum(SHARDS), batch_size=5)
    got = ids(CacheMixture([caches["A"], caches["B"]], [1.0, 2.0]).runs(order))
    per_source = {tag: [i.split("/", 1)[1] for i in got if i.startswith(tag)] for tag in "AB"}
    for source, tag in enumerate("AB"):
        own = itertools.islice(stream(SHARDS, source_seed(4, source), 3, True), len(per_source[tag]))
        assert per_source[tag] == [f"{s}/{r}" for s, r in own]
    assert per_source["A"][:10] != per_source["B"][:10]  # equal shards, not in lockstep
    assert source_seed(4, 0) == 4  # the first cache keeps the single-cache order


def test_a_resumed_mixture_continues_the_uninterrupted_one(caches, monkeypatch) -> None:
    monkeypatch.setattr(data, "MIX_BLOCK", 5)  # resume points inside blocks and across many of them
    mixture = CacheMixture([caches["A"], caches["B"]], [3.0, 1.0])
    whole = ids(mixture.runs(StreamOrder(seed=2, buffer=4, limit=70)))
    assert {i[0] for i in whole} == {"A", "B"}
    for start in (1, 5, 7, 23, 41, 69):
        assert ids(mixture.runs(StreamOrder(seed=2, buffer=4, start=start, limit=70 - start))) == whole[start:]


def test_ranks_and_workers_take_each_global_item_once(caches, monkeypatch) -> None:
    mixture = CacheMixture([caches["A"], caches["B"]], [1.0, 1.0])
    world, workers, batch, start, total = 2, 2, 3, 12, 61
    whole = ids(mixture.runs(StreamOrder(seed=8, buffer=2, start=start, limit=total)))
    rebuilt: list[str | None] = [None] * total
    for rank in range(world):
        runs = {}
        for w in range(workers):
            monkeypatch.setattr(data, "get_worker_info", lambda w=w: SimpleNamespace(id=w, num_workers=workers))
            runs[w] = list(mixture.runs(StreamOrder(seed=8, buffer=2, start=start, limit=total, rank=rank, world=world, batch_size=batch)))
        ordered = [run for group in itertools.zip_longest(*runs.values()) for run in group if run is not None]  # the loader's m mod W
        assert all(len(run) == batch for run in ordered[:-1])
        mine = ids(ordered)
        assert len(mine) == len(range(rank, total, world))
        for j, item in zip(range(rank, total, world), mine):  # global item j on rank j mod world
            assert rebuilt[j] is None
            rebuilt[j] = item
    assert rebuilt == whole


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> list[CacheRows]:
    """Two caches of more shards than the reader looks ahead over, each shard one record batch (fetched once)."""
    root = tmp_path_factory.mktemp("many")
    return [CacheRows(str(write_cache(root / tag, tag, MANY, per_batch=8, dataset=[tag])), read_ahead=1) for tag in "AB"]


@pytest.mark.parametrize("start", [0, 9, 40])
def test_each_source_fetches_from_where_its_own_stream_stands(many_shards, start, monkeypatch) -> None:
    remotes = {rows.location: CountingRemote(rows.location) for rows in many_shards}
    monkeypatch.setattr(data, "open_store", lambda location: remotes[location])
    # Buffer 1: a source's stream visits its shards in its epochs' order; read-ahead 1: one fetch thread, in order.
    got = ids(CacheMixture(many_shards, [1.0, 1.0]).runs(StreamOrder(seed=6, buffer=1, start=start, limit=12)))
    moved = []
    for source, (tag, rows) in enumerate(zip("AB", many_shards)):
        files = [s.file for s in rows.manifest.shards]
        read = list(dict.fromkeys(files[int(i.split("/")[1])] for i in got if i.startswith(tag)))  # shards in first-read order
        gets = remotes[rows.location].gets
        assert gets[: len(read)] == read and len(gets) <= len(read) + 1, (tag, gets, read)  # + the one read ahead
        moved.append(read[0] != files[next(shard_sequence(MANY, source_seed(6, source), True, 0))])
    assert any(moved) == (start > 0)  # a reader fetching from the epoch's first shard would have fetched in vain


def test_only_caches_of_one_teacher_tokenizer_and_head_mix(caches) -> None:
    a = caches["A"].manifest

    def changed(**fields) -> Manifest:
        return dataclasses.replace(a, settings=dataclasses.replace(a.settings, **fields))

    names = ["off-policy", "round-1"]
    for fields, named in ((dict(teacher_hash="t2"), "teacher_hash"), (dict(tokenizer_hash="tok2"), "tokenizer_hash"),
                          (dict(top_k=4), "top_k"), (dict(tail_samples=8), "tail_samples"), (dict(top_p=0.9), "top_p"),
                          (dict(target_logprobs=True), "target_logprobs")):
        with pytest.raises(UserError, match=f"round-1 cannot be mixed with off-policy: {named}") as refused:
            check_mixable([a, changed(**fields)], names, [1.0, 1.0])
        assert "\n" not in str(refused.value)
    check_mixable([a, changed(dataset=["other"], dataset_fingerprint="x", seed=3, precision="fp32", teacher="/elsewhere",
                                 lineage=Lineage("student", "round-1", "f"))], names, [1.0, 0.25])
    check_mixable([a, caches["B"].manifest], names, [1.0, 1.0])  # B: other data, lineage, seed and precision
    for weights in ([1.0, 0.0], [1.0, -1.0], [1.0, math.nan], [math.inf, 1.0], [1.0]):
        with pytest.raises(UserError, match="weight"):
            check_mixable([a, a], names, weights)
    empty = dataclasses.replace(a, records=0, shards=())
    with pytest.raises(UserError, match="round-1 holds no sequences"):
        check_mixable([a, empty], names, [1.0, 1.0])
    with pytest.raises(UserError, match="weight"):  # a mixture is never built of what the check refuses
        CacheMixture([caches["A"], caches["B"]], [1.0, 0.0])


# ---- train-student --mix ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def halves(teacher_dir, student_dir, data_dir, tmp_path_factory) -> dict[str, Path]:
    """Two caches of one teacher over the two halves of the chat rows, and one of the student as its own teacher
    (another teacher and tokenizer hash)."""
    from conftest import run_cli, write_jsonl

    root = tmp_path_factory.mktemp("halves")
    rows = [json.loads(line) for line in (data_dir / "chat.jsonl").read_text().splitlines()]
    common = ["--engine", "hf", "--top-k", "8", "--max-length", "128", "--no-progress"]
    out = {}
    for name, part, model in (("A", rows[: len(rows) // 2], teacher_dir), ("B", rows[len(rows) // 2:], teacher_dir),
                              ("other", rows[len(rows) // 2:], student_dir)):
        data_file = write_jsonl(root / f"{name}.jsonl", part)
        run_cli("dump-teacher", "--model", str(model), "--data", str(data_file), "--output", str(root / name), *common)
        out[name] = root / name
    return out


def train_args(student_dir, cache: Path, out: Path, *extra: str, steps: int = 4) -> list[str]:
    return ["train-student", "--student", str(student_dir), "--cache", str(cache), "--output", str(out), "--batch-size", "2",
            "--lr", "3e-3", "--max-length", "128", "--no-progress", *(["--max-steps", str(steps)] if steps else []), *extra]


def step_log(run: Path) -> list[tuple]:
    return [(m["step"], m["loss"], m["tokens"]) for m in read_metrics(run) if "loss" in m]


def test_a_mixture_trains_on_each_cache_as_its_stream_reads(student_dir, halves, tmp_path) -> None:
    """Weights (1, ε): every item from --cache, in its own order: the run of --cache alone, bit for bit. Weights
    (ε, 1): every item from the --mix cache, read as that cache's stream under its source seed: the run of that
    cache alone with --seed set to it."""
    from conftest import run_cli

    a, b = halves["A"], halves["B"]
    run_cli(*train_args(student_dir, a, tmp_path / "a"))
    run_cli(*train_args(student_dir, a, tmp_path / "a-mostly", "--mix", str(b), "--mix-weights", "1", "--mix-weights", "1e-12"))
    assert step_log(tmp_path / "a-mostly") == step_log(tmp_path / "a")
    run_cli(*train_args(student_dir, b, tmp_path / "b", "--seed", str(source_seed(0, 1))))
    run_cli(*train_args(student_dir, a, tmp_path / "b-mostly", "--mix", str(b), "--mix-weights", "1e-12", "--mix-weights", "1"))
    assert step_log(tmp_path / "b-mostly") == step_log(tmp_path / "b")
    # By default each cache weighs its sequences; an epoch is all of them.
    records = sum(load_manifest(str(c)).records for c in (a, b))
    run_cli(*train_args(student_dir, a, tmp_path / "epoch", "--mix", str(b), "--epochs", "1", steps=0))
    assert [s for s, _, _ in step_log(tmp_path / "epoch")] == list(range(1, math.ceil(records / 2) + 1))


def test_a_mixture_resumes_as_it_ran_and_refuses_changes(student_dir, halves, tmp_path) -> None:
    """A mixture run killed after a checkpoint and resumed logs the uninterrupted run's steps; resumed with other
    weights, or without the mixed cache, it is refused in one line."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT, assert_one_line, run_cli

    a, b = halves["A"], halves["B"]
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"

    def args(out: Path, *extra: str, mix: tuple[str, ...] = ("--mix", str(b))) -> list[str]:
        return train_args(student_dir, a, out, *mix, "--save-every", "2", *extra, steps=8)

    run_cli(*args(clean))
    proc = subprocess.Popen([sys.executable, "-m", "taid_cache.cli", *args(crashed)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not (crashed / "checkpoints" / "step-00000004").exists():
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run_cli(*args(crashed, "--resume"))
    assert step_log(crashed) == step_log(clean) and len(step_log(clean)) == 8
    assert_one_line(run_cli(*args(crashed, "--resume", "--mix-weights", "1", "--mix-weights", "3"), check=False),
                    "--resume with changed settings", "mix_weights")
    assert_one_line(run_cli(*args(crashed, "--resume", mix=()), check=False), "--resume with changed settings", "mix_identities")


def test_a_run_resumed_with_a_cache_joined_reads_each_cache_on(student_dir, halves, tmp_path) -> None:
    """A alone to step 3, then resumed with --mix B (how the rounds grow a mixture): steps 1–3 are A's alone and
    steps 4–8 the grown schedule's, as the step's tokens show. A checkpoint of a release without the schedule
    resumes as if today's weights held from step 0."""
    import shutil

    from conftest import run_cli

    a, b = halves["A"], halves["B"]
    run = tmp_path / "run"
    run_cli(*train_args(student_dir, a, run, "--stop-at-step", "3", steps=8))
    old = tmp_path / "old"
    shutil.copytree(run, old)
    meta_file = next((old / "checkpoints").glob("step-*")) / "meta.json"
    meta = json.loads(meta_file.read_text())
    assert meta.pop("mixture") == {"phases": [[0, [float(load_manifest(str(a)).records)]]]}
    meta_file.write_text(json.dumps(meta))
    for out in (run, old):
        run_cli(*train_args(student_dir, a, out, "--resume", "--mix", str(b), steps=8))

    weights = [float(load_manifest(str(c)).records) for c in (a, b)]
    sources = [CacheRows(str(c)) for c in (a, b)]

    def step_tokens(schedule: MixSchedule) -> list[int]:
        runs = CacheMixture(sources, schedule).runs(StreamOrder(seed=0, limit=16, batch_size=2))
        return [sum(min(len(r.input_ids), 128) for r in run) for run in runs]

    def logged(out: Path) -> list[int]:
        tokens = [t for _, _, t in step_log(out)]
        return [t - before for t, before in zip(tokens, [0, *tokens])]

    grown = MixSchedule.of(weights[:1])
    grown.grow(3 * 2, weights)
    assert logged(run) == step_tokens(grown)
    assert logged(old)[3:] == step_tokens(MixSchedule.of(weights))[3:] != step_tokens(grown)[3:]


def test_caches_that_cannot_mix_are_refused_before_any_write(student_dir, halves, tmp_path) -> None:
    from conftest import assert_one_line, run_cli

    a = halves["A"]
    cases = [(("--mix", str(halves["other"])), ("cannot be mixed with", "teacher_hash")),
             (("--mix", str(halves["B"]), "--mix-weights", "1"), ("--mix-weights", "1 weights for 2 caches")),
             (("--mix", str(halves["B"]), "--mix-weights", "1", "--mix-weights", "-2"), ("weight", "positive")),
             (("--mix-weights", "1"), ("--mix-weights", "no --mix is given")),
             (("--mix", str(tmp_path / "absent")), ("absent",))]
    for i, (extra, words) in enumerate(cases):
        assert_one_line(run_cli(*train_args(student_dir, a, tmp_path / f"run{i}", *extra), check=False), *words)
        assert not (tmp_path / f"run{i}").exists()


def test_the_hugging_face_trainer_trains_on_a_mixture_as_train_student_does(student_dir, halves, tmp_path) -> None:
    """`CacheDistillationConfig(mix=...)`, or a `CacheDataset(mix=...)`: train-student's --mix steps, loss for loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import run_cli
    from taid_cache.integrations import CacheDataset, CacheDistillationTrainer
    from test_hf_trainer import hf_args

    a, b = halves["A"], halves["B"]
    run_cli(*train_args(student_dir, a, tmp_path / "cli", "--mix", str(b), "--mix-weights", "1", "--mix-weights", "2"))
    cli = [m["loss"] for m in read_metrics(tmp_path / "cli") if "loss" in m]

    def trained(train_dataset, **kw) -> list[float]:
        args = hf_args(tmp_path / "hf", max_steps=4, per_device_train_batch_size=2, learning_rate=3e-3, max_length=128, **kw)
        trainer = CacheDistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir), args=args,
                                           train_dataset=train_dataset, processing_class=AutoTokenizer.from_pretrained(student_dir))
        trainer.train()
        return [s["loss"] for s in trainer.steps.history]

    np.testing.assert_allclose(trained(str(a), mix=[str(b)], mix_weights=[1.0, 2.0]), cli, rtol=2e-5)
    mixed = CacheDataset(a, batch_size=2, mix=[b], mix_weights=[1, 2])
    assert mixed.records == sum(load_manifest(str(c)).records for c in (a, b))
    np.testing.assert_allclose(trained(mixed), cli, rtol=2e-5)
    with pytest.raises(ValueError, match="carries its own"):
        trained(mixed, mix=[str(b)])
    with pytest.raises(ValueError, match="carries its own"):
        trained(mixed, mix_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="one held-out cache"):
        CacheDistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir), args=hf_args(tmp_path / "e"),
                                 train_dataset=str(a), eval_dataset=mixed, processing_class=AutoTokenizer.from_pretrained(student_dir))
    with pytest.raises(UserError, match="no mix is given"):
        CacheDataset(a, mix_weights=[1.0])
    with pytest.raises(UserError, match="cannot be mixed"):
        CacheDataset(a, mix=[halves["other"]])


def test_a_hugging_face_run_resumed_with_a_cache_joined_takes_train_students_grown_steps(student_dir, halves, tmp_path) -> None:
    """A alone, checkpoint at step 2, resumed with B mixed in: steps 3–4 are train-student's grown run's, from a
    checkpoint of a release that kept no mixture record too; other caches or weights are refused."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import run_cli
    from taid_cache.integrations import CacheDistillationTrainer
    from taid_cache.integrations.hf_trainer import MIXTURE
    from test_hf_trainer import hf_args

    a, b = halves["A"], halves["B"]
    run_cli(*train_args(student_dir, a, tmp_path / "cli", "--stop-at-step", "2"))
    run_cli(*train_args(student_dir, a, tmp_path / "cli", "--resume", "--mix", str(b)))
    cli = [m["loss"] for m in read_metrics(tmp_path / "cli") if "loss" in m]

    def trainer(out: str, train: Path = a, **kw) -> CacheDistillationTrainer:
        args = hf_args(tmp_path / out, max_steps=4, per_device_train_batch_size=2, learning_rate=3e-3, max_length=128,
                       save_strategy="steps", save_steps=2, **kw)
        return CacheDistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir), args=args, train_dataset=str(train),
                                        processing_class=AutoTokenizer.from_pretrained(student_dir))

    first = trainer("hf")
    first.train()
    np.testing.assert_allclose([s["loss"] for s in first.steps.history[:2]], cli[:2], rtol=2e-5)
    checkpoint = tmp_path / "hf" / "checkpoint-2"
    older = tmp_path / "older" / "checkpoint-2"
    shutil.copytree(checkpoint, older)
    (older / MIXTURE).unlink()
    records = [float(load_manifest(str(c)).records) for c in (a, b)]
    for out, folder in (("hf", checkpoint), ("older", older)):
        resumed = trainer(out, mix=[str(b)])
        resumed.train(resume_from_checkpoint=str(folder))
        assert resumed.train_dataset.schedule.phases == [(0, records[:1]), (4, records)], out
        np.testing.assert_allclose([s["loss"] for s in resumed.steps.history], cli[2:], rtol=2e-5)
    for kw in ({"train": b}, {"mix": [str(b)], "mix_weights": [1.0, 1.0]}):
        shutil.copytree(tmp_path / "hf" / "checkpoint-4", tmp_path / "again" / "checkpoint-4", dirs_exist_ok=True)
        with pytest.raises(UserError, match="other caches, or other weights"):
            trainer("again", **kw).train(resume_from_checkpoint=str(tmp_path / "again" / "checkpoint-4"))
