"""Index tables: patient / study / series / instance and the blob that holds each instance.

The columns are the matching keys of PS3.4 C.6.1.1 (Patient Root) and C.6.2.1 (Study Root) and of
PS3.18 §10.6.1.2 (QIDO-RS); the full header of each instance is kept as its DICOM JSON model
(PS3.18 §F.2), without bulk data. Person names are also stored upper-cased for case-insensitive
matching (PS3.4 C.2.2.2.1).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from simral.db.base import Base, utcnow

JsonModel = JSON().with_variant(JSONB(), "postgresql")


class Patient(Base):
    """A patient as known by one assigning authority (PatientID + IssuerOfPatientID)."""

    __tablename__ = "patient"
    __table_args__ = (UniqueConstraint("patient_id", "issuer", name="uq_patient_id_issuer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    #: IssuerOfPatientID; empty string when the sender gave none.
    issuer: Mapped[str] = mapped_column(String(64), default="")
    name: Mapped[str] = mapped_column(String(324), default="")
    name_upper: Mapped[str] = mapped_column(String(324), default="", index=True)
    birth_date: Mapped[str] = mapped_column(String(8), default="")
    sex: Mapped[str] = mapped_column(String(16), default="")
    #: Patient-module attributes of the latest instance, DICOM JSON.
    meta: Mapped[dict[str, Any]] = mapped_column(JsonModel, default=dict)
    num_studies: Mapped[int] = mapped_column(Integer, default=0)
    num_series: Mapped[int] = mapped_column(Integer, default=0)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    """A study (PS3.3 C.7.2.1) with its denormalised counts and modalities."""

    __tablename__ = "study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    study_id: Mapped[str] = mapped_column(String(16), default="")
    description: Mapped[str] = mapped_column(String(64), default="")
    referring_physician: Mapped[str] = mapped_column(String(324), default="")
    referring_physician_upper: Mapped[str] = mapped_column(String(324), default="")
    #: Backslash-separated, sorted (ModalitiesInStudy).
    modalities: Mapped[str] = mapped_column(String(256), default="")
    sop_classes: Mapped[str] = mapped_column(String(2048), default="")
    num_series: Mapped[int] = mapped_column(Integer, default=0)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    #: Patient- and study-level attributes of the first instance, DICOM JSON.
    meta: Mapped[dict[str, Any]] = mapped_column(JsonModel, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """A series (PS3.3 C.7.3.1)."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    description: Mapped[str] = mapped_column(String(64), default="")
    body_part: Mapped[str] = mapped_column(String(16), default="")
    series_date: Mapped[str] = mapped_column(String(8), default="")
    series_time: Mapped[str] = mapped_column(String(16), default="")
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    #: Series-level attributes of the first instance, DICOM JSON.
    meta: Mapped[dict[str, Any]] = mapped_column(JsonModel, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """A composite SOP instance; ``meta`` is its header as DICOM JSON without bulk data."""

    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    num_frames: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    meta: Mapped[dict[str, Any]] = mapped_column(JsonModel, default=dict)
    #: AE title or other source the instance came from (for audit and routing).
    source: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")
    blob: Mapped[Blob] = relationship(back_populates="instance", uselist=False)


class Blob(Base):
    """Where an instance's bytes live: store, key, size, SHA-256, transfer syntax, tier."""

    __tablename__ = "blob"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instance.id"), unique=True)
    store: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(255), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    tier: Mapped[str] = mapped_column(String(16), default="hot")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: When the fixity sweep last re-hashed the bytes and found them intact (simral.preservation).
    verified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)

    instance: Mapped[Instance] = relationship(back_populates="blob")


Index("ix_study_patient_date", Study.patient_pk, Study.study_date)
Index("ix_instance_series_number", Instance.series_pk, Instance.instance_number)


class ChangeEvent(Base):
    """The archive's change feed: one row per created, updated or deleted instance.

    ``seq`` grows in commit order (on PostgreSQL the writer takes a transaction-level advisory lock
    before inserting), so a follower that remembers the last ``seq`` it saw misses nothing.
    """

    __tablename__ = "change_event"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_uid: Mapped[str] = mapped_column(String(64))
    sop_uid: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class StudyOrganisation(Base):
    """An organisation that produced or received a study; its members see the study (access policy)."""

    __tablename__ = "study_organisation"
    __table_args__ = (UniqueConstraint("study_pk", "organisation_code", name="uq_study_organisation"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    organisation_code: Mapped[str] = mapped_column(String(32), index=True)
    #: "produced" (stored by the organisation's node or user) or "received" (sent to it).
    relation: Mapped[str] = mapped_column(String(16), default="produced")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
