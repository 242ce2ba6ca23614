"""Object storage against local disk (prints a table and saves bench/results/storage.{json,md}).

(a) train-student steps/s reading the cache from S3 ÷ reading it from local disk, with read-ahead (2 shards, the
    default) and without (0). Target >= 0.95 with it.
(b) dump-teacher tok/s writing the cache to S3 ÷ writing it to local disk. Target >= 0.95.

S3 is a moto server on loopback started here (a process of its own); the endpoint and test credentials
go into os.environ, as any S3 client reads them. The teacher (bench/dump_teacher_bench.py's TRAINED size,
random), the student (bench/train_student_bench.py's STUDENT) and the tokenizer are built here in --work; the
data is standard-library source as text rows. Each measured call gets a fresh output folder; the configurations
take turns round by round (train local, train S3 read-ahead 2, train S3 read-ahead 0, dump local, dump S3), and
the medians of `--rounds` rounds are compared.

steps/s: the steps over the run's own `elapsed_s` at its last step (the training loop, first batch fetch
included; not the cache check before it, whose whole-call seconds are recorded beside). tok/s: the cache's
tokens (from its manifest) over the `dump_teacher` call, with the engine opened once beforehand.

Usage: python bench/storage_bench.py [--work runs/bench-storage] [--rounds 5] [--shard-size-mb 0.1]
       [--rows 48] [--steps 3] [--batch-size 4] [--profile CONFIG]   (CONFIG: train-s3-ra2, train-s3-ra0, dump-s3, ...: one
       extra run under cProfile, its top functions printed)
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch

from dump_teacher_bench import TRAINED, VOCAB, build_tokenizer
from publish import ROOT, publish
from taid_cache.config import DumpConfig, TrainConfig
from taid_cache.engines.base import open_engine
from taid_cache.fingerprints import resolve_model
from taid_cache.pipelines.dump_teacher import dump_teacher, engine_config, teacher_facts
from taid_cache.pipelines.train_student import train_student
from taid_cache.reproduce.corpus import split_of, stdlib_files
from taid_cache.reproduce.models import new_llama
from taid_cache.shards.manifest import load_manifest
from taid_cache.storage import open_store
from train_student_bench import STUDENT

MAX_LENGTH = 512
BATCH_TOKENS = 2048  # tokens per engine call: one Arrow record batch (~260 KiB); with --shard-size-mb 0.1 one per shard
TRAIN = {"train-local": None, "train-s3-ra2": 2, "train-s3-ra0": 0}  # name: read-ahead (None: the local cache)
DUMP = ("dump-local", "dump-s3")


def start_s3() -> tuple[subprocess.Popen, str, str]:
    """A moto server in a process of its own on a free loopback port (in this process, its request handling would
    take this process's interpreter lock from the run it serves), its endpoint and credentials in os.environ,
    and a fresh bucket."""
    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    bucket = f"taid-bench-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=endpoint)
    for _ in range(200):  # until it listens (a bounded wait)
        try:
            client.create_bucket(Bucket=bucket)
            break
        except Exception:
            time.sleep(0.05)
    return server, endpoint, bucket


def machine_facts() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "cpu_model": model, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


def prepare(work: Path, rows: int) -> tuple[Path, Path, Path]:
    """The tokenizer, a random teacher and student, and `rows` text rows (standard-library files) in --work."""
    work.mkdir(parents=True, exist_ok=True)
    train_files = [p for p in stdlib_files() if split_of(p) == "train"]
    tokenizer = build_tokenizer(work, train_files[:60])
    teacher, student = work / "teacher", work / "student"
    if not (teacher / "config.json").exists():
        new_llama(TRAINED, VOCAB, tokenizer, seed=0, out=teacher)
    if not (student / "config.json").exists():
        new_llama(STUDENT, len(tokenizer), tokenizer, seed=1, out=student)
    data = work / f"text-{rows}.jsonl"
    if not data.exists():
        texts = [t for p in train_files if len(t := p.read_text(errors="ignore")) > 8000][:rows]  # each >= 512 tokens
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return teacher, student, data


def dump_config(teacher: Path, data: Path, output: str, shard_mb: float) -> DumpConfig:
    return DumpConfig(model=str(teacher), data=[str(data)], output=output, engine="hf", top_k=64, max_length=MAX_LENGTH,
                      batch_tokens=BATCH_TOKENS, shard_size_mb=shard_mb, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-storage")
    parser.add_argument("--rounds", type=int, default=5)
    # The published run: one epoch over 12 shards of 8 sequences each (a shard's worth of training, 2 steps, per
    # fetch). --rows 48 --shard-size-mb 0.1 --steps 3 --shuffle-buffer 4 is the worst case: a fetch every step.
    parser.add_argument("--shard-size-mb", type=float, default=0.3)
    parser.add_argument("--rows", type=int, default=96, help="text rows of <= 512 tokens in the cache")
    parser.add_argument("--steps", type=int, default=24, help="train-student steps per run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shuffle-buffer", type=int, default=8, help="train-student --shuffle-buffer (see the note)")
    parser.add_argument("--profile", choices=[*TRAIN, *DUMP], help="one more run of this configuration under cProfile")
    args = parser.parse_args()
    load_before = os.getloadavg()
    teacher, student, data = prepare(args.work, args.rows)
    server, endpoint, bucket = start_s3()
    scratch = args.work / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        # The training cache, dumped once locally and copied to S3 byte for byte (manifest last).
        local_cache = args.work / f"cache-{args.rows}-{args.shard_size_mb}"
        if not (local_cache / "manifest.json").exists():
            shutil.rmtree(local_cache, ignore_errors=True)
            dump_teacher(dump_config(teacher, data, str(local_cache), args.shard_size_mb))
        s3_cache = f"s3://{bucket}/cache"
        open_store(f"s3://{bucket}").upload(local_cache, "cache", last="manifest.json")
        manifest = load_manifest(s3_cache)
        assert manifest.identity == load_manifest(str(local_cache)).identity
        cache_facts = {"shards": len(manifest.shards), "records": manifest.records, "tokens": manifest.tokens,
                       "bytes": manifest.bytes, "mean_shard_bytes": manifest.bytes / len(manifest.shards),
                       "record_batches": sum(len(s.batch_rows) for s in manifest.shards)}
        print(f"cache: {cache_facts}", flush=True)
        if len(manifest.shards) < 8:
            sys.exit(f"only {len(manifest.shards)} shards: lower --shard-size-mb so read-ahead has shards to fetch ahead")

        folder = resolve_model(str(teacher))
        probe = dump_config(teacher, data, str(scratch / "probe"), args.shard_size_mb)
        engine = open_engine("hf", engine_config(probe, folder, teacher_facts(folder), MAX_LENGTH))
        counter = iter(range(1_000_000))

        def train_once(name: str) -> dict:
            ahead = TRAIN[name]
            cfg = TrainConfig(student=str(student), cache=str(local_cache) if ahead is None else s3_cache,
                              output=str(scratch / f"run-{next(counter)}"), loss="taid", max_steps=args.steps,
                              batch_size=args.batch_size, max_length=MAX_LENGTH, shuffle_buffer=args.shuffle_buffer,
                              read_ahead=2 if ahead is None else ahead, progress=False)
            t0 = time.perf_counter()
            last = train_student(cfg)
            wall = time.perf_counter() - t0
            return {"value": last["step"] / last["elapsed_s"], "elapsed_s": last["elapsed_s"], "call_s": wall}

        def dump_once(name: str) -> dict:
            n = next(counter)
            out = str(scratch / f"dump-{n}") if name == "dump-local" else f"s3://{bucket}/dump-{n}"
            t0 = time.perf_counter()
            dump_teacher(dump_config(teacher, data, out, args.shard_size_mb), engine)
            seconds = time.perf_counter() - t0
            done = load_manifest(out)
            return {"value": done.tokens / seconds, "call_s": seconds, "tokens": done.tokens, "shards": len(done.shards)}

        run = {**{name: train_once for name in TRAIN}, **{name: dump_once for name in DUMP}}
        dump_once("dump-local")  # warm-up (first-call costs of the engine and the writer), not counted
        train_once("train-local")
        runs: dict[str, list[dict]] = {name: [] for name in run}
        load_during = []
        for r in range(args.rounds):
            for name, fn in run.items():
                runs[name].append(fn(name))
                print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
            load_during.append(os.getloadavg())
        profile = None
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            run[args.profile](args.profile)
            prof.disable()
            stats = pstats.Stats(prof).sort_stats("cumulative")
            stats.dump_stats(str(args.work / f"profile-{args.profile}.pstats"))
            stats.print_stats(40)
            profile = str(args.work / f"profile-{args.profile}.pstats")
        engine.close()
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(scratch, ignore_errors=True)
    load_after = os.getloadavg()

    median = {name: statistics.median(r["value"] for r in rs) for name, rs in runs.items()}
    median_call = {name: statistics.median(r["call_s"] for r in rs) for name, rs in runs.items()}
    ratios = {"train_s3_read_ahead_2_over_local": median["train-s3-ra2"] / median["train-local"],
              "train_s3_read_ahead_0_over_local": median["train-s3-ra0"] / median["train-local"],
              "dump_s3_over_local": median["dump-s3"] / median["dump-local"]}
    facts = machine_facts()
    unit = {**{n: "steps/s" for n in TRAIN}, **{n: "tok/s" for n in DUMP}}
    note = ("moto is a Python server (werkzeug) in a process of its own on this machine, sharing its "
            f"{facts['affinity']} CPUs with the run: its per-request overhead and bandwidth are not S3's, and the CPU it takes is "
            "the run's loss. Other test processes may have been running on the machine (the load averages are recorded). "
            f"--shuffle-buffer {args.shuffle_buffer} is about one shard's records here, as train-student's default 1024 is "
            "within one 256 MB shard of a real cache; a buffer spanning many small shards would make the reader hop "
            "between shards.")
    lines = [f"machine: {facts['nproc']} CPUs ({facts['cpu_model']}), torch {facts['torch']}; load average (1, 5, 15 min) "
             f"before {tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in load_after)}", "",
             f"cache: {cache_facts['shards']} shards (~{cache_facts['mean_shard_bytes'] / 1024:.0f} KiB each, "
             f"--shard-size-mb {args.shard_size_mb}), {cache_facts['records']} sequences, {cache_facts['tokens']:,} tokens, top-64, "
             f"V = {VOCAB}; train-student {args.steps} steps x {args.batch_size} sequences x <= {MAX_LENGTH} tokens (TAID); "
             f"medians of {args.rounds} interleaved rounds", "",
             "| configuration | median | runs | whole call (median s) |", "|---|---|---|---|"]
    for name, rs in runs.items():
        each = ", ".join(f"{r['value']:.3f}" for r in rs)
        lines.append(f"| {name} | {median[name]:.3f} {unit[name]} | {each} | "
                     f"{median_call[name]:.2f} |")
    lines += ["", "| ratio (S3 ÷ local) | value | target |", "|---|---|---|",
              f"| train-student, read-ahead 2 | {ratios['train_s3_read_ahead_2_over_local']:.3f} | >= 0.95 |",
              f"| train-student, read-ahead 0 | {ratios['train_s3_read_ahead_0_over_local']:.3f} | - |",
              f"| dump-teacher | {ratios['dump_s3_over_local']:.3f} | >= 0.95 |", "", f"Note: {note}"]
    publish("storage", "\n".join(lines), {
        "machine_facts": facts, "loadavg_before": load_before, "loadavg_after": load_after, "loadavg_per_round": load_during,
        "endpoint": "moto_server in its own process on 127.0.0.1", "cache": cache_facts,
        "settings": {"rounds": args.rounds, "shard_size_mb": args.shard_size_mb, "rows": args.rows, "steps": args.steps,
                     "batch_size": args.batch_size, "shuffle_buffer": args.shuffle_buffer, "max_length": MAX_LENGTH,
                     "batch_tokens": BATCH_TOKENS, "top_k": 64, "vocab": VOCAB},
        "units": unit, "median": median, "median_call_s": median_call, "runs": runs, "ratios": ratios, "profile": profile,
        "note": note})


if __name__ == "__main__":
    main()
