"""Compression rules and, per instance, what the last compression attempt did."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, DateTime, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from simral.db.base import Base, utcnow

#: Outcome states: the instance's blob now holds the lossless copy, or it was left as stored.
COMPRESSED = "compressed"
SKIPPED = "skipped"


class CompressionRule(Base):
    """Re-encode the stored native instances that match every non-empty criterion in ``syntax``.

    Criteria: stored at least ``older_than_days`` days ago (None: any age), series modality in
    ``modalities`` (backslash-separated; empty: any), study held by ``organisation_code`` (empty:
    any). When several rules match an instance, the one created first decides the syntax.
    """

    __tablename__ = "compression_rule"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: A key of :data:`simral.dicom.compression.LOSSLESS_SYNTAXES` (``jpeg-ls``, ``j2k``).
    syntax: Mapped[str] = mapped_column(String(16))
    older_than_days: Mapped[int | None] = mapped_column(Integer, nullable=True)
    modalities: Mapped[str] = mapped_column(String(128), default="")
    organisation_code: Mapped[str] = mapped_column(String(32), default="")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CompressionOutcome(Base):
    """The last compression attempt of an instance; ``source_sha256`` names the bytes it was about,
    so an instance whose content was replaced since is considered again."""

    __tablename__ = "compression_outcome"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    rule_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: :data:`COMPRESSED` or :data:`SKIPPED`.
    state: Mapped[str] = mapped_column(String(16), index=True)
    #: Why the instance was skipped (no PHI).
    reason: Mapped[str] = mapped_column(Text, default="")
    source_sha256: Mapped[str] = mapped_column(String(64))
    source_syntax: Mapped[str] = mapped_column(String(64))
    target_syntax: Mapped[str] = mapped_column(String(64))
    size_before: Mapped[int] = mapped_column(BigInteger)
    size_after: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
