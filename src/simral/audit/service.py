"""The audit trail: recording events in the caller's unit of work, verifying the hash chain, searching.

Services call :func:`record` (DESIGN.md §2), so every protocol is covered and a change and its audit
record commit together. Rows are chained: ``hash = SHA-256(prev_hash, canonical JSON of the row)``;
writers serialise on the chain's tail (the SQLite writer lock, a PostgreSQL advisory lock held to
commit), so ids grow in commit order and :func:`verify` can walk the chain. Since no other writer
can append while a transaction holds that lock, a transaction that recorded a row remembers it as
the tail for its next record (outside savepoints, which may still be rolled back) instead of
reading it again: an ingest batch or a multi-step change reads the tail once.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import orjson
from sqlalchemy import Select, Table, insert, or_, select
from sqlalchemy.orm import Session

from simral.audit.models import AuditEvent, AuditExportCursor
from simral.db.base import utcnow

if TYPE_CHECKING:
    from simral.access.policy import Principal
    from simral.context import AppContext

_INSERT = insert(cast(Table, AuditEvent.__table__))
_TAIL = select(AuditEvent.id, AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)
#: ``session.info`` key of the chain tail a transaction appended last: (root transaction, id, hash).
_TAIL_KEY = "simral.audit.tail"
#: Key of the PostgreSQL transaction-level advisory lock that serialises appends to the chain.
AUDIT_CHAIN_LOCK = 0x5A_4155_4454  # "ZAUDT"

#: Columns covered by the hash, in this order.
HASHED_FIELDS = (
    "id",
    "at",
    "action",
    "actor",
    "actor_national_id",
    "actor_organisation",
    "outcome",
    "source_address",
    "study_uid",
    "patient_id",
    "patient_issuer",
    "detail",
)


def _timestamp(value: datetime) -> str:
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def chain_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """The hash of one row given its predecessor's (canonical JSON, sorted keys, UTC timestamps)."""
    content = {name: row[name] for name in HASHED_FIELDS}
    content["at"] = _timestamp(content["at"])
    payload = orjson.dumps(content, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(prev_hash.encode() + b"\n" + payload).hexdigest()


def record(
    session: Session,
    *,
    action: str,
    principal: Principal,
    outcome: str = "success",
    study_uid: str = "",
    patient_id: str = "",
    patient_issuer: str = "",
    detail: dict[str, Any] | None = None,
) -> int:
    """Append an audit row to the current transaction; it commits (or not) with the change it describes."""
    connection = session.connection()
    transaction = connection.get_transaction()
    nested = connection.in_nested_transaction()
    remembered = session.info.get(_TAIL_KEY)
    last: tuple[int, str] | None
    if remembered is not None and remembered[0] is transaction and not nested:
        # This transaction appended the tail and still holds the chain's lock: nobody appended since.
        last = (remembered[1], remembered[2])
    else:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({AUDIT_CHAIN_LOCK})")
        found = connection.execute(_TAIL).first()
        last = (int(found[0]), str(found[1])) if found else None
    row: dict[str, Any] = {
        "id": (last[0] + 1) if last else 1,
        "at": utcnow(),
        "action": action,
        "actor": principal.audit_name,
        "actor_national_id": principal.national_id,
        "actor_organisation": principal.organisation,
        "outcome": outcome,
        "source_address": principal.address,
        "study_uid": study_uid,
        "patient_id": patient_id,
        "patient_issuer": patient_issuer,
        "detail": detail or {},
    }
    row["prev_hash"] = last[1] if last else ""
    row["hash"] = chain_hash(row["prev_hash"], row)
    connection.execute(_INSERT, row)
    if nested:
        # A savepoint may still be rolled back (taking this row with it): read the tail next time.
        session.info.pop(_TAIL_KEY, None)
    else:
        session.info[_TAIL_KEY] = (transaction, row["id"], row["hash"])
    return int(row["id"])


# ------------------------------------------------------------------------------------------ reads


class _AccessNotes:
    """Per-process memory of recent (principal, action, study) accesses, to audit a viewer session
    once instead of once per frame request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str, str, str], float] = {}

    def first_in_window(self, key: tuple[str, str, str, str], window: float) -> bool:
        now = time.monotonic()
        with self._lock:
            if len(self._seen) > 10000:
                self._seen = {k: t for k, t in self._seen.items() if now - t < window}
            seen = self._seen.get(key)
            if seen is not None and now - seen < window:
                return False
            self._seen[key] = now
            return True


#: Seconds during which repeated reads of one study by one principal give one audit record.
READ_AUDIT_WINDOW = 300.0


def due_reads(ctx: AppContext, principal: Principal, study_uids: Iterable[str], *, action: str) -> list[str]:
    """The studies whose read by ``principal`` was not audited in this process during the last
    :data:`READ_AUDIT_WINDOW` seconds (a viewer session gives one record per study, not one per frame)."""
    notes = cast(_AccessNotes, ctx.caches.setdefault("audit-access-notes", _AccessNotes()))
    return [
        uid
        for uid in dict.fromkeys(study_uids)
        if notes.first_in_window((principal.audit_name, principal.address, action, uid), READ_AUDIT_WINDOW)
    ]


def record_now(ctx: AppContext, **kwargs: Any) -> int:
    """Record one event in a transaction of its own (logins, denials: nothing else to commit)."""
    with ctx.db.unit_of_work() as session:
        return record(session, **kwargs)


# ----------------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class ChainProblem:
    """Where the chain breaks and why."""

    record_id: int
    reason: str


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` found."""

    records: int
    legacy_records: int
    problem: ChainProblem | None


def _rows(session: Session, batch: int = 5000) -> Iterator[AuditEvent]:
    after = -1
    while True:
        rows = list(
            session.scalars(
                select(AuditEvent).where(AuditEvent.id > after).order_by(AuditEvent.id).limit(batch)
            )
        )
        if not rows:
            return
        yield from rows
        after = rows[-1].id
        session.expunge_all()


def verify(session: Session) -> VerifyReport:
    """Walk the trail in id order and name the first record whose link or content does not hold.

    Detects an edited row (its hash no longer matches), a deleted or reordered row (the next row's
    ``prev_hash`` no longer matches its predecessor), and a truncated tail (an export sink already
    acknowledged a record that is gone). Rows written before the chain existed (no hash, at the
    start of the table only) are counted as legacy.
    """
    count = legacy = 0
    prev_hash = ""
    last_id = 0
    chained = False
    for event in _rows(session):
        count += 1
        last_id = event.id
        if not event.hash and not chained:
            legacy += 1
            continue
        chained = True
        row = {name: getattr(event, name) for name in HASHED_FIELDS}
        if event.prev_hash != prev_hash:
            return VerifyReport(
                count, legacy, ChainProblem(event.id, "link to the previous record is broken")
            )
        if chain_hash(event.prev_hash, row) != event.hash:
            return VerifyReport(count, legacy, ChainProblem(event.id, "content does not match its hash"))
        prev_hash = event.hash
    acknowledged = session.scalar(
        select(AuditExportCursor.last_id).order_by(AuditExportCursor.last_id.desc()).limit(1)
    )
    if acknowledged is not None and acknowledged > last_id:
        return VerifyReport(
            count, legacy, ChainProblem(acknowledged, "records up to this id were exported but are missing")
        )
    return VerifyReport(count, legacy, None)


# ---------------------------------------------------------------------------------------- search


def search(
    session: Session,
    *,
    organisations: frozenset[str] | None,
    patient_id: str = "",
    actor: str = "",
    study_uid: str = "",
    action: str = "",
    limit: int = 200,
) -> list[AuditEvent]:
    """Audit records, newest first, by patient, actor (login or national id), study or action.

    ``organisations`` limits the records to those of actors acting for these organisations or about
    studies they hold (None: the whole trail, for the regional operator's auditors).
    """
    query: Select[tuple[AuditEvent]] = select(AuditEvent)
    if organisations is not None:
        from simral.archive.models import Study, StudyOrganisation

        study_uids = (
            select(Study.study_uid)
            .join(StudyOrganisation, StudyOrganisation.study_pk == Study.id)
            .where(StudyOrganisation.organisation_code.in_(sorted(organisations)))
        )
        query = query.where(
            or_(
                AuditEvent.actor_organisation.in_(sorted(organisations)), AuditEvent.study_uid.in_(study_uids)
            )
        )
    if patient_id:
        query = query.where(AuditEvent.patient_id == patient_id)
    if actor:
        query = query.where(
            or_(
                AuditEvent.actor == actor,
                AuditEvent.actor == f"user:{actor}",
                AuditEvent.actor_national_id == actor,
            )
        )
    if study_uid:
        query = query.where(AuditEvent.study_uid == study_uid)
    if action:
        query = query.where(AuditEvent.action == action)
    return list(session.scalars(query.order_by(AuditEvent.id.desc()).limit(limit)))
