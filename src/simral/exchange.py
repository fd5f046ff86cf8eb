"""Wiring of the exchange machinery in a serving process: the router and the job runner.

The router follows the archive's change feed and turns new instances into forwarding jobs
(:func:`simral.sharing.service.route_changes`); the runner claims due jobs and runs them with the
protocol adapters' handlers (DIMSE C-STORE, STOW-RS, HL7 v2 messages to a RIS over MLLP). Every
worker process runs both: claims and the router's cursor are taken under the database's locks, so
they share the work without doing anything twice. A third thread keeps the reading tasks up to
date (:mod:`simral.reading.tasks`: arrived studies, readiness, deadlines); a fourth queues again the
DMP documents that waited for a qualified INS and new manifest versions of studies whose images
changed (:mod:`simral.dmp.service`); a fifth drives storage tiers, replication and the fixity
sweep (:mod:`simral.preservation.background`); a sixth, when ``compression_check_seconds`` is set,
queues the instances the compression rules want re-encoded (:mod:`simral.compression.service`).
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from simral.compression import service as compression
from simral.context import AppContext
from simral.db.base import utcnow
from simral.dicomweb.forwarding import forward_stow
from simral.dimse.forwarding import forward_dimse
from simral.dmp import service as dmp
from simral.dmp.publication import publish_documents, withdraw_documents
from simral.hl7.client import HL7_SEND, send_hl7
from simral.jobs.runner import JobRunner
from simral.lifecycle import service as lifecycle
from simral.preservation import background as preservation
from simral.reading import tasks as reading_tasks
from simral.reading.publication import REPORT_PUBLISH, publish_report
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


def _reading_loop(ctx: AppContext, stop: threading.Event) -> None:
    """Reading tasks (DESIGN.md §7): open the tasks of scheduled studies that arrived, make ready
    those whose images are complete, escalate near or passed deadlines. Looks read-only first;
    takes the write lock only when something is due."""
    settings = ctx.settings
    quiet = timedelta(seconds=settings.reading_quiet_seconds)
    warn_before = timedelta(minutes=settings.reading_escalate_minutes)
    while not stop.is_set():
        try:
            now = utcnow()
            with ctx.db.reading() as session:
                work = reading_tasks.due_work(session, now=now, quiet=quiet, warn_before=warn_before)
            if work:
                with ctx.db.unit_of_work() as session:
                    reading_tasks.do_work(session, work, now=utcnow(), quiet=quiet, warn_before=warn_before)
        except Exception as exc:
            log.error("reading tasks: %s: %s", type(exc).__name__, exc)
        stop.wait(max(0.1, settings.reading_check_seconds))


def _dmp_loop(ctx: AppContext, runner: JobRunner, stop: threading.Event) -> None:
    """DMP documents waiting for a qualified INS are queued again once the identity is QUAL; a
    published manifest whose study's images changed (and are quiet for ``reading_quiet_seconds``)
    gets a new version replacing it."""
    quiet = timedelta(seconds=ctx.settings.reading_quiet_seconds)
    while not stop.wait(max(0.5, ctx.settings.dmp_check_seconds)):
        try:
            quiet_since = utcnow() - quiet
            with ctx.db.reading() as session:
                resumable = dmp.waiting_resumable(session)
                changed = dmp.manifests_due(session, quiet_since=quiet_since)
            if resumable or changed:
                with ctx.db.unit_of_work() as session:
                    queued = dmp.resume_waiting(session) if resumable else 0
                    queued += dmp.refresh_manifests(session, quiet_since=quiet_since) if changed else 0
                if queued:
                    runner.wake()
        except Exception as exc:
            log.error("DMP documents: %s: %s", type(exc).__name__, exc)


def _compression_loop(ctx: AppContext, runner: JobRunner, stop: threading.Event) -> None:
    """Compression at rest: queue the next batch of instances the rules select once the previous
    batch is done (read-only look first)."""
    while not stop.wait(max(0.5, ctx.settings.compression_check_seconds)):
        try:
            with ctx.db.reading() as session:
                pending = not compression.active_jobs(session) and bool(compression.due(session, limit=1))
            if pending:
                with ctx.db.unit_of_work() as session:
                    queued = compression.enqueue_pass(session, batch=max(1, ctx.settings.compression_batch))
                if queued:
                    runner.wake()
        except Exception as exc:
            log.error("compression pass: %s: %s", type(exc).__name__, exc)


def start_exchange(ctx: AppContext, stop: threading.Event) -> JobRunner:
    """Start the router and the job runner threads; the runner is returned for :meth:`JobRunner.stop`."""
    runner = JobRunner(
        ctx,
        {
            sharing.FORWARD_DIMSE: forward_dimse,
            sharing.FORWARD_STOW: forward_stow,
            HL7_SEND: send_hl7,
            REPORT_PUBLISH: publish_report,
            dmp.DMP_PUBLISH: publish_documents,
            dmp.DMP_WITHDRAW: withdraw_documents,
            lifecycle.LIFECYCLE_DELETE: lifecycle.run_deletions,
            **preservation.HANDLERS,
            compression.COMPRESS: compression.compress_instances,
        },
        lease=timedelta(seconds=ctx.settings.job_lease_seconds),
    )
    runner.start()
    threading.Thread(target=_router_loop, args=(ctx, runner, stop), daemon=True, name="router").start()
    threading.Thread(target=_reading_loop, args=(ctx, stop), daemon=True, name="reading-tasks").start()
    threading.Thread(target=_dmp_loop, args=(ctx, runner, stop), daemon=True, name="dmp-waiting").start()
    preservation.start(ctx, runner, stop)
    if ctx.settings.compression_check_seconds > 0:
        threading.Thread(
            target=_compression_loop, args=(ctx, runner, stop), daemon=True, name="compression"
        ).start()
    return runner
