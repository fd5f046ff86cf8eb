"""Storage tiers: rules move blobs between named stores, every move verified by SHA-256.

A :class:`~simral.preservation.models.TierRule` says which blobs belong in which store (received
more than N days ago, optionally of one modality or one organisation's studies; the rule with the
largest age wins). :func:`plan_moves` enqueues one durable :data:`TIER_MOVE` job per study and
batch of :data:`MOVE_BATCH` blobs. The job (:func:`move_blobs`), for each blob:

1. copies the bytes from where the index puts them to the target store (through
   :func:`simral.archive.service.open_blob`: the staged copy of a blob not yet published, a retry
   on a concurrent move) and checks the bytes read hash to ``blob.sha256``;
2. re-reads the target copy and checks its size and SHA-256 again; a copy that differs (altered on
   the way or at rest) is deleted and the blob stays where it is (the job fails and is retried);
3. switches ``blob.store`` / ``blob.tier`` in one transaction, only where the row still names the
   copied bytes (a replaced instance or a concurrent move is left alone), and enqueues in that same
   transaction the :data:`TIER_PURGE` job that deletes the sources;
4. the purge job runs ``tier_purge_delay_seconds`` later and deletes each source copy unless the
   index names it again (moved back meanwhile).

Reads work throughout: before the switch they go to the source; a reader that looked the location
up just before the switch still finds the source (kept until the purge), and one that finds it gone
looks the location up again (:func:`~simral.archive.service.open_blob`). A crash after the switch
leaves the purge job queued, so no source is forgotten; a crash before it leaves at most a copy in
the target store that the retried job overwrites.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from simral.access.policy import AccessDenied, Principal, may_manage
from simral.archive import service as archive
from simral.archive.models import Blob, Instance, Series, Study, StudyOrganisation
from simral.audit import service as audit
from simral.context import AppContext
from simral.db.base import utcnow
from simral.jobs import service as jobs
from simral.jobs.runner import Outcomes, PermanentFailure
from simral.jobs.service import ClaimedJob
from simral.preservation.models import TierRule
from simral.storage.base import sha256_of_stream
from simral.storage.factory import tier_of

log = logging.getLogger(__name__)

TIER_MOVE = "storage.tier-move"
TIER_PURGE = "storage.tier-purge"
#: Blobs per move job (one study at a time).
MOVE_BATCH = 100
#: Blobs planned per evaluation of the rules (the next evaluation takes the rest).
PLAN_LIMIT = 5000
#: Who moves blobs in the audit trail.
TIERING = Principal(kind="system", name="storage-tiers", archive_wide=True, via="job")


class TierError(ValueError):
    """A tier rule or move that cannot be made (unknown store, the replica as a tier…)."""


class CopyMismatch(RuntimeError):
    """The bytes read back from the target store do not hash to the index's SHA-256."""


# ------------------------------------------------------------------------------------- rules


def add_rule(
    session: Session,
    *,
    target_store: str,
    older_than_days: int,
    modality: str = "",
    organisation: str = "",
    known_stores: Collection[str],
    replica_store: str = "",
    principal: Principal,
) -> TierRule:
    """Add a tier rule (platform administrators; audited)."""
    if not may_manage(principal):
        raise AccessDenied(f"{principal.audit_name} may not manage storage tiers")
    if target_store not in known_stores:
        raise TierError(f"no store named {target_store!r} (configured: {', '.join(sorted(known_stores))})")
    if replica_store and target_store == replica_store:
        raise TierError(f"{target_store!r} is the replica store, not a tier")
    if older_than_days < 0:
        raise TierError("--older-than-days must be 0 or more")
    rule = TierRule(
        target_store=target_store,
        older_than_days=older_than_days,
        modality=modality.strip().upper()[:16],
        organisation_code=organisation.strip()[:32],
        enabled=True,
        created_by=principal.audit_name[:128],
        created_at=utcnow(),
    )
    session.add(rule)
    session.flush()
    audit.record(
        session,
        action="storage.tier-rule.add",
        principal=principal,
        detail={
            "rule": rule.id,
            "to": target_store,
            "older_than_days": older_than_days,
            "modality": rule.modality,
            "organisation": rule.organisation_code,
        },
    )
    return rule


def list_rules(session: Session) -> list[TierRule]:
    """Every tier rule, oldest first."""
    return list(session.scalars(select(TierRule).order_by(TierRule.id)))


def remove_rule(session: Session, rule_id: int, *, principal: Principal) -> None:
    """Delete a tier rule (blobs already moved stay where they are; audited)."""
    if not may_manage(principal):
        raise AccessDenied(f"{principal.audit_name} may not manage storage tiers")
    if session.execute(delete(TierRule).where(TierRule.id == rule_id)).rowcount != 1:  # type: ignore[attr-defined]
        raise TierError(f"no tier rule {rule_id}")
    audit.record(session, action="storage.tier-rule.remove", principal=principal, detail={"rule": rule_id})


# ------------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Plan:
    """What an evaluation of the rules queued."""

    blobs: int
    jobs: int


def _candidates(session: Session, rule: TierRule, *, replica_store: str, limit: int) -> list[tuple[int, str]]:
    """(blob id, study UID) of blobs the rule wants moved, by study."""
    cutoff = utcnow() - timedelta(days=rule.older_than_days)
    query = (
        select(Blob.id, Study.study_uid)
        .join(Instance, Instance.id == Blob.instance_pk)
        .join(Series, Series.id == Instance.series_pk)
        .join(Study, Study.id == Series.study_pk)
        .where(Blob.store != rule.target_store, Blob.created_at <= cutoff)
        .order_by(Study.id, Blob.id)
        .limit(limit)
    )
    if replica_store:
        query = query.where(Blob.store != replica_store)
    if rule.modality:
        query = query.where(Series.modality == rule.modality)
    if rule.organisation_code:
        held = select(StudyOrganisation.study_pk).where(
            StudyOrganisation.organisation_code == rule.organisation_code
        )
        query = query.where(Study.id.in_(held))
    return [(int(blob_id), str(study_uid)) for blob_id, study_uid in session.execute(query)]


def plan_moves(
    session: Session, *, known_stores: Collection[str], replica_store: str = "", limit: int = PLAN_LIMIT
) -> Plan:
    """Evaluate the enabled rules and enqueue the move jobs (in the caller's transaction).

    Rules are taken oldest age first, so a blob matching "30 days → cold" and "365 days → archive"
    goes to the archive. A study's blobs already queued for the same target are not queued twice.
    """
    rules = sorted(
        (r for r in list_rules(session) if r.enabled and r.target_store in known_stores),
        key=lambda r: (-r.older_than_days, r.id),
    )
    taken: set[int] = set()
    queued_blobs = queued_jobs = 0
    for rule in rules:
        by_study: dict[str, list[int]] = {}
        for blob_id, study_uid in _candidates(session, rule, replica_store=replica_store, limit=limit):
            if blob_id not in taken:
                taken.add(blob_id)
                by_study.setdefault(study_uid, []).append(blob_id)
        for study_uid, blob_ids in by_study.items():
            blobs, count = enqueue_move(
                session, study_uid=study_uid, blob_ids=blob_ids, target=rule.target_store
            )
            queued_blobs += blobs
            queued_jobs += count
    return Plan(blobs=queued_blobs, jobs=queued_jobs)


def enqueue_move(session: Session, *, study_uid: str, blob_ids: list[int], target: str) -> tuple[int, int]:
    """Queue the move of a study's blobs to ``target`` in jobs of :data:`MOVE_BATCH`; (blobs, jobs)
    queued. A batch whose job is still active is not queued again."""
    blobs = count = 0
    for start in range(0, len(blob_ids), MOVE_BATCH):
        chunk = blob_ids[start : start + MOVE_BATCH]
        job_id = jobs.enqueue(
            session,
            kind=TIER_MOVE,
            payload={"to": target, "study_uid": study_uid, "blobs": chunk},
            dedupe_key=f"{TIER_MOVE}:{target}:{chunk[0]}",
        )
        if job_id is not None:
            blobs += len(chunk)
            count += 1
    return blobs, count


def study_blob_ids(session: Session, study_uid: str) -> list[int]:
    """The blob ids of a study's instances (for an explicit move of one study)."""
    return list(
        session.scalars(
            select(Blob.id)
            .join(Instance, Instance.id == Blob.instance_pk)
            .join(Series, Series.id == Instance.series_pk)
            .join(Study, Study.id == Series.study_pk)
            .where(Study.study_uid == study_uid)
            .order_by(Blob.id)
        )
    )


def store_counts(session: Session) -> list[tuple[str, str, int, int]]:
    """(store, tier, blobs, bytes) for each store holding blobs."""
    rows = session.execute(
        select(Blob.store, Blob.tier, func.count(), func.coalesce(func.sum(Blob.size), 0))
        .group_by(Blob.store, Blob.tier)
        .order_by(Blob.store, Blob.tier)
    )
    return [(str(s), str(t), int(n), int(b)) for s, t, n, b in rows]


# ------------------------------------------------------------------------------------- moves


@dataclass(frozen=True)
class _Located:
    id: int
    store: str
    key: str
    sha256: str
    size: int


def _located(session: Session, blob_ids: Iterable[int]) -> list[_Located]:
    rows = session.execute(
        select(Blob.id, Blob.store, Blob.key, Blob.sha256, Blob.size).where(Blob.id.in_(list(blob_ids)))
    )
    return [_Located(*row) for row in rows]


def copy_verified(ctx: AppContext, blob: _Located, target_name: str) -> None:
    """Copy a blob to ``target_name`` under the same key and verify the copy by reading it back.

    Raises :class:`CopyMismatch` (after deleting the bad copy) when the source or the copy does not
    hash to the index's SHA-256 and size.
    """
    target = ctx.store_named(target_name)
    with archive.open_blob(ctx, blob.key) as source:
        written = target.put_stream(blob.key, source)
    if written.sha256 != blob.sha256 or written.size != blob.size:
        target.delete(blob.key)
        raise CopyMismatch(f"blob {blob.id}: the source in {blob.store!r} does not match its SHA-256")
    with target.open(blob.key) as copy:
        sha, size = sha256_of_stream(copy)
    if sha != blob.sha256 or size != blob.size:
        target.delete(blob.key)
        raise CopyMismatch(
            f"blob {blob.id}: the copy read back from {target_name!r} does not match its SHA-256"
        )


def _move(ctx: AppContext, job: ClaimedJob) -> str | PermanentFailure | None:
    target_name = str(job.payload["to"])
    try:
        ctx.store_named(target_name)
    except KeyError as exc:
        return PermanentFailure(str(exc))
    with ctx.db.reading() as session:
        located = _located(session, job.payload.get("blobs", []))
    copied: list[_Located] = []
    refused: list[str] = []
    for blob in located:
        if blob.store == target_name:
            continue
        try:
            copy_verified(ctx, blob, target_name)
        except CopyMismatch as exc:
            log.error("tier move refused: %s", exc)
            refused.append(str(exc))
            continue
        copied.append(blob)
    switched: list[_Located] = []
    if copied or refused:
        now = utcnow()
        with ctx.db.unit_of_work() as session:
            for blob in copied:
                result = session.execute(
                    update(Blob)
                    .where(Blob.id == blob.id, Blob.store == blob.store, Blob.key == blob.key)
                    .values(store=target_name, tier=tier_of(ctx.settings, target_name), verified_at=now)
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    switched.append(blob)
            if switched:
                jobs.enqueue(
                    session,
                    kind=TIER_PURGE,
                    payload={"copies": [[b.id, b.store, b.key] for b in switched]},
                    delay=timedelta(seconds=max(0.0, ctx.settings.tier_purge_delay_seconds)),
                )
            audit.record(
                session,
                action="storage.tier-move",
                principal=TIERING,
                outcome="failure" if refused else "success",
                study_uid=str(job.payload.get("study_uid", "")),
                detail={
                    "to": target_name,
                    "moved": len(switched),
                    "refused": len(refused),
                    "from": sorted({b.store for b in switched}),
                },
            )
    # Copies whose blob changed meanwhile (replaced, or moved by another job) are not the index's.
    stale = [b for b in copied if b not in switched]
    if stale:
        with ctx.db.reading() as session:
            indexed_here = set(
                session.scalars(
                    select(Blob.key).where(Blob.store == target_name, Blob.key.in_([b.key for b in stale]))
                )
            )
        for blob in stale:
            if blob.key not in indexed_here:
                ctx.store_named(target_name).delete(blob.key)
    if refused:
        return f"{len(refused)} blob(s) not moved to {target_name}: {refused[0]}"
    return None


def move_blobs(ctx: AppContext, batch: list[ClaimedJob]) -> Outcomes:
    """Job handler of :data:`TIER_MOVE` (idempotent: a blob already in the target is skipped)."""
    outcomes: dict[int, str | PermanentFailure | None] = {}
    for job in batch:
        try:
            outcomes[job.id] = _move(ctx, job)
        except Exception as exc:
            outcomes[job.id] = f"{type(exc).__name__}: {exc}"
    return outcomes


def purge_sources(ctx: AppContext, batch: list[ClaimedJob]) -> Outcomes:
    """Job handler of :data:`TIER_PURGE`: delete moved blobs' source copies the index no longer
    names (idempotent: deleting an absent key is a no-op)."""
    outcomes: dict[int, str | PermanentFailure | None] = {}
    for job in batch:
        copies: list[Any] = list(job.payload.get("copies", []))
        try:
            with ctx.db.reading() as session:
                current = {
                    (store, key)
                    for store, key in session.execute(
                        select(Blob.store, Blob.key).where(Blob.key.in_([c[2] for c in copies]))
                    )
                }
            for _blob_id, store, key in copies:
                if (store, key) not in current:
                    ctx.store_named(store).delete(key)
            outcomes[job.id] = None
        except KeyError as exc:
            outcomes[job.id] = PermanentFailure(str(exc))
        except Exception as exc:
            outcomes[job.id] = f"{type(exc).__name__}: {exc}"
    return outcomes
