"""Routing rules: which new images go where (issue: exchange and sharing across the region)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from simral.db.base import Base, utcnow


class RoutingRule(Base):
    """Forward each new instance that matches every non-empty criterion to one destination.

    Criteria: the organisation the study belongs to, the calling AE title (or user) that sent it,
    the series modality, and the study description (``*`` and ``?`` wildcards, case-insensitive).
    Destination: a registered DICOM node (C-STORE) or a DICOMweb peer (STOW-RS).
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
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class FeedCursor(Base):
    """How far a follower of the archive's change feed got (the router's position)."""

    __tablename__ = "feed_cursor"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
