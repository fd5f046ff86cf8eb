"""Patient identities across the region (DESIGN.md §6): the master patient index.

- :class:`AssigningAuthority` — who assigns a local patient id (IPP): an OID (ISO), a namespace
  (HL7 HD.1 / DICOM Issuer of Patient ID), and the organisation it belongs to, if any.
- :class:`PatientIdentity` — a patient as known by one authority: local id + authority, the
  traits of the identity (strict traits of the INS: birth name, birth first names, first birth
  first name, sex, birth date, birth place INSEE code; plus used name and first name), the INS
  (matricule + OID) and the identity status PROV / RECUP / VALI / QUAL with its date and source
  (Référentiel National d'IdentitoVigilance; IHE PAM France national extension, PID-32).
- :class:`Person` — the regional person several identities are linked to (IHE PIX "cross
  reference": same INS from two authorities, an A24 link, a merge).
- :class:`IdentityChange` — every merge (A40), link (A24, INS), change of identifier (A47),
  kept after it is undone so that an unmerge restores exactly what the merge moved.
- :class:`VigilanceCase` — what a person must look at: conflicting traits, a suspected duplicate,
  a change of INS status. Nothing is merged or overwritten silently.
- :class:`StudyIdentity` — the identity the archive's study was stored under (query expansion and
  PatientID coercion at retrieve time start from it).
- :class:`Hl7Message` — the inbound HL7 v2 feed: every message kept before it is acknowledged.
- :class:`Hl7Source` — the HL7 senders admitted to the identity feed and to PDQ queries (the
  hospital's identity manager, a PDQ consumer), known by MSH-3 / MSH-4 and optionally bound to
  their host or TLS client certificate.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from simral.db.base import Base, utcnow

#: INS OIDs (ANS, "Référentiel INS"): NIR and NIA in production; test and demonstration matricules.
INS_NIR_OID = "1.2.250.1.213.1.4.8"
INS_NIA_OID = "1.2.250.1.213.1.4.9"
INS_TEST_OID = "1.2.250.1.213.1.4.10"
INS_DEMO_OID = "1.2.250.1.213.1.4.11"
INS_OIDS = (INS_NIR_OID, INS_NIA_OID)
INS_TEST_OIDS = (INS_TEST_OID, INS_DEMO_OID)

#: Identity statuses (RNIV §2.3): provisional, retrieved from INSi, validated on an identity
#: document, qualified (retrieved and validated). Only QUAL allows referencing data by INS.
STATUS_PROV = "PROV"
STATUS_RECUP = "RECUP"
STATUS_VALI = "VALI"
STATUS_QUAL = "QUAL"
STATUSES = (STATUS_PROV, STATUS_RECUP, STATUS_VALI, STATUS_QUAL)

#: Vigilance case kinds and states.
CASE_CONFLICTING_TRAITS = "conflicting-traits"
CASE_SUSPECTED_DUPLICATE = "suspected-duplicate"
CASE_INS_STATUS_CHANGE = "ins-status-change"
CASE_KINDS = (CASE_CONFLICTING_TRAITS, CASE_SUSPECTED_DUPLICATE, CASE_INS_STATUS_CHANGE)
CASE_OPEN = "open"
CASE_RESOLVED = "resolved"

#: Identity change kinds.
CHANGE_MERGE = "merge"
CHANGE_LINK = "link"
CHANGE_UNLINK = "unlink"
CHANGE_IDENTIFIER = "change-id"


class AssigningAuthority(Base):
    """An authority assigning patient ids (HL7 v2.5 HD data type: namespace, universal id, ISO)."""

    __tablename__ = "assigning_authority"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: Universal id (an ISO OID); None when only a namespace is known.
    oid: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    #: Namespace id (HD.1, DICOM Issuer of Patient ID); may be empty.
    namespace: Mapped[str] = mapped_column(String(64), default="", index=True)
    #: The organisation whose patient ids these are (its ``patient_id_oid``), if known.
    organisation_code: Mapped[str | None] = mapped_column(String(32), unique=True, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Person(Base):
    """A regional person: the identities linked to it are the same human being."""

    __tablename__ = "person"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PatientIdentity(Base):
    """A patient as known by one authority, with the identity's traits, INS and status."""

    __tablename__ = "patient_identity"
    __table_args__ = (
        UniqueConstraint("authority_id", "local_id", name="uq_patient_identity_authority_local_id"),
        Index("ix_patient_identity_ins", "ins_oid", "ins_matricule"),
        Index("ix_patient_identity_traits", "birth_date", "birth_name"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    authority_id: Mapped[int] = mapped_column(ForeignKey("assigning_authority.id"), index=True)
    #: The local id (IPP; DICOM PatientID, HL7 CX.1).
    local_id: Mapped[str] = mapped_column(String(64))
    person_id: Mapped[int] = mapped_column(ForeignKey("person.id"), index=True)
    # -- strict traits (INS) --
    birth_name: Mapped[str] = mapped_column(String(100), default="")
    #: Birth first names, space-separated, in civil-status order.
    birth_given_names: Mapped[str] = mapped_column(String(200), default="")
    first_birth_given_name: Mapped[str] = mapped_column(String(100), default="")
    #: M, F or U (HL7 table 0001 as profiled by PAM France; DICOM O mapped to U).
    sex: Mapped[str] = mapped_column(String(1), default="")
    #: YYYYMMDD (or a shorter partial date when only that is known).
    birth_date: Mapped[str] = mapped_column(String(8), default="")
    #: INSEE code of the birth place (commune, or 99xxx for a country).
    birth_place_code: Mapped[str] = mapped_column(String(5), default="")
    #: YYYYMMDD when the patient is known to have died (retention: CSP R.1112-7, ten years after).
    death_date: Mapped[str] = mapped_column(String(8), default="")
    # -- other traits --
    used_name: Mapped[str] = mapped_column(String(100), default="")
    used_given_name: Mapped[str] = mapped_column(String(100), default="")
    # -- INS --
    ins_matricule: Mapped[str] = mapped_column(String(15), default="")
    ins_oid: Mapped[str] = mapped_column(String(64), default="")
    # -- status --
    status: Mapped[str] = mapped_column(String(8), default=STATUS_PROV)
    status_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: Where the status came from (``hl7:<app>^<facility>``, ``dicom:<organisation>``, ``cli``).
    status_source: Mapped[str] = mapped_column(String(128), default="")
    #: Identity attributes (PAM France PID-32 repetitions besides the status): DOUTE, FICTI, HOMON.
    attributes: Mapped[str] = mapped_column(String(64), default="")
    #: Set when this identity was merged into another one (A40); it is no longer active.
    merged_into_id: Mapped[int | None] = mapped_column(
        ForeignKey("patient_identity.id"), nullable=True, index=True
    )
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class IdentityChange(Base):
    """A merge, link, unlink or change of identifier, with what it moved, so it can be undone."""

    __tablename__ = "identity_change"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    #: The surviving identity (merge), the first identity (link/unlink), the renamed one (change-id).
    identity_id: Mapped[int] = mapped_column(ForeignKey("patient_identity.id"), index=True)
    #: The merged identity (merge) or the second identity (link/unlink).
    other_identity_id: Mapped[int | None] = mapped_column(
        ForeignKey("patient_identity.id"), nullable=True, index=True
    )
    #: Identities whose person changed, each with the person it had: [[identity id, person id], ...].
    moved: Mapped[list[Any]] = mapped_column(JSON, default=list)
    #: Kind-specific facts (old and new local id for a change of identifier, the reason of a link).
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: What asked for it (``hl7:<control id>``, ``ins``, ``portal``, ``cli``).
    source: Mapped[str] = mapped_column(String(128), default="")
    actor: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    undone_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    undone_by: Mapped[str] = mapped_column(String(128), default="")


class VigilanceCase(Base):
    """An identity-vigilance case: something a person must decide, never decided silently."""

    __tablename__ = "vigilance_case"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    state: Mapped[str] = mapped_column(String(16), default=CASE_OPEN, index=True)
    identity_id: Mapped[int] = mapped_column(ForeignKey("patient_identity.id"), index=True)
    other_identity_id: Mapped[int | None] = mapped_column(
        ForeignKey("patient_identity.id"), nullable=True, index=True
    )
    #: The facts: which traits differ (known and received values), the statuses, the source.
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    source: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    resolved_by: Mapped[str] = mapped_column(String(128), default="")
    resolution: Mapped[str] = mapped_column(String(500), default="")


class StudyIdentity(Base):
    """The identity an archived study was stored under (linked once per study at ingest)."""

    __tablename__ = "study_identity"

    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), primary_key=True)
    identity_id: Mapped[int] = mapped_column(ForeignKey("patient_identity.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Hl7Message(Base):
    """One inbound HL7 v2 message as received, with the acknowledgement it was given.

    ``dedup_key`` (sending application, facility and MSH-10) is set when the header could be read:
    a message sent again is answered with the stored acknowledgement, not applied twice.
    """

    __tablename__ = "hl7_message"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dedup_key: Mapped[str | None] = mapped_column(String(300), unique=True, nullable=True)
    control_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    sending_application: Mapped[str] = mapped_column(String(200), default="")
    sending_facility: Mapped[str] = mapped_column(String(200), default="")
    message_type: Mapped[str] = mapped_column(String(32), default="")
    peer: Mapped[str] = mapped_column(String(64), default="")
    raw: Mapped[str] = mapped_column(Text, default="")
    #: AA (applied), AE (application error), AR (rejected: malformed or unsupported).
    outcome: Mapped[str] = mapped_column(String(2), index=True)
    error: Mapped[str] = mapped_column(String(1000), default="")
    ack: Mapped[str] = mapped_column(Text, default="")
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class Hl7Source(Base):
    """A registered sender of the ADT identity feed or of PDQ queries (``simral hl7-sources add``).

    Known by its MSH-3 sending application and, optionally, MSH-4 sending facility (a source
    registered without a facility matches any). With ``check_host`` its messages are believed only
    from ``host``; with ``tls_subject`` only over MLLP TLS with a verified client certificate of
    that subject CN. Senders that are neither a registered source nor a registered RIS are refused
    unless ``allow_unknown_hl7_senders`` is set (a lab).
    """

    __tablename__ = "hl7_source"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    application: Mapped[str] = mapped_column(String(200), index=True)
    facility: Mapped[str] = mapped_column(String(200), default="")
    host: Mapped[str] = mapped_column(String(255), default="")
    #: Messages naming this source are refused unless they come from ``host``.
    check_host: Mapped[bool] = mapped_column(Boolean, default=False)
    #: ... or unless the MLLP TLS connection presented a verified certificate of this subject CN.
    tls_subject: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
