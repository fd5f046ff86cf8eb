"""An organisation's DMP document entries as its members see them (DESIGN.md §8).

The request page shows the publication of one imaging request's documents; a report the site's
RIS sent without naming a request (:mod:`simral.dmp.received`) has none, so :func:`site_documents`
lists every entry of the organisation — kind, version, state and reason, dates, source, patient
and exam — from :func:`simral.dmp.service.statuses`, for the members who follow the site's exams
(:func:`~simral.access.policy.may_request_exam`). The patients shown are an access to patient
data: one ``dmp.status.view`` audit record per (patient, study) shown (PS3.15 A.5.3.10 "Patient
Record").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from simral.access.policy import AccessDenied, Principal, may_request_exam
from simral.archive.models import Study
from simral.audit import service as audit
from simral.dmp.models import DMP_STATES, DmpDocument
from simral.dmp.service import DocumentStatus, statuses
from simral.patients.models import AssigningAuthority, PatientIdentity
from simral.patients.service import authority_label
from simral.reading.models import ImagingRequest

#: Entries shown at most (newest first).
DEFAULT_LIMIT = 200


@dataclass(frozen=True)
class SiteDocument:
    """One entry with its patient and exam."""

    status: DocumentStatus
    created_at: datetime
    #: Birth name and first given name; the local identifier (IPP) and its authority.
    patient_name: str
    patient_id: str
    patient_issuer: str
    accession_number: str
    study_date: str
    study_description: str


def may_follow_dmp(principal: Principal, organisation: str) -> bool:
    """Whether ``principal`` may see ``organisation``'s DMP entries and their patients: who follows
    the site's imaging requests (its clinical members acting for it, the platform)."""
    return may_request_exam(principal, organisation)


def site_documents(
    session: Session,
    *,
    principal: Principal,
    organisation: str,
    state: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> list[SiteDocument]:
    """``organisation``'s DMP entries (newest first, at most ``limit``; one ``state`` if given) with
    their patient and exam; raises :class:`AccessDenied`. Audited (see the module text)."""
    if not may_follow_dmp(principal, organisation):
        raise AccessDenied(f"{principal.audit_name} may not see the DMP documents of {organisation}")
    if state is not None and state not in DMP_STATES:
        return []
    rows = statuses(session, organisation=organisation, state=state, limit=limit)
    if not rows:
        return []
    documents = {
        d.id: d for d in session.scalars(select(DmpDocument).where(DmpDocument.id.in_([r.id for r in rows])))
    }
    request_ids = {d.request_id for d in documents.values() if d.request_id is not None}
    requests = (
        {r.id: r for r in session.scalars(select(ImagingRequest).where(ImagingRequest.id.in_(request_ids)))}
        if request_ids
        else {}
    )

    def identity_id(document: DmpDocument) -> int | None:
        if document.identity_id is not None:
            return document.identity_id
        request = requests.get(document.request_id) if document.request_id is not None else None
        return request.identity_id if request is not None else None

    identity_ids = {i for d in documents.values() if (i := identity_id(d)) is not None}
    identities = (
        {
            identity.id: (identity, authority)
            for identity, authority in session.execute(
                select(PatientIdentity, AssigningAuthority)
                .join(AssigningAuthority, AssigningAuthority.id == PatientIdentity.authority_id)
                .where(PatientIdentity.id.in_(identity_ids))
            )
        }
        if identity_ids
        else {}
    )
    studies = {
        study.study_uid: study
        for study in session.scalars(select(Study).where(Study.study_uid.in_({r.study_uid for r in rows})))
    }
    listed: list[SiteDocument] = []
    seen: set[tuple[str, str, str]] = set()
    for row in rows:
        document = documents[row.id]
        request = requests.get(document.request_id) if document.request_id is not None else None
        identity, authority = identities.get(identity_id(document) or 0, (None, None))
        study = studies.get(row.study_uid)
        issuer = authority_label(authority) if authority is not None else ""
        listed.append(
            SiteDocument(
                status=row,
                created_at=document.created_at,
                patient_name=(
                    " ".join(p for p in (identity.birth_name, identity.first_birth_given_name) if p)
                    if identity is not None
                    else ""
                ),
                patient_id=identity.local_id if identity is not None else "",
                patient_issuer=issuer,
                accession_number=document.accession_number
                or (request.accession_number if request is not None else "")
                or (study.accession_number if study is not None else ""),
                study_date=study.study_date if study is not None else "",
                study_description=study.description if study is not None else "",
            )
        )
        key = (row.study_uid, listed[-1].patient_id, issuer)
        if key not in seen:
            seen.add(key)
            audit.record(
                session,
                action="dmp.status.view",
                principal=principal,
                study_uid=row.study_uid,
                patient_id=listed[-1].patient_id,
                patient_issuer=issuer,
                detail={"organisation": organisation},
            )
    return listed
