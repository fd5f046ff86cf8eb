"""Modality Performed Procedure Step SOP Class (PS3.4 F.7, 1.2.840.10008.3.1.2.3.3), as the IHE
Scheduled Workflow Image Manager receives it.

- N-CREATE (PS3.4 F.7.2.1): a modality starts a procedure step, status IN PROGRESS. It is linked to
  the :class:`ScheduledProcedure` its Scheduled Step Attributes Sequence names (Scheduled
  Procedure Step ID, else Study Instance UID, else Accession Number, within the calling node's
  site), which becomes IN PROGRESS. A step matching nothing is kept unlinked (IHE "unscheduled").
- N-SET (PS3.4 F.7.2.2): the modality updates it; COMPLETED and DISCONTINUED are final, and later
  N-SETs are refused (0110H with Error ID A710H, F.7.2.2.2). A COMPLETED step makes the study's
  reading task ready once its referenced images are stored (:func:`simral.reading.tasks.refresh_study`).
- A COMPLETED step of an accepted imaging request is its post-exam complement (ANS flux 4, DESIGN.md
  §7), recorded with :func:`simral.reading.service.record_complement` as an MPPS complement: exam
  date and time (Performed Procedure Step Start Date/Time, PS3.3 C.4.14), accession number and
  Study Instance UID (Scheduled Step Attributes Sequence), modality, equipment (Performed Station
  AE Title / Name, Manufacturer and model when sent), procedure codes (Procedure Code Sequence),
  administered products (Billing Supplies and Devices Sequence, C.4.17) and dose (Radiation Dose,
  C.4.16, read as :func:`simral.reading.reports.dose_from_mpps` does). It fills only what the RIS's
  complement left empty; from then on the request can no longer be cancelled.

The attributes are kept as DICOM JSON (PS3.18 F.2), the N-SET modifications replacing the
top-level attributes they name (F.7.2.2.1: a sequence is replaced whole).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from simral.access.policy import AccessDenied, Principal, may_perform_procedures
from simral.audit import service as audit
from simral.db.base import utcnow
from simral.reading import service as requests
from simral.reading.models import (
    REQUEST_ACCEPTED,
    REQUEST_PERFORMED,
    STEP_COMPLETED,
    STEP_DISCONTINUED,
    STEP_IN_PROGRESS,
    STEP_SCHEDULED,
    ImagingRequest,
    PerformedProcedureStep,
    ScheduledProcedure,
)
from simral.reading.reports import dose_from_mpps
from simral.reading.tasks import refresh_study
from simral.reading.worklist import local_timezone

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
    complement = ""
    if status == STEP_COMPLETED and procedure is not None:
        complement = _record_complement(session, step, procedure, principal=principal)
    if status == STEP_COMPLETED and step.study_uid:
        task = refresh_study(session, step.study_uid, now=now)
        task_ready = task.id if task is not None else None
    audit.record(
        session,
        action="mpps.update",
        principal=principal,
        study_uid=step.study_uid,
        detail={
            "mpps": sop_instance_uid,
            "status": status,
            "task_ready": task_ready,
            "complement": complement,
        },
    )
    return StepReport(
        step=step, linked_step_id=procedure.step_id if procedure is not None else "", task_ready=task_ready
    )


# ------------------------------------------------------------------- the post-exam complement


def _code_items(dataset: Dataset, keyword: str) -> list[dict[str, str]]:
    """A code sequence (PS3.3 Table 8.8-1) as [{"code", "system", "display"}]."""
    found = []
    for item in dataset.get(keyword, None) or []:
        code = _text(item, "CodeValue") or _text(item, "LongCodeValue") or _text(item, "URNCodeValue")
        if code:
            found.append(
                {
                    "code": code,
                    "system": _text(item, "CodingSchemeDesignator"),
                    "display": _text(item, "CodeMeaning"),
                }
            )
    return found


def _performed_at(dataset: Dataset) -> datetime | None:
    """Performed Procedure Step Start Date and Time (0040,0244/0245), in the modalities' wall
    clock unless Timezone Offset From UTC (0008,0201) says otherwise (PS3.5 §6.2)."""
    day = _text(dataset, "PerformedProcedureStepStartDate")
    if not re.fullmatch(r"\d{8}", day):
        return None
    clock = re.sub(r"[^0-9]", "", _text(dataset, "PerformedProcedureStepStartTime").split(".")[0])
    clock = (clock + "000000")[:6] if clock else "000000"
    try:
        naive = datetime.strptime(day + clock, "%Y%m%d%H%M%S")
    except ValueError:
        return None
    offset = _text(dataset, "TimezoneOffsetFromUTC")
    zone: tzinfo = local_timezone()
    if match := re.fullmatch(r"([+-])(\d{2})(\d{2})", offset):
        sign = -1 if match.group(1) == "-" else 1
        zone = timezone(sign * timedelta(hours=int(match.group(2)), minutes=int(match.group(3))))
    return naive.replace(tzinfo=zone).astimezone(UTC)


def _equipment(dataset: Dataset, station_ae: str) -> list[dict[str, str]]:
    """The device as the MPPS names it (APPAREIL_IMAGERIE of the complement)."""
    model = " ".join(
        value for value in (_text(dataset, "Manufacturer"), _text(dataset, "ManufacturerModelName")) if value
    )
    station = _text(dataset, "PerformedStationName")
    ae = _text(dataset, "PerformedStationAETitle") or station_ae
    label = f"{station} ({ae})" if station and ae and station != ae else station or ae
    device = {key: value for key, value in (("model", model), ("station", label)) if value}
    return [device] if device else []


def _decimal(value: str) -> str:
    """A DS value as a plain decimal text (``80``, ``12.5``); as sent when it is none."""
    try:
        return f"{float(value):g}"
    except ValueError:
        return value


def _products(dataset: Dataset) -> list[dict[str, str]]:
    """Billing Supplies and Devices Sequence (0040,0324; PS3.3 C.4.17): each item's Billing Item
    Sequence code and Quantity Sequence (quantity, Measuring Units Sequence code)."""
    found = []
    for item in dataset.get("BillingSuppliesAndDevicesSequence", None) or []:
        codes = _code_items(item, "BillingItemSequence")
        if not codes:
            continue
        product = {"type": codes[0]["code"], "system": codes[0]["system"], "display": codes[0]["display"]}
        for quantity in item.get("QuantitySequence", None) or []:
            product["quantity"] = _decimal(_text(quantity, "Quantity"))
            units = _code_items(quantity, "MeasuringUnitsSequence")
            if units:
                product["unit"] = units[0]["code"]
        found.append({key: value for key, value in product.items() if value})
    return found


def complement_of(step: PerformedProcedureStep, procedure: ScheduledProcedure) -> requests.Complement:
    """What a COMPLETED step tells of the performed exam, as a post-exam complement."""
    try:
        dataset = Dataset.from_json(step.attributes or {})
    except (ValueError, TypeError, KeyError):  # kept as received: read what can be read
        dataset = Dataset()
    accession = study_uid = requested = ""
    for item in dataset.get("ScheduledStepAttributesSequence", None) or []:
        accession = accession or _text(item, "AccessionNumber")
        study_uid = study_uid or _text(item, "StudyInstanceUID")
        requested = requested or _text(item, "RequestedProcedureID")
    dose = dose_from_mpps(step.attributes or {})
    return requests.Complement(
        accession_number=accession or procedure.accession_number,
        study_uid=study_uid or step.study_uid or procedure.study_uid,
        performed_at=_performed_at(dataset),
        exam_codes=_code_items(dataset, "ProcedureCodeSequence"),
        requested_procedure=requested or procedure.requested_procedure_id,
        modality=_text(dataset, "Modality").upper() or procedure.modality,
        products=_products(dataset),
        equipment=_equipment(dataset, step.station_ae),
        dose={key: value for key, value in dose.items() if key in requests.DOSE_KEYS},
    )


def _record_complement(
    session: Session, step: PerformedProcedureStep, procedure: ScheduledProcedure, *, principal: Principal
) -> str:
    """Record a COMPLETED step of an accepted (or already performed) request as its post-exam
    complement; what was done: ``recorded``, ``skipped: …`` (no live request) or ``refused: …``
    (the step is kept whatever the request's state: the MPPS is the modality's record)."""
    request = session.get(ImagingRequest, procedure.request_id)
    if request is None or request.state not in (REQUEST_ACCEPTED, REQUEST_PERFORMED):
        return f"skipped: request {request.state if request is not None else 'missing'}"
    try:
        with session.begin_nested():
            requests.record_complement(
                session,
                request,
                complement_of(step, procedure),
                principal=principal,
                origin=requests.COMPLEMENT_MPPS,
            )
    except (requests.ReadingError, AccessDenied) as exc:
        return f"refused: {exc}"[:200]
    return "recorded"
