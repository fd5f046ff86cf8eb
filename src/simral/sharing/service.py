"""Routing: turn new instances into forwarding jobs (DESIGN.md §5; issue "exchange and sharing").

The archive's change feed is the outbox: every ingest writes its change row in the ingest
transaction (``archive.service.record_change``). :func:`route_changes` follows the feed from its
cursor, matches each new instance against the enabled rules and, in one transaction, enqueues one
job per (instance, destination) and advances the cursor: a crash repeats nothing and loses
nothing. Jobs are grouped by destination so that a runner sends a batch over one association or
one STOW-RS request; their ``dedupe_key`` keeps one active job per instance and destination.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from simral.access.policy import AccessDenied, Principal, may_manage
from simral.archive.models import ChangeEvent, Instance, Series, Study, StudyOrganisation
from simral.audit import service as audit
from simral.db.base import as_utc, utcnow
from simral.jobs import service as jobs
from simral.nodes.models import DicomWebPeer, RemoteNode
from simral.sharing.models import FeedCursor, RoutingRule

ROUTER_CURSOR = "router"
#: Job kinds the forwarding handlers run.
FORWARD_DIMSE = "forward.dimse"
FORWARD_STOW = "forward.stow"


class RoutingError(ValueError):
    """A rule that cannot be created or removed."""


def create_rule(
    session: Session,
    *,
    name: str,
    principal: Principal,
    destination_node: str = "",
    destination_dicomweb: str = "",
    source_organisation: str = "",
    source: str = "",
    modality: str = "",
    study_description: str = "",
) -> RoutingRule:
    """Add a rule; exactly one destination, which must be registered (audited)."""
    if not may_manage(principal, source_organisation or None):
        raise AccessDenied(f"{principal.audit_name} may not add routing rules")
    if bool(destination_node) == bool(destination_dicomweb):
        raise RoutingError("a rule sends to one DICOM node (--to) or one DICOMweb peer (--to-dicomweb)")
    if (
        destination_node
        and session.scalar(select(RemoteNode).where(RemoteNode.name == destination_node)) is None
    ):
        raise RoutingError(f"no DICOM node named {destination_node!r}")
    if destination_dicomweb and (
        session.scalar(select(DicomWebPeer).where(DicomWebPeer.name == destination_dicomweb)) is None
    ):
        raise RoutingError(f"no DICOMweb peer named {destination_dicomweb!r}")
    if session.scalar(select(RoutingRule).where(RoutingRule.name == name)) is not None:
        raise RoutingError(f"a rule named {name!r} already exists")
    rule = RoutingRule(
        name=name,
        destination_node=destination_node,
        destination_dicomweb=destination_dicomweb,
        source_organisation=source_organisation,
        source=source.strip(),
        modality=modality.strip().upper(),
        study_description=study_description,
        enabled=True,
        created_at=utcnow(),
    )
    session.add(rule)
    audit.record(
        session,
        action="route.create",
        principal=principal,
        detail={
            "name": name,
            "to": destination_node or destination_dicomweb,
            "protocol": "dimse" if destination_node else "stow-rs",
            "organisation": source_organisation,
            "source": source,
            "modality": modality,
            "study_description": study_description,
        },
    )
    return rule


def list_rules(session: Session) -> list[RoutingRule]:
    """Every rule, by name."""
    return list(session.scalars(select(RoutingRule).order_by(RoutingRule.name)))


def delete_rule(session: Session, *, name: str, principal: Principal) -> None:
    """Remove a rule (jobs already enqueued still run; cancel them with ``simral jobs cancel``)."""
    rule = session.scalar(select(RoutingRule).where(RoutingRule.name == name))
    if rule is None:
        raise RoutingError(f"no rule named {name!r}")
    if not may_manage(principal, rule.source_organisation or None):
        raise AccessDenied(f"{principal.audit_name} may not remove rule {name}")
    session.delete(rule)
    audit.record(session, action="route.delete", principal=principal, detail={"name": name})


@dataclass(frozen=True)
class _NewInstance:
    seq: int
    at: datetime
    study_uid: str
    sop_uid: str
    source: str
    modality: str
    description: str
    organisations: frozenset[str]


def _matches(rule: RoutingRule, item: _NewInstance) -> bool:
    created = as_utc(rule.created_at)
    if created is not None and (as_utc(item.at) or created) < created:
        return False  # a rule routes what arrives after it was made, not the archive's history
    if rule.source_organisation and rule.source_organisation not in item.organisations:
        return False
    if rule.source and rule.source != item.source:
        return False
    if rule.modality and rule.modality != item.modality.upper():
        return False
    pattern = rule.study_description
    return not pattern or fnmatch.fnmatchcase(item.description.upper(), pattern.upper())


def _new_instances(session: Session, after: int, limit: int) -> list[_NewInstance]:
    rows = session.execute(
        select(
            ChangeEvent.seq,
            ChangeEvent.at,
            ChangeEvent.study_uid,
            ChangeEvent.sop_uid,
            Instance.source,
            Series.modality,
            Study.description,
            Study.id,
        )
        .join(Instance, Instance.sop_uid == ChangeEvent.sop_uid)
        .join(Series, Series.id == Instance.series_pk)
        .join(Study, Study.id == Series.study_pk)
        .where(ChangeEvent.seq > after, ChangeEvent.kind == "created")
        .order_by(ChangeEvent.seq)
        .limit(limit)
    ).all()
    study_pks = {row[-1] for row in rows}
    holders: dict[int, set[str]] = {}
    if study_pks:
        for study_pk, code in session.execute(
            select(StudyOrganisation.study_pk, StudyOrganisation.organisation_code).where(
                StudyOrganisation.study_pk.in_(study_pks)
            )
        ):
            holders.setdefault(study_pk, set()).add(code)
    return [
        _NewInstance(seq, at, study, sop, source, modality, description, frozenset(holders.get(pk, ())))
        for seq, at, study, sop, source, modality, description, pk in rows
    ]


def _last_seq(session: Session, after: int, limit: int) -> int:
    """The last feed position among the next ``limit`` changes (deleted instances included)."""
    seqs = list(
        session.scalars(
            select(ChangeEvent.seq).where(ChangeEvent.seq > after).order_by(ChangeEvent.seq).limit(limit)
        )
    )
    return seqs[-1] if seqs else after


def routing_due(session: Session) -> bool:
    """Whether :func:`route_changes` has anything to do (read-only: spares the write lock when idle)."""
    if session.scalar(select(RoutingRule.id).where(RoutingRule.enabled.is_(True)).limit(1)) is None:
        return False
    cursor = session.scalar(select(FeedCursor.last_seq).where(FeedCursor.name == ROUTER_CURSOR)) or 0
    newest = session.scalar(select(func.max(ChangeEvent.seq))) or 0
    return bool(newest > cursor)


def route_changes(session: Session, *, limit: int = 500) -> int:
    """Enqueue forwarding jobs for the next new instances of the feed; how many jobs were enqueued.

    Call inside one unit of work: the jobs and the cursor commit together. On PostgreSQL the cursor
    row is locked, so two routers never route the same changes.
    """
    query = select(FeedCursor).where(FeedCursor.name == ROUTER_CURSOR)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    cursor = session.scalar(query)
    if cursor is None:
        cursor = FeedCursor(name=ROUTER_CURSOR, last_seq=0, updated_at=utcnow())
        session.add(cursor)
        session.flush()
    after = cursor.last_seq
    end = _last_seq(session, after, limit)
    if end == after:
        return 0
    rules = [rule for rule in list_rules(session) if rule.enabled]
    enqueued = 0
    for item in _new_instances(session, after, limit) if rules else []:
        if item.seq > end:
            break
        for rule in rules:
            if not _matches(rule, item):
                continue
            kind, destination = (
                (FORWARD_DIMSE, rule.destination_node)
                if rule.destination_node
                else (FORWARD_STOW, rule.destination_dicomweb)
            )
            job = jobs.enqueue(
                session,
                kind=kind,
                payload={
                    "destination": destination,
                    "study_uid": item.study_uid,
                    "sop_uid": item.sop_uid,
                    "rule": rule.name,
                },
                group_key=f"{kind}:{destination}",
                dedupe_key=f"{kind}:{destination}:{item.sop_uid}",
            )
            enqueued += job is not None
    cursor.last_seq = end
    cursor.updated_at = utcnow()
    return enqueued
