"""Retention of medical records (CSP R.1112-7), legal holds, reviewed deletion.

Code de la santé publique, article R.1112-7, second paragraph (the rules encoded by
:func:`retention_term`, each branch quoting its sentence):

    « Le dossier médical mentionné à l'article R. 1112-2 est conservé pendant une durée de vingt
    ans à compter de la date du dernier séjour de son titulaire dans l'établissement ou de la
    dernière consultation externe en son sein. Lorsqu'en application des dispositions qui
    précèdent, la durée de conservation d'un dossier s'achève avant le vingt-huitième anniversaire
    de son titulaire, la conservation du dossier est prorogée jusqu'à cette date. Dans tous les
    cas, si la personne titulaire du dossier décède moins de dix ans après son dernier passage dans
    l'établissement, le dossier est conservé pendant une durée de dix ans à compter de la date du
    décès. Ces délais sont suspendus par l'introduction de tout recours gracieux ou contentieux
    tendant à mettre en cause la responsabilité médicale de l'établissement de santé ou de
    professionnels de santé à raison de leurs interventions au sein de l'établissement. »

How simral reads it:

- the *dossier* is the person's record at one organisation (the instruction DHOS/E1/DAF/DPACI
  2007-322: every piece of it is kept as long as the last visit is less than twenty years old), so
  the *last visit* of a study is the latest study date of the same person (every linked identity)
  among the studies of that organisation; a study held by several organisations is kept until the
  latest of their dates;
- an organisation's :class:`~simral.lifecycle.models.RetentionPolicy` replaces the twenty years of
  the first sentence (longer or shorter, as its policy says); the 28th-birthday and death rules
  apply on top, as written;
- "suspendus par l'introduction de tout recours" is a :class:`~simral.lifecycle.models.LegalHold`:
  a held study is never proposed nor deleted, whatever its date;
- the third paragraph ("La décision d'élimination est prise par le directeur de l'établissement
  après avis du médecin responsable de l'information médicale") is the reviewed deletion: a review
  proposes a :class:`~simral.lifecycle.models.DeletionBatch`, an administrator approves it, and
  only then are deletion jobs queued; each job checks the hold and the date again when it runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from simral.access.policy import AccessDenied, Principal, may_manage_identities, may_manage_retention
from simral.archive import service as archive
from simral.archive.models import Patient, Study, StudyOrganisation
from simral.audit import service as audit
from simral.context import AppContext
from simral.db.base import utcnow
from simral.jobs import service as jobs
from simral.jobs.service import ClaimedJob
from simral.lifecycle.models import (
    BATCH_APPROVED,
    BATCH_CANCELLED,
    BATCH_PROPOSED,
    HOLD_PATIENT,
    HOLD_STUDY,
    ITEM_DELETED,
    ITEM_PENDING,
    ITEM_PURGING,
    ITEM_REFUSED,
    SCOPE_REJECTED,
    SCOPE_STUDY,
    DeletionBatch,
    DeletionItem,
    LegalHold,
    RejectedInstance,
    RetentionPolicy,
)
from simral.lifecycle.rejection import RETENTION_EXPIRED
from simral.patients import service as patients
from simral.patients.models import AssigningAuthority, PatientIdentity, StudyIdentity

log = logging.getLogger(__name__)

#: « conservé pendant une durée de vingt ans à compter de la date du dernier séjour »
LAW_YEARS = 20
#: « prorogée jusqu'au vingt-huitième anniversaire »
MINOR_EXTENSION_AGE = 28
#: « décède moins de dix ans après son dernier passage … conservé dix ans à compter du décès »
AFTER_DEATH_YEARS = 10
#: Job kind deleting one approved item.
LIFECYCLE_DELETE = "lifecycle.delete"

#: Which sentence of R.1112-7 gave the date.
RULE_LAST_VISIT = "20 ans après le dernier passage"
RULE_POLICY = "durée de l'organisation après le dernier passage"
RULE_28TH_BIRTHDAY = "28e anniversaire"
RULE_DEATH = "10 ans après le décès"


class LifecycleError(ValueError):
    """A retention operation that cannot be done (unknown batch or hold, wrong state, bad value)."""


# ------------------------------------------------------------------------------ the law's rules


def add_years(day: date, years: int) -> date:
    """``day`` moved by whole years; 29 February becomes 28 February in a common year."""
    try:
        return day.replace(year=day.year + years)
    except ValueError:
        return day.replace(year=day.year + years, day=28)


def parse_da(value: str) -> date | None:
    """A DICOM DA / HL7 date ``YYYYMMDD`` (or ``YYYY-MM-DD``); None when absent or partial."""
    text = (value or "").strip().replace("-", "")[:8]
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


@dataclass(frozen=True)
class RetentionTerm:
    """The date after which a record may be destroyed, and the rule of R.1112-7 that gave it."""

    until: date
    rule: str


def retention_term(
    last_visit: date,
    *,
    birth_date: date | None = None,
    death_date: date | None = None,
    years: int | None = None,
) -> RetentionTerm:
    """CSP R.1112-7 for one record: ``last_visit`` the date of the last stay or external
    consultation, ``years`` an organisation's term replacing the law's twenty years."""
    # « conservé pendant une durée de vingt ans à compter de la date du dernier séjour de son
    # titulaire dans l'établissement ou de la dernière consultation externe en son sein »
    term = LAW_YEARS if years is None else years
    until = add_years(last_visit, term)
    rule = RULE_LAST_VISIT if years is None else RULE_POLICY
    # « Lorsqu'en application des dispositions qui précèdent, la durée de conservation d'un dossier
    # s'achève avant le vingt-huitième anniversaire de son titulaire, la conservation du dossier
    # est prorogée jusqu'à cette date. »
    if birth_date is not None:
        birthday_28 = add_years(birth_date, MINOR_EXTENSION_AGE)
        if until < birthday_28:
            until, rule = birthday_28, RULE_28TH_BIRTHDAY
    # « Dans tous les cas, si la personne titulaire du dossier décède moins de dix ans après son
    # dernier passage dans l'établissement, le dossier est conservé pendant une durée de dix ans à
    # compter de la date du décès. » — "dans tous les cas": it replaces the two rules above.
    if death_date is not None and death_date < add_years(last_visit, AFTER_DEATH_YEARS):
        until, rule = add_years(death_date, AFTER_DEATH_YEARS), RULE_DEATH
    return RetentionTerm(until, rule)


def retention_until(
    last_visit: date,
    *,
    birth_date: date | None = None,
    death_date: date | None = None,
    years: int | None = None,
) -> date:
    """The date after which the record may be destroyed (:func:`retention_term`)."""
    return retention_term(last_visit, birth_date=birth_date, death_date=death_date, years=years).until


# ------------------------------------------------------------------------------ policies


def set_policy(session: Session, *, organisation: str, years: int | None, principal: Principal) -> None:
    """Set (or with ``None`` remove) an organisation's retention term in years (audited)."""
    if not may_manage_retention(principal, organisation):
        raise AccessDenied(f"{principal.audit_name} may not set the retention policy of {organisation}")
    if not organisation:
        raise LifecycleError("an organisation code is required")
    if years is not None and not 1 <= years <= 200:
        raise LifecycleError("the retention term must be between 1 and 200 years")
    policy = session.scalar(select(RetentionPolicy).where(RetentionPolicy.organisation_code == organisation))
    if years is None:
        if policy is not None:
            session.delete(policy)
    elif policy is None:
        session.add(
            RetentionPolicy(
                organisation_code=organisation,
                years=years,
                updated_by=principal.audit_name[:128],
                updated_at=utcnow(),
            )
        )
    else:
        policy.years, policy.updated_by, policy.updated_at = years, principal.audit_name[:128], utcnow()
    audit.record(
        session,
        action="retention.policy",
        principal=principal,
        detail={"organisation": organisation, "years": years},
    )


def policies(session: Session) -> dict[str, int]:
    """Each organisation's retention term (organisations not listed follow the law's 20 years)."""
    rows = session.execute(select(RetentionPolicy.organisation_code, RetentionPolicy.years))
    return {code: years for code, years in rows}


# ------------------------------------------------------------------------------ deaths


def record_death(
    session: Session,
    *,
    local_id: str,
    authority: patients.AuthorityRef,
    death_date: str,
    principal: Principal,
) -> PatientIdentity:
    """Record that a patient died on ``death_date`` (YYYYMMDD; empty to undo a mistake), audited."""
    if not may_manage_identities(principal):
        raise AccessDenied(f"{principal.audit_name} may not change patient identities")
    if death_date and parse_da(death_date) is None:
        raise LifecycleError("the date of death must be YYYYMMDD")
    identity = patients.get_identity(session, local_id=local_id, authority=authority)
    if identity is None:
        raise LifecycleError(f"unknown patient identifier in authority {authority.label}")
    identity.death_date = death_date.replace("-", "")[:8]
    identity.updated_at = utcnow()
    audit.record(
        session,
        action="patient.death",
        principal=principal,
        patient_id=identity.local_id,
        patient_issuer=authority.label[:64],
        detail={"recorded": bool(death_date)},
    )
    return identity


# ------------------------------------------------------------------------------ a study's date


@dataclass(frozen=True)
class StudyRetention:
    """A study's retention: the organisations holding it, the date and rule deciding it."""

    study_uid: str
    organisations: tuple[str, ...]
    last_visit: date
    until: date
    rule: str


def _day(study_date: str, created_at: datetime) -> date:
    return parse_da(study_date) or created_at.date()


def _person_facts(session: Session, study_pk: int) -> tuple[int | None, date | None, date | None]:
    """(person id, birth date, death date) of a study's patient, over every linked identity."""
    person = patients.study_person(session, study_pk)
    if person is None:
        return None, None, None
    births: list[date] = []
    deaths: list[date] = []
    for identity in patients.person_identities(session, person):
        if (born := parse_da(identity.birth_date)) is not None:
            births.append(born)
        if (died := parse_da(identity.death_date)) is not None:
            deaths.append(died)
    # The earliest birth date keeps the record longest; any recorded death counts.
    return person, min(births, default=None), min(deaths, default=None)


def study_retention(session: Session, study_uid: str) -> StudyRetention | None:
    """The retention of an archived study (None when there is no such study)."""
    row = session.execute(
        select(Study.id, Study.study_date, Study.created_at, Study.patient_pk, Patient.birth_date)
        .join(Patient, Patient.id == Study.patient_pk)
        .where(Study.study_uid == study_uid)
    ).first()
    if row is None:
        return None
    study_pk, study_date, created_at, patient_pk, dicom_birth = row
    person, birth, death = _person_facts(session, study_pk)
    birth = birth or parse_da(dicom_birth)
    if person is not None:
        same_person = (
            select(StudyIdentity.study_pk)
            .join(PatientIdentity, PatientIdentity.id == StudyIdentity.identity_id)
            .where(PatientIdentity.person_id == person)
        )
        siblings = select(Study.id).where(or_(Study.id.in_(same_person), Study.patient_pk == patient_pk))
    else:
        siblings = select(Study.id).where(Study.patient_pk == patient_pk)
    organisations = tuple(
        sorted(
            session.scalars(
                select(StudyOrganisation.organisation_code).where(StudyOrganisation.study_pk == study_pk)
            )
        )
    )
    terms = policies(session)
    best: tuple[date, date, str] | None = None
    for organisation in organisations or ("",):
        visits = select(Study.study_date, Study.created_at).where(Study.id.in_(siblings))
        if organisation:
            visits = visits.where(
                Study.id.in_(
                    select(StudyOrganisation.study_pk).where(
                        StudyOrganisation.organisation_code == organisation
                    )
                )
            )
        last_visit = max([_day(d, c) for d, c in session.execute(visits)] + [_day(study_date, created_at)])
        term = retention_term(last_visit, birth_date=birth, death_date=death, years=terms.get(organisation))
        if best is None or term.until > best[1]:
            best = (last_visit, term.until, term.rule)
    assert best is not None
    return StudyRetention(study_uid, organisations, best[0], best[1], best[2])


# ------------------------------------------------------------------------------ legal holds


def _study_organisations(session: Session, study_uid: str) -> list[str] | None:
    holders = archive.study_holders(session, study_uid)
    return None if holders is None else holders[1]


def _patient_organisations(session: Session, identity: PatientIdentity) -> list[str]:
    """The organisations whose records a patient hold concerns: the one assigning the identifier,
    and those holding a study of the identity's person."""
    owner = session.scalar(
        select(AssigningAuthority.organisation_code).where(AssigningAuthority.id == identity.authority_id)
    )
    person = patients.effective_identity(session, identity).person_id
    holding = session.scalars(
        select(StudyOrganisation.organisation_code)
        .distinct()
        .where(StudyOrganisation.study_pk.in_(patients.person_study_pks(session, person)))
    )
    return sorted({*holding, *([owner] if owner else [])})


def _may_hold_study(principal: Principal, organisations: Iterable[str]) -> bool:
    return may_manage_retention(principal) or any(may_manage_retention(principal, o) for o in organisations)


def _hold_organisations(session: Session, hold: LegalHold) -> list[str]:
    """The organisations whose records ``hold`` concerns (their administrators may see and lift it)."""
    if hold.target == HOLD_STUDY:
        return _study_organisations(session, hold.study_uid) or []
    identity = session.get(PatientIdentity, hold.identity_id)
    return _patient_organisations(session, identity) if identity is not None else []


def add_hold(
    session: Session,
    *,
    reason: str,
    principal: Principal,
    study_uid: str = "",
    patient_id: str = "",
    authority: patients.AuthorityRef | None = None,
) -> LegalHold:
    """Place a legal hold on a study, or on a patient identity (all the studies of its person),
    with the litigation it is for as ``reason`` (audited)."""
    if not reason.strip():
        raise LifecycleError("a legal hold needs a reason (the litigation it is for)")
    if bool(study_uid) == bool(patient_id):
        raise LifecycleError("hold either a study or a patient")
    if study_uid:
        organisations = _study_organisations(session, study_uid)
        if organisations is None:
            raise LifecycleError(f"no study {study_uid}")
        if not _may_hold_study(principal, organisations):
            raise AccessDenied(f"{principal.audit_name} may not hold study {study_uid}")
        hold = LegalHold(target=HOLD_STUDY, study_uid=study_uid)
        patient_ref = ("", "")
    else:
        assert authority is not None
        identity = patients.get_identity(session, local_id=patient_id, authority=authority)
        if identity is None:
            raise LifecycleError(f"unknown patient identifier in authority {authority.label}")
        if not _may_hold_study(principal, _patient_organisations(session, identity)):
            raise AccessDenied(f"{principal.audit_name} may not hold this patient's records")
        hold = LegalHold(target=HOLD_PATIENT, identity_id=identity.id)
        patient_ref = (identity.local_id, authority.label)
    hold.reason = reason.strip()[:500]
    hold.created_by = principal.audit_name[:128]
    hold.created_at = utcnow()
    session.add(hold)
    session.flush()
    audit.record(
        session,
        action="retention.hold",
        principal=principal,
        study_uid=study_uid,
        patient_id=patient_ref[0][:64],
        patient_issuer=patient_ref[1][:64],
        detail={"hold": hold.id, "target": hold.target},
    )
    return hold


def remove_hold(session: Session, hold_id: int, *, reason: str, principal: Principal) -> LegalHold:
    """Lift a legal hold (the litigation ended), audited; the hold stays listed as released."""
    hold = session.get(LegalHold, hold_id)
    if hold is None or hold.released_at is not None:
        raise LifecycleError(f"no active legal hold {hold_id}")
    if not _may_hold_study(principal, _hold_organisations(session, hold)):
        raise AccessDenied(f"{principal.audit_name} may not lift legal hold {hold_id}")
    hold.released_at = utcnow()
    hold.released_by = principal.audit_name[:128]
    hold.release_reason = reason.strip()[:500]
    audit.record(
        session,
        action="retention.hold-release",
        principal=principal,
        study_uid=hold.study_uid,
        detail={"hold": hold.id, "target": hold.target},
    )
    return hold


@dataclass(frozen=True)
class HoldView:
    """A legal hold as listed: what it holds (study UID, or patient id and authority)."""

    id: int
    target: str
    study_uid: str
    patient: str
    reason: str
    created_by: str
    created_at: datetime
    released_at: datetime | None


def list_holds(session: Session, principal: Principal, *, include_released: bool = False) -> list[HoldView]:
    """The legal holds ``principal`` may manage, newest first: every hold for regional
    administrators and the platform, a site administrator's those concerning the site's records
    (the rule that lets them place and lift holds)."""
    query = select(LegalHold).order_by(LegalHold.id.desc())
    if not include_released:
        query = query.where(LegalHold.released_at.is_(None))
    regional = may_manage_retention(principal)
    views = []
    for hold in session.scalars(query):
        if not regional and not _may_hold_study(principal, _hold_organisations(session, hold)):
            continue
        patient = ""
        if hold.identity_id is not None:
            identity = session.get(PatientIdentity, hold.identity_id)
            authority = (
                session.get(AssigningAuthority, identity.authority_id) if identity is not None else None
            )
            if identity is not None and authority is not None:
                patient = f"{identity.local_id} ({patients.authority_label(authority)})"
        views.append(
            HoldView(
                hold.id,
                hold.target,
                hold.study_uid,
                patient,
                hold.reason,
                hold.created_by,
                hold.created_at,
                hold.released_at,
            )
        )
    return views


@dataclass(frozen=True)
class _ActiveHolds:
    studies: frozenset[str]
    persons: frozenset[int]


def _active_holds(session: Session) -> _ActiveHolds:
    studies: set[str] = set()
    persons: set[int] = set()
    for hold in session.scalars(select(LegalHold).where(LegalHold.released_at.is_(None))):
        if hold.target == HOLD_STUDY:
            studies.add(hold.study_uid)
        elif hold.identity_id is not None:
            identity = session.get(PatientIdentity, hold.identity_id)
            if identity is not None:
                persons.add(patients.effective_identity(session, identity).person_id)
    return _ActiveHolds(frozenset(studies), frozenset(persons))


def _held(session: Session, holds: _ActiveHolds, study_uid: str) -> bool:
    if study_uid in holds.studies:
        return True
    if not holds.persons:
        return False
    study_pk = session.scalar(select(Study.id).where(Study.study_uid == study_uid))
    return study_pk is not None and patients.study_person(session, study_pk) in holds.persons


def is_held(session: Session, study_uid: str) -> bool:
    """Whether an active legal hold covers the study (itself, or its patient's person)."""
    return _held(session, _active_holds(session), study_uid)


# ------------------------------------------------------------------------------ review and approval


def _in_open_batches(session: Session) -> set[str]:
    """Studies with an item not yet executed in a proposed or approved batch."""
    return set(
        session.scalars(
            select(DeletionItem.study_uid)
            .join(DeletionBatch, DeletionBatch.id == DeletionItem.batch_id)
            .where(
                DeletionBatch.state.in_((BATCH_PROPOSED, BATCH_APPROVED)),
                DeletionItem.state.in_((ITEM_PENDING, ITEM_PURGING)),
            )
        )
    )


def _scope(organisation: str) -> Any:
    """The studies a review covers: an organisation's own (held by it alone), or every study."""
    query = select(Study.study_uid, Study.study_date)
    if organisation:
        holders = (
            select(StudyOrganisation.study_pk)
            .group_by(StudyOrganisation.study_pk)
            .having(func.count() == 1)
            .having(func.max(StudyOrganisation.organisation_code) == organisation)
        )
        query = query.where(Study.id.in_(holders))
    return query


def review(
    session: Session, *, principal: Principal, today: date, organisation: str = ""
) -> DeletionBatch | None:
    """Propose for deletion, as a batch to approve, the studies whose retention date is before
    ``today`` and that no legal hold covers, with the instances rejected as "Data Retention Policy
    Expired" (IOCM 113039) of the other studies. ``organisation`` limits the review to the studies
    it alone holds (its site administrators approve those); without it every study is reviewed
    (regional administrators). None when nothing is due. Audited."""
    if not may_manage_retention(principal, organisation):
        raise AccessDenied(
            f"{principal.audit_name} may not review the records of {organisation or 'the region'}"
        )
    terms = policies(session)
    # Nothing can expire sooner than 10 years after the last visit (the death rule) or than the
    # shortest organisation term: older study dates only (and undated studies) are candidates.
    shortest = min([AFTER_DEATH_YEARS, *terms.values()])
    cutoff = add_years(today, -shortest).strftime("%Y%m%d")
    busy = _in_open_batches(session)
    holds = _active_holds(session)
    scope = _scope(organisation)
    items: list[DeletionItem] = []
    whole: set[str] = set()
    for study_uid, _study_date in session.execute(
        scope.where(or_(Study.study_date <= cutoff, Study.study_date == ""))
    ):
        if study_uid in busy or _held(session, holds, study_uid):
            continue
        retention = study_retention(session, study_uid)
        if retention is None or retention.until >= today:
            continue
        whole.add(study_uid)
        items.append(
            DeletionItem(study_uid=study_uid, scope=SCOPE_STUDY, retention_until=retention.until.isoformat())
        )
    scoped = {uid for uid, _ in session.execute(scope)} if organisation else None
    expired: dict[str, list[str]] = {}
    for study_uid, sop_uid in session.execute(
        select(RejectedInstance.study_uid, RejectedInstance.sop_uid)
        .where(RejectedInstance.reason_code == RETENTION_EXPIRED)
        .order_by(RejectedInstance.study_uid, RejectedInstance.sop_uid)
    ):
        if scoped is not None and study_uid not in scoped:
            continue
        expired.setdefault(study_uid, []).append(sop_uid)
    for study_uid, sop_uids in expired.items():
        if study_uid in whole or study_uid in busy or _held(session, holds, study_uid):
            continue
        items.append(DeletionItem(study_uid=study_uid, scope=SCOPE_REJECTED, sop_uids=sop_uids))
    if not items:
        return None
    batch = DeletionBatch(
        organisation_code=organisation,
        state=BATCH_PROPOSED,
        reviewed_on=today.isoformat(),
        created_by=principal.audit_name[:128],
        created_at=utcnow(),
    )
    session.add(batch)
    session.flush()
    for item in items:
        item.batch_id = batch.id
        item.state = ITEM_PENDING
        session.add(item)
    session.flush()
    audit.record(
        session,
        action="retention.review",
        principal=principal,
        detail={
            "batch": batch.id,
            "organisation": organisation,
            "items": len(items),
            "reviewed_on": batch.reviewed_on,
        },
    )
    return batch


def _batch_or_raise(session: Session, batch_id: int) -> DeletionBatch:
    batch = session.get(DeletionBatch, batch_id)
    if batch is None:
        raise LifecycleError(f"no deletion batch {batch_id}")
    return batch


def approve(session: Session, batch_id: int, *, principal: Principal) -> list[int]:
    """Approve a proposed batch: queue one deletion job per item (in this transaction), audited.
    The ids of the jobs queued."""
    batch = _batch_or_raise(session, batch_id)
    if not may_manage_retention(principal, batch.organisation_code):
        raise AccessDenied(f"{principal.audit_name} may not approve deletion batch {batch_id}")
    if batch.state != BATCH_PROPOSED:
        raise LifecycleError(f"deletion batch {batch_id} is {batch.state}: only a proposed batch is approved")
    batch.state = BATCH_APPROVED
    batch.approved_by = principal.audit_name[:128]
    batch.approved_at = utcnow()
    queued = []
    for item_id in session.scalars(
        select(DeletionItem.id).where(DeletionItem.batch_id == batch.id).order_by(DeletionItem.id)
    ):
        job_id = jobs.enqueue(
            session,
            kind=LIFECYCLE_DELETE,
            payload={"item": item_id},
            group_key=f"retention:{batch.id}",
            dedupe_key=f"{LIFECYCLE_DELETE}:{item_id}",
        )
        if job_id is not None:
            queued.append(job_id)
    audit.record(
        session,
        action="retention.approve",
        principal=principal,
        detail={"batch": batch.id, "organisation": batch.organisation_code, "jobs": len(queued)},
    )
    return queued


def cancel(session: Session, batch_id: int, *, principal: Principal) -> DeletionBatch:
    """Reject a proposed batch (nothing is deleted; its studies return to the next review), audited."""
    batch = _batch_or_raise(session, batch_id)
    if not may_manage_retention(principal, batch.organisation_code):
        raise AccessDenied(f"{principal.audit_name} may not cancel deletion batch {batch_id}")
    if batch.state != BATCH_PROPOSED:
        raise LifecycleError(
            f"deletion batch {batch_id} is {batch.state}: only a proposed batch is cancelled"
        )
    batch.state = BATCH_CANCELLED
    audit.record(session, action="retention.cancel", principal=principal, detail={"batch": batch.id})
    return batch


@dataclass(frozen=True)
class BatchSummary:
    """A batch and how many of its items are in each state."""

    id: int
    organisation_code: str
    state: str
    reviewed_on: str
    created_by: str
    approved_by: str
    items: Mapping[str, int]


def _summary(session: Session, batch: DeletionBatch) -> BatchSummary:
    counts = {
        state: int(n)
        for state, n in session.execute(
            select(DeletionItem.state, func.count())
            .where(DeletionItem.batch_id == batch.id)
            .group_by(DeletionItem.state)
        )
    }
    return BatchSummary(
        batch.id,
        batch.organisation_code,
        batch.state,
        batch.reviewed_on,
        batch.created_by,
        batch.approved_by,
        counts,
    )


def list_batches(
    session: Session, *, principal: Principal, organisation: str | None = None
) -> list[BatchSummary]:
    """Deletion batches ``principal`` may approve, newest first, with their items' states."""
    query = select(DeletionBatch).order_by(DeletionBatch.id.desc())
    if organisation is not None:
        query = query.where(DeletionBatch.organisation_code == organisation)
    return [
        _summary(session, batch)
        for batch in session.scalars(query)
        if may_manage_retention(principal, batch.organisation_code)
    ]


def batch_summary(session: Session, batch_id: int, *, principal: Principal) -> BatchSummary:
    """One batch with its items' states (for whoever may approve it)."""
    batch = _batch_or_raise(session, batch_id)
    if not may_manage_retention(principal, batch.organisation_code):
        raise AccessDenied(f"{principal.audit_name} may not see deletion batch {batch_id}")
    return _summary(session, batch)


def batch_items(session: Session, batch_id: int, *, principal: Principal) -> list[DeletionItem]:
    """The items of a batch, in order (for whoever may approve it)."""
    batch = _batch_or_raise(session, batch_id)
    if not may_manage_retention(principal, batch.organisation_code):
        raise AccessDenied(f"{principal.audit_name} may not see deletion batch {batch_id}")
    return list(
        session.scalars(
            select(DeletionItem).where(DeletionItem.batch_id == batch_id).order_by(DeletionItem.id)
        )
    )


@dataclass(frozen=True)
class ReviewLine:
    """One item of a deletion batch with what an administrator needs to decide on it."""

    item: DeletionItem
    patient_name: str
    patient_id: str
    study_date: str
    description: str
    modalities: str
    instances: int


def review_lines(session: Session, batch_id: int, *, principal: Principal) -> list[ReviewLine]:
    """:func:`batch_items` with each study's patient and description, for the approval page.

    Reading them is access to patient data: audited (``retention.batch.view``, one record per
    study, PS3.15 A.5.3.10 "Patient Record")."""
    items = batch_items(session, batch_id, principal=principal)
    found = {
        study.study_uid: (study, patient)
        for study, patient in session.execute(
            select(Study, Patient)
            .join(Patient, Patient.id == Study.patient_pk)
            .where(Study.study_uid.in_([item.study_uid for item in items]))
        )
    }
    lines = []
    for item in items:
        study, patient = found.get(item.study_uid, (None, None))
        lines.append(
            ReviewLine(
                item,
                patient.name if patient is not None else "",
                patient.patient_id if patient is not None else "",
                study.study_date if study is not None else "",
                study.description if study is not None else "",
                study.modalities if study is not None else "",
                len(item.sop_uids) if item.scope == SCOPE_REJECTED else (study.num_instances if study else 0),
            )
        )
        if patient is not None:
            audit.record(
                session,
                action="retention.batch.view",
                principal=principal,
                study_uid=item.study_uid,
                patient_id=patient.patient_id,
                patient_issuer=patient.issuer,
                detail={"batch": batch_id, "item": item.id},
            )
    return lines


# ------------------------------------------------------------------------------ execution (jobs)


def _refuse(session: Session, item: DeletionItem, batch: DeletionBatch, reason: str) -> str:
    item.state, item.detail, item.done_at = ITEM_REFUSED, reason, utcnow()
    audit.record(
        session,
        action="study.delete",
        principal=Principal(kind="system", name=LIFECYCLE_DELETE, archive_wide=True, via="job"),
        outcome="failure",
        study_uid=item.study_uid,
        detail={"batch": batch.id, "item": item.id, "approved_by": batch.approved_by, "refused": reason},
    )
    return ITEM_REFUSED


def execute_item(ctx: AppContext, item_id: int, *, today: date | None = None) -> str:
    """Carry out one approved deletion item; its final state (``deleted`` or ``refused``).

    Idempotent: the index rows go in one transaction that also lists the blob keys to delete
    (state ``purging``); the blobs are deleted after it committed; a retry after a crash deletes
    the listed keys again (absent ones are fine) and finishes. Refused, with an audit record, when
    a legal hold now covers the study or a later visit pushed its retention date past ``today``.
    """
    day = today or utcnow().date()
    deleter = Principal(kind="system", name=LIFECYCLE_DELETE, archive_wide=True, via="job")
    with ctx.db.unit_of_work() as session:
        item = session.get(DeletionItem, item_id)
        if item is None:
            raise LifecycleError(f"no deletion item {item_id}")
        batch = _batch_or_raise(session, item.batch_id)
        if item.state in (ITEM_DELETED, ITEM_REFUSED):
            return item.state
        series_uids: list[str] = []
        if item.state == ITEM_PENDING:
            if batch.state != BATCH_APPROVED:
                raise LifecycleError(f"deletion batch {batch.id} is {batch.state}, not approved")
            if is_held(session, item.study_uid):
                return _refuse(session, item, batch, "legal hold")
            sop_uids: list[str] | None = None
            if item.scope == SCOPE_STUDY:
                retention = study_retention(session, item.study_uid)
                if retention is not None and retention.until >= day:
                    return _refuse(session, item, batch, f"retained until {retention.until.isoformat()}")
            else:
                still = set(
                    session.scalars(
                        select(RejectedInstance.sop_uid).where(
                            RejectedInstance.study_uid == item.study_uid,
                            RejectedInstance.reason_code == RETENTION_EXPIRED,
                        )
                    )
                )
                sop_uids = [uid for uid in item.sop_uids if uid in still]
            deletion = archive.delete_instances(session, study_uid=item.study_uid, sop_uids=sop_uids)
            series_uids = deletion.series_uids
            item.state, item.blob_keys = ITEM_PURGING, deletion.blob_keys
            item.detail = f"{deletion.instances} instances" + (
                ", study removed" if deletion.study_deleted else ""
            )
            audit.record(
                session,
                action="study.delete",
                principal=deleter,
                study_uid=item.study_uid,
                patient_id=deletion.patient_id,
                patient_issuer=deletion.patient_issuer,
                detail={
                    "batch": batch.id,
                    "item": item.id,
                    "approved_by": batch.approved_by,
                    "scope": item.scope,
                    "instances": deletion.instances,
                    "retention_until": item.retention_until,
                },
            )
        keys = list(item.blob_keys)
    archive.hierarchy_cache(ctx).forget(series_uids)
    archive.delete_blobs(ctx, keys)
    with ctx.db.unit_of_work() as session:
        item = session.get(DeletionItem, item_id)
        assert item is not None
        item.state, item.blob_keys, item.done_at = ITEM_DELETED, [], utcnow()
    return ITEM_DELETED


def run_deletions(ctx: AppContext, claimed: list[ClaimedJob]) -> dict[int, str | None]:
    """Job handler of :data:`LIFECYCLE_DELETE` (one item per job)."""
    outcomes: dict[int, str | None] = {}
    for job in claimed:
        try:
            execute_item(ctx, int(job.payload["item"]))
            outcomes[job.id] = None
        except Exception as exc:
            log.warning("deletion item %s failed: %s", job.payload.get("item"), type(exc).__name__)
            outcomes[job.id] = f"{type(exc).__name__}: {exc}"
    return outcomes
