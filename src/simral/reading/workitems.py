"""Reading tasks as Unified Procedure Step workitems (PS3.4 Annex CC, UPS Pull; PS3.18 §11 UPS-RS).

Each reading task an external reading tool may see is a UPS Push SOP Instance
(1.2.840.10008.5.1.4.34.6.1) whose SOP Instance UID is derived from the task id (``2.25.`` and a
UUID 5 as an integer, PS3.5 B.2), so it never changes and needs no storage. The task state is the
Procedure Step State (0074,1000):

============  ==================  =====================================================
task          Procedure Step      notes
============  ==================  =====================================================
ready         SCHEDULED           on the group's worklist
claimed       IN PROGRESS         held by one radiologist (Scheduled Human Performers)
reported      COMPLETED           its report is signed
cancelled     CANCELED            the request was cancelled
============  ==================  =====================================================

Waiting tasks (images still arriving) are not workitems yet. Change State (PS3.4 CC.2.1.3,
Table CC.2.4-1) maps onto the reading task operations:

- ``IN PROGRESS`` with a Transaction UID is :func:`simral.reading.tasks.claim` (the same exclusive
  claim as the worklist) and stores the Transaction UID; the holder of a task claimed on the
  worklist attaches (or renews) a Transaction UID the same way; anyone else is refused (409).
- ``COMPLETED`` needs the stored Transaction UID and a signed report: signing the report is what
  completes the step (the task is reported by :func:`simral.reading.reports.sign_report`), so the
  performer's ``COMPLETED`` confirms it and is answered with the "already COMPLETED" warning
  (PS3.4 status B306) once the report is signed; before, it is refused (C304, final state
  requirements not met).
- ``CANCELED`` with the stored Transaction UID is :func:`simral.reading.tasks.release`: the
  radiologist gives the task back and it is SCHEDULED again for the group (a reading task is not
  abandoned because one reader withdraws; only the requesting site cancels the request itself).

Update (PS3.4 CC.2.6 N-SET, PS3.18 11.6) is the performer's: only an IN PROGRESS workitem, with the
stored Transaction UID (400 when missing or incorrect), by the radiologist holding the task (403
for anyone else); a SCHEDULED workitem is nobody's to update (409, its scheduling is the request's
and the worklist's), a COMPLETED or CANCELED one is final (400). It stores (PS3.4 Table CC.2.5-3):

- Procedure Step Progress Information Sequence: Procedure Step Progress (0-100), Procedure Step
  Progress Description, Procedure Step Communications URI Sequence;
- Comments on the Scheduled Procedure Step;
- Unified Procedure Step Performed Procedure Sequence: Performed Procedure Step Description,
  Comments on the Performed Procedure Step and the Output Information Sequence (DICOM references:
  study, series, SOP class and instance), shown with the completed step too.

The state, the SOP Common identifiers, the patient, the request, the input and the schedule
(:data:`NOT_SETTABLE`) are refused (400); any other attribute is ignored with the "optional
Attributes are not supported" warning. The reading task has no column for these values: the audit
record of each update (:data:`UPDATE_ACTION`, written in the same transaction, without the
Transaction UID) holds them, and Retrieve and Search merge those of the current claim (N-SET
semantics: an attribute an update does not carry keeps its value). Releasing the task leaves them
behind: the next claim starts afresh.

Who sees a workitem is who sees the task on ``/api/reading/tasks``: the radiologists and
administrators of the reading group the principal acts for.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from sqlalchemy import Select, select, update
from sqlalchemy.orm import Session

from simral.access.policy import AccessDenied, Principal, may_assign_reading, may_review_requests
from simral.archive.models import Patient, Study
from simral.audit import service as audit
from simral.db.base import as_utc, utcnow
from simral.identity.models import Organisation, Professional
from simral.reading import tasks
from simral.reading.models import (
    PRIORITY_URGENT,
    REPORT_SIGNED,
    TASK_CANCELLED,
    TASK_CLAIMED,
    TASK_READY,
    TASK_REPORTED,
    ImagingRequest,
    ReadingTask,
    Report,
)

#: UPS Push SOP Class (PS3.4 CC.3.1); the one UPS-RS workitems are instances of.
UPS_PUSH_SOP_CLASS = "1.2.840.10008.5.1.4.34.6.1"
#: Namespace of the workitem UIDs (fixed: a task's workitem UID never changes).
UID_NAMESPACE = uuid.UUID("6f1c1d0e-8a57-5d8e-9a31-73696d72616c")

SCHEDULED = "SCHEDULED"
IN_PROGRESS = "IN PROGRESS"
COMPLETED = "COMPLETED"
CANCELED = "CANCELED"
#: Procedure Step State (0074,1000) of each task state that is a workitem.
STATE_OF_TASK = {
    TASK_READY: SCHEDULED,
    TASK_CLAIMED: IN_PROGRESS,
    TASK_REPORTED: COMPLETED,
    TASK_CANCELLED: CANCELED,
}
TASK_OF_STATE = {state: task for task, state in STATE_OF_TASK.items()}
#: Scheduled Procedure Step Priority (0074,1200) of each task priority.
PRIORITY_OF_TASK = {PRIORITY_URGENT: "HIGH"}
ROUTINE_PRIORITY = "MEDIUM"
#: Scheduled Workitem Code (0040,4018): DCM 110005 "Interpretation" (PS3.16 CID 9231).
INTERPRETATION = ("110005", "DCM", "Interpretation")


class WorkitemError(ValueError):
    """A Change State refused (PS3.18 11.7.3.3): ``status`` to answer and the ``warning`` text of
    its Warning header (PS3.4 Table CC.2.4-1 wording)."""

    def __init__(self, status: int, warning: str) -> None:
        super().__init__(warning)
        self.status = status
        self.warning = warning


@dataclass(frozen=True)
class StateChange:
    """The outcome of an accepted Change State: the task and, for a request that changed nothing,
    the warning to return with the 200 (PS3.4 B304-B306)."""

    task: ReadingTask
    warning: str = ""


def workitem_uid(task_id: int) -> str:
    """The workitem's SOP Instance UID: ``2.25.`` + UUID 5 (PS3.5 B.2) of the task id."""
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, f'reading-task:{task_id}').int}"


# ------------------------------------------------------------------------------------ visibility


def _group(principal: Principal) -> str:
    """The reading group whose workitems ``principal`` sees (empty: none), as ``list_tasks``."""
    group = principal.organisation
    return group if group and (_reader(principal, group) or may_assign_reading(principal, group)) else ""


@dataclass(frozen=True)
class Match:
    """Search keys (PS3.18 11.9.3.2), each empty when not given."""

    states: tuple[str, ...] = ()
    priority: str = ""
    patient_id: str = ""
    study_uid: str = ""


def _query(group: str) -> Select[ReadingTask, Study | None, Patient | None, ImagingRequest | None]:
    return (
        select(ReadingTask, Study, Patient, ImagingRequest)
        .outerjoin(Study, Study.study_uid == ReadingTask.study_uid)
        .outerjoin(Patient, Patient.id == Study.patient_pk)
        .outerjoin(ImagingRequest, ImagingRequest.id == ReadingTask.request_id)
        .where(ReadingTask.group_code == group, ReadingTask.state.in_(tuple(STATE_OF_TASK)))
    )


def search(
    session: Session, principal: Principal, match: Match, *, limit: int, offset: int, root: str
) -> tuple[list[Dataset], bool]:
    """The workitems ``principal`` may see matching ``match`` (urgent first, then by deadline), and
    whether more remain after ``limit``. ``root``: the DICOMweb base URL for Retrieve URLs."""
    group = _group(principal)
    if not group:
        return [], False
    query = _query(group)
    if match.states:
        task_states = [TASK_OF_STATE[s] for s in match.states if s in TASK_OF_STATE]
        query = query.where(ReadingTask.state.in_(task_states))
    if match.priority:
        urgent = match.priority == PRIORITY_OF_TASK[PRIORITY_URGENT]
        if match.priority not in (PRIORITY_OF_TASK[PRIORITY_URGENT], ROUTINE_PRIORITY):
            return [], False
        query = query.where(
            ReadingTask.priority == PRIORITY_URGENT if urgent else ReadingTask.priority != PRIORITY_URGENT
        )
    if match.patient_id:
        query = query.where(Patient.patient_id == match.patient_id)
    if match.study_uid:
        query = query.where(ReadingTask.study_uid == match.study_uid)
    rows = session.execute(query.order_by(*tasks._order()).offset(offset).limit(limit + 1)).all()
    items = [_dataset(session, *row, root=root) for row in rows[:limit]]
    return items, len(rows) > limit


def find(session: Session, principal: Principal, uid: str) -> ReadingTask | None:
    """The task whose workitem is ``uid``, if ``principal`` may see it."""
    group = _group(principal)
    if not group or not uid.startswith("2.25."):
        return None
    ids = session.scalars(
        select(ReadingTask.id).where(
            ReadingTask.group_code == group, ReadingTask.state.in_(tuple(STATE_OF_TASK))
        )
    )
    task_id = next((i for i in ids if workitem_uid(i) == uid), None)
    return tasks.get_or_raise(session, task_id) if task_id is not None else None


def retrieve(session: Session, principal: Principal, uid: str, *, root: str) -> Dataset | None:
    """The workitem ``uid`` (PS3.18 11.5), if ``principal`` may see it."""
    task = find(session, principal, uid)
    if task is None:
        return None
    row = session.execute(_query(task.group_code).where(ReadingTask.id == task.id)).one()
    return _dataset(session, *row, root=root)


# ------------------------------------------------------------------------------- the dataset


def _dt(value: datetime | None) -> str:
    """A DT value in UTC (PS3.5 6.2), empty when unknown."""
    moment = as_utc(value)
    return moment.strftime("%Y%m%d%H%M%S+0000") if moment is not None else ""


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _performer(session: Session, login: str, group: str) -> Dataset:
    """A Human Performer item (PS3.4 Table CC.2.5-3): the radiologist by national id (RPPS) when
    known (local scheme 99IDNATPS, the national id of the health professional), else
    by login (99SIMRAL), with their name and organisation."""
    professional = session.scalar(select(Professional).where(Professional.login == login))
    organisation = session.scalar(select(Organisation.name).where(Organisation.code == group))
    item = Dataset()
    if professional is not None and professional.national_id:
        code = _code(professional.national_id, "99IDNATPS", professional.display_name or login)
    else:
        code = _code(login[:16], "99SIMRAL", login[:64])
    item.HumanPerformerCodeSequence = Sequence([code])
    name = (professional.display_name if professional is not None else "") or login
    item.HumanPerformerName = name.replace("^", " ")[:64]
    item.HumanPerformerOrganization = (organisation or group)[:64]
    return item


def _signed_at(session: Session, task_id: int) -> datetime | None:
    return session.scalar(
        select(Report.signed_at)
        .where(Report.task_id == task_id, Report.state == REPORT_SIGNED)
        .order_by(Report.version)
        .limit(1)
    )


def _dataset(
    session: Session,
    task: ReadingTask,
    study: Study | None,
    patient: Patient | None,
    request: ImagingRequest | None,
    *,
    root: str,
) -> Dataset:
    """The UPS attributes of PS3.4 Table CC.2.5-3 that apply to a reading task (the Transaction
    UID is never returned, PS3.4 CC.2.5.1.2)."""
    state = STATE_OF_TASK[task.state]
    ds = Dataset()
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = UPS_PUSH_SOP_CLASS
    ds.SOPInstanceUID = workitem_uid(task.id)
    # Unified Procedure Step Scheduled Procedure Information
    ds.ScheduledProcedureStepPriority = PRIORITY_OF_TASK.get(task.priority, ROUTINE_PRIORITY)
    ds.ScheduledProcedureStepModificationDateTime = _dt(task.updated_at)
    description = (study.description if study is not None else "") or ""
    ds.ProcedureStepLabel = " ".join(p for p in ("Interpretation", task.modality, description) if p)[:64]
    ds.WorklistLabel = f"Reading {task.group_code}"[:64]
    ds.ScheduledStationNameCodeSequence = Sequence()
    ds.ScheduledStationClassCodeSequence = Sequence()
    ds.ScheduledStationGeographicLocationCodeSequence = Sequence()
    ds.ScheduledHumanPerformersSequence = Sequence(
        [_performer(session, task.claimed_by, task.group_code)] if task.claimed_by else []
    )
    ds.ScheduledProcedureStepStartDateTime = _dt(task.ready_at or task.created_at)
    if task.due_at is not None:
        ds.ExpectedCompletionDateTime = _dt(task.due_at)
    ds.ScheduledWorkitemCodeSequence = Sequence([_code(*INTERPRETATION)])
    updates = _updates(task) if state in (IN_PROGRESS, COMPLETED) else {}
    ds.CommentsOnTheScheduledProcedureStep = str(updates.get("comments") or "")
    ds.InputReadinessState = "READY"
    study_input = Dataset()
    study_input.TypeOfInstances = "DICOM"
    study_input.StudyInstanceUID = task.study_uid
    study_input.RetrieveURL = f"{root}/studies/{task.study_uid}"
    ds.InputInformationSequence = Sequence([study_input])
    ds.StudyInstanceUID = task.study_uid
    # Unified Procedure Step Relationship: the patient as the archive stored the study
    ds.PatientName = patient.name.split("=")[0] if patient is not None else ""
    ds.PatientID = patient.patient_id if patient is not None else ""
    ds.IssuerOfPatientID = patient.issuer[:64] if patient is not None else ""
    ds.PatientBirthDate = patient.birth_date if patient is not None else ""
    ds.PatientSex = patient.sex[:16] if patient is not None else ""
    ds.AdmissionID = ""
    ds.IssuerOfAdmissionIDSequence = Sequence()
    ds.AdmittingDiagnosesDescription = ""
    ds.AdmittingDiagnosesCodeSequence = Sequence()
    ordered = Dataset()
    ordered.StudyInstanceUID = task.study_uid
    ordered.AccessionNumber = (study.accession_number if study is not None else "") or (
        request.accession_number if request is not None else ""
    )
    ordered.IssuerOfAccessionNumberSequence = Sequence()
    ordered.RequestedProcedureID = ""
    ordered.RequestedProcedureDescription = description
    ordered.RequestedProcedureCodeSequence = Sequence()
    ordered.PlacerOrderNumberImagingServiceRequest = request.placer_number[:16] if request else ""
    ordered.FillerOrderNumberImagingServiceRequest = ""
    ds.ReferencedRequestSequence = Sequence([ordered])
    ds.ReplacedProcedureStepSequence = Sequence()
    # Unified Procedure Step Progress Information
    ds.ProcedureStepState = state
    progress = Dataset()
    if state == IN_PROGRESS:
        reported = updates.get("progress") or {}
        percent = reported.get("percent")
        progress.ProcedureStepProgress = 0 if percent is None else percent
        progress.ProcedureStepProgressDescription = (
            reported.get("description") or "Claimed for interpretation"
        )
        contacts = []
        for uri, name in reported.get("contacts") or []:
            contact = Dataset()
            contact.ContactURI = uri
            contact.ContactDisplayName = name
            contacts.append(contact)
        if contacts:
            progress.ProcedureStepCommunicationsURISequence = Sequence(contacts)
    elif state == COMPLETED:
        progress.ProcedureStepProgress = 100
        progress.ProcedureStepProgressDescription = "Report signed"
    elif state == CANCELED:
        progress.ProcedureStepCancellationDateTime = _dt(task.updated_at)
        progress.ReasonForCancellation = "Request cancelled by the requesting site"
    ds.ProcedureStepProgressInformationSequence = Sequence([progress] if state != SCHEDULED else [])
    # Unified Procedure Step Performed Procedure Information
    performed: list[Dataset] = []
    reported_performed = updates.get("performed")
    if state == COMPLETED or reported_performed:
        done = Dataset()
        done.ActualHumanPerformersSequence = Sequence(
            [_performer(session, task.claimed_by, task.group_code)] if task.claimed_by else []
        )
        done.PerformedStationNameCodeSequence = Sequence()
        done.PerformedProcedureStepStartDateTime = _dt(task.claimed_at or task.ready_at)
        done.PerformedWorkitemCodeSequence = Sequence([_code(*INTERPRETATION)])
        if state == COMPLETED:
            done.PerformedProcedureStepEndDateTime = _dt(_signed_at(session, task.id) or task.updated_at)
        if reported_performed and reported_performed.get("description"):
            done.PerformedProcedureStepDescription = reported_performed["description"]
        if reported_performed and reported_performed.get("comments"):
            done.CommentsOnThePerformedProcedureStep = reported_performed["comments"]
        done.OutputInformationSequence = Sequence(
            [_output(item) for item in (reported_performed or {}).get("outputs") or []]
        )
        performed.append(done)
    ds.UnifiedProcedureStepPerformedProcedureSequence = Sequence(performed)
    return ds


def _output(stored: dict[str, Any]) -> Dataset:
    """An Output Information Sequence item (PS3.4 Table CC.2.5-3) as an Update gave it."""
    item = Dataset()
    item.TypeOfInstances = "DICOM"
    item.StudyInstanceUID = stored.get("study", "")
    item.SeriesInstanceUID = stored.get("series", "")
    references = []
    for sop_class, sop_instance in stored.get("instances") or []:
        reference = Dataset()
        reference.ReferencedSOPClassUID = sop_class
        reference.ReferencedSOPInstanceUID = sop_instance
        references.append(reference)
    item.ReferencedSOPSequence = Sequence(references)
    return item


def to_json(items: Seq[Dataset]) -> list[dict[str, Any]]:
    """DICOM JSON (PS3.18 F.2) of ``items``."""
    return [item.to_json_dict() for item in items]


# ------------------------------------------------------------------------------ change state


def _audit(session: Session, action: str, task: ReadingTask, principal: Principal, **detail: Any) -> None:
    audit.record(
        session,
        action=action,
        principal=principal,
        study_uid=task.study_uid,
        detail={"task": task.id, "group": task.group_code, "workitem": workitem_uid(task.id), **detail},
    )


def change_state(
    session: Session, principal: Principal, uid: str, *, state: str, transaction_uid: str
) -> StateChange | None:
    """Change State (PS3.18 11.7, PS3.4 CC.2.1.3 and Table CC.2.4-1) of the workitem ``uid``; None
    when ``principal`` may not see it. Raises :class:`WorkitemError` when refused,
    :class:`AccessDenied` when the principal may see but not perform it."""
    if state not in (IN_PROGRESS, COMPLETED, CANCELED):
        raise WorkitemError(
            400, "The requested Procedure Step State is not IN PROGRESS, COMPLETED or CANCELED"
        )
    if not transaction_uid:
        raise WorkitemError(400, "The Transaction UID is missing")
    task = find(session, principal, uid)
    if task is None:
        return None
    current = STATE_OF_TASK[task.state]
    if state == IN_PROGRESS:
        return _start(session, principal, task, current, transaction_uid)
    if current in (SCHEDULED, CANCELED) or (current == COMPLETED and state == CANCELED):
        if current == state:
            return StateChange(task, warning=f"The UPS is already in the requested state of {state}")
        raise WorkitemError(
            409,
            f"The submitted request is inconsistent with the current state of the UPS Instance ({current})",
        )
    if task.ups_transaction_uid != transaction_uid:
        raise WorkitemError(400, "The Transaction UID is incorrect")
    if state == CANCELED:
        try:
            tasks.release(session, task.id, principal=principal)
        except tasks.TaskError as exc:
            raise WorkitemError(409, str(exc)) from None
        session.execute(
            update(ReadingTask)
            .where(ReadingTask.id == task.id)
            .values(ups_transaction_uid="")
            .execution_options(synchronize_session=False)
        )
        released = tasks.get_or_raise(session, task.id)
        _audit(session, "reading-task.ups-cancel", released, principal)
        return StateChange(released)
    # COMPLETED: the signed report completed the step (PS3.4 CC.2.5.1.3 final state requirements).
    if current != COMPLETED or not _signed_at(session, task.id):
        raise WorkitemError(
            409,
            "The submitted request is inconsistent with the current state of the UPS Instance"
            " (the report is not signed)",
        )
    if not _reader(principal, task.group_code) or task.claimed_by != principal.name:
        raise AccessDenied(f"{principal.audit_name} does not hold reading task {task.id}")
    _audit(session, "reading-task.ups-complete", task, principal)
    return StateChange(task, warning="The UPS is already in the requested state of COMPLETED")


def _reader(principal: Principal, group: str) -> bool:
    return principal.kind == "user" and may_review_requests(principal, group)


def _start(
    session: Session, principal: Principal, task: ReadingTask, current: str, transaction_uid: str
) -> StateChange:
    """IN PROGRESS: claim the task (exclusive) for ``principal`` and store the Transaction UID. The
    holder of a task claimed on the worklist may attach (or renew) its Transaction UID."""
    holder = (
        current == IN_PROGRESS and task.claimed_by == principal.name and _reader(principal, task.group_code)
    )
    if current == SCHEDULED:
        try:
            task = tasks.claim(session, task.id, principal=principal)
        except tasks.TaskError as exc:
            raise WorkitemError(409, "The UPS is already IN PROGRESS" if exc.conflict else str(exc)) from None
    elif holder and task.ups_transaction_uid == transaction_uid:
        return StateChange(task, warning="The UPS is already in the requested state of IN PROGRESS")
    elif not holder:
        raise WorkitemError(409, f"The UPS is already {current}")
    result = session.execute(
        update(ReadingTask)
        .where(
            ReadingTask.id == task.id,
            ReadingTask.state == TASK_CLAIMED,
            ReadingTask.claimed_by == principal.name,
        )
        .values(ups_transaction_uid=transaction_uid[:64], updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        raise WorkitemError(409, "The UPS is already IN PROGRESS")
    started = tasks.get_or_raise(session, task.id)
    _audit(session, "reading-task.ups-start", started, principal)
    return StateChange(started)


# ------------------------------------------------------------------------------------ update

#: Update (N-SET) attributes the SCU may never set (PS3.4 Table CC.2.5-3, N-SET "Not allowed":
#: the SOP Common identifiers and the Procedure Step State, changed by Change State only) and those
#: simral derives from the request and the task (the patient and the request are the requesting
#: site's, the schedule and the performers the worklist's): refused, 400.
NOT_SETTABLE = frozenset(
    {
        "SOPClassUID",
        "SOPInstanceUID",
        "ProcedureStepState",
        "ScheduledProcedureStepPriority",
        "ScheduledProcedureStepStartDateTime",
        "ScheduledProcedureStepExpirationDateTime",
        "ExpectedCompletionDateTime",
        "ScheduledHumanPerformersSequence",
        "ScheduledWorkitemCodeSequence",
        "InputInformationSequence",
        "InputReadinessState",
        "StudyInstanceUID",
        "ReferencedRequestSequence",
        "ReplacedProcedureStepSequence",
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "IssuerOfPatientIDQualifiersSequence",
        "OtherPatientIDsSequence",
        "PatientBirthDate",
        "PatientSex",
    }
)
#: What an Update stores (PS3.4 Table CC.2.5-3, N-SET 3/1 or 2/2); any other attribute is
#: ignored with the "optional Attributes are not supported" warning (PS3.18 11.6.3.2).
SETTABLE = frozenset(
    {
        "ProcedureStepProgressInformationSequence",
        "CommentsOnTheScheduledProcedureStep",
        "UnifiedProcedureStepPerformedProcedureSequence",
    }
)
#: Attributes of the request that are not workitem content.
_CONTROL = frozenset({"TransactionUID", "SpecificCharacterSet"})
#: Within the Procedure Step Progress Information Sequence and the Performed Procedure Sequence.
_PROGRESS_KEYS = frozenset(
    {"ProcedureStepProgress", "ProcedureStepProgressDescription", "ProcedureStepCommunicationsURISequence"}
)
_PERFORMED_KEYS = frozenset(
    {"OutputInformationSequence", "CommentsOnThePerformedProcedureStep", "PerformedProcedureStepDescription"}
)
#: The audit action recording each accepted update (who, which attributes).
UPDATE_ACTION = "reading-task.ups-update"
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_OPTIONAL_WARNING = "Requested optional Attributes are not supported"


@dataclass(frozen=True)
class UpdateResult:
    """An accepted Update: the task, and the warning to answer with the 200 (empty: none)."""

    task: ReadingTask
    warning: str = ""


def _text(value: Any, keyword: str, limit: int) -> str:
    text = str(value or "").strip()
    if len(text) > limit:
        raise WorkitemError(400, f"The dataset did not conform to the requirements: {keyword} is too long")
    return text


def _uid(value: Any, keyword: str) -> str:
    uid = str(value or "").strip()
    if len(uid) > 64 or not _UID.match(uid):
        raise WorkitemError(400, f"The dataset did not conform to the requirements: {keyword} is not a UID")
    return uid


def _one_item(ds: Dataset, keyword: str) -> Dataset | None:
    items = list(ds.get(keyword) or [])
    if len(items) > 1:
        raise WorkitemError(400, f"The dataset did not conform to the requirements: one {keyword} item")
    return items[0] if items else None


def _progress(item: Dataset | None, ignored: set[str]) -> dict[str, Any]:
    """The progress (PS3.4 Table CC.2.5-3 Progress Information) of one Update, replacing the last."""
    out: dict[str, Any] = {"percent": None, "description": "", "contacts": []}
    if item is None:
        return out
    ignored.update(e.keyword or str(e.tag) for e in item if e.keyword not in _PROGRESS_KEYS)
    raw = item.get("ProcedureStepProgress")
    if raw not in (None, ""):
        try:
            percent = float(raw)
        except (TypeError, ValueError):
            percent = -1.0
        if not 0 <= percent <= 100:
            raise WorkitemError(
                400, "The dataset did not conform to the requirements: ProcedureStepProgress is 0 to 100"
            )
        out["percent"] = percent
    out["description"] = _text(
        item.get("ProcedureStepProgressDescription"), "ProcedureStepProgressDescription", 1024
    )
    for contact in list(item.get("ProcedureStepCommunicationsURISequence") or [])[:8]:
        uri = _text(contact.get("ContactURI"), "ContactURI", 1024)
        if uri:
            out["contacts"].append([uri, _text(contact.get("ContactDisplayName"), "ContactDisplayName", 64)])
    return out


def _outputs(performed: Dataset, ignored: set[str]) -> list[dict[str, Any]]:
    """The Output Information Sequence items: DICOM references (study, series, SOP instances)."""
    outputs: list[dict[str, Any]] = []
    for item in list(performed.get("OutputInformationSequence") or [])[:32]:
        known = {"TypeOfInstances", "StudyInstanceUID", "SeriesInstanceUID", "ReferencedSOPSequence"}
        ignored.update(e.keyword or str(e.tag) for e in item if e.keyword not in known)
        kind = _text(item.get("TypeOfInstances") or "DICOM", "TypeOfInstances", 16).upper()
        if kind != "DICOM":
            ignored.add("OutputInformationSequence.TypeOfInstances")
            continue
        references = [
            [
                _uid(ref.get("ReferencedSOPClassUID"), "ReferencedSOPClassUID"),
                _uid(ref.get("ReferencedSOPInstanceUID"), "ReferencedSOPInstanceUID"),
            ]
            for ref in list(item.get("ReferencedSOPSequence") or [])[:1000]
        ]
        outputs.append(
            {
                "study": _uid(item.get("StudyInstanceUID"), "StudyInstanceUID"),
                "series": _uid(item.get("SeriesInstanceUID"), "SeriesInstanceUID"),
                "instances": references,
            }
        )
    return outputs


def parse_update(payload: Dataset) -> tuple[dict[str, Any], list[str]]:
    """What an Update payload sets (only the keys it carries: N-SET leaves the others as they are)
    and the attributes ignored; :class:`WorkitemError` (400) for an attribute that may not be set or
    a value that does not conform."""
    refused = sorted(e.keyword for e in payload if e.keyword in NOT_SETTABLE)
    if refused:
        raise WorkitemError(
            400,
            "The dataset did not conform to the requirements: these attributes may not be updated: "
            + ", ".join(refused),
        )
    ignored: set[str] = {
        e.keyword or str(e.tag) for e in payload if e.keyword not in SETTABLE and e.keyword not in _CONTROL
    }
    changes: dict[str, Any] = {}
    if "ProcedureStepProgressInformationSequence" in payload:
        changes["progress"] = _progress(
            _one_item(payload, "ProcedureStepProgressInformationSequence"), ignored
        )
    if "CommentsOnTheScheduledProcedureStep" in payload:
        changes["comments"] = _text(
            payload.get("CommentsOnTheScheduledProcedureStep"), "CommentsOnTheScheduledProcedureStep", 10240
        )
    if "UnifiedProcedureStepPerformedProcedureSequence" in payload:
        performed = _one_item(payload, "UnifiedProcedureStepPerformedProcedureSequence") or Dataset()
        ignored.update(e.keyword or str(e.tag) for e in performed if e.keyword not in _PERFORMED_KEYS)
        changes["performed"] = {
            "description": _text(
                performed.get("PerformedProcedureStepDescription"), "PerformedProcedureStepDescription", 64
            ),
            "comments": _text(
                performed.get("CommentsOnThePerformedProcedureStep"),
                "CommentsOnThePerformedProcedureStep",
                10240,
            ),
            "outputs": _outputs(performed, ignored),
        }
    return changes, sorted(ignored)


def update_workitem(
    session: Session, principal: Principal, uid: str, *, payload: Dataset, transaction_uid: str
) -> UpdateResult | None:
    """Update Workitem (PS3.18 11.6; PS3.4 CC.2.6, N-SET) by its performer: None when ``principal``
    may not see ``uid``. A SCHEDULED workitem is not updated (its scheduling is the request's and
    the worklist's: 409); a COMPLETED or CANCELED one is final (400, PS3.18 11.6.2); an IN PROGRESS
    one needs the Transaction UID given to Change State (400 when missing or incorrect) and its
    holder (:class:`AccessDenied` for anyone else). The accepted values are kept with the task
    (``ups_updates``, under that Transaction UID), which Retrieve and Search read back; the audit
    record (:data:`UPDATE_ACTION`) names the attributes set."""
    task = find(session, principal, uid)
    if task is None:
        return None
    current = STATE_OF_TASK[task.state]
    if current in (COMPLETED, CANCELED):
        raise WorkitemError(
            400, f"The submitted request is inconsistent with the current state of the Workitem ({current})"
        )
    if current == SCHEDULED:
        raise WorkitemError(409, "The target URI did not reference a claimed Workitem")
    if not transaction_uid:
        raise WorkitemError(400, "The Transaction UID is missing")
    if task.ups_transaction_uid != transaction_uid:
        raise WorkitemError(400, "The Transaction UID is incorrect")
    if not _reader(principal, task.group_code) or task.claimed_by != principal.name:
        raise AccessDenied(f"{principal.audit_name} does not hold reading task {task.id}")
    changes, ignored = parse_update(payload)
    warning = f"{_OPTIONAL_WARNING}: {', '.join(ignored)[:200]}" if ignored else ""
    if not changes:
        return UpdateResult(task, warning=warning)
    result = session.execute(
        update(ReadingTask)
        .where(
            ReadingTask.id == task.id,
            ReadingTask.state == TASK_CLAIMED,
            ReadingTask.claimed_by == principal.name,
            ReadingTask.ups_transaction_uid == transaction_uid,
        )
        .values(updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        raise WorkitemError(
            409, "The submitted request is inconsistent with the current state of the Workitem"
        )
    updated = tasks.get_or_raise(session, task.id)
    updated.ups_updates = {"transaction": transaction_uid, "set": {**_updates(updated), **changes}}
    # The trail says who changed what; the values (free text among them) stay with the task.
    _audit(session, UPDATE_ACTION, updated, principal, set=sorted(changes), ignored=ignored)
    return UpdateResult(updated, warning=warning)


def _updates(task: ReadingTask) -> dict[str, Any]:
    """The values set by Update under the task's current Transaction UID (its current claim)."""
    stored = task.ups_updates or {}
    if not task.ups_transaction_uid or stored.get("transaction") != task.ups_transaction_uid:
        return {}
    values = stored.get("set")
    return dict(values) if isinstance(values, dict) else {}
