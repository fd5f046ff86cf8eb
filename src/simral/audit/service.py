"""Recording audit events inside the caller's unit of work (DESIGN.md §2: services audit)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from simral.audit.models import AuditEvent


def record(
    session: Session,
    *,
    action: str,
    actor: str,
    outcome: str,
    study_uid: str = "",
    patient_id: str = "",
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    """Add an audit row to the current transaction; it commits (or not) with the change it describes."""
    event = AuditEvent(
        action=action,
        actor=actor,
        outcome=outcome,
        study_uid=study_uid,
        patient_id=patient_id,
        detail=detail or {},
    )
    session.add(event)
    return event
