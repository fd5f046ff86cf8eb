"""Reading tasks: the studies a reading group is to interpret (DESIGN.md §7, issue 6 item 4).

A task is opened for a study when the post-exam complement arrives (ANS flux 4, by
:mod:`simral.reading.service`) or when images arrive under the Study Instance UID of a scheduled
procedure (the Modality Worklist gave it to the modality, PS3.4 K.6.1). It is ``waiting`` until
the study's images are complete, then ``ready`` on the group's worklist:

- an MPPS of the study is COMPLETED (PS3.4 F.7) and every instance its Performed Series Sequence
  references is stored (at least one instance when it references none), or
- no instance arrived for ``reading_quiet_seconds`` (modalities without MPPS).

A radiologist of the group claims a ready task (exclusively: one conditional UPDATE, so two
claims never both win, whatever process they run in), releases it, or a group administrator hands
it to another radiologist. Tasks whose deadline is near or passed are escalated once: an alert
for the group's administrators and an audit record. Once ready, the group is attached to the
study (relation ``received``), so its radiologists see it through the access policy.

Routing by subspecialty and on-call schedule (:mod:`simral.reading.routing`): a task is opened for
the group the contract rules choose; once ready it is pre-assigned to the radiologist on call for it
(the assignment follows the schedule while the task stays ready), and a near deadline alerts that
radiologist first, the group's administrators when it passes.

The periodic work (:func:`due_work` read-only, then :func:`do_work` in one unit of work) runs in
every serving process (:mod:`simral.exchange`); each change is a conditional UPDATE and the work
is serialised on the database, so processes share it without doing anything twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, exists, func, insert, or_, select, update
from sqlalchemy.orm import Session, aliased

from simral.access.policy import (
    AccessDenied,
    Principal,
    may_assign_reading,
    may_review_requests,
    visible_studies,
)
from simral.archive.models import ChangeEvent, Instance, Study, StudyOrganisation
from simral.audit import service as audit
from simral.db.base import as_utc, utcnow
from simral.identity.models import AdminAlert, Organisation, Professional
from simral.reading import routing
from simral.reading.models import (
    PRIORITIES,
    PRIORITY_URGENT,
    REQUEST_ACCEPTED,
    REQUEST_PERFORMED,
    STEP_COMPLETED,
    STEP_IN_PROGRESS,
    STEP_SCHEDULED,
    TASK_CANCELLED,
    TASK_CLAIMED,
    TASK_READY,
    TASK_REPORTED,
    TASK_WAITING,
    ImagingRequest,
    PerformedProcedureStep,
    ReadingTask,
    ScheduledProcedure,
)
from simral.sharing import service as sharing

#: Who the periodic checks act as in the audit trail.
READING_SYSTEM = Principal(kind="system", name="reading-tasks", archive_wide=True, via="scheduler")
#: Advisory lock key serialising :func:`do_work` across processes on PostgreSQL.
READING_LOCK = 0x5349_5254
#: Open tasks (the deadline still matters).
OPEN_STATES = (TASK_WAITING, TASK_READY, TASK_CLAIMED)


class TaskError(ValueError):
    """A task operation that cannot be done (``conflict``: someone else changed the task first)."""

    def __init__(self, message: str, *, conflict: bool = False) -> None:
        super().__init__(message)
        self.conflict = conflict


def open_task(
    session: Session,
    *,
    study_uid: str,
    site_code: str,
    group_code: str,
    modality: str = "",
    priority: str,
    due_at: datetime | None,
    request_id: int | None = None,
    subspecialty: str = "",
) -> ReadingTask:
    """The reading task of a study, opened (state ``waiting``) if it has none still open: a study
    is read once per request; a task reported or cancelled does not block a new one."""
    if priority not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}")
    existing = session.scalar(
        select(ReadingTask)
        .where(
            ReadingTask.study_uid == study_uid,
            ReadingTask.state.not_in((TASK_REPORTED, TASK_CANCELLED)),
        )
        .order_by(ReadingTask.id.desc())
        .limit(1)
    )
    if existing is not None:
        return existing
    now = utcnow()
    task = ReadingTask(
        request_id=request_id,
        study_uid=study_uid,
        site_code=site_code,
        group_code=group_code,
        modality=modality,
        subspecialty=subspecialty,
        priority=priority,
        due_at=due_at,
        state=TASK_WAITING,
        created_at=now,
        updated_at=now,
    )
    session.add(task)
    session.flush()
    return task


# --------------------------------------------------------------------------- readiness


def _mpps_references(attributes: dict[str, Any]) -> set[str]:
    """SOP Instance UIDs an MPPS's Performed Series Sequence (0040,0340) references (Referenced
    Image Sequence 0008,1140 and Referenced Non-Image Composite SOP Instance Sequence 0040,0220)."""
    found: set[str] = set()
    for series in (attributes.get("00400340") or {}).get("Value") or []:
        for sequence in ("00081140", "00400220"):
            for item in (series.get(sequence) or {}).get("Value") or []:
                for uid in (item.get("00081155") or {}).get("Value") or []:
                    found.add(str(uid))
    return found


def _stored_count(session: Session, sop_uids: Iterable[str]) -> int:
    uids = sorted(set(sop_uids))
    total = 0
    for start in range(0, len(uids), 500):
        chunk = uids[start : start + 500]
        total += (
            session.scalar(select(func.count()).select_from(Instance).where(Instance.sop_uid.in_(chunk))) or 0
        )
    return total


def completion(session: Session, study_uid: str, *, now: datetime, quiet: timedelta | None) -> str | None:
    """Why the images of ``study_uid`` are complete — ``"mpps"`` (an MPPS COMPLETED whose
    referenced instances are all stored) or ``"quiet"`` (nothing new for ``quiet``; None: this rule
    is not applied) — or None while they are not (or none arrived)."""
    last = as_utc(session.scalar(select(func.max(ChangeEvent.at)).where(ChangeEvent.study_uid == study_uid)))
    if last is None:
        return None
    for attributes in session.scalars(
        select(PerformedProcedureStep.attributes).where(
            PerformedProcedureStep.study_uid == study_uid, PerformedProcedureStep.status == STEP_COMPLETED
        )
    ):
        referenced = _mpps_references(attributes or {})
        if not referenced or _stored_count(session, referenced) == len(referenced):
            return "mpps"
    if quiet is not None and last <= now - quiet:
        return "quiet"
    return None


def _attach_group(session: Session, study_uid: str, group_code: str, *, now: datetime) -> None:
    """The group receives the study (its members see it through the access policy)."""
    study_pk = session.scalar(select(Study.id).where(Study.study_uid == study_uid))
    if study_pk is None or not group_code:
        return
    known = session.scalar(
        select(StudyOrganisation.id).where(
            StudyOrganisation.study_pk == study_pk, StudyOrganisation.organisation_code == group_code
        )
    )
    if known is None:
        session.execute(
            insert(StudyOrganisation).values(
                study_pk=study_pk, organisation_code=group_code, relation="received", created_at=now
            )
        )


def _make_ready(session: Session, task: ReadingTask, *, now: datetime, reason: str) -> bool:
    """waiting → ready (conditional: another process may have done it)."""
    result = session.execute(
        update(ReadingTask)
        .where(ReadingTask.id == task.id, ReadingTask.state == TASK_WAITING)
        .values(state=TASK_READY, ready_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        return False
    session.refresh(task)
    _attach_group(session, task.study_uid, task.group_code, now=now)
    priors = site_priors(session, task.study_uid, task.site_code)
    for prior in priors:
        _attach_group(session, prior, task.group_code, now=now)
    # The reading site's own workstation or PACS, if it has a prefetch rule, gets them all now.
    sharing.prefetch_for_reading(session, group_code=task.group_code, study_uids=[task.study_uid, *priors])
    audit.record(
        session,
        action="reading-task.ready",
        principal=READING_SYSTEM,
        study_uid=task.study_uid,
        detail={
            "task": task.id,
            "group": task.group_code,
            "site": task.site_code,
            "because": reason,
            "priors": priors,
        },
    )
    routing.assign_on_call(session, task, now=now, principal=READING_SYSTEM)
    return True


#: How many of the patient's earlier studies go with a task (attached to the group, shown in the viewer).
PRIORS = 5


def _other_studies_of_person(session: Session, study_uid: str) -> list[int]:
    """The other archived studies of the study's person (identity service: merged and linked
    identities included)."""
    from simral.patients import service as patients  # the identity service

    study_pk = session.scalar(select(Study.id).where(Study.study_uid == study_uid))
    person = patients.study_person(session, study_pk) if study_pk is not None else None
    if person is None:
        return []
    return [pk for pk in patients.person_study_pks(session, person) if pk != study_pk]


def visible_priors(
    session: Session, study_uid: str, *, principal: Principal, limit: int = PRIORS
) -> list[str]:
    """The patient's other studies ``principal`` may see (every identity of the person, every
    site; filtered by the access policy), newest first."""
    candidates = _other_studies_of_person(session, study_uid)
    if not candidates:
        return []
    query = visible_studies(principal, select(Study.study_uid).where(Study.id.in_(candidates)))
    return list(
        session.scalars(query.order_by(Study.study_date.desc(), Study.study_time.desc()).limit(limit))
    )


def site_priors(session: Session, study_uid: str, site_code: str, *, limit: int = PRIORS) -> list[str]:
    """The requesting site's other studies of the same person, newest first: the priors a remote
    radiologist compares with. The contract between the site and the reading group covers them;
    other sites' studies are not attached (they stay behind their own sharing decisions)."""
    candidates = _other_studies_of_person(session, study_uid) if site_code else []
    if not candidates:
        return []
    query = (
        select(Study.study_uid)
        .where(
            Study.id.in_(candidates),
            Study.id.in_(
                select(StudyOrganisation.study_pk).where(StudyOrganisation.organisation_code == site_code)
            ),
        )
        .order_by(Study.study_date.desc(), Study.study_time.desc())
        .limit(limit)
    )
    return list(session.scalars(query))


def _task_for_procedure(
    session: Session, step: ScheduledProcedure, request: ImagingRequest, *, now: datetime
) -> ReadingTask:
    """Open the task of a scheduled procedure whose images arrived: routed by the site's reading
    contract for the study's modality (the request's group otherwise), deadline
    :func:`simral.reading.service.reading_deadline` (the contract's turnaround from now, the
    desired delay from the request's reception)."""
    from simral.reading import service as requests  # the request service opens tasks too

    modality = step.modality or request.modality
    stored = session.scalar(select(Study.modalities).where(Study.study_uid == step.study_uid)) or ""
    if stored and modality not in stored.split("\\"):
        modality = stored.split("\\")[0]
    contract = requests.route(
        session, site_code=step.site_code, modality=modality, subspecialty=request.subspecialty, now=now
    )
    group = contract.group_code if contract is not None else request.group_code
    due = requests.reading_deadline(request, contract=contract, available_at=now)
    task = open_task(
        session,
        study_uid=step.study_uid,
        site_code=step.site_code,
        group_code=group,
        modality=modality,
        priority=request.priority,
        due_at=due or request.due_at,
        request_id=request.id,
        subspecialty=request.subspecialty,
    )
    audit.record(
        session,
        action="reading-task.open",
        principal=READING_SYSTEM,
        study_uid=step.study_uid,
        detail={"task": task.id, "group": group, "site": step.site_code, "step": step.step_id},
    )
    return task


def _procedures_with_images(session: Session, study_uid: str | None = None, limit: int = 200) -> list[int]:
    """Scheduled procedures of live requests whose study has images and no reading task yet."""
    query = (
        select(ScheduledProcedure.id)
        .join(ImagingRequest, ImagingRequest.id == ScheduledProcedure.request_id)
        .where(
            ScheduledProcedure.state.in_((STEP_SCHEDULED, STEP_IN_PROGRESS, STEP_COMPLETED)),
            ImagingRequest.state.in_((REQUEST_ACCEPTED, REQUEST_PERFORMED)),
            exists().where(Study.study_uid == ScheduledProcedure.study_uid),
            ~exists().where(ReadingTask.study_uid == ScheduledProcedure.study_uid),
        )
    )
    if study_uid is not None:
        query = query.where(ScheduledProcedure.study_uid == study_uid)
    return list(session.scalars(query.order_by(ScheduledProcedure.id).limit(limit)))


def refresh_study(
    session: Session, study_uid: str, *, now: datetime, quiet: timedelta | None = None
) -> ReadingTask | None:
    """Bring the reading task of ``study_uid`` up to date now (after an MPPS COMPLETED): open it if
    the study belongs to a scheduled procedure, make it ready if its images are complete. Returns
    the task made ready, if any."""
    for procedure_id in _procedures_with_images(session, study_uid):
        step = session.get(ScheduledProcedure, procedure_id)
        request = session.get(ImagingRequest, step.request_id) if step is not None else None
        if step is not None and request is not None:
            _task_for_procedure(session, step, request, now=now)
    task = session.scalar(
        select(ReadingTask)
        .where(ReadingTask.study_uid == study_uid, ReadingTask.state == TASK_WAITING)
        .limit(1)
    )
    if task is None:
        return None
    reason = completion(session, study_uid, now=now, quiet=quiet)
    if reason is not None and _make_ready(session, task, now=now, reason=reason):
        return task
    return None


# ------------------------------------------------------------------------- periodic work


@dataclass
class DueWork:
    """What the periodic check found to do (ids; :func:`do_work` checks each again)."""

    open_procedures: list[int] = field(default_factory=list)
    ready_tasks: list[int] = field(default_factory=list)
    escalate_tasks: list[int] = field(default_factory=list)
    #: Ready tasks whose on-call assignment is to follow the schedule (:func:`routing.assignment_due`).
    assign_tasks: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.open_procedures or self.ready_tasks or self.escalate_tasks or self.assign_tasks)


def _escalation_due(now: datetime, warn_before: timedelta) -> Any:
    """Open, not yet escalated, deadline within ``warn_before``; once the on-call radiologist was
    alerted, the group waits for the deadline itself."""
    return and_(
        ReadingTask.state.in_(OPEN_STATES),
        ReadingTask.escalated_at.is_(None),
        ReadingTask.due_at.is_not(None),
        ReadingTask.due_at <= now + warn_before,
        or_(ReadingTask.oncall_alerted_at.is_(None), ReadingTask.due_at <= now),
    )


def due_work(session: Session, *, now: datetime, quiet: timedelta, warn_before: timedelta) -> DueWork:
    """Look (read-only) for studies of scheduled procedures that arrived without a task, waiting
    tasks whose images are complete, and deadlines to escalate."""
    work = DueWork(open_procedures=_procedures_with_images(session))
    waiting = list(
        session.execute(
            select(ReadingTask.id, ReadingTask.study_uid)
            .where(ReadingTask.state == TASK_WAITING)
            .order_by(ReadingTask.id)
            .limit(500)
        )
    )
    work.ready_tasks = [
        task_id
        for task_id, study_uid in waiting
        if completion(session, study_uid, now=now, quiet=quiet) is not None
    ]
    work.escalate_tasks = list(
        session.scalars(
            select(ReadingTask.id)
            .where(_escalation_due(now, warn_before))
            .order_by(ReadingTask.id)
            .limit(500)
        )
    )
    work.assign_tasks = routing.assignment_due(session, now=now)
    return work


def _serialise(session: Session) -> None:
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({READING_LOCK})")


def do_work(
    session: Session, work: DueWork, *, now: datetime, quiet: timedelta, warn_before: timedelta
) -> DueWork:
    """Carry out :func:`due_work`'s findings in one unit of work (each checked again); returns what
    was done."""
    _serialise(session)
    done = DueWork()
    for procedure_id in work.open_procedures:
        if procedure_id not in _procedures_with_images(session, _study_of(session, procedure_id)):
            continue
        step = session.get(ScheduledProcedure, procedure_id)
        request = session.get(ImagingRequest, step.request_id) if step is not None else None
        if step is not None and request is not None:
            task = _task_for_procedure(session, step, request, now=now)
            done.open_procedures.append(procedure_id)
            reason = completion(session, task.study_uid, now=now, quiet=quiet)
            if reason is not None and _make_ready(session, task, now=now, reason=reason):
                done.ready_tasks.append(task.id)
    for task_id in work.ready_tasks:
        waiting = session.get(ReadingTask, task_id)
        if waiting is None or waiting.state != TASK_WAITING:
            continue
        reason = completion(session, waiting.study_uid, now=now, quiet=quiet)
        if reason is not None and _make_ready(session, waiting, now=now, reason=reason):
            done.ready_tasks.append(waiting.id)
    for task_id in work.escalate_tasks:
        if _escalate(session, task_id, now=now, warn_before=warn_before):
            done.escalate_tasks.append(task_id)
    for task_id in work.assign_tasks:
        ready = session.get(ReadingTask, task_id, populate_existing=True)
        if ready is None or ready.state != TASK_READY:
            continue
        before = ready.assigned_to
        if routing.assign_on_call(session, ready, now=now, principal=READING_SYSTEM) != before:
            done.assign_tasks.append(task_id)
    return done


def _study_of(session: Session, procedure_id: int) -> str:
    return (
        session.scalar(select(ScheduledProcedure.study_uid).where(ScheduledProcedure.id == procedure_id))
        or ""
    )


def _alert_on_call(session: Session, task_id: int, *, now: datetime) -> bool:
    """Alert the radiologist on call for a ready task whose deadline is near but not passed (the
    first step of the escalation, :mod:`simral.reading.routing`); False when there is nobody to
    alert that way (the group is then alerted)."""
    task = session.get(ReadingTask, task_id, populate_existing=True)
    due = as_utc(task.due_at) if task is not None else None
    if task is None or task.state != TASK_READY or task.oncall_alerted_at is not None or due is None:
        return False
    if due <= now:
        return False
    login = routing.assign_on_call(session, task, now=now, principal=READING_SYSTEM, alert=True)
    return bool(login) and task.oncall_alerted_at is not None


def _escalate(session: Session, task_id: int, *, now: datetime, warn_before: timedelta) -> bool:
    """Alert the on-call radiologist first (:func:`_alert_on_call`); otherwise mark the task
    escalated (once), alert its group's administrators, audit it."""
    if _alert_on_call(session, task_id, now=now):
        return True
    result = session.execute(
        update(ReadingTask)
        .where(ReadingTask.id == task_id, _escalation_due(now, warn_before))
        .values(escalated_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        return False
    task = session.get(ReadingTask, task_id, populate_existing=True)
    if task is None:
        return False
    due = as_utc(task.due_at)
    overdue = due is not None and due <= now
    minutes = int(abs((due - now).total_seconds()) // 60) if due is not None else 0
    when = f"overdue by {minutes} min" if overdue else f"due in {minutes} min"
    holder = f", claimed by {task.claimed_by}" if task.claimed_by else ""
    if task.oncall_alerted_at is not None and task.assigned_to:
        holder += f", on-call {task.assigned_to} alerted"
    session.add(
        AdminAlert(
            organisation_code=task.group_code,
            kind="reading-deadline",
            message=f"Reading task {task.id} ({task.priority}, {task.modality or '?'} from {task.site_code}) "
            f"is {when} ({task.state}{holder}).",
            study_uid=task.study_uid,
            created_at=now,
        )
    )
    audit.record(
        session,
        action="reading-task.escalate",
        principal=READING_SYSTEM,
        outcome="warning",
        study_uid=task.study_uid,
        detail={
            "task": task.id,
            "group": task.group_code,
            "state": task.state,
            "claimed_by": task.claimed_by,
            "on_call": task.assigned_to,
            "due_at": due.isoformat() if due is not None else "",
            "overdue": overdue,
        },
    )
    return True


# --------------------------------------------------------------------- the group's worklist


@dataclass(frozen=True)
class TaskRow:
    """A task as the reading worklist shows it."""

    task: ReadingTask
    patient_name: str
    patient_id: str
    birth_date: str
    description: str
    site_name: str
    instances: int
    #: The display name of the radiologist holding the task (their login when they have none).
    holder_name: str = ""
    #: The display name of the on-call radiologist the task is pre-assigned to (empty: none).
    assignee_name: str = ""


def _may_read(principal: Principal, group_code: str) -> bool:
    return principal.kind == "user" and may_review_requests(principal, group_code)


def _order() -> tuple[Any, ...]:
    """Urgent first, then the nearest deadline (none last), then the oldest."""
    return (
        case((ReadingTask.priority == PRIORITY_URGENT, 0), else_=1),
        ReadingTask.due_at.is_(None),
        ReadingTask.due_at,
        ReadingTask.id,
    )


def list_tasks(
    session: Session,
    *,
    principal: Principal,
    states: tuple[str, ...] = (TASK_READY, TASK_CLAIMED),
    limit: int = 200,
) -> list[TaskRow]:
    """The tasks of the group ``principal`` acts for (its radiologists and administrators), urgent
    first then by deadline."""
    group = principal.organisation
    if not (_may_read(principal, group) or may_assign_reading(principal, group)):
        return []
    assignee = aliased(Professional)
    rows = session.execute(
        select(
            ReadingTask,
            ImagingRequest,
            Study,
            Organisation.name,
            Professional.display_name,
            assignee.display_name,
        )
        .outerjoin(ImagingRequest, ImagingRequest.id == ReadingTask.request_id)
        .outerjoin(
            Professional, and_(ReadingTask.claimed_by != "", Professional.login == ReadingTask.claimed_by)
        )
        .outerjoin(assignee, and_(ReadingTask.assigned_to != "", assignee.login == ReadingTask.assigned_to))
        .outerjoin(Study, Study.study_uid == ReadingTask.study_uid)
        .outerjoin(Organisation, Organisation.code == ReadingTask.site_code)
        .where(ReadingTask.group_code == group, ReadingTask.state.in_(states))
        .order_by(*_order())
        .limit(limit)
    )
    out = []
    for task, request, study, site_name, holder, assigned in rows:
        patient = (request.patient if request is not None else None) or {}
        family = str(patient.get("used_name") or patient.get("birth_name") or "")
        given = str(patient.get("used_given_name") or patient.get("first_birth_given_name") or "")
        if not family and study is not None:
            family, _, given = _stored_name(study).partition("^")
        description = (study.description if study is not None else "") or (
            " ".join(str(a.get("display") or a.get("code") or "") for a in (request.anatomy or []))
            if request
            else ""
        )
        out.append(
            TaskRow(
                task=task,
                patient_name=" ".join(part for part in (family.upper(), given.replace("^", " ")) if part),
                patient_id=str(patient.get("ipp") or ""),
                birth_date=str(patient.get("birth_date") or ""),
                description=description.strip(),
                site_name=site_name or task.site_code,
                instances=study.num_instances if study is not None else 0,
                holder_name=(holder or task.claimed_by) if task.claimed_by else "",
                assignee_name=(assigned or task.assigned_to) if task.assigned_to else "",
            )
        )
    return out


def _stored_name(study: Study) -> str:
    """The Patient's Name of a stored study (PN, ``FAMILY^GIVEN``)."""
    patient = study.patient
    return patient.name.split("=")[0] if patient is not None else ""


def get_or_raise(session: Session, task_id: int) -> ReadingTask:
    """The task with this id."""
    task = session.get(ReadingTask, task_id, populate_existing=True)
    if task is None:
        raise TaskError(f"no reading task {task_id}")
    return task


def _audit_task(
    session: Session, action: str, task: ReadingTask, *, principal: Principal, **detail: Any
) -> None:
    audit.record(
        session,
        action=action,
        principal=principal,
        study_uid=task.study_uid,
        detail={"task": task.id, "group": task.group_code, **detail},
    )


def claim(session: Session, task_id: int, *, principal: Principal) -> ReadingTask:
    """Take a ready task (exclusive): one conditional UPDATE ``... WHERE state = 'ready'``, so of
    two concurrent claims, in any processes, exactly one changes the row."""
    task = get_or_raise(session, task_id)
    if not _may_read(principal, task.group_code):
        raise AccessDenied(f"{principal.audit_name} may not read for {task.group_code}")
    now = utcnow()
    result = session.execute(
        update(ReadingTask)
        .where(
            ReadingTask.id == task_id,
            ReadingTask.state == TASK_READY,
            ReadingTask.group_code == task.group_code,
        )
        .values(state=TASK_CLAIMED, claimed_by=principal.name[:128], claimed_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        current = get_or_raise(session, task_id)
        who = f" by {current.claimed_by}" if current.state == TASK_CLAIMED else ""
        raise TaskError(f"reading task {task_id} is not ready: it is {current.state}{who}", conflict=True)
    task = get_or_raise(session, task_id)
    _audit_task(session, "reading-task.claim", task, principal=principal)
    return task


def release(session: Session, task_id: int, *, principal: Principal) -> ReadingTask:
    """Give a claimed task back to the group: its holder, or a group administrator."""
    task = get_or_raise(session, task_id)
    admin = may_assign_reading(principal, task.group_code)
    if not (admin or (_may_read(principal, task.group_code) and task.claimed_by == principal.name)):
        raise AccessDenied(f"{principal.audit_name} does not hold reading task {task_id}")
    conditions = [ReadingTask.id == task_id, ReadingTask.state == TASK_CLAIMED]
    if not admin:
        conditions.append(ReadingTask.claimed_by == principal.name)
    previous = task.claimed_by
    result = session.execute(
        update(ReadingTask)
        .where(*conditions)
        .values(state=TASK_READY, claimed_by="", claimed_at=None, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        raise TaskError(f"reading task {task_id} is not claimed by {principal.name}", conflict=True)
    task = get_or_raise(session, task_id)
    _audit_task(session, "reading-task.release", task, principal=principal, previous_holder=previous)
    return task


def reassign(session: Session, task_id: int, *, login: str, principal: Principal) -> ReadingTask:
    """Hand a ready or claimed task to another radiologist of the group (group administrators)."""
    task = get_or_raise(session, task_id)
    if not may_assign_reading(principal, task.group_code):
        raise AccessDenied(f"{principal.audit_name} may not assign the reading tasks of {task.group_code}")
    if not routing.is_group_radiologist(session, login, task.group_code):
        raise TaskError(f"{login} is not a radiologist of {task.group_code}")
    previous = task.claimed_by
    now = utcnow()
    result = session.execute(
        update(ReadingTask)
        .where(ReadingTask.id == task_id, ReadingTask.state.in_((TASK_READY, TASK_CLAIMED)))
        .values(state=TASK_CLAIMED, claimed_by=login, claimed_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        raise TaskError(f"reading task {task_id} is {task.state}: it cannot be assigned", conflict=True)
    task = get_or_raise(session, task_id)
    _audit_task(
        session, "reading-task.reassign", task, principal=principal, previous_holder=previous, to=login
    )
    return task
