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
    """An exception's message cut to its first line (libraries often add pages of context)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


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


@contextlib.contextmanager
def interrupts_at_safe_points() -> Iterator[Callable[[], None]]:
    """Ctrl-C and SIGTERM inside a loop that feeds a thread: the signal is recorded, and the loop stops where it
    calls the yielded check (between batches). Raised at an arbitrary point, KeyboardInterrupt can land inside
    a queue's lock handling (after the acquire, before the with-block that releases it), leaving the lock held:
    the writer thread and the process's exit then wait forever. Outside the main
    thread (where handlers cannot be set) the check does nothing and signals act as before; a signal the
    process was started ignoring (SIGINT under `nohup cmd &`) stays ignored. A second signal stops the loop
    at once; the writer still commits what it holds (a third gets out of even that)."""
    requested: list[int] = []

    def record(signum, frame) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)

    def check() -> None:
        if requested:
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield check
        return
    # Left alone: a signal ignored, or handled from C (whose handler Python could not put back).
    previous = {sig: signal.signal(sig, record) for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) not in (signal.SIG_IGN, None)}
    try:
        yield check
    except Exception as exc:
        # The same signal stopped a helper process (vLLM's engine core): that failure is the interruption. A
        # failure of our own (a full disk while the writer drains, a bad teacher) is still said as itself.
        if requested and not isinstance(exc, (UserError, OSError)):
            raise KeyboardInterrupt from None
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    check()  # a signal during the loop's last steps still stops the command


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)
FULL_DISK_WORDS = ("No space left", "StorageFull", "file write failed", "Disk quota")


def mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def write_failure(exc: BaseException, folder: Path, rerun: Callable[[], str]) -> UserError | None:
    """A failure to write under `folder` as one line naming the device or file and how to continue, or None when
    `exc` is not one. Libraries word a full disk their own way (pyarrow's OSError without an errno, torch's
    `PytorchStreamWriter failed writing file`, safetensors' `StorageFull`), so the chain of causes is read."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(e) for e in chain)
    codes = {getattr(e, "errno", None) for e in chain}
    full = errno.ENOSPC in codes or errno.EDQUOT in codes or any(word in text for word in FULL_DISK_WORDS)
    named = next((e.filename for e in chain if isinstance(getattr(e, "filename", None), str)), None)
    ours = named is not None and Path(named).resolve().is_relative_to(folder.resolve())
    if not (full or ours or codes & set(WRITE_ERRNOS)):
        return None
    target = named or str(folder)
    if full or shutil.disk_usage(folder).free < 1 << 20:
        return UserError(f"no space left on {mount_point(folder)} writing {target}; free space and {rerun()}")
    return UserError(f"cannot write {target}: {first_line(exc)}; {rerun()}")


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
