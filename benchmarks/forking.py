"""A benchmark's measuring child process, as a fork of the benchmark's own process where ``BENCHMARK_FORK=1``.

The tests run every benchmark at tiny sizes, where a child trains for a second and a fresh interpreter spends
several importing torch, transformers and Lightning again; a fork of a process that has imported them (the
tests' command server) skips that. The numbers for people come from fresh interpreters (the default).
"""

import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

FORK = os.environ.get("BENCHMARK_FORK") == "1"


def run(command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``command`` (``python SCRIPT ARGS`` or ``python -m MODULE ARGS``) in a process of its own, its output captured:
    a fresh interpreter, or with ``BENCHMARK_FORK=1`` a fork of this one (``forked``)."""
    if FORK:
        return forked(command, env, cwd)[0]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)


def forked(
    command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None, output: Path | None = None
) -> tuple[subprocess.CompletedProcess, int]:
    """``command`` run as ``python`` runs it, in a fork of this process with ``env`` (this process's by default) in
    ``cwd``: the completed process, its output captured (or written, stderr too, to the file ``output``), and its
    peak resident memory in KiB."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                log = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if output else None
                os.dup2(log if log is not None else out.fileno(), 1)
                os.dup2(log if log is not None else err.fileno(), 2)
                if env is not None:
                    os.environ.clear()
                    os.environ.update(env)
                if cwd is not None:
                    os.chdir(cwd)
                if command[1] == "-m":
                    sys.argv = [command[2], *command[3:]]
                    runpy.run_module(command[2], run_name="__main__", alter_sys=True)
                else:
                    sys.argv = command[1:]
                    runpy.run_path(command[1], run_name="__main__")
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
            except BaseException:
                traceback.print_exc()
            finally:  # no exit handlers: this process's would run too (and remove its temporary folders)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status, usage = os.wait4(pid, 0)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(command, os.waitstatus_to_exitcode(status), out.read(), err.read())
        return done, usage.ru_maxrss
