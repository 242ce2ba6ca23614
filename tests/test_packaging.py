"""The package installs as a library: its wheel, put into a fresh environment that already holds a torch, keeps
that torch, and every command's --help works there."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from filelock import FileLock, Timeout

from conftest import ROOT

TORCH_WHERE = "import torch; print(torch.__version__, torch.__file__)"  # which torch an environment imports
KEPT_ENVS = 2  # environments kept (the most recently used): each is about 1.6 GB, one per version of the package
COMMANDS = ["dump-teacher", "train-student", "inspect", "verify", "export", "evaluate", "export-checkpoint", "convert-gguf"]


def run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def wheel(tmp_path: Path) -> Path:
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", ROOT)
    (built,) = (tmp_path / "dist").glob("taid_cache-*.whl")
    return built


def test_the_wheels_requirements_leave_torch_to_the_user(tmp_path) -> None:
    """No exact pin and no upper bound on torch or transformers in the package's own metadata (the set-up's
    constraints file pins this machine's build, not the package)."""
    with zipfile.ZipFile(wheel(tmp_path)) as archive:
        metadata = Parser().parsestr(archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    base = {r.split(">=")[0].split(" ")[0]: r for r in metadata.get_all("Requires-Dist") if "extra ==" not in r}
    assert base["torch"] == "torch>=2.6" and base["transformers"].startswith("transformers>=")
    assert not any("==" in r or "<" in r for r in base.values()), base
    assert metadata["License-Expression"] == "Apache-2.0"


def wheel_digest(built: Path) -> str:
    """The wheel's contents (names and bytes, not the zip's timestamps): equal for equal sources."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(built) as archive:
        for name in sorted(archive.namelist()):
            digest.update(name.encode() + b"\0" + archive.read(name))
    return digest.hexdigest()[:16]


def installed_env(built: Path, constraints: Path) -> tuple[Path, dict]:
    """A fresh venv, torch installed first (this machine's CPU build), then the wheel with its dependencies from the
    package registry; what torch was before the wheel and pip's output. Kept by the hash of the wheel and of the
    constraints, outside the checkout (a rerun of the same code reuses it, a changed package builds its own); the
    record is written last, so an environment a killed run left is built again."""
    key = hashlib.sha256((wheel_digest(built) + constraints.read_text()).encode()).hexdigest()[:16]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "taid-cache-tests"
    env, record = root / f"wheel-env-{key}", root / f"wheel-env-{key}.json"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / f"wheel-env-{key}.lock"):
        if not record.exists():
            shutil.rmtree(env, ignore_errors=True)
            venv.create(env, with_pip=True)
            python = env / "bin" / "python"
            run(python, "-m", "pip", "install", "-q", "-c", constraints, "torch==2.13.0")
            before = run(python, "-c", TORCH_WHERE).stdout
            install = run(python, "-m", "pip", "install", built)  # no constraints: the wheel's own requirements alone
            record.write_text(json.dumps({"torch_before": before, "install_output": install.stdout}))
        os.utime(record)  # used now: the newest is kept
        prune_envs(root, KEPT_ENVS)
    return env, json.loads(record.read_text())


def prune_envs(root: Path, keep: int) -> None:
    """Remove all but the `keep` most recently used environments under `root` (by their records' times), and any
    a killed build left without a record; one another run holds (its lock) is left alone."""
    records = sorted(root.glob("wheel-env-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    kept = {p.with_suffix("") for p in records[:keep]}
    for env in [p for p in root.glob("wheel-env-*") if p.is_dir() and p not in kept]:
        try:
            with FileLock(env.with_suffix(".lock"), timeout=0):
                env.with_suffix(".json").unlink(missing_ok=True)  # the record first: a half-removed env is rebuilt
                shutil.rmtree(env, ignore_errors=True)
        except Timeout:
            continue


def test_old_test_environments_are_pruned_to_the_most_recently_used(tmp_path) -> None:
    for age, key in enumerate(["newest", "second", "third", "fourth"]):
        (tmp_path / f"wheel-env-{key}").mkdir()
        (tmp_path / f"wheel-env-{key}.json").write_text("{}")
        os.utime(tmp_path / f"wheel-env-{key}.json", (1e9 - age, 1e9 - age))
    (tmp_path / "wheel-env-killed").mkdir()  # a build killed before its record
    held = FileLock(tmp_path / "wheel-env-fourth.lock")
    with held:  # another run's, building or using it
        prune_envs(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.glob("wheel-env-*") if p.is_dir()) == ["wheel-env-fourth", "wheel-env-newest", "wheel-env-second"]
    assert not (tmp_path / "wheel-env-third.json").exists() and (tmp_path / "wheel-env-fourth.json").exists()


@pytest.mark.slow
def test_the_wheel_installs_beside_an_existing_torch(tmp_path) -> None:
    """Installed beside an existing torch, the wheel keeps it: torch is the same afterwards, and `taid-cache --help`
    and every subcommand's run."""
    env, record = installed_env(wheel(tmp_path), ROOT / "scripts" / "constraints.txt")
    assert "Uninstalling torch" not in record["install_output"]
    assert run(env / "bin" / "python", "-c", TORCH_WHERE).stdout == record["torch_before"]
    cli = env / "bin" / "taid-cache"
    assert "dump-teacher" in run(cli, "--help", cwd=tmp_path).stdout
    for command in COMMANDS:
        assert "Usage: taid-cache " + command in run(cli, command, "--help", cwd=tmp_path).stdout
