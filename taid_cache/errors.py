"""The one exception type for user mistakes and the wrapper that prints its message as one line and exits 2;
interruptions (Ctrl-C, SIGTERM) said in one line too, with how to continue, exit 130."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

import typer


class UserError(Exception):
    """Bad input or settings; the message names the problem and is shown without a traceback."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM, with a message that says how to continue (`KeyboardInterrupt` turned into words)."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (libraries often add pages of context); a first line that
    only announces the next ("Parameter validation failed:") keeps that next line too."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    announces = lines[0].endswith(":") and not lines[0].startswith("Traceback") and len(lines) > 1
    return f"{lines[0]} {lines[1]}" if announces else lines[0]


def one_line(text: str) -> str:
    """A message kept to one line: a newline inside it (a path's, say) shown as \\n."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def user_errors(fn: Callable) -> Callable:
    """A user mistake becomes one line on stderr and exit status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {one_line(str(exc))}", err=True)
            raise SystemExit(2) from None
        except Interrupted as exc:
            if str(exc):  # empty: a rank that leaves the saying to rank 0
                typer.echo(str(exc), err=True)
            raise SystemExit(130) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise SystemExit(130) from None

    return wrapper


def interrupt_on_sigterm() -> None:
    """SIGTERM (a scheduler's preemption, torchrun stopping its ranks) arrives like Ctrl-C, so the pipelines stop
    the same way: committed work kept, one line saying how to continue."""

    def handler(signum, frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


class SafePoints:
    """What `interrupts_at_safe_points` yields: calling it raises KeyboardInterrupt once a signal came;
    `requested` says so without raising (ranks that must stop at the same step agree on it first)."""

    def __init__(self) -> None:
        self.signals: list[int] = []

    @property
    def requested(self) -> bool:
        return bool(self.signals)

    def __call__(self) -> None:
        if self.signals:
            raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_at_safe_points() -> Iterator[SafePoints]:
    """Ctrl-C and SIGTERM inside a loop: the signal is recorded, and the loop stops where it calls the yielded
    check (between batches, between optimizer steps). Raised at an arbitrary point, KeyboardInterrupt can land
    inside a queue's lock handling (after the acquire, before the with-block that releases it), leaving the lock
    held so that the writer thread and the process's exit wait forever; or inside a finalizer (`__del__`, a
    weakref callback: torch runs many), where Python prints it and drops it, and the loop goes on as if no
    signal came. Outside the main thread (where handlers cannot be set) the check does nothing and signals act
    as before; a signal the process was started ignoring (SIGINT under `nohup cmd &`) stays ignored. A second
    signal stops the loop at once; the writer still commits what it holds (a third gets out of even that)."""
    points = SafePoints()

    def record(signum, frame) -> None:
        if points.signals:
            raise KeyboardInterrupt
        points.signals.append(signum)

    if threading.current_thread() is not threading.main_thread():
        yield points
        return
    # Left alone: a signal ignored, or handled from C (whose handler Python could not put back).
    previous = {sig: signal.signal(sig, record) for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) not in (signal.SIG_IGN, None)}
    try:
        yield points
    except Exception as exc:
        # The same signal stopped a helper process (vLLM's engine core): that failure is the interruption. A
        # failure of our own (a full disk while the writer drains, a bad teacher) is still said as itself.
        if points.requested and not isinstance(exc, (UserError, OSError)):
            raise KeyboardInterrupt from None
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    points()  # a signal during the loop's last steps still stops the command


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)
FULL_DISK_WORDS = ("No space left", "StorageFull", "file write failed", "Disk quota")
# A write cut short that a library reports without the OS error: torch's zip writer (torch.save, and
# torch.distributed.checkpoint's shards through it) checks its position after each record, and a full disk (or a
# file-size limit) reads "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598".
SHORT_WRITE_WORDS = ("unexpected pos",)


def mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def write_failure(exc: BaseException, folder: Path, rerun: Callable[[], str]) -> UserError | None:
    """A failure to write under `folder` as one line naming the device or file and how to continue, or None when
    `exc` is not one. Libraries word a full disk their own way (pyarrow's OSError without an errno, torch's
    `PytorchStreamWriter failed writing file`, safetensors' `StorageFull`), so the chain of causes is read."""
    chain = causes(exc)
    text = " ".join(str(e) for e in chain)
    codes = {getattr(e, "errno", None) for e in chain}
    full = errno.ENOSPC in codes or errno.EDQUOT in codes or any(word in text for word in FULL_DISK_WORDS)
    short = any(word in text for word in SHORT_WRITE_WORDS)
    named = next((e.filename for e in chain if isinstance(getattr(e, "filename", None), str)), None)
    ours = named is not None and Path(named).resolve().is_relative_to(folder.resolve())
    if not (full or short or ours or codes & set(WRITE_ERRNOS)):
        return None
    target = named or str(folder)
    if full or shutil.disk_usage(folder).free < 1 << 20:
        return UserError(f"no space left on {mount_point(folder)} writing {target}; free space and {rerun()}")
    if short:  # the deepest one that says it: a CheckpointException repeats its failures' text in its own
        said = first_line([e for e in chain if any(word in str(e) for word in SHORT_WRITE_WORDS)][-1])
        return UserError(f"cannot write {target}: a write stopped part-way (a file-size limit, a quota?; torch says "
                         f"'{said}'); {rerun()}")
    return UserError(f"cannot write {target}: {first_line(exc)}; {rerun()}")


def causes(exc: BaseException, limit: int = 8) -> list[BaseException]:
    """`exc` and what caused it, nearest first: its __cause__ / __context__ chain, and the failures a
    torch.distributed.checkpoint CheckpointException wraps (one per failed rank, held in its `failures`)."""
    chain: list[BaseException] = []
    todo = [exc]
    while todo and len(chain) < limit:
        seen = todo.pop(0)
        if seen is None or any(seen is e for e in chain):
            continue
        chain.append(seen)
        wrapped = getattr(seen, "failures", None)
        if isinstance(wrapped, dict):
            todo.extend(f[0] if isinstance(f, tuple) else f for f in wrapped.values() if isinstance(f, (tuple, BaseException)))
        todo.append(seen.__cause__ or seen.__context__)
    return chain


def root_cause(exc: BaseException) -> BaseException:
    """The failure a torch.distributed.checkpoint CheckpointException wraps (its own message is "CheckpointException
    ranks:dict_keys([0])" and a traceback), else `exc` itself."""
    wrapped = getattr(exc, "failures", None)
    if isinstance(wrapped, dict) and wrapped:
        first = next(iter(wrapped.values()))
        inner = first[0] if isinstance(first, tuple) else first
        if isinstance(inner, BaseException):
            return root_cause(inner)
    return exc


def run_and_exit(entry: Callable[[], object]) -> None:
    """A console entry point: run it, then end the process with its exit status. Once vLLM has run in this
    process, the interpreter's teardown is skipped (os._exit after flushing): vLLM leaves daemon threads
    blocked in native calls, and one that wakes during teardown aborts the finished process (seen as
    "terminate called without an active exception", exit 134, after a complete dump). The same for a rank of
    a multi-process run: gloo's threads were seen to abort a rank the same way after the student was saved,
    even with the process group destroyed (trackers are closed by the trainer, not left to atexit)."""
    interrupt_on_sigterm()
    try:
        entry()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    one_of_several_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun's, as init_distributed reads it
    if "vllm" not in sys.modules and not one_of_several_ranks:
        raise SystemExit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)



@contextlib.contextmanager
def write_errors(folder: str | Path, rerun: Callable[[], str]) -> Iterator[None]:
    """Failures to write under `folder` (a full disk above all; for an object store, its client's failures)
    become one line (`write_failure`); what was committed before stays, and `rerun()` says how to continue."""
    from .storage import is_remote, remote_errors

    remote = is_remote(str(folder))
    try:
        if remote:
            with remote_errors(str(folder)):
                yield
        else:
            yield
    except (UserError, Interrupted, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        if remote:
            raise
        failure = write_failure(exc, Path(folder), rerun)
        if failure is None:
            raise
        raise failure from None
