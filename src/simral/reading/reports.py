"""Radiology reports (DESIGN.md §7, ANS Téléradiologie flux 5 "Compte rendu"; issue 6 item 5).

- :func:`start_report` — the radiologist holding a task starts its report from a template: the
  Indications come from the request (justification, clinical history, purpose), the Technique from
  the template plus the equipment and, for ionising exams, the dose the modality reported in its
  MPPS (PS3.3 C.4.16 Radiation Dose Module) or the site's post-exam complement.
- :func:`save_draft` — autosave of a draft by its author; a signed version never changes.
- :func:`sign_report` — signature with re-authentication (a TOTP code of the signer's own
  account, counted as a failed factor like a login when wrong): the version is signed, the task
  and the request are reported and publication (CDA CR-IMG, PDF, Encapsulated PDF, ORU^R01) is
  queued in the same unit of work.
- :func:`add_addendum` — a new draft version of a signed report (same ``set_id``, version + 1, a
  new ``document_uid``, sections carried over), signed the same way; :func:`history` lists them.
- :func:`ask_second_opinion` / :func:`answer_second_opinion` — télé-expertise: the holder of a task
  asks another radiologist of the group, who sees the study (the group received it, see
  :func:`simral.reading.tasks._attach_group`) and answers.

Every operation is audited; services never commit (the adapter's unit of work does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from simral.access.policy import AccessDenied, Principal, may_request_exam, may_review_requests
from simral.audit import service as audit
from simral.db.base import utcnow
from simral.identity import service as identity
from simral.identity.models import Membership, Organisation, Professional
from simral.reading.models import (
    PUBLICATION_PENDING,
    REPORT_DRAFT,
    REPORT_SIGNED,
    REQUEST_REPORTED,
    TASK_CLAIMED,
    TASK_REPORTED,
    ImagingRequest,
    PerformedProcedureStep,
    ReadingTask,
    Report,
    SecondOpinion,
)
from simral.reading.templates import ReportTemplate, dose_line, get_template, is_ionising

#: The sections of a report (ANS CR-IMG), as the model's columns name them.
SECTIONS = ("indications", "technique", "results", "conclusion")
#: The dose fields a report keeps (all text: the radiologist types them as the console shows them).
DOSE_FIELDS = ("equipment", "ctdivol_mgy", "dlp_mgycm", "dap_gycm2", "fluoro_seconds")
#: Longest section text accepted.
MAX_SECTION = 20_000

OPINION_OPEN = "open"
OPINION_ANSWERED = "answered"


class ReportError(ValueError):
    """A report operation that cannot be done (``conflict``: the report is not in the right state)."""

    def __init__(self, message: str, *, conflict: bool = False) -> None:
        super().__init__(message)
        self.conflict = conflict


@dataclass(frozen=True)
class Signature:
    """The outcome of a signature attempt: ``report`` signed, or refused (wrong code, locked)."""

    report: Report
    signed: bool
    #: The signer's account is locked after too many failed factors.
    locked: bool = False


# ------------------------------------------------------------------------------- helpers


def _task(session: Session, task_id: int) -> ReadingTask:
    task = session.get(ReadingTask, task_id, populate_existing=True)
    if task is None:
        raise ReportError(f"no reading task {task_id}")
    return task


def _radiologist_of(principal: Principal, group_code: str) -> bool:
    return principal.kind == "user" and may_review_requests(principal, group_code)


def _audit(session: Session, action: str, report: Report, *, principal: Principal, **detail: Any) -> None:
    audit.record(
        session,
        action=action,
        principal=principal,
        study_uid=report.study_uid,
        detail={
            "report": report.id,
            "set_id": report.set_id,
            "version": report.version,
            "task": report.task_id,
            **detail,
        },
    )


def _group_of(session: Session, report: Report) -> str:
    if report.task_id is None:
        return report.organisation_code
    return session.scalar(select(ReadingTask.group_code).where(ReadingTask.id == report.task_id)) or ""


def get_or_raise(session: Session, report_id: int) -> Report:
    """The report version with this id."""
    report = session.get(Report, report_id, populate_existing=True)
    if report is None:
        raise ReportError(f"no report {report_id}")
    return report


def may_see(session: Session, report: Report, principal: Principal) -> bool:
    """Whether ``principal`` may read ``report``: its author, a radiologist of the reading group, a
    radiologist asked for an opinion on its task, and — once signed — the requesting site's
    clinical members (ANS flux 5: the site receives the report)."""
    if principal.kind == "system":
        return True
    if principal.kind != "user":
        return False
    if report.author == principal.name or _radiologist_of(principal, _group_of(session, report)):
        return True
    if report.state == REPORT_SIGNED and report.request_id is not None:
        site = session.scalar(select(ImagingRequest.site_code).where(ImagingRequest.id == report.request_id))
        if site and may_request_exam(principal, site):
            return True
    return report.task_id is not None and _asked_of(session, report.task_id, principal.name)


def signed_for_request(session: Session, request_id: int) -> list[Report]:
    """The signed versions of a request's report (original and addenda), oldest first."""
    return list(
        session.scalars(
            select(Report)
            .where(Report.request_id == request_id, Report.state == REPORT_SIGNED)
            .order_by(Report.version, Report.id)
        )
    )


def get_for(session: Session, report_id: int, principal: Principal) -> Report:
    """The report version ``principal`` may read."""
    report = get_or_raise(session, report_id)
    if not may_see(session, report, principal):
        raise AccessDenied(f"{principal.audit_name} may not read report {report_id}")
    return report


def latest_for_task(session: Session, task_id: int) -> Report | None:
    """The latest version of the task's report (draft or signed), if one was started."""
    return session.scalar(
        select(Report)
        .where(Report.task_id == task_id)
        .order_by(Report.version.desc(), Report.id.desc())
        .limit(1)
    )


def history(session: Session, set_id: str) -> list[Report]:
    """Every version of a report, oldest first."""
    return list(session.scalars(select(Report).where(Report.set_id == set_id).order_by(Report.version)))


# ----------------------------------------------------------------------- dose from the MPPS


def _first(attributes: dict[str, Any], tag: str) -> Any:
    values = (attributes.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _number(value: Any) -> str:
    """A DICOM DS/FD value as a short decimal text ("" when absent)."""
    if value is None or value == "":
        return ""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return ""
    return f"{number:.2f}".rstrip("0").rstrip(".")


_DLP_COMMENT = re.compile(r"(?:DLP|PDL)\D{0,12}?([0-9]+(?:[.,][0-9]+)?)", re.IGNORECASE)
_CTDI_COMMENT = re.compile(r"(?:CTDI\s*vol|IDSV)\D{0,12}?([0-9]+(?:[.,][0-9]+)?)", re.IGNORECASE)


def dose_from_mpps(attributes: dict[str, Any]) -> dict[str, str]:
    """Equipment and dose a modality reported in its MPPS (DICOM JSON, PS3.3 C.4.16 Radiation Dose
    Module and C.4.14 Performed Procedure Step Information; CT: CTDIvol (0018,9345); projection:
    Image and Fluoroscopy Area Dose Product (0018,115E) in dGy·cm², Total Time of Fluoroscopy
    (0040,0300); the DLP, which the module has no attribute for, from Comments on Radiation Dose
    (0040,0310))."""
    dose: dict[str, str] = {}
    equipment = " ".join(
        str(value)
        for value in (_first(attributes, "00080070"), _first(attributes, "00081090"))
        if value  # Manufacturer, Manufacturer's Model Name
    )
    station = _first(attributes, "00400242") or _first(attributes, "00400241")  # Station Name / AE
    if station:
        equipment = f"{equipment} ({station})" if equipment else str(station)
    if equipment:
        dose["equipment"] = equipment
    ctdi = _first(attributes, "00189345")
    for item in (attributes.get("0040030E") or {}).get("Value") or []:  # Exposure Dose Sequence
        ctdi = ctdi if ctdi is not None else _first(item, "00189345")
    if ctdi is not None:
        dose["ctdivol_mgy"] = _number(ctdi)
    area = _first(attributes, "0018115E")
    if area is not None and _number(area):
        dose["dap_gycm2"] = _number(float(area) / 10.0)  # dGy·cm² → Gy·cm²
    fluoro = _first(attributes, "00400300")
    if fluoro is not None:
        dose["fluoro_seconds"] = _number(fluoro)
    comment = str(_first(attributes, "00400310") or "")
    if match := _DLP_COMMENT.search(comment):
        dose["dlp_mgycm"] = match.group(1).replace(",", ".")
    if "ctdivol_mgy" not in dose and (match := _CTDI_COMMENT.search(comment)):
        dose["ctdivol_mgy"] = match.group(1).replace(",", ".")
    return {key: value for key, value in dose.items() if value}


def exam_dose(session: Session, task: ReadingTask, request: ImagingRequest | None) -> dict[str, str]:
    """What is known of the exam's equipment and dose: the latest MPPS of the study, completed by
    the post-exam complement (its dose, entered in the portal by a site without MPPS, and its
    equipment, APPAREIL_IMAGERIE)."""
    dose: dict[str, str] = {}
    for attributes in session.scalars(
        select(PerformedProcedureStep.attributes)
        .where(PerformedProcedureStep.study_uid == task.study_uid)
        .order_by(PerformedProcedureStep.updated_at.desc(), PerformedProcedureStep.id.desc())
    ):
        for key, value in dose_from_mpps(attributes or {}).items():
            dose.setdefault(key, value)
    entered = ((request.complement or {}).get("dose") or {}) if request is not None else {}
    for key, value in entered.items():
        if key in DOSE_FIELDS and str(value or "").strip():
            dose.setdefault(key, str(value).strip())
    if "equipment" not in dose and request is not None:
        models = [
            str(item.get("model") or item.get("udi") or "")
            for item in (request.complement or {}).get("equipment") or []
        ]
        if any(models):
            dose["equipment"] = ", ".join(m for m in models if m)
    return dose


# --------------------------------------------------------------------------------- drafts


def _indications(request: ImagingRequest | None) -> str:
    if request is None:
        return ""
    lines = []
    for label, value in (
        ("Motif", request.justification),
        ("Antécédents", request.clinical_history),
        ("Question posée", request.purpose),
    ):
        if value.strip():
            lines.append(f"{label} : {value.strip()}")
    return "\n".join(lines)


def _technique(template: ReportTemplate, modality: str, dose: dict[str, str]) -> str:
    lines = [template.technique]
    if dose.get("equipment"):
        lines.append(f"Appareil : {dose['equipment']}.")
    if is_ionising(modality or template.modality):
        lines.append(dose_line(dose) or "Dose délivrée : à compléter.")
    return "\n".join(lines)


_DOSE_LINE = re.compile(r"^(?:Dose délivrée|Dose delivered)\s*:.*$", re.MULTILINE)


def _with_dose_line(technique: str, dose: dict[str, str]) -> str:
    """The Technique text with its dose sentence rewritten from the dose fields (kept in step)."""
    line = dose_line(dose)
    if not line or not _DOSE_LINE.search(technique):
        return technique
    return _DOSE_LINE.sub(line, technique, count=1)


def _clean_dose(values: dict[str, Any]) -> dict[str, str]:
    return {
        key: str(values.get(key) or "").strip()[:64]
        for key in DOSE_FIELDS
        if str(values.get(key) or "").strip()
    }


def start_report(session: Session, task_id: int, principal: Principal, template: str) -> Report:
    """Start the report of a task the principal holds, from ``template`` (an exam type of
    :mod:`simral.reading.templates`); the draft already started for the task is returned as is."""
    task = _task(session, task_id)
    if not _radiologist_of(principal, task.group_code):
        raise AccessDenied(f"{principal.audit_name} may not report for {task.group_code}")
    existing = latest_for_task(session, task_id)
    if existing is not None:
        if existing.state == REPORT_DRAFT and existing.author != principal.name:
            raise AccessDenied(f"the report of task {task_id} is being written by {existing.author}")
        return existing
    if task.state != TASK_CLAIMED or task.claimed_by != principal.name:
        raise AccessDenied(f"reading task {task_id} is not claimed by {principal.name}")
    chosen = get_template(template)
    if chosen is None:
        raise ReportError(f"unknown report template {template!r}")
    request = session.get(ImagingRequest, task.request_id) if task.request_id is not None else None
    dose = exam_dose(session, task, request)
    professional = identity.get_professional(session, principal.name)
    now = utcnow()
    uid = str(generate_uid())
    report = Report(
        task_id=task.id,
        request_id=task.request_id,
        study_uid=task.study_uid,
        set_id=uid,
        version=1,
        document_uid=str(generate_uid()),
        template=chosen.code,
        indications=_indications(request),
        technique=_technique(chosen, task.modality, dose),
        results=chosen.results,
        conclusion=chosen.conclusion,
        dose=dose,
        state=REPORT_DRAFT,
        author=principal.name[:128],
        author_name=(professional.display_name if professional else principal.display_name)[:200],
        author_national_id=(professional.national_id if professional else principal.national_id)[:32],
        organisation_code=task.group_code,
        created_at=now,
        updated_at=now,
    )
    session.add(report)
    session.flush()
    _audit(session, "report.create", report, principal=principal, template=chosen.code)
    return report


def _editable(session: Session, report_id: int, principal: Principal) -> Report:
    report = get_or_raise(session, report_id)
    if report.author != principal.name or not _radiologist_of(principal, _group_of(session, report)):
        raise AccessDenied(f"only the author of report {report_id} may change it")
    if report.state != REPORT_DRAFT:
        raise ReportError(f"report {report_id} is signed: it cannot change (add an addendum)", conflict=True)
    return report


def save_draft(
    session: Session,
    report_id: int,
    principal: Principal,
    *,
    sections: dict[str, str],
    dose: dict[str, Any] | None = None,
    addendum: str | None = None,
) -> Report:
    """Save a draft (autosave): only its author, never a signed version. An addendum keeps the
    sections of the version it completes: only its ``addendum`` text changes."""
    report = _editable(session, report_id, principal)
    if report.version == 1:
        for name in SECTIONS:
            if name in sections:
                setattr(report, name, str(sections[name])[:MAX_SECTION])
        if dose is not None:
            report.dose = _clean_dose(dose)
            report.technique = _with_dose_line(report.technique, report.dose)
    if addendum is not None and report.version > 1:
        report.addendum = addendum[:MAX_SECTION]
    report.updated_at = utcnow()
    return report


# ------------------------------------------------------------------------------ signature


def _missing(report: Report, modality: str) -> list[str]:
    """What a version needs before it can be signed."""
    if report.version > 1:
        return [] if report.addendum.strip() else ["addendum"]
    missing = [name for name in ("technique", "results", "conclusion") if not getattr(report, name).strip()]
    dose_values = [v for k, v in (report.dose or {}).items() if k != "equipment" and str(v).strip()]
    if is_ionising(modality) and not dose_values:
        missing.append("dose")
    return missing


def sign_report(session: Session, report_id: int, principal: Principal, *, totp_code: str) -> Signature:
    """Sign a draft after re-authentication with a TOTP code of the signer's account.

    A wrong code is a failed factor (counted and locking the account like a failed login) and an
    audited failure: the outcome says it was refused, and the adapter commits so the count holds.
    Signed: the version is immutable, the task and the request are reported, publication is
    queued in the same unit of work."""
    report = _editable(session, report_id, principal)
    task = _task(session, report.task_id) if report.task_id is not None else None
    modality = task.modality if task is not None else ""
    missing = _missing(report, modality)
    if missing:
        raise ReportError(f"report {report_id} cannot be signed yet: {', '.join(missing)} missing")
    professional = identity.get_professional(session, principal.name)
    if professional is None or not professional.active:
        raise AccessDenied(f"{principal.audit_name} has no active account to sign with")
    locked = identity.is_locked(professional)
    if locked or not identity.check_totp(professional, totp_code):
        if not locked:
            identity.record_failure(professional)
        audit.record(
            session,
            action="report.sign",
            principal=principal,
            outcome="failure",
            study_uid=report.study_uid,
            detail={
                "report": report.id,
                "version": report.version,
                "step": "totp",
                "reason": "account locked" if locked else "wrong code",
            },
        )
        return Signature(report, signed=False, locked=identity.is_locked(professional))
    identity.record_success(professional)
    now = utcnow()
    report.state = REPORT_SIGNED
    report.signed_at = now
    report.updated_at = now
    report.signature_method = "totp"
    report.publication_state = PUBLICATION_PENDING
    if task is not None and task.state != TASK_REPORTED:
        result = session.execute(
            update(ReadingTask)
            .where(ReadingTask.id == task.id, ReadingTask.state == TASK_CLAIMED)
            .values(state=TASK_REPORTED, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        if getattr(result, "rowcount", 0) != 1:
            raise ReportError(f"reading task {task.id} is {task.state}: it cannot be reported", conflict=True)
    if report.request_id is not None:
        request = session.get(ImagingRequest, report.request_id)
        if request is not None and request.state != REQUEST_REPORTED:
            request.state = REQUEST_REPORTED
            request.updated_at = now
    session.flush()
    from simral.reading import publication  # written alongside: CDA, PDF, Encapsulated PDF, ORU^R01

    publication.enqueue_publication(session, report)
    _audit(session, "report.sign", report, principal=principal, method="totp", document=report.document_uid)
    return Signature(report, signed=True)


def add_addendum(session: Session, report_id: int, principal: Principal) -> Report:
    """A new draft version completing the latest signed version of the report (the draft already
    open for it is returned as is): same set, version + 1, sections carried over."""
    signed = get_or_raise(session, report_id)
    if not _radiologist_of(principal, _group_of(session, signed)):
        raise AccessDenied(f"{principal.audit_name} may not add to report {report_id}")
    latest = session.scalar(
        select(Report).where(Report.set_id == signed.set_id).order_by(Report.version.desc()).limit(1)
    )
    assert latest is not None
    if latest.state == REPORT_DRAFT:
        if latest.author != principal.name:
            raise AccessDenied(f"an addendum to report {report_id} is being written by {latest.author}")
        return latest
    professional = identity.get_professional(session, principal.name)
    now = utcnow()
    addendum = Report(
        task_id=latest.task_id,
        request_id=latest.request_id,
        study_uid=latest.study_uid,
        set_id=latest.set_id,
        version=latest.version + 1,
        document_uid=str(generate_uid()),
        previous_id=latest.id,
        template=latest.template,
        indications=latest.indications,
        technique=latest.technique,
        results=latest.results,
        conclusion=latest.conclusion,
        dose=dict(latest.dose or {}),
        state=REPORT_DRAFT,
        author=principal.name[:128],
        author_name=(professional.display_name if professional else principal.display_name)[:200],
        author_national_id=(professional.national_id if professional else principal.national_id)[:32],
        organisation_code=latest.organisation_code,
        created_at=now,
        updated_at=now,
    )
    session.add(addendum)
    session.flush()
    _audit(session, "report.addendum", addendum, principal=principal, previous=latest.id)
    return addendum


# ------------------------------------------------------------------------ second opinions


def _asked_of(session: Session, task_id: int, login: str) -> bool:
    return bool(
        session.scalar(
            select(func.count())
            .select_from(SecondOpinion)
            .where(SecondOpinion.task_id == task_id, SecondOpinion.requested_of == login)
        )
    )


def group_radiologists(session: Session, group_code: str) -> list[tuple[str, str]]:
    """The active radiologists of a group: (login, display name), by name."""
    rows = session.execute(
        select(Professional.login, Professional.display_name)
        .join(Membership, Membership.professional_id == Professional.id)
        .join(Organisation, Organisation.id == Membership.organisation_id)
        .where(
            Organisation.code == group_code,
            Membership.role == "radiologist",
            Professional.active.is_(True),
        )
        .order_by(Professional.display_name, Professional.login)
    )
    return [(login, name or login) for login, name in rows]


def ask_second_opinion(
    session: Session, task_id: int, principal: Principal, *, requested_of: str, question: str
) -> SecondOpinion:
    """Ask another radiologist of the task's group for their opinion (the holder of the task)."""
    task = _task(session, task_id)
    if not _radiologist_of(principal, task.group_code) or task.claimed_by != principal.name:
        raise AccessDenied(f"{principal.audit_name} does not hold reading task {task_id}")
    if requested_of == principal.name:
        raise ReportError("a second opinion is asked of another radiologist")
    if requested_of not in {login for login, _ in group_radiologists(session, task.group_code)}:
        raise AccessDenied(f"{requested_of} is not a radiologist of {task.group_code}")
    if not question.strip():
        raise ReportError("the question is required")
    opinion = SecondOpinion(
        task_id=task.id,
        requested_by=principal.name[:128],
        requested_of=requested_of[:128],
        question=question.strip()[:MAX_SECTION],
        state=OPINION_OPEN,
        created_at=utcnow(),
    )
    session.add(opinion)
    session.flush()
    audit.record(
        session,
        action="second-opinion.ask",
        principal=principal,
        study_uid=task.study_uid,
        detail={"opinion": opinion.id, "task": task.id, "group": task.group_code, "to": requested_of},
    )
    return opinion


def answer_second_opinion(
    session: Session, opinion_id: int, principal: Principal, *, answer: str
) -> SecondOpinion:
    """The radiologist asked answers (acting for the task's group)."""
    opinion = session.get(SecondOpinion, opinion_id, populate_existing=True)
    if opinion is None:
        raise ReportError(f"no second opinion {opinion_id}")
    task = _task(session, opinion.task_id)
    if opinion.requested_of != principal.name or not _radiologist_of(principal, task.group_code):
        raise AccessDenied(f"second opinion {opinion_id} was not asked of {principal.audit_name}")
    if opinion.state != OPINION_OPEN:
        raise ReportError(f"second opinion {opinion_id} was already answered", conflict=True)
    if not answer.strip():
        raise ReportError("the answer is required")
    opinion.answer = answer.strip()[:MAX_SECTION]
    opinion.state = OPINION_ANSWERED
    opinion.answered_at = utcnow()
    audit.record(
        session,
        action="second-opinion.answer",
        principal=principal,
        study_uid=task.study_uid,
        detail={
            "opinion": opinion.id,
            "task": task.id,
            "group": task.group_code,
            "from": opinion.requested_by,
        },
    )
    return opinion


def opinions_of_task(session: Session, task_id: int) -> list[SecondOpinion]:
    """The second opinions asked on a task, oldest first."""
    return list(
        session.scalars(
            select(SecondOpinion).where(SecondOpinion.task_id == task_id).order_by(SecondOpinion.id)
        )
    )


def opinions_asked_of(session: Session, principal: Principal) -> list[SecondOpinion]:
    """The open second opinions asked of ``principal`` on tasks of the group they act for."""
    if principal.kind != "user":
        return []
    return list(
        session.scalars(
            select(SecondOpinion)
            .join(ReadingTask, ReadingTask.id == SecondOpinion.task_id)
            .where(
                SecondOpinion.requested_of == principal.name,
                SecondOpinion.state == OPINION_OPEN,
                ReadingTask.group_code == principal.organisation,
            )
            .order_by(SecondOpinion.id)
        )
    )


def may_open_task(session: Session, task: ReadingTask, principal: Principal) -> bool:
    """Whether ``principal`` may open the report page of ``task``: a radiologist of its group."""
    return _radiologist_of(principal, task.group_code)


@dataclass(frozen=True)
class ReportRow:
    """A report as the list of a radiologist's reports shows it (its latest version)."""

    report: Report
    patient_name: str
    modality: str


def recent_reports(session: Session, principal: Principal, *, limit: int = 50) -> list[ReportRow]:
    """The reports ``principal`` wrote for the group they act for, latest version of each, most
    recently changed first (to find a signed report again and add an addendum)."""
    if not _radiologist_of(principal, principal.organisation):
        return []
    sets = (
        select(Report.set_id, func.max(Report.version).label("version"))
        .where(Report.organisation_code == principal.organisation)
        .where(
            Report.set_id.in_(
                select(Report.set_id).where(
                    Report.author == principal.name, Report.organisation_code == principal.organisation
                )
            )
        )
        .group_by(Report.set_id)
        .subquery()
    )
    rows = session.execute(
        select(Report, ImagingRequest, ReadingTask.modality)
        .join(sets, (sets.c.set_id == Report.set_id) & (sets.c.version == Report.version))
        .outerjoin(ImagingRequest, ImagingRequest.id == Report.request_id)
        .outerjoin(ReadingTask, ReadingTask.id == Report.task_id)
        .order_by(Report.updated_at.desc(), Report.id.desc())
        .limit(limit)
    )
    out = []
    for report, request, modality in rows:
        patient = (request.patient if request is not None else None) or {}
        family = str(patient.get("used_name") or patient.get("birth_name") or "")
        given = str(patient.get("used_given_name") or patient.get("first_birth_given_name") or "")
        name = " ".join(part for part in (family.upper(), given) if part)
        out.append(ReportRow(report, name, modality or ""))
    return out
