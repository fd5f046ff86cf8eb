"""DMP publication on an organisation's behalf (DESIGN.md §8; IHE ITI TF-2b §3.41 ITI-41, DMP TD0.2).

The first trigger is a report signed in simral (ANS Téléradiologie flux 5): once the report's own
publication (CDA, PDF, Encapsulated PDF, ORU^R01) is done, :func:`enqueue_for_report` adds, in the
same transaction, a document entry for the report version and — first time, or when the study's
images changed since the last one — one for a new KOS manifest version, then queues one
``dmp.publish`` job for both (DESIGN.md §5: durable, retried, idempotent). The second is a report
received from the site's RIS as a CDA in HL7 v2 (:mod:`simral.dmp.received`), queued the same way.
Only organisations that chose it (:class:`~simral.dmp.models.DmpOrganisation`) are published for:
the requesting site owns the report's lifecycle (DESIGN.md §7).

The job (:func:`publish_documents`) publishes only when the patient's INS is QUAL (DESIGN.md §6);
otherwise, or when TD0.2 says the patient has no DMP or access is not authorised, the documents
*wait* with a reason the site sees, and :func:`resume_waiting` queues them again once the identity
is qualified. A version that follows a published one replaces it (RPLC); a DMP that answers a
registry error or does not answer is tried again with backoff (doubling up to 30 minutes) for
:data:`MAX_ATTEMPTS` attempts.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from simral.access.policy import AccessDenied, Principal, may_manage
from simral.archive.models import Study
from simral.audit import service as audit
from simral.db.base import utcnow
from simral.dmp.models import (
    DMP_FAILED,
    DMP_PENDING,
    DMP_PUBLISHED,
    DMP_REPLACED,
    DMP_WAITING,
    KIND_MANIFEST,
    KIND_REPORT,
    SOURCE_SIMRAL,
    DmpDocument,
    DmpOrganisation,
)
from simral.identity.models import Organisation
from simral.jobs import service as jobs
from simral.patients.models import STATUS_QUAL, PatientIdentity
from simral.reading.models import ImagingRequest, Report

log = logging.getLogger(__name__)

#: Job kind: publish ``payload["documents"]`` (ids of :class:`DmpDocument`) in one submission.
DMP_PUBLISH = "dmp.publish"

#: Job kind: withdraw ``payload["document"]`` from the DMP (ITI-57), ``payload["action"]``.
DMP_WITHDRAW = "dmp.withdraw"
#: Withdrawal actions: logical deletion (availabilityStatus Deleted) or masking to professionals
#: (confidentialityCode MASQUE_PS, JDV_J08).
WITHDRAW_DELETE = "delete"
WITHDRAW_MASK = "mask"

#: Attempts of one publication (about 4 hours with the job queue's backoff) before it is failed.
MAX_ATTEMPTS = 12

#: Why a document waits (French: shown to the site on the portal).
REASON_NOT_CONFIGURED = "Publication DMP non configurée sur la plateforme (adresse ITI-41 absente)."
REASON_INS = "INS non qualifiée (statut {status}) : publication en attente de qualification de l'identité."
REASON_NO_INS = "Patient sans INS : publication en attente de l'identité nationale de santé."
#: The reasons that a qualified identity lifts.
INS_REASONS = (REASON_NO_INS, *(REASON_INS.format(status=s) for s in ("PROV", "RECUP", "VALI")))


class DmpError(ValueError):
    """A DMP configuration request that cannot be done."""


# ------------------------------------------------------------------ organisations that publish


def configure_organisation(
    session: Session,
    *,
    code: str,
    principal: Principal,
    enabled: bool = True,
    auth_cert_file: str | None = None,
    auth_key_file: str | None = None,
    signing_cert_file: str | None = None,
    signing_key_file: str | None = None,
    structure_id: str | None = None,
    activity_sector: str | None = None,
    facility_type_code: str | None = None,
    practice_setting_code: str | None = None,
) -> DmpOrganisation:
    """Let simral publish to the DMP for organisation ``code`` (or stop it: ``enabled=False``);
    ``None`` keeps a setting as it is. Audited."""
    if not may_manage(principal, code):
        raise AccessDenied(f"{principal.audit_name} may not configure DMP publication for {code}")
    if session.scalar(select(Organisation.id).where(Organisation.code == code)) is None:
        raise DmpError(f"unknown organisation {code}")
    row = session.scalar(select(DmpOrganisation).where(DmpOrganisation.organisation_code == code))
    if row is None:
        row = DmpOrganisation(organisation_code=code)
        session.add(row)
    row.enabled = enabled
    for name, value in (
        ("auth_cert_file", auth_cert_file),
        ("auth_key_file", auth_key_file),
        ("signing_cert_file", signing_cert_file),
        ("signing_key_file", signing_key_file),
        ("structure_id", structure_id),
        ("activity_sector", activity_sector),
        ("facility_type_code", facility_type_code),
        ("practice_setting_code", practice_setting_code),
    ):
        if value is not None:
            setattr(row, name, value)
    if enabled and not (
        row.auth_cert_file and row.auth_key_file and row.signing_cert_file and row.signing_key_file
    ):
        raise DmpError("publishing needs the authentication and signing certificates and keys")
    row.updated_at = utcnow()
    session.flush()
    audit.record(
        session,
        action="dmp.configure",
        principal=principal,
        detail={"organisation": code, "enabled": enabled},
    )
    return row


def publishing_organisation(session: Session, code: str) -> DmpOrganisation | None:
    """The organisation's DMP settings when simral publishes on its behalf."""
    row = session.scalar(select(DmpOrganisation).where(DmpOrganisation.organisation_code == code))
    return row if row is not None and row.enabled else None


# ---------------------------------------------------------------------------------- the trigger


def new_entry_uuid() -> str:
    """A fresh XDSDocumentEntry.entryUUID (``urn:uuid:…``), chosen before the first try."""
    return f"urn:uuid:{uuid.uuid4()}"


def _study_fingerprint(session: Session, study_uid: str) -> tuple[int, str]:
    """The images a manifest lists (:func:`simral.dmp.manifest.study_references`): (count, SHA-1
    of their sorted SOP Instance UIDs)."""
    from simral.dmp.manifest import study_references

    uids = sorted(uid for sops in study_references(session, study_uid).values() for uid in sops)
    return len(uids), hashlib.sha1("\n".join(uids).encode()).hexdigest()


def _latest(
    session: Session, organisation: str, kind: str, study_uid: str, *, set_id: str = ""
) -> DmpDocument | None:
    query = select(DmpDocument).where(
        DmpDocument.organisation_code == organisation,
        DmpDocument.kind == kind,
        DmpDocument.study_uid == study_uid,
    )
    if set_id:
        query = query.join(Report, Report.id == DmpDocument.report_id).where(Report.set_id == set_id)
    return session.scalar(query.order_by(DmpDocument.version.desc(), DmpDocument.id.desc()).limit(1))


def enqueue_for_report(session: Session, report: Report, request: ImagingRequest | None) -> int | None:
    """Queue the DMP publication of a signed report version (and of a new manifest when the study's
    images changed) in the caller's transaction; ``None`` when the site does not publish through
    simral or this version is already queued."""
    if request is None:
        return None
    organisation = publishing_organisation(session, request.site_code)
    if organisation is None:
        return None
    code = organisation.organisation_code
    if session.scalar(
        select(DmpDocument.id).where(
            DmpDocument.organisation_code == code, DmpDocument.unique_id == report.document_uid
        )
    ):
        return None
    documents: list[DmpDocument] = []
    previous = _latest(session, code, KIND_REPORT, report.study_uid, set_id=report.set_id)
    documents.append(
        DmpDocument(
            organisation_code=code,
            kind=KIND_REPORT,
            study_uid=report.study_uid,
            report_id=report.id,
            request_id=request.id,
            version=report.version,
            unique_id=report.document_uid,
            entry_uuid=new_entry_uuid(),
            replaces_id=previous.id if previous is not None else None,
            state=DMP_PENDING,
        )
    )
    manifest = manifest_document(session, code, report.study_uid, request_id=request.id)
    if manifest is not None:
        documents.append(manifest)
    session.add_all(documents)
    session.flush()
    return enqueue_documents(session, documents)


def manifest_document(
    session: Session, organisation: str, study_uid: str, *, request_id: int | None
) -> DmpDocument | None:
    """A new manifest version for the study when none was made yet or its images changed since the
    last one (new series, rejected instances: DESIGN.md §8 "image changes → new KOS replaces old")."""
    from simral.dmp.manifest import manifest_uids

    count, fingerprint = _study_fingerprint(session, study_uid)
    if count == 0:
        return None
    previous = _latest(session, organisation, KIND_MANIFEST, study_uid)
    if previous is not None and previous.sha1 == fingerprint:
        return None
    version = (previous.version + 1) if previous is not None else 1
    sop_uid, _series_uid = manifest_uids(study_uid, version)
    return DmpDocument(
        organisation_code=organisation,
        kind=KIND_MANIFEST,
        study_uid=study_uid,
        request_id=request_id,
        version=version,
        unique_id=sop_uid,
        entry_uuid=new_entry_uuid(),
        replaces_id=previous.id if previous is not None else None,
        state=DMP_PENDING,
        # The images this version lists (what "changed" is measured against); the submitted
        # document's own hash is kept in the publication record.
        sha1=fingerprint,
    )


def _stale_manifests() -> Any:
    """The latest published manifest of each (organisation, study) whose study received instances
    since the manifest was made or last checked (``updated_at``)."""
    latest = (
        select(
            DmpDocument.organisation_code,
            DmpDocument.study_uid,
            func.max(DmpDocument.version).label("version"),
        )
        .where(DmpDocument.kind == KIND_MANIFEST)
        .group_by(DmpDocument.organisation_code, DmpDocument.study_uid)
        .subquery()
    )
    return (
        select(DmpDocument)
        .join(
            latest,
            (latest.c.organisation_code == DmpDocument.organisation_code)
            & (latest.c.study_uid == DmpDocument.study_uid)
            & (latest.c.version == DmpDocument.version),
        )
        .join(Study, Study.study_uid == DmpDocument.study_uid)
        .where(
            DmpDocument.kind == KIND_MANIFEST,
            DmpDocument.state == DMP_PUBLISHED,
            Study.updated_at > DmpDocument.updated_at,
        )
    )


def manifests_due(session: Session, *, quiet_since: datetime) -> bool:
    """Whether a published manifest's study changed and has been quiet since ``quiet_since``."""
    query = _stale_manifests().where(Study.updated_at <= quiet_since)
    return session.scalar(query.limit(1)) is not None


def refresh_manifests(session: Session, *, quiet_since: datetime) -> int:
    """Image changes (DESIGN.md §8): for each published manifest whose study got new instances and
    has been quiet since ``quiet_since``, queue a new manifest version replacing it when the images
    it would list differ (a new series, a rejected instance); otherwise only note the check. The
    number of publications queued."""
    queued = 0
    now = utcnow()
    for published in list(session.scalars(_stale_manifests().where(Study.updated_at <= quiet_since))):
        if publishing_organisation(session, published.organisation_code) is None:
            published.updated_at = now
            continue
        replacement = manifest_document(
            session, published.organisation_code, published.study_uid, request_id=published.request_id
        )
        published.updated_at = now
        if replacement is None:
            continue
        # The same patient and exam as the version it replaces (a RIS report's manifest has no request).
        replacement.identity_id = published.identity_id
        replacement.source = published.source
        replacement.accession_number = published.accession_number
        replacement.accession_authority = published.accession_authority
        session.add(replacement)
        session.flush()
        if enqueue_documents(session, [replacement]) is not None:
            queued += 1
    return queued


def enqueue_documents(session: Session, documents: list[DmpDocument]) -> int | None:
    """Queue one ``dmp.publish`` job for these documents (one ITI-41 submission) in the caller's
    transaction; ``None`` when the same lot is already queued."""
    ids = sorted(d.id for d in documents)
    return jobs.enqueue(
        session,
        kind=DMP_PUBLISH,
        payload={"documents": ids},
        group_key=f"dmp:{documents[0].study_uid}",
        dedupe_key=f"dmp.publish:{ids[0]}",
        max_attempts=MAX_ATTEMPTS,
    )


def _resumable() -> Any:
    # The document's own identity (a report received from a RIS), else its request's.
    return (
        select(DmpDocument)
        .outerjoin(ImagingRequest, ImagingRequest.id == DmpDocument.request_id)
        .join(
            PatientIdentity,
            PatientIdentity.id == func.coalesce(DmpDocument.identity_id, ImagingRequest.identity_id),
        )
        .where(
            DmpDocument.state == DMP_WAITING,
            DmpDocument.reason.in_(INS_REASONS),
            PatientIdentity.status == STATUS_QUAL,
            PatientIdentity.ins_matricule != "",
        )
    )


def waiting_resumable(session: Session) -> bool:
    """Whether a document waiting for a qualified INS may now go (read-only look)."""
    return session.scalar(_resumable().limit(1)) is not None


def resume_waiting(session: Session) -> int:
    """Queue again the documents that wait for a qualified INS whose identity is now QUAL; the
    number of jobs queued."""
    waiting = list(session.scalars(_resumable().order_by(DmpDocument.id)))
    # One submission per patient, study and source, as they were queued.
    lots: dict[tuple[str, str, str, int | None, int | None], list[DmpDocument]] = {}
    for document in waiting:
        key = (
            document.organisation_code,
            document.study_uid,
            document.source,
            document.request_id,
            document.identity_id,
        )
        lots.setdefault(key, []).append(document)
    queued = 0
    for documents in lots.values():
        for document in documents:
            document.state = DMP_PENDING
            document.reason = ""
            document.updated_at = utcnow()
        if enqueue_documents(session, documents) is not None:
            queued += 1
    return queued


def retry(session: Session, document_id: int, *, principal: Principal) -> int | None:
    """An operator queues a failed or waiting document again (audited)."""
    document = session.get(DmpDocument, document_id)
    if document is None:
        raise DmpError(f"no DMP document {document_id}")
    if not may_manage(principal, document.organisation_code):
        raise AccessDenied(
            f"{principal.audit_name} may not retry DMP publications of {document.organisation_code}"
        )
    if document.state not in (DMP_FAILED, DMP_WAITING):
        raise DmpError(
            f"DMP document {document_id} is {document.state}: only failed or waiting ones are retried"
        )
    document.state = DMP_PENDING
    document.reason = ""
    document.updated_at = utcnow()
    audit.record(
        session,
        action="dmp.retry",
        principal=principal,
        study_uid=document.study_uid,
        detail={"document": document.id, "kind": document.kind},
    )
    return enqueue_documents(session, [document])


def request_withdrawal(
    session: Session, document_id: int, *, action: str, principal: Principal
) -> int | None:
    """The organisation withdraws a published entry from the DMP: queue the ITI-57 update (logical
    deletion or masking to professionals) in the caller's transaction; audited."""
    if action not in (WITHDRAW_DELETE, WITHDRAW_MASK):
        raise DmpError(f"unknown withdrawal {action!r} (delete or mask)")
    document = session.get(DmpDocument, document_id)
    if document is None:
        raise DmpError(f"no DMP document {document_id}")
    if not may_manage(principal, document.organisation_code):
        raise AccessDenied(
            f"{principal.audit_name} may not withdraw DMP documents of {document.organisation_code}"
        )
    if document.state != DMP_PUBLISHED:
        raise DmpError(f"DMP document {document_id} is {document.state}: only a published entry is withdrawn")
    audit.record(
        session,
        action="dmp.withdraw-request",
        principal=principal,
        study_uid=document.study_uid,
        detail={"document": document.id, "kind": document.kind, "action": action},
    )
    return jobs.enqueue(
        session,
        kind=DMP_WITHDRAW,
        payload={"document": document.id, "action": action},
        group_key=f"dmp:{document.study_uid}",
        dedupe_key=f"dmp.withdraw:{document.id}",
        max_attempts=MAX_ATTEMPTS,
    )


# ------------------------------------------------------------------------------------ the view


@dataclass(frozen=True)
class DocumentStatus:
    """Where one document's publication stands (the portal and ``simral dmp status``)."""

    id: int
    organisation_code: str
    kind: str
    study_uid: str
    report_id: int | None
    request_id: int | None
    version: int
    unique_id: str
    entry_uuid: str
    state: str
    reason: str
    replaces_entry_uuid: str
    published_at: datetime | None
    updated_at: datetime
    #: ``simral`` (a report signed here) or ``ris:<name>`` (a report received from the site's RIS).
    source: str = SOURCE_SIMRAL


def statuses(
    session: Session,
    *,
    organisation: str | None = None,
    request_id: int | None = None,
    state: str | None = None,
    limit: int | None = None,
) -> list[DocumentStatus]:
    """The document entries (newest first, at most ``limit``), optionally of one organisation,
    request or state."""
    query = select(DmpDocument).order_by(DmpDocument.id.desc()).limit(limit)
    if organisation is not None:
        query = query.where(DmpDocument.organisation_code == organisation)
    if request_id is not None:
        query = query.where(DmpDocument.request_id == request_id)
    if state is not None:
        query = query.where(DmpDocument.state == state)
    rows = list(session.scalars(query))
    replaced_ids = {row.replaces_id for row in rows if row.replaces_id is not None}
    replaced = (
        {
            d.id: d.entry_uuid
            for d in session.scalars(select(DmpDocument).where(DmpDocument.id.in_(replaced_ids)))
        }
        if replaced_ids
        else {}
    )
    return [
        DocumentStatus(
            id=row.id,
            organisation_code=row.organisation_code,
            kind=row.kind,
            study_uid=row.study_uid,
            report_id=row.report_id,
            request_id=row.request_id,
            version=row.version,
            unique_id=row.unique_id,
            entry_uuid=row.entry_uuid,
            state=row.state,
            reason=row.reason,
            replaces_entry_uuid=replaced.get(row.replaces_id, "") if row.replaces_id else "",
            published_at=row.published_at,
            updated_at=row.updated_at,
            source=row.source,
        )
        for row in rows
    ]


def counts(session: Session) -> dict[str, int]:
    """Documents per state (metrics)."""
    return dict(session.execute(select(DmpDocument.state, func.count()).group_by(DmpDocument.state)).all())  # type: ignore[arg-type]


def set_state(session: Session, ids: list[int], state: str, reason: str = "") -> None:
    """Set the state (and reason) of the documents not yet published nor replaced."""
    for document in session.scalars(select(DmpDocument).where(DmpDocument.id.in_(ids))):
        if document.state in (DMP_PUBLISHED, DMP_REPLACED):
            continue
        document.state = state
        document.reason = reason
        document.updated_at = utcnow()


def payload_ids(payload: dict[str, Any]) -> list[int]:
    """The document ids of a ``dmp.publish`` job."""
    return [int(i) for i in payload.get("documents", [])]
