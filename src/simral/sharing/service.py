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
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from simral.access.policy import SYSTEM, AccessDenied, Principal, may_manage, may_share
from simral.archive import service as archive
from simral.archive.models import ChangeEvent, Instance, Series, Study, StudyOrganisation
from simral.archive.service import StoredInstance
from simral.audit import service as audit
from simral.context import AppContext
from simral.db.base import as_utc, utcnow
from simral.jobs import service as jobs
from simral.jobs.runner import PermanentFailure
from simral.jobs.service import ClaimedJob
from simral.nodes.models import DicomWebPeer, RemoteNode
from simral.sharing.models import FeedCursor, RoutingRule, Share, ShareLink

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
    reading_group: str = "",
) -> RoutingRule:
    """Add a rule; exactly one destination, which must be registered (audited). With
    ``reading_group`` it is a prefetch rule: it sends the study of each reading task of that group
    that becomes ready, and its priors, rather than new instances."""
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
        reading_group=reading_group.strip(),
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


def forwarded_instances(
    session: Session, batch: list[ClaimedJob]
) -> tuple[dict[int, StoredInstance], dict[int, str | PermanentFailure | None]]:
    """The stored instances a batch of forwarding jobs names (job id → instance), and the outcomes
    already known: an instance deleted since the job was queued dead-letters its job."""
    found = {
        job.id: archive.get_instance(session, principal=SYSTEM, sop_uid=job.payload["sop_uid"])
        for job in batch
    }
    instances = {job_id: instance for job_id, instance in found.items() if instance is not None}
    gone: dict[int, str | PermanentFailure | None] = {
        job_id: PermanentFailure("the instance is no longer in the archive")
        for job_id, instance in found.items()
        if instance is None
    }
    return instances, gone


def audit_forwarded(ctx: AppContext, *, destination: str, protocol: str, studies: dict[str, int]) -> None:
    """One audit record per study forwarded (PS3.15 A.5.3.4 "DICOM Instances Transferred")."""
    for study_uid, count in studies.items():
        audit.record_now(
            ctx,
            action="study.forward",
            principal=SYSTEM,
            study_uid=study_uid,
            detail={"to": destination, "protocol": protocol, "instances": count},
        )


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
    enabled = [rule for rule in list_rules(session) if rule.enabled]
    rules = [rule for rule in enabled if not rule.reading_group]
    prefetch = [rule for rule in enabled if rule.reading_group]
    enqueued = 0
    for item in _new_instances(session, after, limit) if enabled else []:
        if item.seq > end:
            break
        for rule in rules:
            if not _matches(rule, item):
                continue
            enqueued += _enqueue_forward(session, rule, item.study_uid, item.sop_uid)
        if prefetch:
            # Images of a study already being read (they kept arriving after its task was ready).
            groups = _reading_groups(session, item.study_uid)
            for rule in prefetch:
                if rule.reading_group in groups:
                    enqueued += _enqueue_forward(session, rule, item.study_uid, item.sop_uid)
    cursor.last_seq = end
    cursor.updated_at = utcnow()
    return enqueued


def _enqueue_forward(session: Session, rule: RoutingRule, study_uid: str, sop_uid: str) -> bool:
    """One forwarding job for one instance to the rule's destination (deduplicated per instance
    and destination while a job for it is active)."""
    kind, destination = (
        (FORWARD_DIMSE, rule.destination_node)
        if rule.destination_node
        else (FORWARD_STOW, rule.destination_dicomweb)
    )
    job = jobs.enqueue(
        session,
        kind=kind,
        payload={"destination": destination, "study_uid": study_uid, "sop_uid": sop_uid, "rule": rule.name},
        group_key=f"{kind}:{destination}",
        dedupe_key=f"{kind}:{destination}:{sop_uid}",
    )
    return job is not None


def _reading_groups(session: Session, study_uid: str) -> set[str]:
    """The groups with a reading task of the study that is ready, claimed or reported."""
    from simral.reading.models import TASK_CLAIMED, TASK_READY, TASK_REPORTED, ReadingTask

    return set(
        session.scalars(
            select(ReadingTask.group_code).where(
                ReadingTask.study_uid == study_uid,
                ReadingTask.state.in_((TASK_READY, TASK_CLAIMED, TASK_REPORTED)),
            )
        )
    )


def prefetch_for_reading(session: Session, *, group_code: str, study_uids: list[str]) -> int:
    """Enqueue, for every enabled prefetch rule of ``group_code``, the instances of ``study_uids``
    (a ready task's study and its priors), in the caller's transaction; how many jobs. Images of
    the study stored after this are sent by the router (:func:`route_changes`)."""
    rules = [
        rule
        for rule in session.scalars(select(RoutingRule).where(RoutingRule.reading_group == group_code))
        if rule.enabled
    ]
    if not rules or not study_uids:
        return 0
    instances = session.execute(
        select(Study.study_uid, Instance.sop_uid)
        .join(Series, Series.id == Instance.series_pk)
        .join(Study, Study.id == Series.study_pk)
        .where(Study.study_uid.in_(study_uids))
    ).all()
    return sum(_enqueue_forward(session, rule, study, sop) for rule in rules for study, sop in instances)


# ------------------------------------------------------------------------------------------ shares

#: Longest a share or a capability link may last.
MAX_SHARE = timedelta(days=365)
MAX_LINK = timedelta(days=30)
#: Wrong birth dates accepted on a link before it locks (revocation by brute force protection).
MAX_LINK_FAILURES = 5


class ShareError(ValueError):
    """A share or link that cannot be made or used."""


def _visible(session: Session, principal: Principal, study_uid: str) -> archive.StudySummary:
    summary = archive.get_study(session, principal=principal, study_uid=study_uid)
    if summary is None:
        raise ShareError("no such study, or no access")
    return summary


def create_share(
    session: Session,
    *,
    principal: Principal,
    study_uid: str,
    grantee_kind: str,
    grantee: str,
    purpose: str,
    lifetime: timedelta,
    whole_patient: bool = False,
) -> Share:
    """Share a study the principal sees (or all studies of its patient) with a professional or an
    organisation until ``lifetime`` from now (audited; the grantee must exist)."""
    from simral.identity import service as identity

    if not may_share(principal):
        raise AccessDenied("only professionals share studies")
    if grantee_kind not in ("user", "organisation"):
        raise ShareError("share with a professional (user) or an organisation")
    if not purpose.strip():
        raise ShareError("a share states its purpose")
    if not timedelta(0) < lifetime <= MAX_SHARE:
        raise ShareError(f"a share lasts at most {MAX_SHARE.days} days")
    study = _visible(session, principal, study_uid).study
    if grantee_kind == "user" and identity.get_professional(session, grantee) is None:
        raise ShareError(f"no professional {grantee!r}")
    if grantee_kind == "organisation" and identity.get_organisation(session, grantee) is None:
        raise ShareError(f"no organisation {grantee!r}")
    now = utcnow()
    share = Share(
        study_uid="" if whole_patient else study.study_uid,
        patient_pk=study.patient_pk if whole_patient else None,
        grantee_kind=grantee_kind,
        grantee=grantee,
        purpose=purpose.strip()[:500],
        created_by=principal.name,
        created_by_organisation=principal.organisation,
        created_at=now,
        expires_at=now + lifetime,
        revoked_by="",
    )
    session.add(share)
    session.flush()
    audit.record(
        session,
        action="share.create",
        principal=principal,
        study_uid=study.study_uid,
        detail={
            "share": share.id,
            "to": f"{grantee_kind}:{grantee}",
            "purpose": share.purpose,
            "expires": share.expires_at.isoformat(),
            "whole_patient": whole_patient,
        },
    )
    return share


def _active(model: type[Share] | type[ShareLink], now: datetime) -> Any:
    return and_(model.revoked_at.is_(None), model.expires_at > now)


def shared_study_uids(session: Session, *, login: str = "", organisation: str = "") -> frozenset[str]:
    """Study UIDs actively shared with the professional ``login`` or the ``organisation``."""
    now = utcnow()
    grantees = []
    if login:
        grantees.append(and_(Share.grantee_kind == "user", Share.grantee == login))
    if organisation:
        grantees.append(and_(Share.grantee_kind == "organisation", Share.grantee == organisation))
    if not grantees:
        return frozenset()
    shares = session.execute(
        select(Share.study_uid, Share.patient_pk).where(_active(Share, now), or_(*grantees))
    )
    uids: set[str] = set()
    patients: set[int] = set()
    for study_uid, patient_pk in shares:
        if study_uid:
            uids.add(study_uid)
        elif patient_pk is not None:
            patients.add(patient_pk)
    if patients:
        uids.update(session.scalars(select(Study.study_uid).where(Study.patient_pk.in_(patients))))
    return frozenset(uids)


def shares_for(session: Session, principal: Principal) -> tuple[list[Share], list[Share]]:
    """(active shares the principal made, active shares made to them or their acting organisation)."""
    now = utcnow()
    made = session.scalars(
        select(Share).where(_active(Share, now), Share.created_by == principal.name).order_by(Share.id.desc())
    )
    received = session.scalars(
        select(Share)
        .where(
            _active(Share, now),
            or_(
                and_(Share.grantee_kind == "user", Share.grantee == principal.name),
                and_(Share.grantee_kind == "organisation", Share.grantee == principal.organisation),
            ),
        )
        .order_by(Share.id.desc())
    )
    return list(made), list(received)


def revoke_share(session: Session, *, principal: Principal, share_id: int) -> None:
    """End a share now: its author, or an administrator of the author's organisation (audited)."""
    share = session.get(Share, share_id)
    if share is None or share.revoked_at is not None:
        raise ShareError("no such active share")
    if share.created_by != principal.name and not may_manage(
        principal, share.created_by_organisation or None
    ):
        raise AccessDenied("only the author or an administrator revokes a share")
    share.revoked_at = utcnow()
    share.revoked_by = principal.name
    audit.record(session, action="share.revoke", principal=principal, study_uid=share.study_uid,
                 detail={"share": share.id})  # fmt: skip


@dataclass(frozen=True)
class NewLink:
    """A capability link just made: the token is shown once and never stored."""

    id: int
    token: str
    expires_at: datetime


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_link(
    session: Session,
    *,
    principal: Principal,
    study_uids: list[str],
    purpose: str,
    lifetime: timedelta,
    ask_birth_date: bool,
    audience: str = "colleague",
) -> NewLink:
    """A viewer-only link to studies the principal sees (256-bit random token; audited).

    A ``patient`` link always asks the patient's birth date and opens the patient's page."""
    if not may_share(principal):
        raise AccessDenied("only professionals make links")
    if not timedelta(0) < lifetime <= MAX_LINK:
        raise ShareError(f"a link lasts at most {MAX_LINK.days} days")
    if audience not in ("colleague", "patient"):
        raise ShareError("a link is for a colleague or for the patient")
    summaries = [_visible(session, principal, uid) for uid in dict.fromkeys(study_uids)]
    if not summaries:
        raise ShareError("no such study, or no access")
    birth_date = ""
    if ask_birth_date or audience == "patient":
        dates = {summary.patient.birth_date for summary in summaries}
        if len(dates) != 1 or not next(iter(dates)):
            raise ShareError("the birth-date check needs studies of one patient with a known birth date")
        birth_date = dates.pop()
    token = secrets.token_urlsafe(32)
    now = utcnow()
    link = ShareLink(
        token_sha256=_token_hash(token),
        study_uids=" ".join(summary.study.study_uid for summary in summaries),
        purpose=purpose.strip()[:500],
        birth_date_check=birth_date,
        created_by=principal.name,
        created_by_organisation=principal.organisation,
        created_at=now,
        expires_at=now + lifetime,
        failed_checks=0,
        seal_key=secrets.token_hex(32),
        audience=audience,
    )
    session.add(link)
    session.flush()
    for summary in summaries:
        audit.record(
            session,
            action="share-link.create",
            principal=principal,
            study_uid=summary.study.study_uid,
            detail={
                "link": link.id,
                "expires": link.expires_at.isoformat(),
                "birth_date_check": bool(birth_date),
            },
        )
    return NewLink(link.id, token, link.expires_at)


def find_link(session: Session, token: str) -> ShareLink | None:
    """The active link of ``token`` (not expired, not revoked, not locked by failed checks)."""
    link = session.scalar(select(ShareLink).where(ShareLink.token_sha256 == _token_hash(token)))
    if link is None or link.revoked_at is not None or link.failed_checks >= MAX_LINK_FAILURES:
        return None
    expires = as_utc(link.expires_at)
    return link if expires is not None and expires > utcnow() else None


def check_link_birth_date(session: Session, link: ShareLink, birth_date: str) -> bool:
    """Whether ``birth_date`` (YYYYMMDD or YYYY-MM-DD) is the patient's; failures count and lock."""
    given = birth_date.replace("-", "").strip()
    if not link.birth_date_check or secrets.compare_digest(given, link.birth_date_check):
        return True
    link.failed_checks += 1
    return False


def visitor_cookie(link: ShareLink, token: str) -> str:
    """The cookie value of a visitor who opened ``link`` (and passed its birth-date check): the
    token and an HMAC seal under the link's server-side key, so the check cannot be skipped."""
    return f"{token}:{hmac.new(bytes.fromhex(link.seal_key), token.encode(), 'sha256').hexdigest()}"


def link_from_cookie(session: Session, cookie: str) -> ShareLink | None:
    """The active link a visitor cookie names, if its seal is right."""
    token, _, seal = cookie.partition(":")
    link = find_link(session, token) if token and seal else None
    if link is None or not hmac.compare_digest(visitor_cookie(link, token), cookie):
        return None
    return link


def link_principal(link: ShareLink, *, address: str = "") -> Principal:
    """The read-only principal of a visitor holding ``link``."""
    return Principal(
        kind="share-link",
        name=f"link:{link.id}",
        organisation=link.created_by_organisation,
        shared=frozenset(link.study_uids.split()),
        address=address,
        via="patient-link" if link.audience == "patient" else "share-link",
    )


def revoke_link(session: Session, *, principal: Principal, link_id: int) -> None:
    """End a link now: its author or an administrator of the author's organisation (audited)."""
    link = session.get(ShareLink, link_id)
    if link is None or link.revoked_at is not None:
        raise ShareError("no such active link")
    if link.created_by != principal.name and not may_manage(principal, link.created_by_organisation or None):
        raise AccessDenied("only the author or an administrator revokes a link")
    link.revoked_at = utcnow()
    audit.record(session, action="share-link.revoke", principal=principal, detail={"link": link.id})


def accesses_to(session: Session, study_uids: list[str], *, limit: int = 200) -> list[Any]:
    """Audit records about these studies, newest first: what a patient may see of who accessed
    their images (the professional, their organisation, when, what)."""
    from simral.audit.models import AuditEvent

    return list(
        session.scalars(
            select(AuditEvent)
            .where(AuditEvent.study_uid.in_(study_uids))
            .order_by(AuditEvent.id.desc())
            .limit(limit)
        )
    )


def links_made_by(session: Session, principal: Principal) -> list[ShareLink]:
    """The principal's active links."""
    now = utcnow()
    return list(
        session.scalars(
            select(ShareLink)
            .where(_active(ShareLink, now), ShareLink.created_by == principal.name)
            .order_by(ShareLink.id.desc())
        )
    )
