"""Modality Performed Procedure Step SOP Class (PS3.4 F.7, 1.2.840.10008.3.1.2.3.3), as the IHE
Scheduled Workflow Image Manager receives it.

- N-CREATE (PS3.4 F.7.2.1): a modality starts a procedure step, status IN PROGRESS. It is linked to
  the :class:`ScheduledProcedure` its Scheduled Step Attributes Sequence names (Scheduled
  Procedure Step ID, else Study Instance UID, else Accession Number, within the calling node's
  site), which becomes IN PROGRESS. A step matching nothing is kept unlinked (IHE "unscheduled").
- N-SET (PS3.4 F.7.2.2): the modality updates it; COMPLETED and DISCONTINUED are final, and later
  N-SETs are refused (0110H with Error ID A710H, F.7.2.2.2). A COMPLETED step makes the study's
  reading task ready once its referenced images are stored (:func:`simral.reading.tasks.refresh_study`).

The attributes are kept as DICOM JSON (PS3.18 F.2), the N-SET modifications replacing the
top-level attributes they name (F.7.2.2.1: a sequence is replaced whole).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from simral.access.policy import Principal, may_perform_procedures
from simral.audit import service as audit
from simral.db.base import utcnow
from simral.reading.models import (
    STEP_COMPLETED,
    STEP_DISCONTINUED,
    STEP_IN_PROGRESS,
    STEP_SCHEDULED,
    PerformedProcedureStep,
    ScheduledProcedure,
)
from simral.reading.tasks import refresh_study

#: Modality Performed Procedure Step SOP Class (PS3.4 F.7.1).
MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
FINAL_STATES = (STEP_COMPLETED, STEP_DISCONTINUED)
_STATES = (STEP_IN_PROGRESS, *FINAL_STATES)


class MppsError(Exception):
    """An N-CREATE or N-SET refused: ``status`` is the DIMSE status (PS3.4 F.7.2.1.2, F.7.2.2.2,
    PS3.7 Annex C), ``error_id`` the Error ID (0000,0903) when the standard names one."""

    def __init__(self, message: str, *, status: int, error_id: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_id = error_id


@dataclass(frozen=True)
class StepReport:
    """What an N-CREATE or N-SET did: the step and the task it made ready, if any."""

    step: PerformedProcedureStep
    linked_step_id: str = ""
    task_ready: int | None = None


def _text(dataset: Dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    return str(value).strip() if value not in (None, "") else ""


def _to_json(dataset: Dataset) -> dict[str, Any]:
    return dict(dataset.to_json_dict(bulk_data_threshold=1 << 20, bulk_data_element_handler=None))


def _linked_procedure(
    session: Session, attributes: Dataset, *, site: str | None
) -> ScheduledProcedure | None:
    """The scheduled step the Scheduled Step Attributes Sequence (0040,0270) names."""
    for item in attributes.get("ScheduledStepAttributesSequence", None) or []:
        for column, keyword in (
            (ScheduledProcedure.step_id, "ScheduledProcedureStepID"),
            (ScheduledProcedure.study_uid, "StudyInstanceUID"),
            (ScheduledProcedure.accession_number, "AccessionNumber"),
        ):
            value = _text(item, keyword)
            if not value:
                continue
            query = select(ScheduledProcedure).where(column == value)
            if site is not None:
                query = query.where(ScheduledProcedure.site_code == site)
            found = session.scalar(query.order_by(ScheduledProcedure.id.desc()).limit(1))
            if found is not None:
                return found
    return None


def _site_of(principal: Principal) -> str | None:
    """The site whose procedures ``principal`` reports (None: any, for the platform itself)."""
    if principal.kind == "system" and not principal.organisation:
        return None
    if not may_perform_procedures(principal, principal.organisation):
        raise MppsError(f"{principal.audit_name} reports no procedure steps", status=0x0124)
    return principal.organisation


def create(
    session: Session,
    *,
    sop_instance_uid: str,
    attributes: Dataset,
    principal: Principal,
    station_ae: str = "",
) -> StepReport:
    """N-CREATE (PS3.4 F.7.2.1): record a step IN PROGRESS and link it to its scheduled step."""
    site = _site_of(principal)
    status = _text(attributes, "PerformedProcedureStepStatus").upper()
    if not status:
        raise MppsError("Performed Procedure Step Status (0040,0252) is missing", status=0x0121)
    if status != STEP_IN_PROGRESS:
        raise MppsError(f"an N-CREATE must be IN PROGRESS, not {status!r} (PS3.4 F.7.2.1.1)", status=0x0106)
    if session.scalar(
        select(PerformedProcedureStep.id).where(PerformedProcedureStep.sop_instance_uid == sop_instance_uid)
    ):
        raise MppsError("an MPPS with this SOP Instance UID exists", status=0x0111)
    procedure = _linked_procedure(session, attributes, site=site)
    study_uid = ""
    for item in attributes.get("ScheduledStepAttributesSequence", None) or []:
        study_uid = study_uid or _text(item, "StudyInstanceUID")
    if procedure is not None:
        study_uid = study_uid or procedure.study_uid
    now = utcnow()
    step = PerformedProcedureStep(
        sop_instance_uid=sop_instance_uid,
        procedure_id=procedure.id if procedure is not None else None,
        status=STEP_IN_PROGRESS,
        station_ae=(_text(attributes, "PerformedStationAETitle") or station_ae)[:16],
        study_uid=study_uid[:64],
        attributes=_to_json(attributes),
        created_at=now,
        updated_at=now,
    )
    session.add(step)
    if procedure is not None and procedure.state == STEP_SCHEDULED:
        procedure.state = STEP_IN_PROGRESS
        procedure.updated_at = now
    session.flush()
    audit.record(
        session,
        action="mpps.create",
        principal=principal,
        study_uid=step.study_uid,
        detail={
            "mpps": sop_instance_uid,
            "scheduled_step": procedure.step_id if procedure is not None else "",
            "site": site or "",
        },
    )
    return StepReport(step=step, linked_step_id=procedure.step_id if procedure is not None else "")


def update(
    session: Session,
    *,
    sop_instance_uid: str,
    modifications: Dataset,
    principal: Principal,
) -> StepReport:
    """N-SET (PS3.4 F.7.2.2): apply the modifications; refuse them once the step is final."""
    site = _site_of(principal)
    step = session.scalar(
        select(PerformedProcedureStep).where(PerformedProcedureStep.sop_instance_uid == sop_instance_uid)
    )
    if step is None:
        raise MppsError("no such MPPS", status=0x0112)
    procedure = session.get(ScheduledProcedure, step.procedure_id) if step.procedure_id is not None else None
    if site is not None and procedure is not None and procedure.site_code != site:
        raise MppsError("this MPPS belongs to another site", status=0x0124)
    if step.status in FINAL_STATES:
        raise MppsError(
            f"Performed Procedure Step Object may no longer be updated (it is {step.status})",
            status=0x0110,
            error_id=0xA710,
        )
    status = _text(modifications, "PerformedProcedureStepStatus").upper() or step.status
    if status not in _STATES:
        raise MppsError(f"invalid Performed Procedure Step Status {status!r}", status=0x0106)
    now = utcnow()
    step.attributes = {**(step.attributes or {}), **_to_json(modifications)}
    step.status = status
    step.updated_at = now
    task_ready: int | None = None
    if (
        procedure is not None
        and status in FINAL_STATES
        and procedure.state in (STEP_SCHEDULED, STEP_IN_PROGRESS)
    ):
        procedure.state = status
        procedure.updated_at = now
    session.flush()
    if status == STEP_COMPLETED and step.study_uid:
        task = refresh_study(session, step.study_uid, now=now)
        task_ready = task.id if task is not None else None
    audit.record(
        session,
        action="mpps.update",
        principal=principal,
        study_uid=step.study_uid,
        detail={"mpps": sop_instance_uid, "status": status, "task_ready": task_ready},
    )
    return StepReport(
        step=step, linked_step_id=procedure.step_id if procedure is not None else "", task_ready=task_ready
    )
