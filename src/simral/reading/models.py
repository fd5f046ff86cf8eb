"""Teleradiology (DESIGN.md §7; ANS "Volet Téléradiologie" flows 1–5, IHE RAD Scheduled Workflow).

- :class:`ReadingContract` — a proximity site has its images read by a teleradiology group
  (optionally only some modalities): requests and reading tasks are routed by contract.
- :class:`RisEndpoint` — a site's RIS as an HL7 receiver (answers and reports go back to it).
- :class:`ImagingRequest` — a request for an imaging exam (flux 1 TransmissionDemandeIMG, from the
  site's RIS over HL7 or from the portal form), its answer (flux 3: accepted with an imaging
  protocol, or refused with a reason), its cancellation (flux 2) and the post-exam complement
  (flux 4: accession number, Study Instance UID, exam codes, equipment, administered products).
- :class:`ScheduledProcedure` — an accepted request as a Scheduled Procedure Step served by the
  Modality Worklist (PS3.4 K.6.1.2) to the site's modalities.
- :class:`PerformedProcedureStep` — a Modality Performed Procedure Step (PS3.4 F.7, N-CREATE /
  N-SET) as the modality reported it.
- :class:`ReadingTask` — a study to interpret by a reading group, with its priority, deadline,
  readiness, and the radiologist who claimed it (exclusively).
- :class:`Report` — the radiologist's report (ANS flux 5 "Compte rendu"): French structure
  (Indications, Technique, Résultats, Conclusion), draft then signed; an addendum is a new version
  of the same document (CDA setId kept, versionNumber + 1); what publication produced (CDA CR-IMG,
  PDF, DICOM Encapsulated PDF, ORU^R01) is recorded on it.
- :class:`SecondOpinion` — a request for another radiologist's opinion (télé-expertise) on a task.
- :class:`OnCallShift` — the on-call schedule ("tableau de garde") of a teleradiology group: who
  reads (and is alerted) when, optionally for one subspecialty (:mod:`simral.reading.routing`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from simral.db.base import Base, utcnow

#: Request states, in the order a request normally goes through them.
REQUEST_RECEIVED = "received"  # waiting for a radiologist's answer
REQUEST_ACCEPTED = "accepted"  # answered with an imaging protocol, scheduled
REQUEST_REFUSED = "refused"  # answered with a refusal reason
REQUEST_CANCELLED = "cancelled"  # cancelled by the site (flux 2) before the exam
REQUEST_PERFORMED = "performed"  # the post-exam complement (flux 4) arrived
REQUEST_REPORTED = "reported"  # a signed report went back
REQUEST_STATES = (
    REQUEST_RECEIVED,
    REQUEST_ACCEPTED,
    REQUEST_REFUSED,
    REQUEST_CANCELLED,
    REQUEST_PERFORMED,
    REQUEST_REPORTED,
)

PRIORITY_ROUTINE = "routine"
PRIORITY_URGENT = "urgent"
PRIORITIES = (PRIORITY_URGENT, PRIORITY_ROUTINE)

#: Scheduled Procedure Step Status (PS3.3 C.4.10, 0040,0020) and MPPS status (0040,0252).
STEP_SCHEDULED = "SCHEDULED"
STEP_IN_PROGRESS = "IN PROGRESS"
STEP_COMPLETED = "COMPLETED"
STEP_DISCONTINUED = "DISCONTINUED"

#: Reading task states.
TASK_WAITING = "waiting"  # images expected or still arriving
TASK_READY = "ready"  # images complete: on the reading group's worklist
TASK_CLAIMED = "claimed"  # a radiologist holds it (exclusive)
TASK_REPORTED = "reported"  # a signed report exists
TASK_CANCELLED = "cancelled"
TASK_STATES = (TASK_WAITING, TASK_READY, TASK_CLAIMED, TASK_REPORTED, TASK_CANCELLED)


class ReadingContract(Base):
    """A site's images are read by a teleradiology group (for ``modalities``, or all when empty)."""

    __tablename__ = "reading_contract"
    __table_args__ = (UniqueConstraint("site_code", "group_code", name="uq_reading_contract_site_group"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: The proximity site (organisation code) whose exams are read.
    site_code: Mapped[str] = mapped_column(String(32), index=True)
    #: The reading organisation (kind ``teleradiology-group``).
    group_code: Mapped[str] = mapped_column(String(32), index=True)
    #: Modalities covered, backslash-separated (DICOM CS values); empty: every modality.
    modalities: Mapped[str] = mapped_column(String(128), default="")
    #: Subspecialties covered, backslash-separated (:data:`simral.reading.routing.SUBSPECIALTIES`
    #: codes); empty: every exam, whatever its subspecialty.
    subspecialties: Mapped[str] = mapped_column(String(256), default="")
    #: Turnaround deadlines in minutes, by priority.
    urgent_minutes: Mapped[int] = mapped_column(Integer, default=60)
    routine_minutes: Mapped[int] = mapped_column(Integer, default=24 * 60)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RisEndpoint(Base):
    """A site's RIS as an HL7 v2 receiver (MLLP): where answers (flux 3) and reports (flux 5) go."""

    __tablename__ = "ris_endpoint"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    site_code: Mapped[str] = mapped_column(String(32), index=True)
    #: Its MSH-3 / MSH-4 (sending application and facility): messages from it are the site's.
    application: Mapped[str] = mapped_column(String(200), default="")
    facility: Mapped[str] = mapped_column(String(200), default="")
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Messages naming this RIS (MSH-3/MSH-4) are refused unless they come from ``host``.
    check_host: Mapped[bool] = mapped_column(Boolean, default=False)
    #: ... or unless the MLLP TLS connection presented a verified certificate of this subject CN.
    tls_subject: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ImagingRequest(Base):
    """A request for an imaging exam to be interpreted remotely (ANS flux 1 to 4)."""

    __tablename__ = "imaging_request"
    __table_args__ = (
        UniqueConstraint("site_code", "placer_number", "placer_authority", name="uq_imaging_request_placer"),
        Index("ix_imaging_request_state_due", "state", "due_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: The requesting site (organisation code) and the reading group the contract routes it to.
    site_code: Mapped[str] = mapped_column(String(32), index=True)
    group_code: Mapped[str] = mapped_column(String(32), default="", index=True)
    #: Placer order number (ORC-2 / OBR-2 EI: entity id and the assigning authority's OID).
    placer_number: Mapped[str] = mapped_column(String(64))
    placer_authority: Mapped[str] = mapped_column(String(64), default="")
    #: The patient identity the request is about (the identity service's, when it was resolved).
    identity_id: Mapped[int | None] = mapped_column(
        ForeignKey("patient_identity.id"), nullable=True, index=True
    )
    #: The patient as the request named them: INS, IPP, traits and identity status (for display
    #: and the answer messages; the identity service holds the reference).
    patient: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: When the request was made (ORC-9) and when it arrived here.
    requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    priority: Mapped[str] = mapped_column(String(8), default=PRIORITY_ROUTINE)
    #: The delay the requester wishes (free text or ISO 8601 duration) and the deadline computed
    #: from it or from the contract.
    desired_delay: Mapped[str] = mapped_column(String(32), default="")
    due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    justification: Mapped[str] = mapped_column(Text, default="")
    clinical_history: Mapped[str] = mapped_column(Text, default="")
    purpose: Mapped[str] = mapped_column(Text, default="")
    #: Requested modality (DICOM CS, JDV 1.2.250.1.213.1.1.5.660) and targeted anatomy: a list of
    #: {"code", "system", "display"} (JDV 1.2.250.1.213.1.1.5.695, SNOMED CT).
    modality: Mapped[str] = mapped_column(String(16), default="")
    anatomy: Mapped[list[Any]] = mapped_column(JSON, default=list)
    #: The subspecialty the exam needs (:data:`simral.reading.routing.SUBSPECIALTIES`): derived from
    #: the anatomy, or chosen on the request form / by the reviewing radiologist; empty: general.
    subspecialty: Mapped[str] = mapped_column(String(32), default="")
    #: Pregnancy status (LOINC 82810-3 answer: Y / N / UNK), body height and weight.
    pregnancy: Mapped[str] = mapped_column(String(8), default="")
    height_cm: Mapped[float | None] = mapped_column(Float, nullable=True)
    weight_kg: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: The requester attests the patient's consent to remote interpretation.
    consent: Mapped[bool] = mapped_column(Boolean, default=False)
    appointment_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: The requesting physician: {"id", "family", "given", "authority"} (XCN, RPPS id).
    requester: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: Unused: the attached documents (request letter, priors) are :class:`RequestDocument` rows.
    documents: Mapped[list[Any]] = mapped_column(JSON, default=list)
    state: Mapped[str] = mapped_column(String(16), default=REQUEST_RECEIVED, index=True)
    #: The answer (flux 3): the imaging protocol when accepted, the reason when refused.
    protocol: Mapped[str] = mapped_column(Text, default="")
    refusal_reason: Mapped[str] = mapped_column(Text, default="")
    answered_by: Mapped[str] = mapped_column(String(128), default="")
    answered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cancel_reason: Mapped[str] = mapped_column(Text, default="")
    #: The exam as performed (flux 4): accession number (with its issuer), Study Instance UID.
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    accession_authority: Mapped[str] = mapped_column(String(64), default="")
    study_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    #: The rest of the complement: exam codes, equipment, administered products, viewer URL,
    #: retention period, as received.
    complement: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: Where it came from: ``hl7:<RIS endpoint name>`` (the RIS answers go to) or ``portal``.
    source: Mapped[str] = mapped_column(String(128), default="")
    #: The HL7 order that brought it, for the answer's shape (:mod:`simral.hl7.answers`):
    #: {"message": "ORM^O01" or "OMI^O23" (MSH-9), "control_id": MSH-10, "service": {"code",
    #: "text", "system"} (OBR-4)}; empty for a portal request.
    hl7_order: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RequestDocument(Base):
    """A document attached to a request (flux 1: the request document, prior documents): its
    metadata here, its bytes in the blob store under ``blob_key`` (``documents/requests/…``)."""

    __tablename__ = "request_document"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("imaging_request.id"), index=True)
    #: ``demande`` (the request letter), ``anteriorite`` (a prior report) or ``autre``.
    kind: Mapped[str] = mapped_column(String(16))
    title: Mapped[str] = mapped_column(String(256), default="")
    #: The document's own date (OBX-14, the CDA effectiveTime), when it has one.
    document_date: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    media_type: Mapped[str] = mapped_column(String(64), default="application/pdf")
    #: The document type code as sent (LOINC, JDV J07 XdsTypeCode), if any.
    type_code: Mapped[str] = mapped_column(String(32), default="")
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    store: Mapped[str] = mapped_column(String(32))
    blob_key: Mapped[str] = mapped_column(String(255), unique=True)
    #: ``hl7:<sender>:<control id>`` or ``portal``.
    source: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ScheduledProcedure(Base):
    """An accepted request as a Scheduled Procedure Step of the Modality Worklist (PS3.4 K.6.1.2,
    PS3.3 C.4.10 / C.4.11: Requested Procedure and Scheduled Procedure Step)."""

    __tablename__ = "scheduled_procedure"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("imaging_request.id"), index=True)
    #: The site whose modalities may see it (MWL queries are answered per organisation).
    site_code: Mapped[str] = mapped_column(String(32), index=True)
    #: Scheduled Procedure Step ID (0040,0009) and Requested Procedure ID (0040,1001).
    step_id: Mapped[str] = mapped_column(String(16), unique=True)
    requested_procedure_id: Mapped[str] = mapped_column(String(16))
    #: Accession Number (0008,0050) and the Study Instance UID the modality is to use (0020,000D).
    accession_number: Mapped[str] = mapped_column(String(16), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    #: Scheduled Station AE Title (0040,0001); empty: any station of the site.
    station_ae: Mapped[str] = mapped_column(String(16), default="")
    start_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    #: Scheduled Procedure Step Description (0040,0007) / Requested Procedure Description (0032,1060).
    description: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(16), default=STEP_SCHEDULED, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PerformedProcedureStep(Base):
    """A Modality Performed Procedure Step (PS3.4 F.7.2: N-CREATE, then N-SET until COMPLETED or
    DISCONTINUED, after which it is final)."""

    __tablename__ = "performed_procedure_step"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: Affected SOP Instance UID of the N-CREATE.
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    procedure_id: Mapped[int | None] = mapped_column(
        ForeignKey("scheduled_procedure.id"), nullable=True, index=True
    )
    #: Performed Procedure Step Status (0040,0252): IN PROGRESS, COMPLETED, DISCONTINUED.
    status: Mapped[str] = mapped_column(String(16), default=STEP_IN_PROGRESS, index=True)
    station_ae: Mapped[str] = mapped_column(String(16), default="")
    study_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    #: The attributes the modality sent (N-CREATE, then each N-SET applied), as DICOM JSON.
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ReadingTask(Base):
    """A study to interpret, on a reading group's worklist."""

    __tablename__ = "reading_task"
    __table_args__ = (Index("ix_reading_task_group_state_due", "group_code", "state", "due_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[int | None] = mapped_column(
        ForeignKey("imaging_request.id"), nullable=True, index=True
    )
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    site_code: Mapped[str] = mapped_column(String(32), default="")
    group_code: Mapped[str] = mapped_column(String(32), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    #: Subspecialty the task needs (:data:`simral.reading.routing.SUBSPECIALTIES`: neuro, osteo, ...),
    #: empty when any radiologist of the group may read.
    subspecialty: Mapped[str] = mapped_column(String(32), default="")
    priority: Mapped[str] = mapped_column(String(8), default=PRIORITY_ROUTINE)
    due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    state: Mapped[str] = mapped_column(String(16), default=TASK_WAITING, index=True)
    ready_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: The radiologist holding the task (login) since ``claimed_at``; empty when unclaimed.
    claimed_by: Mapped[str] = mapped_column(String(128), default="")
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: The Transaction UID (0008,1195) of the UPS-RS performer that set the workitem IN PROGRESS
    #: (PS3.4 CC.1.1, :mod:`simral.reading.workitems`); empty when not claimed through UPS-RS.
    ups_transaction_uid: Mapped[str] = mapped_column(String(64), default="")
    #: What the performer set with UPS-RS Update Workitem (PS3.18 11.6) under that Transaction UID:
    #: ``{"transaction": uid, "set": {...}}`` (progress, comments, outputs); a later claim has another
    #: Transaction UID, so earlier values no longer apply.
    ups_updates: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: When the group was alerted that the deadline was near or passed.
    escalated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: The on-call radiologist the task is pre-assigned to (login; shown "de garde : Dr X", still
    #: claimable by the group's other radiologists) since ``assigned_at``; empty when none.
    assigned_to: Mapped[str] = mapped_column(String(128), default="")
    assigned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: When the on-call radiologist (``assigned_to``) was alerted that the deadline was near, before
    #: the group (:mod:`simral.reading.routing`).
    oncall_alerted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class OnCallShift(Base):
    """One shift of a teleradiology group's on-call schedule ("tableau de garde"): ``login`` reads
    for ``group_code`` from ``start_at`` (included) to ``end_at`` (excluded), for every exam or only
    for ``subspecialty``."""

    __tablename__ = "on_call_shift"
    __table_args__ = (Index("ix_on_call_shift_group_period", "group_code", "start_at", "end_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    group_code: Mapped[str] = mapped_column(String(32))
    #: The radiologist on call (a member of the group with the radiologist role).
    login: Mapped[str] = mapped_column(String(128), index=True)
    start_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    end_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: Empty: every exam of the group; else the subspecialty this shift covers.
    subspecialty: Mapped[str] = mapped_column(String(32), default="")
    created_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


#: Report states.
REPORT_DRAFT = "draft"
REPORT_SIGNED = "signed"
#: Publication states of a signed report (CDA, PDF, Encapsulated PDF, ORU^R01 to the RIS).
PUBLICATION_PENDING = "pending"
PUBLICATION_DONE = "done"
PUBLICATION_FAILED = "failed"


class Report(Base):
    """One version of a radiology report: the original (version 1) or an addendum (version n + 1,
    ``previous_id`` the version it completes). Signed versions never change."""

    __tablename__ = "report"
    __table_args__ = (UniqueConstraint("set_id", "version", name="uq_report_set_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int | None] = mapped_column(ForeignKey("reading_task.id"), nullable=True, index=True)
    request_id: Mapped[int | None] = mapped_column(
        ForeignKey("imaging_request.id"), nullable=True, index=True
    )
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    #: The document's identity across versions (CDA ClinicalDocument/setId, a UID) and this version's
    #: number (versionNumber); ``document_uid`` is this version's ClinicalDocument/id.
    set_id: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    document_uid: Mapped[str] = mapped_column(String(64), unique=True)
    previous_id: Mapped[int | None] = mapped_column(ForeignKey("report.id"), nullable=True)
    #: The template it was started from (exam type), for the record.
    template: Mapped[str] = mapped_column(String(64), default="")
    #: The four sections (ANS CR-IMG: Indications / Technique / Résultats / Conclusion), plain text.
    indications: Mapped[str] = mapped_column(Text, default="")
    technique: Mapped[str] = mapped_column(Text, default="")
    results: Mapped[str] = mapped_column(Text, default="")
    conclusion: Mapped[str] = mapped_column(Text, default="")
    #: For an addendum: what it adds (the earlier version's sections are carried over unchanged).
    addendum: Mapped[str] = mapped_column(Text, default="")
    #: Dose information of ionising exams (e.g. {"ctdivol_mgy", "dlp_mgycm", "dap_gycm2",
    #: "equipment"}), from the MPPS / dose reports / the radiologist.
    dose: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default=REPORT_DRAFT, index=True)
    #: The author (login, display name, RPPS national id) and the organisation they report for.
    author: Mapped[str] = mapped_column(String(128), default="")
    author_name: Mapped[str] = mapped_column(String(200), default="")
    author_national_id: Mapped[str] = mapped_column(String(32), default="")
    organisation_code: Mapped[str] = mapped_column(String(32), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: Last save of the draft (autosave).
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    signed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: How the signer re-authenticated (``totp``, ``psc``).
    signature_method: Mapped[str] = mapped_column(String(16), default="")
    publication_state: Mapped[str] = mapped_column(String(16), default="")
    #: What publication produced: blob keys / UIDs of the CDA and the PDF, the Encapsulated PDF's
    #: SOP Instance UID, the ORU^R01 job.
    published: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class SecondOpinion(Base):
    """A request for another radiologist's opinion (télé-expertise) on a reading task."""

    __tablename__ = "second_opinion"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("reading_task.id"), index=True)
    requested_by: Mapped[str] = mapped_column(String(128))
    #: The radiologist asked (login).
    requested_of: Mapped[str] = mapped_column(String(128), index=True)
    question: Mapped[str] = mapped_column(Text, default="")
    answer: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[str] = mapped_column(String(16), default="open", index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    answered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
