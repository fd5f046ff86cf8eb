"""``simral serve``: the DICOM service and the HTTP service in one process."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from simral import tls
from simral.app import open_app
from simral.archive.service import recover_staged
from simral.audit.export import start_exporter
from simral.config import Settings
from simral.context import AppContext
from simral.dimse.server import DimseService
from simral.exchange import start_exchange
from simral.observability import health, logs, metrics
from simral.web.app import create_web_app
from simral.web.auth import check_http_exposure

log = logging.getLogger(__name__)


class _HttpServer(uvicorn.Server):
    """uvicorn server whose SIGINT/SIGTERM ends ``serve`` normally (exit status 0).

    uvicorn re-raises the captured signal after shutting down, which would kill the process
    before the DICOM service is stopped; simral handles the signal itself instead.
    """

    #: A forked worker leaves SIGINT (Ctrl-C reaches the whole process group) to the parent.
    stop_signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
    #: Called when a stop signal arrives (``/readyz`` answers 503 while the server drains).
    on_stop: Callable[[], None] | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.on_stop is not None:
            self.on_stop()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in self.stop_signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _recovery_loop(ctx: AppContext, stop: threading.Event) -> None:
    """Sweep the staging folder: publish what the store missed, drop what the index never took."""
    settings = ctx.settings
    period = max(settings.staging_sweep_seconds, 0.1)
    while not stop.wait(period):
        try:
            recover_staged(ctx, older_than=max(settings.staging_orphan_seconds, 1.0), publish_after=period)
        except Exception as exc:
            log.error("staging recovery sweep failed: %s", exc)


def _http_socket(host: str, port: int) -> socket.socket:
    """The HTTP listening socket, shared by worker processes through SO_REUSEPORT."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


class PortInUse(RuntimeError):
    """A port simral should listen on is already taken."""


def check_ports_free(settings: Settings) -> None:
    """Fail early when another process (another simral included) already listens on our ports.

    Workers bind with SO_REUSEPORT, which would otherwise let a second instance of the same user
    silently share the ports; a plain bind here refuses any existing listener.
    """
    for host, port, what in (
        (settings.dicom_host, settings.dicom_port, "DICOM"),
        (settings.dicom_host, settings.dicom_tls_port, "DICOM TLS"),
        (settings.http_host, settings.http_port, "HTTP"),
        (settings.hl7_host, settings.hl7_port, "HL7 MLLP"),
    ):
        if port == 0:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise PortInUse(f"{what} port {host}:{port} is not available: {exc.strerror}") from None


def effective_workers(settings: Settings) -> int:
    """Worker processes to run: the setting, or one per CPU (at most 4) when it is 0.

    Several workers need fixed ports (each binds its own SO_REUSEPORT listener).
    """
    if settings.dicom_port == 0 or settings.http_port == 0:
        return 1
    if settings.workers > 0:
        return settings.workers
    return max(1, min(os.cpu_count() or 1, 4))


def run_server(settings: Settings) -> int:
    """Run until SIGINT/SIGTERM; return the exit status.

    The parent prepares the index (migrations) and finishes interrupted ingests, then serves itself
    (worker 0) and, with several workers, forks the others; each accepts DICOM associations and
    HTTP requests on the shared ports (SO_REUSEPORT), so ingest and retrieve use every CPU despite
    the GIL (:func:`_lead`).
    """
    check_http_exposure(
        settings.http_host,
        https=settings.https,
        behind_tls_proxy=settings.behind_tls_proxy,
    )
    try:
        tls.check(settings)
        if settings.hl7_tls:
            tls.server_context(settings)
    except tls.TlsConfigError as exc:
        print(f"refusing to start: {exc}", file=sys.stderr, flush=True)
        return 2
    check_ports_free(settings)
    limit_malloc_arenas()
    # Before anything is counted: every worker's metrics in one per-run folder, merged at scrape.
    metrics.use_multiprocess_directory(metrics.run_directory(settings.data_dir))
    try:
        return _run_node(settings)
    finally:
        metrics.end_multiprocess_directory()


#: glibc's mallopt parameter M_ARENA_MAX (malloc.h).
_M_ARENA_MAX = -8
#: Memory arenas per process: glibc's default, 8 per CPU, lets each of the many short-lived
#: threads (one or two per DICOM association, uvicorn's thread pool, MLLP connections) keep its
#: own arena of freed memory, which the server's RSS then carries: about 5 MiB/min of growth
#: under ``bench/mixed_load.py``, halved with 2 arenas at no measurable cost in latency.
MALLOC_ARENAS = 2


def limit_malloc_arenas() -> bool:
    """Cap glibc's malloc arenas at :data:`MALLOC_ARENAS` for the threads created from now on,
    unless ``MALLOC_ARENA_MAX`` is set in the environment (the operator's choice, already applied
    by glibc). Returns whether the cap was set (False on a C library without mallopt)."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    return bool(_libc_call("mallopt", _M_ARENA_MAX, MALLOC_ARENAS))


#: Seconds between two :func:`release_free_memory` calls of a serving process.
MALLOC_TRIM_SECONDS = 60.0


def release_free_memory() -> bool:
    """Give the whole free pages inside glibc's malloc arenas back to the system (``malloc_trim(0)``,
    which also releases the middle of an arena, not only its top). Memory freed by short-lived
    association and request threads otherwise stays resident as arena free space: under
    ``bench/mixed_load.py`` the RSS kept growing while the memory in use did not. Returns whether
    pages were released (False as well on a C library without malloc_trim)."""
    return bool(_libc_call("malloc_trim", 0))


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (malloc.h, glibc 2.33+)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost",
        )
    ]  # fmt: skip


def native_memory() -> dict[str, int]:
    """This process's native memory (bytes): glibc malloc in use (arena chunks in use plus mmapped
    blocks), free inside the arenas, SQLite's own (``sqlite3_memory_used``: page caches, schemas,
    prepared statements; part of malloc's), and the whole anonymous RSS. Kinds the system does not
    provide are left out."""
    figures: dict[str, int] = {}
    libc = _libc()
    mallinfo2 = getattr(libc, "mallinfo2", None)
    if mallinfo2 is not None:
        mallinfo2.restype = _MallInfo2
        info = mallinfo2()
        figures["malloc_in_use"] = int(info.uordblks + info.hblkhd)
        figures["malloc_free"] = int(info.fordblks)
    used = _sqlite_memory_used()
    if used is not None:
        figures["sqlite"] = used
    anonymous = _status_kib("RssAnon")
    if anonymous is not None:
        # The rest of the anonymous RSS: Python's own arenas (obmalloc maps them itself), thread
        # stacks, and what libraries map without malloc.
        figures["rss_anon"] = anonymous * 1024
    return figures


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux), None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@functools.cache
def _sqlite_library() -> ctypes.CDLL | None:
    """The SQLite library Python's sqlite3 module is linked with (the same loaded copy)."""
    import _sqlite3

    try:
        return ctypes.CDLL(_sqlite3.__file__)
    except OSError:
        return None


def _sqlite_memory_used() -> int | None:
    function = getattr(_sqlite_library(), "sqlite3_memory_used", None)
    if function is None:
        return None
    function.restype = ctypes.c_int64
    return int(function())


def _memory_trim_loop(stop: threading.Event, period: float = MALLOC_TRIM_SECONDS) -> None:
    """Every ``period`` seconds until ``stop`` is set: :func:`release_free_memory`, then publish
    :func:`native_memory` (``simral_native_memory_bytes``)."""
    metrics.record_native_memory(native_memory())
    while not stop.wait(period):
        release_free_memory()
        metrics.record_native_memory(native_memory())


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once: ``ctypes.util.find_library`` runs ``ldconfig -p`` in a
    child process (a fork of the server) at every call."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def _libc_call(function: str, *args: int) -> int | None:
    """Call a C library function with integer arguments; None when the library lacks it."""
    try:
        return int(getattr(_libc(), function)(*args))
    except AttributeError:
        return None


#: prctl option PR_SET_PDEATHSIG (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Ask Linux for a SIGTERM when the parent process (``parent``) dies: a worker must not
    outlive it."""
    _libc_call("prctl", _PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _run_node(settings: Settings) -> int:
    """:func:`run_server` once the ports are checked and the metrics folder is set."""
    ctx = open_app(settings)
    _first_start(settings, ctx)
    published, deleted = recover_staged(ctx)
    if published or deleted:
        log.warning("recovered interrupted ingests: %d published, %d discarded", published, deleted)
    workers = effective_workers(settings)
    if workers == 1:
        # A stop requested while starting up (before uvicorn takes the signals) ends cleanly.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _EarlyStop.handle)
        return _serve(settings, ctx, banner=True)
    ctx.db.dispose()
    # What the parent imported and built is shared with the workers copy-on-write: out of the
    # collector's reach, a worker's collections do not write to (and so copy) those pages.
    gc.collect()
    gc.freeze()
    children: dict[int, int] = {}  # pid -> worker index
    parent = os.getpid()
    for index in range(1, workers):
        pid = os.fork()
        if pid == 0:
            os._exit(_worker(settings, index, parent))
        children[pid] = index
    print(
        f"simral serving with {workers} worker processes: DICOM {settings.ae_title}@{settings.dicom_host}:"
        f"{settings.dicom_port}{_tls_banner(settings, settings.dicom_tls_port)}, HTTP "
        f"{_scheme(settings)}://{settings.http_host}:{settings.http_port}/{_hl7_banner(settings)} "
        f"(data in {settings.data_dir})",
        flush=True,
    )
    return _lead(settings, children)


def _lead(settings: Settings, children: dict[int, int]) -> int:
    """The parent's life with several workers: it is worker 0 itself (the singletons: audit export,
    HL7 listener) while a thread per child watches it. SIGINT/SIGTERM stop the parent's server,
    which then stops the children; a child's death stops the parent's server and the other
    children, and the exit status is then 1. The children die with the parent (PR_SET_PDEATHSIG)."""
    logs.set_worker(0)
    failed = threading.Event()
    stopping = threading.Event()

    def stop_children() -> None:
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def watch(pid: int) -> None:
        try:
            _, wait_status = os.waitpid(pid, 0)
        except ChildProcessError:
            return
        code = os.waitstatus_to_exitcode(wait_status)
        if not stopping.is_set():
            log.error("worker %d (pid %d) exited with %d: stopping the others", children[pid], pid, code)
            failed.set()
            stopping.set()
            _EarlyStop.handle(signal.SIGTERM, None)
            stop_children()
        elif code != 0:
            failed.set()

    watchers = [
        threading.Thread(target=watch, args=(pid,), daemon=True, name=f"watch-worker-{index}")
        for pid, index in children.items()
    ]
    for watcher in watchers:
        watcher.start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _EarlyStop.handle)
    status = 0
    try:
        status = _serve(
            settings, open_app(settings), banner=False, stop_signals=(signal.SIGINT, signal.SIGTERM)
        )
    except BaseException:
        log.exception("worker 0 failed")
        status = 1
    finally:
        stopping.set()
        stop_children()
        for watcher in watchers:
            watcher.join()
    if failed.is_set():
        status = 1
    log.info("simral stopped")
    return status


def _first_start(settings: Settings, ctx: AppContext) -> None:
    """Create the first regional administrator on an empty platform and say how to log in."""
    from simral.identity.service import BOOTSTRAP_LOGIN, ensure_first_administrator

    password_file = settings.data_dir / "initial-admin-password"
    with ctx.db.unit_of_work() as session:
        created = ensure_first_administrator(session, password_file=password_file)
    if created:
        scheme = "https" if settings.https else "http"
        host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::") else settings.http_host
        print(
            f"first start: log in at {scheme}://{host}:{settings.http_port}/login as {BOOTSTRAP_LOGIN!r}; "
            f"its one-time password is in {password_file.resolve()} (readable by you only). "
            "You will enrol a TOTP authenticator at first login.",
            flush=True,
        )


class _EarlyStop:
    """A stop signal received before the HTTP server took the signals over."""

    requested = False
    http: _HttpServer | None = None

    @classmethod
    def handle(cls, signum: int, _frame: object) -> None:
        cls.requested = True
        if cls.http is not None:
            cls.http.should_exit = True


def _worker(settings: Settings, index: int, parent: int) -> int:
    """A forked worker's life; its exit status. A SIGTERM before serving starts ends it cleanly,
    and so does its parent's death, however it died (PR_SET_PDEATHSIG)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the parent decides
    signal.signal(signal.SIGTERM, _EarlyStop.handle)
    _die_with_parent(parent)
    logs.set_worker(index)
    try:
        return _serve(
            settings, open_app(settings), banner=False, stop_signals=(signal.SIGTERM,), singletons=index == 0
        )
    except BaseException:
        log.exception("worker %d failed", index)
        return 1


def _scheme(settings: Settings) -> str:
    return "https" if settings.https else "http"


def _hl7_banner(settings: Settings) -> str:
    if not settings.hl7_port:
        return ""
    return f", HL7 MLLP{' over TLS' if settings.hl7_tls else ''} {settings.hl7_host}:{settings.hl7_port}"


def _tls_banner(settings: Settings, port: int) -> str:
    return f" (DICOM TLS on port {port})" if settings.dicom_tls_port else ""


def _serve(
    settings: Settings,
    ctx: AppContext,
    *,
    banner: bool,
    stop_signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM),
    singletons: bool = True,
) -> int:
    """One worker: the DICOM acceptor, the HTTP server and the staging sweep; with ``singletons``
    (the only worker, or the first of several) also the audit export, which must run once so the
    collector receives the trail in order, and the HL7 MLLP listener when ``hl7_port`` is set (one
    owner of the port: see :mod:`simral.hl7.server`)."""
    dimse = DimseService(ctx)
    server = dimse.start(settings.dicom_host, settings.dicom_port)
    tls_port = 0
    if settings.dicom_tls_port:
        tls_server = dimse.start(
            settings.dicom_host, settings.dicom_tls_port, ssl_context=tls.server_context(settings)
        )
        tls_port = tls_server.server_address[1]
    mllp_server = None
    if singletons and settings.hl7_port:
        from simral.hl7 import server as hl7_server

        context = tls.server_context(settings) if settings.hl7_tls else None
        mllp_server = hl7_server.start(ctx, settings.hl7_host, settings.hl7_port, ssl_context=context)
    stop = threading.Event()
    threading.Thread(target=_recovery_loop, args=(ctx, stop), daemon=True, name="staging-recovery").start()
    threading.Thread(target=_memory_trim_loop, args=(stop,), daemon=True, name="malloc-trim").start()
    runner = start_exchange(ctx, stop)
    if singletons:
        start_exporter(ctx, stop)
    web = create_web_app(ctx)
    https: dict[str, Any] = {}
    if settings.https:
        # uvicorn wraps the sockets handed to ``run(sockets=...)`` with this context (TLS 1.2+).
        https = {"ssl_context_factory": lambda _config, _default: tls.https_context(settings)}
    # log_config=None: uvicorn's records go through simral's handler (format, PHI guard).
    config = uvicorn.Config(web, log_level="warning", access_log=False, log_config=None, **https)
    http = _HttpServer(config)
    http.on_stop = lambda: health.mark_stopping(ctx)
    http.stop_signals = stop_signals
    _EarlyStop.http = http
    http.should_exit = _EarlyStop.requested
    sock = _http_socket(settings.http_host, settings.http_port)
    # Start-up objects (dictionaries, compiled statements, the app) live for the whole run: keep
    # them out of the garbage collector's scans, which otherwise cost milliseconds per request.
    gc.collect()
    gc.freeze()
    if banner:
        print(
            f"simral serving: DICOM {settings.ae_title}@{settings.dicom_host}:{server.server_address[1]}"
            f"{_tls_banner(settings, tls_port)}, HTTP {_scheme(settings)}://{settings.http_host}:"
            f"{sock.getsockname()[1]}/{_hl7_banner(settings)} (data in {settings.data_dir})",
            flush=True,
        )
    try:
        http.run(sockets=[sock])  # handles SIGINT/SIGTERM and returns
    finally:
        stop.set()
        runner.stop()
        if mllp_server is not None:
            hl7_server.stop(mllp_server)
        dimse.stop()
        ctx.db.dispose()
        log.info("simral worker stopped")
    return 0
