"""Routing rules: which new images go where (issue: exchange and sharing across the region)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from simral.db.base import Base, utcnow


class RoutingRule(Base):
    """Forward each new instance that matches every non-empty criterion to one destination.

    Criteria: the organisation the study belongs to, the calling AE title (or user) that sent it,
    the series modality, and the study description (``*`` and ``?`` wildcards, case-insensitive).
    Destination: a registered DICOM node (C-STORE) or a DICOMweb peer (STOW-RS). A rule with a
    ``reading_group`` is a prefetch rule (see the column).
    """

    __tablename__ = "routing_rule"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    source_organisation: Mapped[str] = mapped_column(String(32), default="")
    source: Mapped[str] = mapped_column(String(128), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    destination_node: Mapped[str] = mapped_column(String(64), default="")
    destination_dicomweb: Mapped[str] = mapped_column(String(64), default="")
    #: A prefetch rule: instead of new instances, it sends the study and its priors (the
    #: requesting site's earlier studies of the patient) when a reading task of this group
    #: becomes ready (IHE SWF "request assignment"; the reading site's own workstation or PACS).
    reading_group: Mapped[str] = mapped_column(String(32), default="", server_default="")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class FeedCursor(Base):
    """How far a follower of the archive's change feed got (the router's position)."""

    __tablename__ = "feed_cursor"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Share(Base):
    """A study (or every study of a patient) shared by a professional with a professional or an
    organisation, for a purpose, until an expiry, revocable. The access policy lets the grantee see
    it (DESIGN.md §2); the grantee's queries and retrieves on every protocol then include it."""

    __tablename__ = "share"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: A study share names the study; a patient share names the patient (``patient_pk``).
    study_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    patient_pk: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    #: ``user`` (a login) or ``organisation`` (a code).
    grantee_kind: Mapped[str] = mapped_column(String(16))
    grantee: Mapped[str] = mapped_column(String(64), index=True)
    purpose: Mapped[str] = mapped_column(String(500), default="")
    created_by: Mapped[str] = mapped_column(String(64))
    created_by_organisation: Mapped[str] = mapped_column(String(32), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_by: Mapped[str] = mapped_column(String(64), default="")


class ShareLink(Base):
    """A viewer-only capability link for someone outside the platform: a random token (only its
    SHA-256 is kept), bound to the listed studies, expiring, revocable, optionally asking for the
    patient's birth date as a second factor."""

    __tablename__ = "share_link"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    #: Space-separated Study Instance UIDs the link opens.
    study_uids: Mapped[str] = mapped_column(String(2048))
    purpose: Mapped[str] = mapped_column(String(500), default="")
    #: The patient's birth date (YYYYMMDD) the visitor must give, or "" for none.
    birth_date_check: Mapped[str] = mapped_column(String(8), default="")
    created_by: Mapped[str] = mapped_column(String(64))
    created_by_organisation: Mapped[str] = mapped_column(String(32), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    failed_checks: Mapped[int] = mapped_column(Integer, default=0)
    #: ``colleague`` (opens the viewer) or ``patient`` (the patient's page: images, download of the
    #: media, and who accessed the images).
    audience: Mapped[str] = mapped_column(String(16), default="colleague")
    #: Server-side key sealing a visitor's cookie once the birth date was given (HMAC-SHA-256).
    seal_key: Mapped[str] = mapped_column(String(64), default="")


class DeidentifiedExport(Base):
    """A de-identified export (PS3.15 Annex E) and its pseudonym map: who made it, when, with which
    options, of which studies, and what replaced what (patients, UIDs). The map re-identifies the
    export: only its author and administrators of the author's organisation read it."""

    __tablename__ = "deidentified_export"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: The exporting principal as audited (``user:login``, ``system:cli:...``).
    created_by: Mapped[str] = mapped_column(String(128), index=True)
    created_by_organisation: Mapped[str] = mapped_column(String(32), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: The PS3.15 E.3 options chosen (``retain_dates``, ``retain_uids``, ``clean_descriptors``...).
    options: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: Space-separated original Study Instance UIDs.
    study_uids: Mapped[str] = mapped_column(Text, default="")
    instances: Mapped[int] = mapped_column(Integer, default=0)
    #: ``{"patients": [...], "uids": {original: replacement}}``.
    pseudonym_map: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
