"""Lifecycle tables: retention policies, legal holds, reviewed deletion batches, IOCM rejections.

- :class:`RetentionPolicy` — an organisation's retention term replacing the 20 years of CSP
  R.1112-7 (longer or shorter, as its policy says).
- :class:`LegalHold` — a litigation hold on a study or on a patient identity (all the studies of
  the identity's person): "ces délais sont suspendus par l'introduction de tout recours gracieux
  ou contentieux" (CSP R.1112-7). A held study is never proposed nor deleted.
- :class:`DeletionBatch` / :class:`DeletionItem` — the studies (or instances rejected with
  "Data Retention Policy Expired") past their retention date, proposed for an administrator's
  approval; approval queues one deletion job per item.
- :class:`RejectedInstance` — an instance an IHE IOCM rejection note (KOS titled with a PS3.16
  CID 7011 code) rejected: hidden from every read path.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from simral.db.base import Base, utcnow

#: Hold targets.
HOLD_STUDY = "study"
HOLD_PATIENT = "patient"

#: Batch states: proposed (to approve), approved (deletion jobs queued), cancelled.
BATCH_PROPOSED = "proposed"
BATCH_APPROVED = "approved"
BATCH_CANCELLED = "cancelled"

#: Item scopes: the whole study, or only its instances rejected as "Data Retention Policy Expired".
SCOPE_STUDY = "study"
SCOPE_REJECTED = "rejected"

#: Item states: pending (not yet executed), purging (index rows removed, blobs being deleted),
#: deleted, refused (a legal hold or a later visit appeared after approval).
ITEM_PENDING = "pending"
ITEM_PURGING = "purging"
ITEM_DELETED = "deleted"
ITEM_REFUSED = "refused"


class RetentionPolicy(Base):
    """An organisation's retention term in years after the last visit (instead of the law's 20)."""

    __tablename__ = "retention_policy"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    organisation_code: Mapped[str] = mapped_column(String(32), unique=True)
    years: Mapped[int] = mapped_column(Integer)
    updated_by: Mapped[str] = mapped_column(String(128), default="")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LegalHold(Base):
    """A litigation hold on one study or on a patient identity; active until ``released_at``."""

    __tablename__ = "legal_hold"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: ``study`` or ``patient``.
    target: Mapped[str] = mapped_column(String(16))
    study_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    identity_id: Mapped[int | None] = mapped_column(
        ForeignKey("patient_identity.id"), nullable=True, index=True
    )
    reason: Mapped[str] = mapped_column(String(500))
    created_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    released_by: Mapped[str] = mapped_column(String(128), default="")
    release_reason: Mapped[str] = mapped_column(String(500), default="")


class DeletionBatch(Base):
    """A reviewed list of deletions: proposed by a review, approved by an administrator."""

    __tablename__ = "deletion_batch"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: The organisation whose studies it lists; empty for a regional batch.
    organisation_code: Mapped[str] = mapped_column(String(32), default="", index=True)
    state: Mapped[str] = mapped_column(String(16), default=BATCH_PROPOSED, index=True)
    #: The day the retention dates were compared with (YYYY-MM-DD).
    reviewed_on: Mapped[str] = mapped_column(String(10))
    created_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    approved_by: Mapped[str] = mapped_column(String(128), default="")
    approved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class DeletionItem(Base):
    """One study (or its rejected instances) in a batch, and what became of it."""

    __tablename__ = "deletion_item"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("deletion_batch.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    scope: Mapped[str] = mapped_column(String(16), default=SCOPE_STUDY)
    #: For scope ``rejected``: the SOP Instance UIDs to delete.
    sop_uids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    #: The retention date computed at review (YYYY-MM-DD); empty for rejected instances.
    retention_until: Mapped[str] = mapped_column(String(10), default="")
    state: Mapped[str] = mapped_column(String(16), default=ITEM_PENDING, index=True)
    #: Why it was refused, or what was deleted.
    detail: Mapped[str] = mapped_column(String(500), default="")
    #: Blob keys still to delete from the store (state ``purging``).
    blob_keys: Mapped[list[Any]] = mapped_column(JSON, default=list)
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class RejectedInstance(Base):
    """An instance rejected by an IOCM rejection note (IHE RAD-66): hidden from every read."""

    __tablename__ = "rejected_instance"

    instance_pk: Mapped[int] = mapped_column(ForeignKey("instance.id", ondelete="CASCADE"), primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    #: The CID 7011 code of the note's title (113001, 113037, 113038, 113039).
    reason_code: Mapped[str] = mapped_column(String(16), index=True)
    note_sop_uid: Mapped[str] = mapped_column(String(64))
    rejected_by: Mapped[str] = mapped_column(String(128), default="")
    rejected_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
