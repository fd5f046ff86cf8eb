"""Tables of storage tiering, replication and fixity.

``blob.store`` / ``blob.tier`` / ``blob.verified_at`` (:mod:`simral.archive.models`) say where a
blob is and when its bytes were last found intact; these tables add the tier rules, the verified
copies in the replica store and the fixity alarms (counted by ``/metrics``). ``blob_pk`` columns
are plain indexed integers, not foreign keys: deleting an instance is not held back by its history.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from simral.db.base import Base, utcnow

#: FixityAlarm.problem values.
MISMATCH = "mismatch"
MISSING = "missing"
#: FixityAlarm.outcome values.
REPAIRED = "repaired"
UNREPAIRED = "unrepaired"


class TierRule(Base):
    """Blobs received more than ``older_than_days`` ago (of a modality, of an organisation's
    studies, when given) belong in ``target_store``. The rule with the largest age wins."""

    __tablename__ = "tier_rule"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    target_store: Mapped[str] = mapped_column(String(32))
    older_than_days: Mapped[int] = mapped_column(Integer)
    #: Series modality (PS3.3 C.7.3.1 Modality); "" = any.
    modality: Mapped[str] = mapped_column(String(16), default="")
    #: Organisation holding the study (``study_organisation``); "" = any.
    organisation_code: Mapped[str] = mapped_column(String(32), default="")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BlobReplica(Base):
    """A verified copy of a blob in a replica store: same key, bytes re-read and hashed after the
    copy. The copy is current while ``sha256`` equals ``blob.sha256`` (a replaced instance changes
    the blob's bytes and key; the replication job then copies it again)."""

    __tablename__ = "blob_replica"
    __table_args__ = (UniqueConstraint("blob_pk", "store", name="uq_blob_replica_blob_store"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    blob_pk: Mapped[int] = mapped_column(Integer)
    store: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    replicated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: When the fixity sweep last found the copy intact (None: not since it was made).
    verified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class FixityAlarm(Base):
    """A blob whose bytes were missing or did not hash to ``blob.sha256``, and what became of it."""

    __tablename__ = "fixity_alarm"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    blob_pk: Mapped[int] = mapped_column(Integer, index=True)
    store: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(255))
    study_uid: Mapped[str] = mapped_column(String(64), default="")
    #: :data:`MISMATCH` or :data:`MISSING`.
    problem: Mapped[str] = mapped_column(String(16))
    expected_sha256: Mapped[str] = mapped_column(String(64))
    #: What the bytes hashed to ("" when missing).
    found_sha256: Mapped[str] = mapped_column(String(64), default="")
    #: :data:`REPAIRED` (from the replica, re-verified) or :data:`UNREPAIRED`.
    outcome: Mapped[str] = mapped_column(String(16), index=True)
    detected_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    repaired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
