"""Fixity: re-hash every blob on a schedule, alarm on a mismatch, repair from the replica.

A sweep (:func:`sweep`) takes up to ``limit`` blobs due for verification, oldest-verified first
(never-verified ones first, by age: ingest hashed them when writing, so they are due one interval
after their creation), reads each as a reader would (:func:`simral.archive.service.open_blob`)
and compares its SHA-256 and size with the index. Intact blobs get ``blob.verified_at``. A blob
missing or altered is, in this order:

1. checked again against the index (moved to another tier or replaced meanwhile: not a problem);
2. repaired when ``replica_store`` holds a copy that hashes right: the copy is spooled, hashed,
   written back atomically under the same key, and the blob read back and verified again;
3. recorded: a ``fixity_alarm`` row (the counters ``/metrics`` reads, :func:`fixity_counts`), an
   audit event ``storage.fixity`` and an admin alert (platform administrators; the study's
   organisations too when no intact copy is left).

The copies in the replica store are verified the same way, on the same schedule (their
``blob_replica.verified_at``, else when they were made): a copy missing or altered is made again
from the blob, which the replication job checks against its SHA-256 before writing and reads back
after (:func:`simral.preservation.replication.replicate_one`); the alarm names the replica store.
When the blob itself is not intact the copy cannot be remade: that alarm stays unrepaired and the
blob's own alarm says what is left.

A blob left unrepaired is looked at again one interval later, not at every look. The serving
process runs sweeps as durable jobs (:data:`FIXITY_SWEEP`, one active at a time across nodes);
``simral fixity run`` runs one at once for operators.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from simral.access.policy import Principal
from simral.archive import service as archive
from simral.archive.models import Blob, Instance, Series, Study
from simral.audit import service as audit
from simral.context import AppContext
from simral.db.base import utcnow
from simral.identity.models import AdminAlert
from simral.jobs.runner import Outcomes, PermanentFailure
from simral.jobs.service import ClaimedJob
from simral.preservation import replication
from simral.preservation.models import MISMATCH, MISSING, REPAIRED, UNREPAIRED, BlobReplica, FixityAlarm
from simral.storage.base import CHUNK, sha256_of_stream

log = logging.getLogger(__name__)

FIXITY_SWEEP = "storage.fixity-sweep"
#: Who verifies and repairs in the audit trail.
FIXITY = Principal(kind="system", name="fixity", archive_wide=True, via="scheduler")
#: Organisation code of alerts for the platform's administrators.
PLATFORM = ""


@dataclass(frozen=True)
class _Located:
    id: int
    store: str
    key: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Alarm:
    """One problem a sweep found, and what became of it."""

    blob_id: int
    store: str
    key: str
    problem: str
    outcome: str


@dataclass
class FixityReport:
    """What a sweep did."""

    checked: int = 0
    intact: int = 0
    #: Missing or altered but moved or replaced meanwhile: nothing wrong.
    skipped: int = 0
    #: Copies in the replica store verified, and found intact.
    replicas_checked: int = 0
    replicas_intact: int = 0
    alarms: list[Alarm] = field(default_factory=list)

    @property
    def repaired(self) -> int:
        return sum(1 for a in self.alarms if a.outcome == REPAIRED)

    @property
    def unrepaired(self) -> int:
        return sum(1 for a in self.alarms if a.outcome == UNREPAIRED)


_COLUMNS = (Blob.id, Blob.store, Blob.key, Blob.sha256, Blob.size)


def due_blobs(session: Session, *, cutoff: datetime, limit: int) -> list[_Located]:
    """Blobs last verified (or, never verified, written) before ``cutoff``, oldest first; those
    with an unrepaired alarm since ``cutoff`` wait for the next interval."""
    alarmed = (
        select(FixityAlarm.id)
        .where(
            FixityAlarm.blob_pk == Blob.id,
            FixityAlarm.outcome == UNREPAIRED,
            FixityAlarm.detected_at > cutoff,
        )
        .exists()
    )
    never = session.execute(
        select(*_COLUMNS)
        .where(Blob.verified_at.is_(None), Blob.created_at <= cutoff, ~alarmed)
        .order_by(Blob.id)
        .limit(limit)
    ).all()
    found = [_Located(*row) for row in never]
    if len(found) < limit:
        older = session.execute(
            select(*_COLUMNS)
            .where(Blob.verified_at <= cutoff, ~alarmed)
            .order_by(Blob.verified_at, Blob.id)
            .limit(limit - len(found))
        ).all()
        found.extend(_Located(*row) for row in older)
    return found


def fixity_due(session: Session, *, interval: timedelta) -> bool:
    """Whether some blob is due for verification (read-only)."""
    return bool(due_blobs(session, cutoff=utcnow() - interval, limit=1))


def due_replica_copies(
    session: Session, *, replica_store: str, cutoff: datetime, limit: int
) -> list[_Located]:
    """Current copies in ``replica_store`` last verified (or, never verified, made) before
    ``cutoff``, oldest first, located in the replica store."""
    last = func.coalesce(BlobReplica.verified_at, BlobReplica.replicated_at)
    rows = session.execute(
        select(Blob.id, BlobReplica.store, BlobReplica.key, Blob.sha256, Blob.size)
        .join(Blob, Blob.id == BlobReplica.blob_pk)
        .where(BlobReplica.store == replica_store, BlobReplica.sha256 == Blob.sha256, last <= cutoff)
        .order_by(last, BlobReplica.id)
        .limit(limit)
    ).all()
    return [_Located(*row) for row in rows]


def _remake_copy(ctx: AppContext, copy: _Located) -> bool:
    """Forget the bad copy and make it again from the blob (verified before and after writing);
    whether a current copy exists now."""
    with ctx.db.unit_of_work() as session:
        session.execute(
            delete(BlobReplica).where(BlobReplica.blob_pk == copy.id, BlobReplica.store == copy.store)
        )
    error = replication.replicate_one(ctx, copy.id, copy.store)
    if error is not None:
        log.error("fixity: the replica copy of blob %d could not be made again: %s", copy.id, error)
        return False
    with ctx.db.reading() as session:
        return replication.current_copy(session, copy.id, copy.store, copy.sha256) is not None


def _hash(ctx: AppContext, blob: _Located, *, replica_copy: bool = False) -> tuple[str, str]:
    """(problem, SHA-256 found): problem "" when intact. The blob as readers get it, or
    (``replica_copy``) its copy in the replica store ``blob.store``."""
    try:
        opened = (
            ctx.store_named(blob.store).open(blob.key) if replica_copy else archive.open_blob(ctx, blob.key)
        )
        with opened as stream:
            sha, size = sha256_of_stream(stream)
    except FileNotFoundError:
        return MISSING, ""
    if sha != blob.sha256 or size != blob.size:
        return MISMATCH, sha
    return "", sha


def _repair(ctx: AppContext, blob: _Located) -> bool:
    """Write the replica's copy back under the blob's key when it hashes right; whether the blob
    now reads back intact."""
    replica = ctx.replica
    if replica is None or blob.store == replica.name:
        return False
    target = ctx.store_named(blob.store)
    fd, name = tempfile.mkstemp(prefix=".tmp-repair-", dir=target.scratch_dir())
    spooled = Path(name)
    try:
        try:
            with os.fdopen(fd, "wb") as out, replica.open(blob.key) as source:
                shutil.copyfileobj(source, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
        except FileNotFoundError:
            return False
        with open(spooled, "rb") as check:
            sha, size = sha256_of_stream(check)
        if sha != blob.sha256 or size != blob.size:
            log.error("fixity: the replica's copy of blob %d does not match its SHA-256 either", blob.id)
            return False
        target.put_file(blob.key, spooled, move=True)
    finally:
        with contextlib.suppress(FileNotFoundError):
            spooled.unlink()
    with target.open(blob.key) as stream:
        sha, size = sha256_of_stream(stream)
    return sha == blob.sha256 and size == blob.size


def _message(
    blob: _Located, problem: str, repaired: bool, study_uid: str, replica: str, *, replica_copy: bool = False
) -> str:
    if replica_copy:
        what = "était absente" if problem == MISSING else "ne correspondait plus à son empreinte SHA-256"
        head = f"Intégrité des images : la copie de secours d'un fichier de l'examen {study_uid} {what}"
        where = f"(réplique « {blob.store} »)"
        if repaired:
            return f"{head} {where} ; elle a été refaite depuis le fichier principal et vérifiée."
        return (
            f"{head} {where} ; elle n'a pas pu être refaite : le fichier principal "
            "n'est pas intact non plus (voir son alerte)."
        )
    what = (
        "était absent du stockage"
        if problem == MISSING
        else "ne correspondait plus à son empreinte SHA-256 dans le stockage"
    )
    head = f"Intégrité des images : un fichier de l'examen {study_uid} {what} « {blob.store} »"
    if repaired:
        return f"{head} ; il a été restauré depuis la réplique « {replica} » et vérifié."
    why = "réplique sans copie valide" if replica else "pas de réplique configurée"
    return (
        f"{head} ; aucune copie intacte n'est disponible ({why}) : "
        "intervention nécessaire (restauration depuis une sauvegarde)."
    )


def _record(
    ctx: AppContext, blob: _Located, problem: str, found: str, repaired: bool, *, replica_copy: bool = False
) -> Alarm:
    """The alarm row, the audit event, the admin alerts; a repaired blob is marked verified.

    ``replica_copy``: the problem is the blob's copy in the replica store (``blob.store``), remade
    from the blob when ``repaired``; the platform's administrators are told, not the study's
    organisations (their images are intact)."""
    now = utcnow()
    outcome = REPAIRED if repaired else UNREPAIRED
    replica = ctx.settings.replica_store
    with ctx.db.unit_of_work() as session:
        study_uid = (
            session.scalar(
                select(Study.study_uid)
                .join(Series, Series.study_pk == Study.id)
                .join(Instance, Instance.series_pk == Series.id)
                .join(Blob, Blob.instance_pk == Instance.id)
                .where(Blob.id == blob.id)
            )
            or ""
        )
        session.add(
            FixityAlarm(
                blob_pk=blob.id,
                store=blob.store,
                key=blob.key,
                study_uid=study_uid,
                problem=problem,
                expected_sha256=blob.sha256,
                found_sha256=found,
                outcome=outcome,
                detected_at=now,
                repaired_at=now if repaired else None,
            )
        )
        if repaired and replica_copy:
            session.execute(
                update(BlobReplica)
                .where(BlobReplica.blob_pk == blob.id, BlobReplica.store == blob.store)
                .values(verified_at=now)
            )
        elif repaired:
            session.execute(update(Blob).where(Blob.id == blob.id).values(verified_at=now))
        audit.record(
            session,
            action="storage.fixity",
            principal=FIXITY,
            outcome="warning" if repaired else "failure",
            study_uid=study_uid,
            detail={
                "blob": blob.id,
                "store": blob.store,
                "problem": problem,
                "expected_sha256": blob.sha256,
                "found_sha256": found,
                "repaired_from": ("primary" if replica_copy else replica) if repaired else "",
                "replica_copy": replica_copy,
            },
        )
        recipients = [PLATFORM]
        if not repaired and study_uid and not replica_copy:
            holders = archive.study_holders(session, study_uid)
            recipients += holders[1] if holders is not None else []
        message = _message(blob, problem, repaired, study_uid, replica, replica_copy=replica_copy)
        for code in recipients:
            session.add(
                AdminAlert(
                    organisation_code=code,
                    kind="fixity",
                    message=message,
                    study_uid=study_uid,
                    created_at=now,
                )
            )
    return Alarm(blob_id=blob.id, store=blob.store, key=blob.key, problem=problem, outcome=outcome)


def sweep(ctx: AppContext, *, limit: int, interval: timedelta | None = None) -> FixityReport:
    """Verify up to ``limit`` blobs due for verification, then up to ``limit`` of their copies in
    the replica store (``interval`` None: the oldest-verified ones whatever their age, as
    ``simral fixity run`` does); alarm and repair what is wrong."""
    report = FixityReport()
    cutoff = utcnow() - interval if interval is not None else utcnow()
    with ctx.db.reading() as session:
        blobs = due_blobs(session, cutoff=cutoff, limit=limit)
    report.checked = len(blobs)
    report.intact = _verify(ctx, blobs, report, replica_copy=False)
    if ctx.replica is not None:
        with ctx.db.reading() as session:
            copies = due_replica_copies(session, replica_store=ctx.replica.name, cutoff=cutoff, limit=limit)
        report.replicas_checked = len(copies)
        report.replicas_intact = _verify(ctx, copies, report, replica_copy=True)
    return report


def _still_current(ctx: AppContext, located: _Located, *, replica_copy: bool) -> bool:
    """Whether the index still describes ``located`` so (not moved, replaced or re-copied meanwhile)."""
    with ctx.db.reading() as session:
        if replica_copy:
            return replication.current_copy(session, located.id, located.store, located.sha256) is not None
        row = session.execute(select(*_COLUMNS).where(Blob.id == located.id)).first()
        return row is not None and _Located(*row) == located


def _verify(ctx: AppContext, located: list[_Located], report: FixityReport, *, replica_copy: bool) -> int:
    """Hash each blob (or replica copy), repair and alarm the bad ones, mark the rest verified;
    how many were intact."""
    intact: list[int] = []
    what = "the replica copy of blob" if replica_copy else "blob"
    for item in located:
        problem, found = _hash(ctx, item, replica_copy=replica_copy)
        if not problem:
            intact.append(item.id)
            continue
        if not _still_current(ctx, item, replica_copy=replica_copy):
            report.skipped += 1
            continue
        log.error("fixity: %s %d in the %s store is %s", what, item.id, item.store, problem)
        try:
            repaired = _remake_copy(ctx, item) if replica_copy else _repair(ctx, item)
        except Exception as exc:
            log.error("fixity: repairing %s %d failed: %s: %s", what, item.id, type(exc).__name__, exc)
            repaired = False
        report.alarms.append(_record(ctx, item, problem, found, repaired, replica_copy=replica_copy))
    now = utcnow()
    with ctx.db.unit_of_work() as session:
        for start in range(0, len(intact), 500):
            chunk = intact[start : start + 500]
            statement = (
                update(BlobReplica).where(
                    BlobReplica.store == ctx.settings.replica_store, BlobReplica.blob_pk.in_(chunk)
                )
                if replica_copy
                else update(Blob).where(Blob.id.in_(chunk))
            )
            session.execute(statement.values(verified_at=now))
    return len(intact)


def run_sweep(ctx: AppContext, batch: list[ClaimedJob]) -> Outcomes:
    """Job handler of :data:`FIXITY_SWEEP`: one look of the background sweep."""
    hours = ctx.settings.fixity_interval_hours
    outcomes: dict[int, str | PermanentFailure | None] = {}
    for job in batch:
        try:
            sweep(
                ctx,
                limit=max(1, ctx.settings.fixity_batch),
                interval=timedelta(hours=hours) if hours > 0 else None,
            )
            outcomes[job.id] = None
        except Exception as exc:
            outcomes[job.id] = f"{type(exc).__name__}: {exc}"
    return outcomes


@dataclass(frozen=True)
class FixityCounts:
    """Counters for ``/metrics``: blobs verified at least once, alarms raised, repaired, unrepaired."""

    verified: int
    alarms: int
    repaired: int
    unrepaired: int


def fixity_counts(session: Session) -> FixityCounts:
    """The fixity counters (``simral_fixity_*`` metrics)."""
    verified = (
        session.scalar(select(func.count()).select_from(Blob).where(Blob.verified_at.is_not(None))) or 0
    )
    by_outcome = {
        str(outcome): int(count)
        for outcome, count in session.execute(
            select(FixityAlarm.outcome, func.count()).group_by(FixityAlarm.outcome)
        )
    }
    repaired = int(by_outcome.get(REPAIRED, 0))
    unrepaired = int(by_outcome.get(UNREPAIRED, 0))
    return FixityCounts(
        verified=int(verified), alarms=repaired + unrepaired, repaired=repaired, unrepaired=unrepaired
    )


def recent_alarms(session: Session, *, limit: int = 50) -> list[FixityAlarm]:
    """The latest fixity alarms, newest first."""
    return list(session.scalars(select(FixityAlarm).order_by(FixityAlarm.id.desc()).limit(limit)))
