"""The serving process's preservation loop: replication follower, fixity looks, tier rules.

Every worker runs it; the work itself is done by durable jobs (:mod:`simral.jobs`), so it is
shared between workers and nodes without being done twice:

- while a ``replica_store`` is set, the change feed is followed every :data:`LOOK_SECONDS`
  (:func:`simral.preservation.replication.follow_changes`, under the cursor's lock);
- every :data:`FIXITY_LOOK_SECONDS`, when ``fixity_interval_hours`` > 0 and some blob is due, one
  :data:`~simral.preservation.fixity.FIXITY_SWEEP` job is queued (one active at a time);
- every ``tier_check_minutes``, when tier rules exist, the moves they call for are queued.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from simral.context import AppContext
from simral.jobs import service as jobs
from simral.jobs.runner import Handler, JobRunner
from simral.preservation import fixity, replication, tiers

log = logging.getLogger(__name__)

LOOK_SECONDS = 1.0
FIXITY_LOOK_SECONDS = 30.0

#: The job handlers of this package, for the job runner.
HANDLERS: dict[str, Handler] = {
    tiers.TIER_MOVE: tiers.move_blobs,
    tiers.TIER_PURGE: tiers.purge_sources,
    replication.REPLICATE: replication.replicate_blobs,
    fixity.FIXITY_SWEEP: fixity.run_sweep,
}


def _look(ctx: AppContext, runner: JobRunner, *, fixity_now: bool, tiers_now: bool) -> None:
    settings = ctx.settings
    queued = False
    if settings.replica_store:
        with ctx.db.reading() as session:
            due = replication.replication_due(session)
        if due:
            with ctx.db.unit_of_work() as session:
                queued |= replication.follow_changes(session) > 0
    if fixity_now:
        with ctx.db.reading() as session:
            due = fixity.fixity_due(session, interval=timedelta(hours=settings.fixity_interval_hours))
        if due:
            with ctx.db.unit_of_work() as session:
                queued |= (
                    jobs.enqueue(
                        session, kind=fixity.FIXITY_SWEEP, payload={}, dedupe_key=fixity.FIXITY_SWEEP
                    )
                    is not None
                )
    if tiers_now:
        with ctx.db.reading() as session:
            has_rules = any(rule.enabled for rule in tiers.list_rules(session))
        if has_rules:
            with ctx.db.unit_of_work() as session:
                plan = tiers.plan_moves(
                    session, known_stores=ctx.stores, replica_store=settings.replica_store
                )
            queued |= plan.jobs > 0
    if queued:
        runner.wake()


def preservation_loop(ctx: AppContext, runner: JobRunner, stop: threading.Event) -> None:
    """Run until ``stop`` is set (a thread of :func:`simral.exchange.start_exchange`)."""
    settings = ctx.settings
    next_fixity = time.monotonic() + FIXITY_LOOK_SECONDS
    tier_period = settings.tier_check_minutes * 60
    next_tiers = time.monotonic() + tier_period
    while not stop.wait(LOOK_SECONDS):
        now = time.monotonic()
        fixity_now = settings.fixity_interval_hours > 0 and now >= next_fixity
        tiers_now = tier_period > 0 and now >= next_tiers
        if fixity_now:
            next_fixity = now + FIXITY_LOOK_SECONDS
        if tiers_now:
            next_tiers = now + tier_period
        try:
            _look(ctx, runner, fixity_now=fixity_now, tiers_now=tiers_now)
        except Exception as exc:
            log.error("preservation: %s: %s", type(exc).__name__, exc)


def start(ctx: AppContext, runner: JobRunner, stop: threading.Event) -> None:
    """Start :func:`preservation_loop` in a daemon thread."""
    threading.Thread(
        target=preservation_loop, args=(ctx, runner, stop), daemon=True, name="preservation"
    ).start()
