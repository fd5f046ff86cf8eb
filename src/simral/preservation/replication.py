"""Replication: every blob copied to a second store (``replica_store``), asynchronously, verified.

Trigger: the archive's change feed, not the ingest transaction. :func:`follow_changes` reads the
feed after its cursor (``feed_cursor`` row :data:`REPLICATION_CURSOR`) and enqueues one
:data:`REPLICATE` job per :data:`REPLICATE_BATCH` created or replaced instances, moving the cursor
in the same transaction. This keeps the ingest path (DESIGN.md §3, group commits of C-STORE and
STOW-RS) free of one more row per instance, misses nothing (``seq`` grows in commit order), and a
replica configured on an existing archive is filled from the start of the feed.

The job (:func:`replicate_blobs`) copies each blob under the same key, checks that the bytes read
hash to ``blob.sha256``, reads the copy back and hashes it again, then records the verified copy in
``blob_replica``. It is idempotent: a blob whose current bytes are already replicated is skipped; a
replaced instance (new bytes, new key) is copied again and its old copy deleted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from simral.archive import service as archive
from simral.archive.models import Blob, ChangeEvent, Instance
from simral.context import AppContext
from simral.db.base import utcnow
from simral.jobs import service as jobs
from simral.jobs.runner import Outcomes, PermanentFailure
from simral.jobs.service import ClaimedJob
from simral.preservation.models import BlobReplica
from simral.sharing.models import FeedCursor
from simral.storage.base import sha256_of_stream

log = logging.getLogger(__name__)

REPLICATE = "storage.replicate"
#: The replication follower's position in the change feed.
REPLICATION_CURSOR = "replication"
REPLICATE_BATCH = 100


def replication_due(session: Session) -> bool:
    """Whether the change feed has entries the replication follower has not seen (read-only)."""
    cursor = session.scalar(select(FeedCursor.last_seq).where(FeedCursor.name == REPLICATION_CURSOR)) or 0
    newest = session.scalar(select(func.max(ChangeEvent.seq))) or 0
    return bool(newest > cursor)


def follow_changes(session: Session, *, limit: int = 1000) -> int:
    """Enqueue replication jobs for the next created or replaced instances of the feed; how many
    blobs were queued. Call inside one unit of work: the jobs and the cursor commit together (the
    cursor row is locked on PostgreSQL, so two followers never queue the same changes)."""
    query = select(FeedCursor).where(FeedCursor.name == REPLICATION_CURSOR)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    cursor = session.scalar(query)
    if cursor is None:
        cursor = FeedCursor(name=REPLICATION_CURSOR, last_seq=0, updated_at=utcnow())
        session.add(cursor)
        session.flush()
    rows = session.execute(
        select(ChangeEvent.seq, ChangeEvent.kind, ChangeEvent.sop_uid)
        .where(ChangeEvent.seq > cursor.last_seq)
        .order_by(ChangeEvent.seq)
        .limit(limit)
    ).all()
    if not rows:
        return 0
    sop_uids = {sop for _seq, kind, sop in rows if kind in ("created", "updated")}
    blob_ids = sorted(
        session.scalars(
            select(Blob.id)
            .join(Instance, Instance.id == Blob.instance_pk)
            .where(Instance.sop_uid.in_(sop_uids))
        )
    )
    for start in range(0, len(blob_ids), REPLICATE_BATCH):
        jobs.enqueue(session, kind=REPLICATE, payload={"blobs": blob_ids[start : start + REPLICATE_BATCH]})
    cursor.last_seq = rows[-1][0]
    cursor.updated_at = utcnow()
    return len(blob_ids)


def enqueue_missing(session: Session, *, replica_store: str, limit: int = 10000) -> int:
    """Queue replication of blobs without a current verified copy (an operator's catch-up, e.g.
    after a replica store was lost); how many blobs were queued."""
    current = select(BlobReplica.blob_pk).where(
        BlobReplica.store == replica_store, BlobReplica.sha256 == Blob.sha256, BlobReplica.blob_pk == Blob.id
    )
    blob_ids = list(session.scalars(select(Blob.id).where(~current.exists()).order_by(Blob.id).limit(limit)))
    for start in range(0, len(blob_ids), REPLICATE_BATCH):
        jobs.enqueue(session, kind=REPLICATE, payload={"blobs": blob_ids[start : start + REPLICATE_BATCH]})
    return len(blob_ids)


@dataclass(frozen=True)
class ReplicaCounts:
    """How far replication got: blobs, those with a current verified copy, the rest."""

    blobs: int
    replicated: int

    @property
    def behind(self) -> int:
        return self.blobs - self.replicated


def replica_counts(session: Session, replica_store: str) -> ReplicaCounts:
    """Blobs and blobs with a current verified copy in ``replica_store`` (for ``/metrics``)."""
    blobs = session.scalar(select(func.count()).select_from(Blob)) or 0
    replicated = (
        session.scalar(
            select(func.count())
            .select_from(BlobReplica)
            .join(Blob, Blob.id == BlobReplica.blob_pk)
            .where(BlobReplica.store == replica_store, BlobReplica.sha256 == Blob.sha256)
        )
        or 0
    )
    return ReplicaCounts(blobs=int(blobs), replicated=int(replicated))


def current_copy(session: Session, blob_pk: int, replica_store: str, sha256: str) -> BlobReplica | None:
    """The verified copy of a blob's current bytes in ``replica_store``, if any."""
    return session.scalar(
        select(BlobReplica).where(
            BlobReplica.blob_pk == blob_pk, BlobReplica.store == replica_store, BlobReplica.sha256 == sha256
        )
    )


def replicate_one(ctx: AppContext, blob_id: int, replica_name: str) -> str | None:
    """Copy one blob to the replica and record it; an error text, or None when done or not needed."""
    with ctx.db.reading() as session:
        row = session.execute(select(Blob.key, Blob.sha256, Blob.size).where(Blob.id == blob_id)).first()
        previous = session.execute(
            select(BlobReplica.key, BlobReplica.sha256).where(
                BlobReplica.blob_pk == blob_id, BlobReplica.store == replica_name
            )
        ).first()
    if row is None:
        return None  # the instance was deleted
    key, sha256, size = row
    if previous is not None and previous[1] == sha256:
        return None
    replica = ctx.store_named(replica_name)
    with archive.open_blob(ctx, key) as source:
        written = replica.put_stream(key, source)
    if written.sha256 != sha256 or written.size != size:
        replica.delete(key)
        return f"blob {blob_id}: the source does not match its SHA-256 (left to the fixity sweep)"
    with replica.open(key) as copy:
        read_sha, read_size = sha256_of_stream(copy)
    if read_sha != sha256 or read_size != size:
        replica.delete(key)
        return f"blob {blob_id}: the copy read back from {replica_name!r} does not match its SHA-256"
    now = utcnow()
    with ctx.db.unit_of_work() as session:
        still = session.scalar(select(Blob.sha256).where(Blob.id == blob_id))
        if still != sha256:
            # Replaced meanwhile: the feed has an "updated" entry that queues the new bytes.
            replica.delete(key)
            return None
        record = session.scalar(
            select(BlobReplica).where(BlobReplica.blob_pk == blob_id, BlobReplica.store == replica_name)
        )
        if record is None:
            session.add(
                BlobReplica(blob_pk=blob_id, store=replica_name, key=key, sha256=sha256, replicated_at=now)
            )
        else:
            record.key, record.sha256, record.replicated_at = key, sha256, now
    if previous is not None and previous[0] != key:
        replica.delete(previous[0])
    return None


def replicate_blobs(ctx: AppContext, batch: list[ClaimedJob]) -> Outcomes:
    """Job handler of :data:`REPLICATE`."""
    replica_name = ctx.settings.replica_store
    outcomes: dict[int, str | PermanentFailure | None] = {}
    for job in batch:
        if not replica_name:
            outcomes[job.id] = PermanentFailure("no replica_store configured")
            continue
        errors: list[str] = []
        for blob_id in job.payload.get("blobs", []):
            try:
                error = replicate_one(ctx, int(blob_id), replica_name)
            except Exception as exc:
                error = f"blob {blob_id}: {type(exc).__name__}: {exc}"
            if error is not None:
                log.warning("replication: %s", error)
                errors.append(error)
        outcomes[job.id] = f"{len(errors)} blob(s) not replicated: {errors[0]}" if errors else None
    return outcomes
