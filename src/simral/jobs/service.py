"""Durable jobs (DESIGN.md §5): enqueue in the caller's transaction, claim, finish, retry.

A job is enqueued in the same transaction as the change that calls for it, so the change and its
follow-up work land together or not at all. Runners claim due jobs under a lease: ``SELECT … FOR
UPDATE SKIP LOCKED`` on PostgreSQL, the database's single write lock on SQLite (``BEGIN
IMMEDIATE``). A runner that dies leaves its jobs ``running`` until the lease expires; they are then
claimed again, so handlers must be idempotent. Failures are retried with exponential backoff and
the job is dead-lettered after ``max_attempts``; an operator can retry or cancel it (audited).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from simral.access.policy import AccessDenied, Principal, may_manage
from simral.audit import service as audit
from simral.db.base import utcnow
from simral.jobs.models import ACTIVE_STATES, CANCELLED, DEAD, DONE, QUEUED, RUNNING, STATES, Job

#: First retry delay; each further failure doubles it, up to :data:`MAX_BACKOFF`.
BASE_BACKOFF = timedelta(seconds=2)
MAX_BACKOFF = timedelta(minutes=30)
DEFAULT_LEASE = timedelta(minutes=5)


class JobError(ValueError):
    """A job operation that cannot be done (unknown job, wrong state)."""


@dataclass(frozen=True)
class ClaimedJob:
    """What a runner needs of a claimed job, detached from the session."""

    id: int
    kind: str
    payload: dict[str, Any]
    group_key: str
    attempts: int
    max_attempts: int


def enqueue(
    session: Session,
    *,
    kind: str,
    payload: dict[str, Any],
    group_key: str = "",
    dedupe_key: str = "",
    delay: timedelta = timedelta(0),
    max_attempts: int = 10,
) -> int | None:
    """Add a job to the caller's transaction; ``None`` when an active job has the same ``dedupe_key``."""
    if dedupe_key:
        active = session.scalar(
            select(Job.id).where(Job.dedupe_key == dedupe_key, Job.state.in_(ACTIVE_STATES)).limit(1)
        )
        if active is not None:
            return None
    now = utcnow()
    job = Job(
        kind=kind,
        payload=payload,
        group_key=group_key,
        dedupe_key=dedupe_key,
        state=QUEUED,
        attempts=0,
        max_attempts=max_attempts,
        run_after=now + delay,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    session.flush()
    return job.id


def _claimable(now: datetime) -> Any:
    return or_(
        and_(Job.state == QUEUED, Job.run_after <= now),
        and_(Job.state == RUNNING, Job.lease_until < now),
    )


def due(session: Session, *, kinds: tuple[str, ...] | None = None) -> bool:
    """Whether a job is ready to be claimed (read-only: spares the write lock when idle)."""
    query = select(Job.id).where(_claimable(utcnow())).limit(1)
    if kinds is not None:
        query = query.where(Job.kind.in_(kinds))
    return session.scalar(query) is not None


def claim(
    session: Session,
    *,
    worker: str,
    kinds: tuple[str, ...] | None = None,
    batch: int = 1,
    lease: timedelta = DEFAULT_LEASE,
) -> list[ClaimedJob]:
    """Claim the oldest due job and up to ``batch - 1`` more due jobs of the same kind and group.

    Commit the caller's transaction before running them: the lease is what protects them then.
    """
    now = utcnow()
    first_query = select(Job).where(_claimable(now)).order_by(Job.run_after, Job.id).limit(1)
    if kinds is not None:
        first_query = first_query.where(Job.kind.in_(kinds))
    if session.get_bind().dialect.name == "postgresql":
        first_query = first_query.with_for_update(skip_locked=True)
    first = session.scalar(first_query)
    if first is None:
        return []
    jobs = [first]
    if batch > 1 and first.group_key:
        more = (
            select(Job)
            .where(
                _claimable(now), Job.kind == first.kind, Job.group_key == first.group_key, Job.id != first.id
            )
            .order_by(Job.run_after, Job.id)
            .limit(batch - 1)
        )
        if session.get_bind().dialect.name == "postgresql":
            more = more.with_for_update(skip_locked=True)
        jobs.extend(session.scalars(more))
    claimed = []
    for job in jobs:
        job.state = RUNNING
        job.attempts += 1
        job.lease_until = now + lease
        job.claimed_by = worker[:64]
        job.updated_at = now
        claimed.append(
            ClaimedJob(job.id, job.kind, dict(job.payload), job.group_key, job.attempts, job.max_attempts)
        )
    return claimed


def complete(session: Session, job_id: int) -> None:
    """Mark a claimed job done."""
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == RUNNING)
        .values(state=DONE, lease_until=None, finished_at=now, updated_at=now, last_error="")
    )


def backoff(attempts: int) -> timedelta:
    """Delay before the next try after ``attempts`` failures: doubling, capped, with ±20 % jitter."""
    base = min(BASE_BACKOFF * (2 ** max(attempts - 1, 0)), MAX_BACKOFF)
    return base * random.uniform(0.8, 1.2)


def fail(session: Session, job_id: int, error: str, *, permanent: bool = False) -> str:
    """Record a failed try: back to the queue after :func:`backoff`, or dead-lettered; the new state."""
    job = session.get(Job, job_id)
    if job is None or job.state != RUNNING:
        return job.state if job is not None else ""
    now = utcnow()
    job.last_error = error[:4000]
    job.lease_until = None
    job.updated_at = now
    if permanent or job.attempts >= job.max_attempts:
        job.state = DEAD
        job.finished_at = now
    else:
        job.state = QUEUED
        job.run_after = now + backoff(job.attempts)
    return job.state


def get(session: Session, job_id: int) -> Job | None:
    """One job."""
    return session.get(Job, job_id)


def list_jobs(session: Session, *, state: str = "", kind: str = "", limit: int = 100) -> list[Job]:
    """Jobs, newest first, optionally of one state and kind."""
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if state:
        if state not in STATES:
            raise JobError(f"unknown state {state!r} (one of {', '.join(STATES)})")
        query = query.where(Job.state == state)
    if kind:
        query = query.where(Job.kind == kind)
    return list(session.scalars(query))


def counts(session: Session) -> Counter[str]:
    """How many jobs are in each state."""
    rows = session.execute(select(Job.state, func.count()).group_by(Job.state))
    return Counter({state: int(n) for state, n in rows})


def _managed(principal: Principal) -> None:
    if not may_manage(principal):
        raise AccessDenied(f"{principal.audit_name} may not manage jobs")


def retry(session: Session, job_id: int, *, principal: Principal) -> Job:
    """Put a dead or cancelled job back in the queue with fresh attempts (audited)."""
    _managed(principal)
    job = session.get(Job, job_id)
    if job is None:
        raise JobError(f"no job {job_id}")
    if job.state not in (DEAD, CANCELLED):
        raise JobError(f"job {job_id} is {job.state}: only dead or cancelled jobs can be retried")
    now = utcnow()
    job.state, job.attempts, job.run_after, job.updated_at, job.finished_at = QUEUED, 0, now, now, None
    audit.record(session, action="job.retry", principal=principal, detail={"job": job_id, "kind": job.kind})
    return job


def cancel(session: Session, job_id: int, *, principal: Principal) -> Job:
    """Cancel a queued or dead job (a running one is cancelled once its current try ends: not here)."""
    _managed(principal)
    job = session.get(Job, job_id)
    if job is None:
        raise JobError(f"no job {job_id}")
    if job.state not in (QUEUED, DEAD):
        raise JobError(f"job {job_id} is {job.state}: only queued or dead jobs can be cancelled")
    now = utcnow()
    job.state, job.updated_at, job.finished_at = CANCELLED, now, now
    audit.record(session, action="job.cancel", principal=principal, detail={"job": job_id, "kind": job.kind})
    return job
