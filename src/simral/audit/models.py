"""Audit trail table: append-only, chained by SHA-256 (DESIGN.md §9).

Each row stores the hash of the previous row and its own hash over its content and that link, so
an edited, deleted, inserted or reordered row breaks the chain (see :func:`simral.audit.service.verify`).
DICOM PS3.15 A.5 audit messages are derived from these rows for the syslog collector.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from simral.db.base import Base, utcnow


class AuditEvent(Base):
    """One security-relevant event: who did what to which resource, from where, with what outcome."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    #: ``kind:name`` of the principal (``user:jdupont``, ``dicom-node:CT_SITE_A``, ``system:simral``).
    actor: Mapped[str] = mapped_column(String(128), index=True)
    #: The actor's national id (``8`` + RPPS) when it is a professional.
    actor_national_id: Mapped[str] = mapped_column(String(32), default="")
    #: The organisation the actor acted for.
    actor_organisation: Mapped[str] = mapped_column(String(32), default="")
    #: success, failure (minor failure), warning.
    outcome: Mapped[str] = mapped_column(String(16))
    source_address: Mapped[str] = mapped_column(String(64), default="")
    study_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    patient_issuer: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64), default="")
    hash: Mapped[str] = mapped_column(String(64), default="")


class AuditExportCursor(Base):
    """How far a sink (the syslog collector) has received the trail: the last id it acknowledged."""

    __tablename__ = "audit_export_cursor"

    sink: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_id: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
