"""Figures read from the index at scrape time: job queue, storage per tier and organisation, fixity.

Aggregates only (counts, byte totals, times): no patient, study or instance identifier. Two
queries per computation — one over ``job`` restricted to the active and dead states (the claim
index covers them), one over ``blob`` joined up to the study's producing organisation — and the
result is reused for ``metrics_cache_seconds`` by each process, so a scrape every few seconds does
not rescan a large archive.

Attribution: an instance's bytes count for the organisation that produced its study (the lowest
code when several did; ``none`` when no organisation did, e.g. an archive-wide node's). Fixity:
``verified_at`` is set on a blob each time its bytes were re-hashed and found right; mismatches are
the fixity sweep's alarms (:func:`simral.preservation.fixity.fixity_counts`), repaired or not.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from simral.access.policy import AccessDenied, Principal, may_read_metrics
from simral.archive.models import Blob, Instance, Series, Study, StudyOrganisation
from simral.compression import service as compression
from simral.compression.models import CompressionRule
from simral.context import AppContext
from simral.db.base import as_utc, utcnow
from simral.jobs.models import DEAD, QUEUED, RUNNING, Job
from simral.preservation import tiers
from simral.preservation.fixity import fixity_counts
from simral.preservation.models import TierRule

#: Job states whose counts are the queue: waiting, being run, dead-lettered.
QUEUE_STATES = (QUEUED, RUNNING, DEAD)
NO_ORGANISATION = "none"


@dataclass(frozen=True)
class JobCount:
    """Jobs of one kind in one state; ``retrying`` of them have failed at least once."""

    kind: str
    state: str
    count: int
    retrying: int


@dataclass(frozen=True)
class StorageUse:
    """Instances and bytes of one tier attributed to one organisation."""

    tier: str
    organisation: str
    instances: int
    bytes: int


@dataclass(frozen=True)
class Fixity:
    """Blobs re-verified so far, the newest and oldest verification, alarms raised."""

    blobs: int
    verified: int
    last_verified_at: datetime | None
    oldest_verified_at: datetime | None
    #: Blobs found missing or altered by the fixity sweep, and those no intact copy could repair.
    mismatches: int
    unrepaired: int


@dataclass(frozen=True)
class Figures:
    """Everything the scrape and the administration page show besides the counters."""

    jobs: list[JobCount]
    storage: list[StorageUse]
    fixity: Fixity
    measured_at: datetime = field(default_factory=utcnow)

    @property
    def dead_jobs(self) -> int:
        return sum(j.count for j in self.jobs if j.state == DEAD)


@dataclass(frozen=True)
class StorageRules:
    """The rules that move (tiers) and re-encode (lossless compression) stored blobs, and what
    compression achieved so far."""

    tier_rules: list[TierRule]
    compression_rules: list[CompressionRule]
    compressed: compression.Summary


def _require(principal: Principal) -> None:
    if not may_read_metrics(principal):
        raise AccessDenied(f"{principal.audit_name} may not read the platform's figures")


def measure(session: Session, *, principal: Principal) -> Figures:
    """Compute the figures now (see the module docstring for what each one means)."""
    _require(principal)
    job_rows = session.execute(
        select(
            Job.kind,
            Job.state,
            func.count(),
            func.count().filter(Job.attempts > 0),
        )
        .where(Job.state.in_(QUEUE_STATES))
        .group_by(Job.kind, Job.state)
        .order_by(Job.kind, Job.state)
    )
    jobs = [JobCount(kind, state, int(n), int(retrying or 0)) for kind, state, n, retrying in job_rows]
    producer = (
        select(
            StudyOrganisation.study_pk.label("study_pk"),
            func.min(StudyOrganisation.organisation_code).label("organisation"),
        )
        .where(StudyOrganisation.relation == "produced")
        .group_by(StudyOrganisation.study_pk)
        .subquery()
    )
    organisation = func.coalesce(producer.c.organisation, NO_ORGANISATION)
    blob_rows = session.execute(
        select(
            Blob.tier,
            organisation,
            func.count(),
            func.coalesce(func.sum(Blob.size), 0),
            func.count(Blob.verified_at),
            func.max(Blob.verified_at),
            func.min(Blob.verified_at),
        )
        .join(Instance, Instance.id == Blob.instance_pk)
        .join(Series, Series.id == Instance.series_pk)
        .join(Study, Study.id == Series.study_pk)
        .outerjoin(producer, producer.c.study_pk == Study.id)
        .group_by(Blob.tier, organisation)
        .order_by(Blob.tier, organisation)
    ).all()
    storage = [
        StorageUse(tier, org or NO_ORGANISATION, int(n), int(size)) for tier, org, n, size, *_ in blob_rows
    ]
    newest = [as_utc(row[5]) for row in blob_rows if row[5] is not None]
    oldest = [as_utc(row[6]) for row in blob_rows if row[6] is not None]
    alarms = fixity_counts(session)
    fixity = Fixity(
        blobs=sum(int(row[2]) for row in blob_rows),
        verified=sum(int(row[4]) for row in blob_rows),
        last_verified_at=max((t for t in newest if t is not None), default=None),
        oldest_verified_at=min((t for t in oldest if t is not None), default=None),
        mismatches=alarms.alarms,
        unrepaired=alarms.unrepaired,
    )
    return Figures(jobs=jobs, storage=storage, fixity=fixity)


class _FiguresCache:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.value: Figures | None = None
        self.expires = 0.0


def current(ctx: AppContext, *, principal: Principal) -> Figures:
    """The figures, recomputed when older than ``metrics_cache_seconds`` (per process)."""
    _require(principal)
    cache: _FiguresCache = ctx.caches.setdefault("observability-figures", _FiguresCache())
    with cache.lock:
        if cache.value is not None and time.monotonic() < cache.expires:
            return cache.value
        with ctx.db.reading() as session:
            cache.value = measure(session, principal=principal)
        cache.expires = time.monotonic() + ctx.settings.metrics_cache_seconds
        return cache.value


def storage_rules(session: Session, *, principal: Principal) -> StorageRules:
    """The tier and compression rules in force, for the administration's monitoring page."""
    _require(principal)
    return StorageRules(
        tiers.list_rules(session), compression.list_rules(session), compression.summary(session)
    )
