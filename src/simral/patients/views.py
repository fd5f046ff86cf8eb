"""Read-only views of the master patient index for the portal's identity-vigilance pages.

Plain values (no ORM objects) so that a page can be rendered after its session closed:

- :func:`identity_summaries` — identities with their authority and organisation, for showing two
  identities side by side in a vigilance case or listing a person's linked identities;
- :func:`recent_changes` — the latest merges, links, unlinks and changes of identifier;
- :func:`open_case_counts` — how many open cases of each kind (the worklist's filter);
- :func:`visible_person_studies` — the studies of a person's identities that a principal may see,
  through :func:`simral.access.policy.visible_studies` (never a study the policy hides).

Nothing here writes; the operations and their audit records are in :mod:`simral.patients.service`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from simral.access.policy import Principal, visible_studies
from simral.archive.models import Patient, Study, StudyOrganisation
from simral.patients.models import (
    CASE_OPEN,
    AssigningAuthority,
    IdentityChange,
    PatientIdentity,
    VigilanceCase,
)
from simral.patients.service import OTHER_TRAITS, STRICT_TRAITS, person_study_pks

#: Traits shown for an identity, strict ones first (RNIV), in display order.
SHOWN_TRAITS: tuple[str, ...] = STRICT_TRAITS + OTHER_TRAITS


@dataclass(frozen=True)
class IdentitySummary:
    """One identity as a page shows it: keys, authority, traits, INS, status and state."""

    id: int
    person_id: int
    local_id: str
    #: The authority's OID, else its namespace.
    authority: str
    authority_namespace: str
    #: The organisation whose IPPs the authority assigns (empty when not known).
    organisation_code: str
    traits: dict[str, str]
    ins_matricule: str
    ins_oid: str
    status: str
    status_at: datetime | None
    status_source: str
    attributes: str
    merged_into_id: int | None
    active: bool


@dataclass(frozen=True)
class ChangeSummary:
    """One identity change, with who made it, when, and whether it was undone."""

    id: int
    kind: str
    identity_id: int
    other_identity_id: int | None
    detail: dict[str, Any]
    source: str
    actor: str
    created_at: datetime
    undone_at: datetime | None
    undone_by: str


@dataclass(frozen=True)
class PersonStudy:
    """A study of a person that the asking principal may see."""

    study_uid: str
    study_date: str
    description: str
    modalities: str
    accession_number: str
    patient_id: str
    patient_name: str
    organisations: tuple[str, ...]


def _summary(identity: PatientIdentity, authority: AssigningAuthority | None) -> IdentitySummary:
    return IdentitySummary(
        id=identity.id,
        person_id=identity.person_id,
        local_id=identity.local_id,
        authority=(authority.oid or authority.namespace) if authority is not None else "",
        authority_namespace=authority.namespace if authority is not None else "",
        organisation_code=(authority.organisation_code or "") if authority is not None else "",
        traits={name: str(getattr(identity, name) or "") for name in SHOWN_TRAITS},
        ins_matricule=identity.ins_matricule,
        ins_oid=identity.ins_oid,
        status=identity.status,
        status_at=identity.status_at,
        status_source=identity.status_source,
        attributes=identity.attributes,
        merged_into_id=identity.merged_into_id,
        active=identity.active,
    )


def identity_summaries(session: Session, identity_ids: Iterable[int]) -> dict[int, IdentitySummary]:
    """The identities with these ids (unknown ids are left out), by id."""
    wanted = sorted({int(i) for i in identity_ids})
    if not wanted:
        return {}
    rows = session.execute(
        select(PatientIdentity, AssigningAuthority)
        .join(AssigningAuthority, AssigningAuthority.id == PatientIdentity.authority_id)
        .where(PatientIdentity.id.in_(wanted))
    )
    return {identity.id: _summary(identity, authority) for identity, authority in rows}


def get_identity_summary(session: Session, identity_id: int) -> IdentitySummary | None:
    """One identity, or None when there is no such identity."""
    return identity_summaries(session, [identity_id]).get(identity_id)


def person_identity_summaries(session: Session, person_id: int) -> list[IdentitySummary]:
    """Every identity of a person (merged ones too), by id."""
    rows = session.execute(
        select(PatientIdentity, AssigningAuthority)
        .join(AssigningAuthority, AssigningAuthority.id == PatientIdentity.authority_id)
        .where(PatientIdentity.person_id == person_id)
        .order_by(PatientIdentity.id)
    )
    return [_summary(identity, authority) for identity, authority in rows]


def recent_changes(session: Session, *, limit: int = 100) -> list[ChangeSummary]:
    """The latest identity changes, newest first (undone ones too, marked so)."""
    changes = session.scalars(select(IdentityChange).order_by(IdentityChange.id.desc()).limit(limit))
    return [
        ChangeSummary(
            id=change.id,
            kind=change.kind,
            identity_id=change.identity_id,
            other_identity_id=change.other_identity_id,
            detail=dict(change.detail or {}),
            source=change.source,
            actor=change.actor,
            created_at=change.created_at,
            undone_at=change.undone_at,
            undone_by=change.undone_by,
        )
        for change in changes
    ]


def open_case_counts(session: Session) -> dict[str, int]:
    """Open vigilance cases by kind."""
    rows = session.execute(
        select(VigilanceCase.kind, func.count())
        .where(VigilanceCase.state == CASE_OPEN)
        .group_by(VigilanceCase.kind)
    )
    return {str(kind): int(count) for kind, count in rows}


def visible_person_studies(session: Session, *, principal: Principal, person_id: int) -> list[PersonStudy]:
    """The studies of every identity of the person that ``principal`` may see, newest first.

    The candidates come from :func:`simral.patients.service.person_study_pks`; the access policy
    (:func:`simral.access.policy.visible_studies`) decides which of them are returned.
    """
    pks = person_study_pks(session, person_id)
    if not pks:
        return []
    rows = list(
        session.execute(
            visible_studies(principal, select(Study, Patient).join(Patient, Patient.id == Study.patient_pk))
            .where(Study.id.in_(pks))
            .order_by(Study.study_date.desc(), Study.id.desc())
        )
    )
    holders: dict[int, list[str]] = {}
    if rows:
        for study_pk, code in session.execute(
            select(StudyOrganisation.study_pk, StudyOrganisation.organisation_code).where(
                StudyOrganisation.study_pk.in_([study.id for study, _ in rows])
            )
        ):
            holders.setdefault(int(study_pk), []).append(str(code))
    return [
        PersonStudy(
            study_uid=study.study_uid,
            study_date=study.study_date,
            description=study.description,
            modalities=study.modalities,
            accession_number=study.accession_number,
            patient_id=patient.patient_id,
            patient_name=patient.name,
            organisations=tuple(sorted(set(holders.get(study.id, [])))),
        )
        for study, patient in rows
    ]
