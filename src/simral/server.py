"""``simral serve``: the DICOM service and the HTTP service in one process."""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import threading
from collections.abc import Iterator

import uvicorn

from simral.app import open_app
from simral.archive.service import recover_staged
from simral.config import Settings
from simral.dimse.server import DimseService
from simral.web.app import create_web_app
from simral.web.auth import check_http_exposure

log = logging.getLogger(__name__)

RECOVERY_PERIOD = 30.0


class _HttpServer(uvicorn.Server):
    """uvicorn server whose SIGINT/SIGTERM ends ``serve`` normally (exit status 0).

    uvicorn re-raises the captured signal after shutting down, which would kill the process
    before the DICOM service is stopped; simral handles the signal itself instead.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _recovery_loop(ctx: object, stop: threading.Event) -> None:
    while not stop.wait(RECOVERY_PERIOD):
        try:
            recover_staged(ctx, older_than=RECOVERY_PERIOD)  # type: ignore[arg-type]
        except Exception as exc:
            log.error("staging recovery sweep failed: %s", exc)


def run_server(settings: Settings) -> int:
    """Run until SIGINT/SIGTERM; return the exit status."""
    check_http_exposure(settings.http_host)
    ctx = open_app(settings)
    published, deleted = recover_staged(ctx)
    if published or deleted:
        log.warning("recovered interrupted ingests: %d published, %d discarded", published, deleted)
    dimse = DimseService(ctx)
    server = dimse.start(settings.dicom_host, settings.dicom_port)
    stop = threading.Event()
    threading.Thread(target=_recovery_loop, args=(ctx, stop), daemon=True, name="staging-recovery").start()
    web = create_web_app(ctx)
    config = uvicorn.Config(
        web, host=settings.http_host, port=settings.http_port, log_level="warning", access_log=False
    )
    http = _HttpServer(config)
    # Start-up objects (dictionaries, compiled statements, the app) live for the whole run: keep
    # them out of the garbage collector's scans, which otherwise cost milliseconds per request.
    gc.collect()
    gc.freeze()
    dicom_port = server.server_address[1]
    print(
        f"simral serving: DICOM {settings.ae_title}@{settings.dicom_host}:{dicom_port}, "
        f"HTTP http://{settings.http_host}:{settings.http_port}/ (data in {settings.data_dir})",
        flush=True,
    )
    try:
        http.run()  # handles SIGINT/SIGTERM and returns
    finally:
        stop.set()
        dimse.stop()
        ctx.db.dispose()
        log.info("simral stopped")
    return 0
