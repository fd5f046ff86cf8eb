"""Publication of a signed report (DESIGN.md §7; ANS Téléradiologie flux 5 "Compte rendu").

On signature (and on each signed addendum), :func:`enqueue_publication` queues a ``report.publish``
job in the signer's unit of work (the outbox, DESIGN.md §5). The job's handler,
:func:`publish_report`, produces:

- the CDA R2 document CR-IMG 2024.01 (CI-SIS "Volet Compte rendu d'imagerie médicale"),
- the PDF of the report,
- a DICOM Encapsulated PDF (PS3.3 A.45.1) stored into the study through the archive's one ingest
  path (so the site sees it like any other instance),
- when the request came from a RIS, an HL7 ORU^R01 carrying the CDA (CI-SIS "Volet transmission
  de documents CDA en HL7 v2") queued as an ``hl7.send`` job, retried until acknowledged,
- when the requesting site lets simral publish to the DMP on its behalf, a ``dmp.publish`` job for
  the report version and the study's KOS manifest (:mod:`simral.dmp.service`).

Everything is recorded in ``Report.published``; a retried job reuses what was already done.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from simral.access.policy import Principal
from simral.archive import service as archive
from simral.archive.models import Blob, Instance, Series, Study
from simral.audit import service as audit
from simral.context import AppContext
from simral.db.base import utcnow
from simral.dmp import service as dmp
from simral.hl7.answers import Party, Responder
from simral.hl7.client import enqueue_message
from simral.hl7.report_message import ReportMessage, build_report_message
from simral.identity import service as identity
from simral.identity.models import Organisation
from simral.jobs import service as jobs
from simral.jobs.runner import Outcomes, PermanentFailure
from simral.jobs.service import ClaimedJob
from simral.reading.cda import Organisation as CdaOrganisation
from simral.reading.cda import ReportDocument, SeriesSummary, build_cda, modality_name
from simral.reading.models import (
    PUBLICATION_DONE,
    PUBLICATION_FAILED,
    PUBLICATION_PENDING,
    REPORT_SIGNED,
    ImagingRequest,
    Report,
    RisEndpoint,
)
from simral.reading.pdf import EncapsulatedPdfIdentity, ReportPdf, dataset_bytes, encapsulated_pdf, render_pdf

log = logging.getLogger(__name__)

#: Job kind: publish ``payload["report_id"]``.
REPORT_PUBLISH = "report.publish"
#: Publication is retried for a while (the archive's storage may be briefly unavailable).
MAX_ATTEMPTS = 10


def enqueue_publication(session: Session, report: Report) -> int | None:
    """Queue the publication of the signed ``report`` in the caller's transaction and mark it
    pending; ``None`` when a publication of this version is already queued."""
    if report.id is None:
        session.flush()
    report.publication_state = PUBLICATION_PENDING
    return jobs.enqueue(
        session,
        kind=REPORT_PUBLISH,
        payload={"report_id": report.id},
        group_key=f"report:{report.id}",
        dedupe_key=f"report.publish:{report.id}",
        max_attempts=MAX_ATTEMPTS,
    )


# ------------------------------------------------------------------------------- the handler


#: Who stores the Encapsulated PDF: the platform acting for the requesting site, so the instance
#: joins the study the site already sees (``organisation`` is filled per report).
PUBLISHER_NAME = "report-publication"


@dataclass(frozen=True)
class _Gathered:
    """What the publication of one report needs, read in one read-only session."""

    report_id: int
    version: int
    document: ReportDocument
    site_code: str
    study_uid: str
    study_blob_key: str
    source: str
    already_stored: bool
    sop_instance_uid: str
    series_instance_uid: str


def encapsulated_pdf_uids(report: Report) -> tuple[str, str]:
    """SOP Instance UID of a version's Encapsulated PDF (derived from its document UID, so a retry
    stores the same instance) and Series Instance UID of the report's series (one per set), both
    UUID-derived UIDs under 2.25 (PS3.5 B.2)."""
    sop_uid = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, f"{report.document_uid}/encapsulated-pdf").int)
    series_uid = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, f"{report.set_id}/report-series").int)
    return sop_uid, series_uid


def _organisation(session: Session, code: str) -> CdaOrganisation:
    found = session.scalar(select(Organisation).where(Organisation.code == code))
    if found is None:
        return CdaOrganisation(code=code, name=code)
    sector, setting = identity.organisation_sector(found)
    return CdaOrganisation(
        code=code,
        name=found.name,
        finess=found.finess,
        siret=found.siret,
        activity_sector=sector,
        practice_setting=setting,
    )


def _exam_time(request: ImagingRequest | None, study: Study | None) -> datetime | None:
    performed = (request.complement or {}).get("performed_at") if request is not None else ""
    if performed:
        try:
            return datetime.fromisoformat(performed)
        except ValueError:
            pass
    if study is not None and len(study.study_date) == 8:
        clock = (study.study_time or "000000").split(".")[0].ljust(6, "0")[:6]
        try:
            return datetime.strptime(study.study_date + clock, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
        except ValueError:
            return None
    return None


def _gather(session: Session, report_id: int) -> _Gathered | None:
    """Read the report, its request and the stored study; ``None`` when already published."""
    report = session.get(Report, report_id)
    if report is None:
        raise PermanentFailure(f"report {report_id} no longer exists")
    if report.state != REPORT_SIGNED:
        raise PermanentFailure(f"report {report_id} is {report.state}: only a signed report is published")
    if report.publication_state == PUBLICATION_DONE:
        return None
    request = session.get(ImagingRequest, report.request_id) if report.request_id else None
    study = session.scalar(select(Study).where(Study.study_uid == report.study_uid))
    if study is None:
        raise PermanentFailure(f"the study of report {report_id} is not in the archive")
    series_rows = list(session.scalars(select(Series).where(Series.study_pk == study.id).order_by(Series.id)))
    first = session.scalar(
        select(Blob.key)
        .join(Instance, Instance.id == Blob.instance_pk)
        .join(Series, Series.id == Instance.series_pk)
        .where(Series.study_pk == study.id, Series.modality != "DOC")
        .order_by(Instance.id)
        .limit(1)
    )
    if first is None:
        raise PermanentFailure(
            f"the study of report {report_id} has no stored image to take the patient from"
        )
    previous = session.get(Report, report.previous_id) if report.previous_id else None
    sop_uid, series_uid = encapsulated_pdf_uids(report)
    already = session.scalar(select(Instance.id).where(Instance.sop_uid == sop_uid)) is not None
    complement = (request.complement if request is not None else {}) or {}
    site_code = request.site_code if request is not None else ""
    document = ReportDocument(
        document_uid=report.document_uid,
        set_id=report.set_id,
        version=report.version,
        signed_at=report.signed_at or report.updated_at,
        author_name=report.author_name or report.author,
        author_national_id=report.author_national_id,
        indications=report.indications,
        technique=report.technique,
        results=report.results,
        conclusion=report.conclusion,
        addendum=report.addendum,
        previous_document_uid=previous.document_uid if previous is not None else "",
        dose=dict(report.dose or {}),
        patient=dict(request.patient or {}) if request is not None else {},
        study_uid=report.study_uid,
        exam_at=_exam_time(request, study),
        modality=(
            complement.get("modality") or (request.modality if request is not None else "") or ""
        ).upper(),
        exam_codes=list(complement.get("exam_codes") or []),
        anatomy=list(complement.get("anatomy") or (request.anatomy if request is not None else []) or []),
        requested_procedure=str(complement.get("requested_procedure") or ""),
        placer_number=request.placer_number if request is not None else "",
        placer_authority=request.placer_authority if request is not None else "",
        accession_number=(request.accession_number if request is not None else "") or study.accession_number,
        accession_authority=request.accession_authority if request is not None else "",
        series=[
            SeriesSummary(s.series_uid, s.modality, s.description, s.num_instances)
            for s in series_rows
            if s.modality != "DOC"
        ],
        group=_organisation(session, report.organisation_code or (request.group_code if request else "")),
        site=_organisation(session, site_code),
        exam_title=study.description,
        pregnancy=request.pregnancy if request is not None else "",
    )
    return _Gathered(
        report_id=report.id,
        version=report.version,
        document=document,
        site_code=site_code,
        study_uid=report.study_uid,
        study_blob_key=first,
        source=request.source if request is not None else "",
        already_stored=already,
        sop_instance_uid=sop_uid,
        series_instance_uid=series_uid,
    )


def _pdf_content(doc: ReportDocument) -> ReportPdf:
    patient = doc.patient
    names = " ".join(
        part
        for part in (str(patient.get("birth_name", "")).upper(), patient.get("first_birth_given_name", ""))
        if part
    )
    used = f" (nom utilisé {patient['used_name']})" if patient.get("used_name") else ""
    birth = str(patient.get("birth_date", ""))
    birth_text = f", né(e) le {birth[6:8]}/{birth[4:6]}/{birth[:4]}" if len(birth) >= 8 else ""
    exam_date = (doc.exam_at or doc.signed_at).strftime("%d/%m/%Y")
    sections = []
    if doc.addendum:
        sections.append((f"Addendum (version {doc.version})", doc.addendum))
    sections += [
        ("Indications", doc.indications),
        ("Technique", doc.technique),
        ("Résultats", doc.results),
        ("Conclusion", doc.conclusion),
    ]
    signer = doc.author_name + (
        f" (RPPS {doc.author_national_id[1:]})" if doc.author_national_id.startswith("8") else ""
    )
    return ReportPdf(
        title="Compte rendu d'imagerie médicale" + (f" - {doc.exam_title}" if doc.exam_title else ""),
        organisation=doc.group.name,
        patient_line=f"Patient : {names}{used}{birth_text}",
        exam_line=(
            f"Examen du {exam_date} - {modality_name(doc.modality) if doc.modality else 'imagerie'}"
            + (f" - demande {doc.placer_number}" if doc.placer_number else "")
            + (f" - n° d'examen {doc.accession_number}" if doc.accession_number else "")
        ),
        author_line=f"Signé le {doc.signed_at.astimezone(UTC).strftime('%d/%m/%Y %H:%M')} UTC par {signer}",
        sections=sections,
        footer=(
            f"Document {doc.document_uid}, version {doc.version}. Établissement demandeur : {doc.site.name}."
        ),
    )


def _store_encapsulated_pdf(ctx: AppContext, gathered: _Gathered, pdf: bytes) -> str:
    """Build the Encapsulated PDF in the study and archive it through the ingest path; the ingest
    outcome (``stored``, or ``existing`` when a previous try stored it already)."""
    if gathered.already_stored:
        return "existing"
    with archive.open_blob(ctx, gathered.study_blob_key) as stream:
        study_header = dcmread(stream, stop_before_pixels=True)
    document = gathered.document
    dataset = encapsulated_pdf(
        pdf,
        study_header,
        EncapsulatedPdfIdentity(
            sop_instance_uid=gathered.sop_instance_uid,
            series_instance_uid=gathered.series_instance_uid,
            document_title=f"Compte rendu d'imagerie médicale v{document.version}",
            created=document.signed_at,
            instance_number=document.version,
        ),
    )
    scratch = ctx.store.scratch_dir()
    fd, name = tempfile.mkstemp(prefix="report-", suffix=".dcm", dir=scratch)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(dataset_bytes(dataset))
        publisher = Principal(
            kind="system",
            name=PUBLISHER_NAME,
            organisation=gathered.site_code,
            archive_wide=True,
            via="job",
        )
        result = archive.ingest_file(
            ctx,
            path,
            principal=publisher,
            source=PUBLISHER_NAME,
            move=True,
            expected_sop_uid=gathered.sop_instance_uid,
            expected_study_uid=gathered.study_uid,
        )
    finally:
        path.unlink(missing_ok=True)
    if result.outcome in ("stored", "duplicate", "replaced"):
        return result.outcome
    raise RuntimeError(f"the Encapsulated PDF was not archived: {result.outcome} {result.reason}")


def _queue_oru(
    session: Session, report: Report, request: ImagingRequest | None, cda: bytes
) -> tuple[int | None, str, str]:
    """Queue the ORU^R01 for the RIS the request came from; (job id, control id, endpoint name),
    nothing for a portal request (the site reads the report on the portal)."""
    if request is None or not request.source.startswith("hl7:"):
        return None, "", ""
    name = request.source[4:]
    endpoint = session.scalar(select(RisEndpoint).where(RisEndpoint.name == name))
    if endpoint is None or endpoint.site_code != request.site_code:
        raise PermanentFailure(f"the RIS {name} of {request.site_code} is no longer registered")
    group = session.scalar(select(Organisation).where(Organisation.code == report.organisation_code))
    control_id = f"CR{report.id}V{report.version}"[:20]
    complement = request.complement or {}
    performed = complement.get("performed_at") or ""
    message = build_report_message(
        cda,
        ReportMessage(
            control_id=control_id,
            patient=dict(request.patient or {}),
            placer_number=request.placer_number,
            placer_authority=request.placer_authority,
            accession_number=request.accession_number,
            accession_authority=request.accession_authority,
            signed_at=report.signed_at or report.updated_at,
            exam_at=datetime.fromisoformat(performed) if performed else None,
            version=report.version,
        ),
        receiver=Party(application=endpoint.application, facility=endpoint.facility),
        platform=Party(
            application="SIMRAL",
            facility=report.organisation_code,
            name=group.name if group is not None else report.organisation_code,
            finess=group.finess if group is not None else "",
        ),
        signer=Responder(national_id=report.author_national_id, name=report.author_name or report.author),
    )
    job_id = enqueue_message(
        session, endpoint=endpoint, message=message, control_id=control_id, subject=f"report:{report.id}"
    )
    return job_id, control_id, endpoint.name


def publish_one(ctx: AppContext, report_id: int) -> None:
    """Publish one signed report version (see the module docstring); does nothing when done."""
    with ctx.db.reading() as session:
        gathered = _gather(session, report_id)
    if gathered is None:
        return
    document = gathered.document
    cda = build_cda(document)
    pdf = render_pdf(_pdf_content(document), created=document.signed_at)
    outcome = _store_encapsulated_pdf(ctx, gathered, pdf)
    with ctx.db.unit_of_work() as session:
        report = session.get(Report, report_id, with_for_update=True)
        if report is None or report.publication_state == PUBLICATION_DONE:
            return
        request = session.get(ImagingRequest, report.request_id) if report.request_id else None
        earlier = dict(report.published or {})
        if earlier.get("hl7_control_id"):  # published before (a forced re-run): the RIS has it already
            job_id, control_id, endpoint = (
                earlier.get("hl7_job"),
                earlier["hl7_control_id"],
                earlier["ris_endpoint"],
            )
            cda = str(earlier.get("cda", "")).encode("utf-8") or cda
        else:
            job_id, control_id, endpoint = _queue_oru(session, report, request, cda)
        report.published = {
            "cda": cda.decode("utf-8"),
            "cda_sha256": hashlib.sha256(cda).hexdigest(),
            "pdf_sha256": hashlib.sha256(pdf).hexdigest(),
            "pdf_size": len(pdf),
            "study_uid": gathered.study_uid,
            "series_instance_uid": gathered.series_instance_uid,
            "sop_instance_uid": gathered.sop_instance_uid,
            "ingest": outcome,
            "hl7_job": job_id,
            "hl7_control_id": control_id,
            "ris_endpoint": endpoint,
            "published_at": utcnow().isoformat(),
        }
        report.publication_state = PUBLICATION_DONE
        dmp_job = dmp.enqueue_for_report(session, report, request)
        if dmp_job is not None:
            report.published = {**report.published, "dmp_job": dmp_job}
        audit.record(
            session,
            action="report.publish",
            outcome="success",
            principal=Principal(kind="system", name=PUBLISHER_NAME, via="job"),
            study_uid=gathered.study_uid,
            detail={
                "report": report.id,
                "version": report.version,
                "sop_instance_uid": gathered.sop_instance_uid,
            },
        )
    log.info("report %d version %d published (ORU job %s)", report_id, gathered.version, job_id)


def publish_report(ctx: AppContext, batch: list[ClaimedJob]) -> Outcomes:
    """Job handler of :data:`REPORT_PUBLISH`: each report of the batch on its own."""
    outcomes: dict[int, str | PermanentFailure | None] = {}
    for job in batch:
        try:
            publish_one(ctx, int(job.payload["report_id"]))
            outcomes[job.id] = None
        except PermanentFailure as exc:
            outcomes[job.id] = exc
            _mark_failed(ctx, int(job.payload["report_id"]))
        except Exception as exc:
            outcomes[job.id] = f"{type(exc).__name__}: {exc}"
            if job.attempts >= job.max_attempts:
                _mark_failed(ctx, int(job.payload["report_id"]))
    return outcomes


def _mark_failed(ctx: AppContext, report_id: int) -> None:
    with ctx.db.unit_of_work() as session:
        report = session.get(Report, report_id)
        if report is not None and report.publication_state != PUBLICATION_DONE:
            report.publication_state = PUBLICATION_FAILED
