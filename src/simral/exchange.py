"""Wiring of the exchange machinery in a serving process: the router and the job runner.

The router follows the archive's change feed and turns new instances into forwarding jobs
(:func:`simral.sharing.service.route_changes`); the runner claims due jobs and runs them with the
protocol adapters' handlers (DIMSE C-STORE, STOW-RS). Every worker process runs both: claims and
the router's cursor are taken under the database's locks, so they share the work without doing
anything twice.
"""

from __future__ import annotations

import logging
import threading

from simral.context import AppContext
from simral.dicomweb.forwarding import forward_stow
from simral.dimse.forwarding import forward_dimse
from simral.jobs.runner import JobRunner
from simral.sharing import service as sharing

log = logging.getLogger(__name__)

#: Seconds between two looks at the change feed when nothing new came.
ROUTER_PERIOD = 0.5


def _router_loop(ctx: AppContext, runner: JobRunner, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            with ctx.db.reading() as session:
                due = sharing.routing_due(session)
            enqueued = 0
            if due:
                with ctx.db.unit_of_work() as session:
                    enqueued = sharing.route_changes(session)
        except Exception as exc:
            log.error("router: %s: %s", type(exc).__name__, exc)
            enqueued = 0
        if enqueued:
            runner.wake()
            continue
        stop.wait(ROUTER_PERIOD)


def start_exchange(ctx: AppContext, stop: threading.Event) -> JobRunner:
    """Start the router and the job runner threads; the runner is returned for :meth:`JobRunner.stop`."""
    runner = JobRunner(ctx, {sharing.FORWARD_DIMSE: forward_dimse, sharing.FORWARD_STOW: forward_stow})
    runner.start()
    threading.Thread(target=_router_loop, args=(ctx, runner, stop), daemon=True, name="router").start()
    return runner
