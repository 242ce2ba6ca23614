"""Runs console commands one after another in one process, as `python -m MODULE ARGS` would run them, for tests
whose many cases each fail before any real work (a refused config, a bad option): the interpreter, torch and
transformers are started once for all of them instead of once per case.

Protocol: one JSON request per line on stdin ({"module", "args", "cwd"}), one JSON reply per line on the file
descriptor named by argv[1] ({"code", "stdout", "stderr"}). The command runs through `runpy` as `-m` runs it,
entry point and exit handling included; its stdout and stderr are captured."""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import sys
import traceback


def run(module: str, args: list[str], cwd: str) -> dict:
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    code = 0
    try:
        os.chdir(cwd)
        sys.argv = [module, *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
            except BaseException:  # what a process would print as its traceback, exit status 1
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def exit_command(code: int) -> None:
    raise SystemExit(code)


def main() -> None:
    # `run_and_exit` ends its process with os._exit once vLLM is imported: here that ends the command, not the server.
    os._exit = exit_command
    with os.fdopen(int(sys.argv[1]), "w") as replies:
        for line in sys.stdin:
            request = json.loads(line)
            replies.write(json.dumps(run(request["module"], request["args"], request["cwd"])) + "\n")
            replies.flush()


if __name__ == "__main__":
    main()
