"""DMP publication state (DESIGN.md §8; IHE ITI-41, ANS "DMP: guide d'intégration" for the LPS).

- :class:`DmpOrganisation` — an organisation that lets simral publish to the DMP on its behalf: its
  authentication certificate (mutual TLS), its signing certificate (VIHF assertion, XAdES signature
  document), its structure identifier and the codes of its document entries.
- :class:`DmpDocument` — one document entry submitted (or waiting to be) for one organisation: a
  report version (CDA CR-IMG) or an image manifest (KOS) version, with its state (pending, waiting +
  reason, published, failed + reason), the entryUUID it was registered under and the entry it
  replaces (RPLC association, ITI TF-3 §4.2.2). ``source`` says where the report came from: signed
  in simral (``simral``, its :class:`~simral.reading.models.Report`) or received from a site's RIS
  (``ris:<name>``, the CDA as received in the blob store under ``content_key``, the patient identity
  in ``identity_id``). An organisation may withdraw a published entry (ITI-57: logical deletion,
  or masking to professionals).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from simral.db.base import Base, utcnow

#: The document waits for its publication job.
DMP_PENDING = "pending"
#: Publication cannot go on until something changes (INS not QUAL, no DMP, access refused): see ``reason``.
DMP_WAITING = "waiting"
DMP_PUBLISHED = "published"
#: Retries exhausted or a permanent registry error: see ``reason``; an operator may retry.
DMP_FAILED = "failed"
#: Replaced in the DMP by a later version (its successor's RPLC association).
DMP_REPLACED = "replaced"
#: Withdrawn by the organisation through ITI-57: logically deleted, or masked to professionals.
DMP_DELETED = "deleted"
DMP_MASKED = "masked"
DMP_STATES = (DMP_PENDING, DMP_WAITING, DMP_PUBLISHED, DMP_FAILED, DMP_REPLACED, DMP_DELETED, DMP_MASKED)

KIND_REPORT = "report"
KIND_MANIFEST = "manifest"

#: A report signed in simral; a report received from a RIS is ``ris:<endpoint name>``.
SOURCE_SIMRAL = "simral"


class DmpOrganisation(Base):
    """An organisation on whose behalf simral publishes (its choice, made by its administrator)."""

    __tablename__ = "dmp_organisation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    organisation_code: Mapped[str] = mapped_column(String(32), unique=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    #: PEM files of the organisation's authentication certificate and key (mutual TLS to the DMP).
    auth_cert_file: Mapped[str] = mapped_column(String(500), default="")
    auth_key_file: Mapped[str] = mapped_column(String(500), default="")
    #: PEM files of its signing certificate and key (VIHF assertion, XAdES signature document).
    signing_cert_file: Mapped[str] = mapped_column(String(500), default="")
    signing_key_file: Mapped[str] = mapped_column(String(500), default="")
    #: VIHF ``Identifiant_Structure`` (e.g. ``1`` + FINESS, ``3`` + SIRET); empty: derived from the
    #: organisation's FINESS (else SIRET).
    structure_id: Mapped[str] = mapped_column(String(32), default="")
    #: VIHF ``Secteur_Activite`` (TRE_R02-SecteurActivite, e.g. ``SA01`` hospital, ``SA07`` practice).
    activity_sector: Mapped[str] = mapped_column(String(16), default="SA01")
    #: healthcareFacilityTypeCode (JDV_J02-XdsHealthcareFacilityTypeCode-CISIS, e.g. ``SA01``).
    facility_type_code: Mapped[str] = mapped_column(String(16), default="SA01")
    #: practiceSettingCode (JDV_J04-XdsPracticeSettingCode-CISIS, e.g. ``ETABLISSEMENT``).
    practice_setting_code: Mapped[str] = mapped_column(String(32), default="ETABLISSEMENT")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DmpDocument(Base):
    """A document entry for the DMP and where its publication stands."""

    __tablename__ = "dmp_document"
    __table_args__ = (UniqueConstraint("organisation_code", "unique_id", name="uq_dmp_document_unique"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    organisation_code: Mapped[str] = mapped_column(String(32), index=True)
    #: ``report`` (CDA CR-IMG) or ``manifest`` (DICOM KOS).
    kind: Mapped[str] = mapped_column(String(16))
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    #: The report version this entry carries (a report signed in simral).
    report_id: Mapped[int | None] = mapped_column(ForeignKey("report.id"), nullable=True, index=True)
    #: The imaging request (its patient identity, accession number, placer order).
    request_id: Mapped[int | None] = mapped_column(
        ForeignKey("imaging_request.id"), nullable=True, index=True
    )
    version: Mapped[int] = mapped_column(Integer, default=1)
    #: XDSDocumentEntry.uniqueId: the CDA's id root or the KOS SOP Instance UID.
    unique_id: Mapped[str] = mapped_column(String(128))
    #: XDSDocumentEntry.entryUUID (``urn:uuid:…``), chosen before the first try so retries reuse it.
    entry_uuid: Mapped[str] = mapped_column(String(64), unique=True)
    #: The entry this one replaces (RPLC): the previous version of the report or manifest.
    replaces_id: Mapped[int | None] = mapped_column(ForeignKey("dmp_document.id"), nullable=True)
    state: Mapped[str] = mapped_column(String(16), default=DMP_PENDING, index=True)
    #: Why it waits or failed, in French for the site (shown on the portal).
    reason: Mapped[str] = mapped_column(Text, default="")
    #: SubmissionSet.uniqueId of the submission that registered it.
    submission_uid: Mapped[str] = mapped_column(String(128), default="")
    size: Mapped[int] = mapped_column(Integer, default=0)
    sha1: Mapped[str] = mapped_column(String(40), default="")
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: Where the report came from: :data:`SOURCE_SIMRAL` or ``ris:<endpoint name>``.
    source: Mapped[str] = mapped_column(String(64), default=SOURCE_SIMRAL)
    #: The patient identity (a document without an imaging request: a report received from a RIS).
    identity_id: Mapped[int | None] = mapped_column(
        ForeignKey("patient_identity.id"), nullable=True, index=True
    )
    #: The received CDA's blob (``documents/dmp/…``), its SHA-256 (``simral check``).
    content_key: Mapped[str] = mapped_column(String(300), default="")
    content_sha256: Mapped[str] = mapped_column(String(64), default="")
    #: The received CDA's setId (its versions replace each other).
    set_id: Mapped[str] = mapped_column(String(128), default="", index=True)
    #: The exam's accession number and its issuer (OID) when there is no imaging request.
    accession_number: Mapped[str] = mapped_column(String(64), default="")
    accession_authority: Mapped[str] = mapped_column(String(64), default="")
