"""Run ``simral serve`` as a real subprocess for end-to-end tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests import cli_forkserver
from tests.peers import free_port, wait_port

SIMRAL = str(Path(sys.executable).parent / "simral")
#: Run ``SimralProcess.cli`` commands through the fork server (see :mod:`tests.cli_forkserver`).
FORK_CLI = os.environ.get("SIMRAL_TEST_CLI_SUBPROCESS", "") != "1"

#: The organisation, technologist account and password every test instance gets on first use:
#: nodes added by tests belong to it, imports are assigned to it, and its token reads everything
#: the tests store (the access policy in action, not bypassed).
TEST_ORGANISATION = "TESTORG"
TEST_USER = "tester"
TEST_PASSWORD = "Essai-Radio-2026!x"
#: The HL7 senders every instance with an MLLP listener admits (``simral hl7-sources add``), as
#: name → (MSH-3, MSH-4; "" any facility): the identity manager of the tests' ADT feed
#: (tests/test_hl7_adt.py) and the PDQ consumer of their queries (tests/test_pdq.py). Unregistered
#: senders are refused (``allow_unknown_hl7_senders`` is false by default).
TEST_HL7_SOURCES = {"GAM_CHA": ("GAM_CHA", "CHA"), "PDC_RIS": ("PDC_RIS", "")}
_DATA_DIR_COMMANDS = {
    "nodes",
    "import",
    "check",
    "organisations",
    "users",
    "dmp",
    "tokens",
    "audit",
    "routes",
    "dicomweb-peers",
    "jobs",
    "compression",
    "export",
    "retention",
    "hl7-sources",
}


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


class SimralProcess:
    """A ``simral serve`` process with its own data folder, ports and environment."""

    def __init__(
        self,
        data_dir: Path,
        *,
        env: dict[str, str] | None = None,
        ae_title: str = "SIMRAL",
        extra_env: dict[str, str] | None = None,
        hl7: bool = False,
        hl7_sources: dict[str, tuple[str, str]] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        #: The MLLP port (``--hl7-port``) when ``hl7`` is asked for, else 0.
        self.hl7_port = free_port() if hl7 else 0
        #: HL7 senders registered before the first start (default :data:`TEST_HL7_SOURCES` with ``hl7``).
        self.hl7_sources = dict(TEST_HL7_SOURCES if hl7 and hl7_sources is None else hl7_sources or {})
        self._hl7_sources_ready = False
        self.env = {**os.environ, "TCP_NODELAY": "1", **(env or {}), **(extra_env or {})}
        self.env.pop("SIMRAL_CONFIG", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self._directory_ready = False
        self._token = ""
        self.log_path = data_dir.parent / f"{data_dir.name}-serve.log"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"

    # -- CLI --------------------------------------------------------------------------------------

    def cli(
        self, *args: str, check: bool = True, timeout: float = 600, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a ``simral`` subcommand against this instance's data folder and settings.

        ``import`` is assigned to the test organisation unless the arguments name one. The command runs
        in a process forked from an interpreter that has already imported the CLI
        (:mod:`tests.cli_forkserver`), unless ``SIMRAL_TEST_CLI_SUBPROCESS=1`` asks for a fresh
        ``simral`` subprocess.
        """
        argv = [SIMRAL, *args]
        if args and args[0] in _DATA_DIR_COMMANDS:
            argv += ["--data-dir", str(self.data_dir)]
        if args and args[0] == "import" and "--organisation" not in args:
            self.ensure_directory()
            argv += ["--organisation", TEST_ORGANISATION]
        if FORK_CLI:
            result = cli_forkserver.SERVER.run(argv[1:], self.env, timeout=timeout, input=input)
        else:
            result = subprocess.run(
                argv,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                input=input,
            )
        if check and result.returncode != 0:
            raise AssertionError(
                f"simral {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return result

    def ensure_directory(self) -> None:
        """Create the test organisation and its technologist account (once)."""
        if self._directory_ready:
            return
        self._directory_ready = True
        self.cli(
            "organisations", "add", TEST_ORGANISATION, "--name", "Test organisation", "--finess", "990000001"
        )
        self.cli(
            "users",
            "add",
            TEST_USER,
            "--organisation",
            TEST_ORGANISATION,
            "--role",
            "technologist",
            "--password-stdin",
            input=TEST_PASSWORD + "\n",
        )

    def add_node(
        self, name: str, ae: str, port: int, host: str = "127.0.0.1", *, organisation: str | None = None
    ) -> None:
        """Register a node of ``organisation`` (default: the test organisation); ``""``: archive-wide."""
        if organisation is None:
            self.ensure_directory()
            organisation = TEST_ORGANISATION
        scope = ["--organisation", organisation] if organisation else ["--archive-wide"]
        self.cli("nodes", "add", name, "--ae", ae, "--host", host, "--port", str(port), *scope)

    def add_hl7_source(self, name: str, application: str, facility: str = "", *options: str) -> None:
        """Admit an HL7 sender of ADT messages or PDQ queries (``simral hl7-sources add``)."""
        scope = ["--facility", facility] if facility else []
        self.cli("hl7-sources", "add", name, "--application", application, *scope, *options)

    def token_for(self, login: str, expires: str = "12h") -> str:
        """A bearer token of ``login``."""
        return self.cli("tokens", "create", login, "--expires", expires).stdout.strip()

    @property
    def token(self) -> str:
        """The test technologist's bearer token (created on first use)."""
        if not self._token:
            self.ensure_directory()
            self._token = self.token_for(TEST_USER)
        return self._token

    @property
    def auth_headers(self) -> dict[str, str]:
        """``Authorization: Bearer`` for the test technologist."""
        return {"Authorization": f"Bearer {self.token}"}

    # -- process ----------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> SimralProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self._hl7_sources_ready:
            self._hl7_sources_ready = True
            for name, (application, facility) in self.hl7_sources.items():
                self.add_hl7_source(name, application, facility)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    SIMRAL,
                    "serve",
                    "--data-dir",
                    str(self.data_dir),
                    "--dicom-port",
                    str(self.dicom_port),
                    "--http-port",
                    str(self.http_port),
                    "--ae-title",
                    self.ae_title,
                    "--dicom-host",
                    "127.0.0.1",
                    *(["--hl7-port", str(self.hl7_port), "--hl7-host", "127.0.0.1"] if self.hl7_port else []),
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"simral serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                wait_port("127.0.0.1", self.dicom_port, timeout=0.5)
                wait_port("127.0.0.1", self.http_port, timeout=0.5)
                if self.hl7_port:
                    wait_port("127.0.0.1", self.hl7_port, timeout=0.5)
                return self
            except TimeoutError:
                continue
        self.kill()
        raise TimeoutError(f"simral serve did not start:\n{self.log_tail()}")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; return the exit status."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.kill()
            self.proc = None

    def kill(self) -> None:
        """SIGKILL the whole process group (crash simulation)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        # Worker processes die with the group but may outlive the parent by a moment: a restart
        # must not meet their listening sockets.
        deadline = time.monotonic() + 10
        while _group_members(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.proc = None

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> SimralProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            self.stop()
