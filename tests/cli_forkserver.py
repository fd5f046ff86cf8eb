"""Run ``simral`` subcommands in processes forked from one interpreter that has already imported the CLI.

Each ``simral …`` subprocess spends most of its time importing the platform (SQLAlchemy, pydicom,
boto3, the services: about 1.5 s of CPU per call on the CI machine) before the command itself runs
in a fraction of that. The test harness (:meth:`tests.simral_proc.SimralProcess.cli`) runs hundreds
of commands, so a server process imports :mod:`simral.cli.main` once and forks a child per command:
the child is a fresh process (own environment, stdin, stdout, stderr, exit status, atexit handlers)
running the same Typer application as the ``simral`` script, only without the import.

Protocol: one JSON request per line on the server's stdin (argv, environment, working directory, paths of
the stdin, stdout and stderr files, timeout); one JSON reply per line on a pipe of its own (exit status, or
``null`` when the command overran its timeout and was killed). ``SIMRAL_TEST_CLI_SUBPROCESS=1``
makes the harness run real ``simral`` subprocesses instead.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any


def _child(request: dict[str, Any], reply_fd: int) -> int:
    """In the forked child: become ``simral <argv>`` and return its exit status."""
    os.setsid()
    for fd, path, flags in (
        (0, request["stdin"], os.O_RDONLY),
        (1, request["stdout"], os.O_WRONLY),
        (2, request["stderr"], os.O_WRONLY),
    ):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    os.close(reply_fd)
    sys.stdin = io.TextIOWrapper(open(0, "rb", closefd=False), encoding="utf-8")  # noqa: SIM115
    sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), encoding="utf-8", line_buffering=False)  # noqa: SIM115
    sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), encoding="utf-8", line_buffering=True)  # noqa: SIM115
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["simral", *request["argv"]]
    from simral.cli.main import app

    status: Any = 0
    try:
        app(args=request["argv"], prog_name="simral")
    except SystemExit as exc:
        status = exc.code
    except BaseException:  # the interpreter would print it and exit with 1
        traceback.print_exc()
        status = 1
    if status is None:
        status = 0
    elif not isinstance(status, int):
        print(status, file=sys.stderr)
        status = 1
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    return status


def serve(reply_fd: int) -> None:
    """The server loop: fork a child per request, reply on ``reply_fd`` with its exit status."""
    _preload()

    reply = open(reply_fd, "w", encoding="utf-8")  # noqa: SIM115
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(request, reply_fd)
            finally:
                os._exit(code)
        deadline = time.monotonic() + request["timeout"]
        status: int | None = None
        while True:
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(wait_status)
                break
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.005)
        reply.write(json.dumps({"status": status}) + "\n")
        reply.flush()


def _preload() -> None:
    """Import the CLI and every module of the platform (commands import their services lazily)."""
    import importlib
    import pkgutil

    import simral
    import simral.cli.main  # the import every child inherits

    for module in pkgutil.walk_packages(simral.__path__, "simral."):
        if ".migrations." in module.name:  # loaded by Alembic from their files, not imported
            continue
        with contextlib.suppress(Exception):
            importlib.import_module(module.name)


class CliServer:
    """The client side: one server per test process, started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reply: io.TextIOWrapper | None = None

    def _start(self) -> None:
        read_fd, write_fd = os.pipe()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", f"from tests.cli_forkserver import serve; serve({write_fd})"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(write_fd,),
            cwd=str(Path(__file__).resolve().parent.parent),
            env={**os.environ, "PYTHONPATH": _pythonpath()},
        )
        os.close(write_fd)
        self._reply = open(read_fd, encoding="utf-8")  # noqa: SIM115
        atexit.register(self.close)

    def close(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(OSError):
                assert self._proc.stdin is not None
                self._proc.stdin.close()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None
        if self._reply is not None:
            self._reply.close()
            self._reply = None

    def run(
        self, argv: list[str], env: dict[str, str], *, timeout: float, input: str | None
    ) -> subprocess.CompletedProcess[str]:
        """Like ``subprocess.run([simral, *argv], env=env, capture_output=True, text=True, …)``."""
        with tempfile.TemporaryDirectory(prefix="simral-cli-") as tmp, self._lock:
            paths = {name: Path(tmp) / name for name in ("stdin", "stdout", "stderr")}
            paths["stdin"].write_text(input or "", encoding="utf-8")
            paths["stdout"].touch()
            paths["stderr"].touch()
            request = {
                "argv": argv,
                "env": env,
                "timeout": timeout,
                "cwd": os.getcwd(),
                **{name: str(path) for name, path in paths.items()},
            }
            if self._proc is None or self._proc.poll() is not None:
                self.close()
                self._start()
            assert self._proc is not None and self._proc.stdin is not None and self._reply is not None
            self._proc.stdin.write((json.dumps(request) + "\n").encode())
            self._proc.stdin.flush()
            line = self._reply.readline()
            if not line:
                self.close()
                raise RuntimeError("the CLI fork server died")
            status = json.loads(line)["status"]
            stdout = paths["stdout"].read_text(encoding="utf-8", errors="replace")
            stderr = paths["stderr"].read_text(encoding="utf-8", errors="replace")
        if status is None:
            raise subprocess.TimeoutExpired(["simral", *argv], timeout, stdout, stderr)
        return subprocess.CompletedProcess(["simral", *argv], status, stdout, stderr)


def _pythonpath() -> str:
    """The test process's import path first, so the server imports the same ``simral`` and ``tests``."""
    root = str(Path(__file__).resolve().parent.parent)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([*parts, root])


SERVER = CliServer()
