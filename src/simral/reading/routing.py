"""Routing of teleradiology exams by contract, subspecialty and on-call schedule (DESIGN.md §7;
issue 6 item 4: "routing by contract (site → reading group), modality, subspecialty and on-call
schedule").

The rules, kept simple on purpose so that a group's coordinator can predict them:

**Subspecialty.** An exam needs at most one subspecialty of :data:`SUBSPECIALTIES` (a closed list
with French labels). It is, in this order:

1. the one chosen explicitly (the portal request form, the radiologist reviewing the request);
2. else the one the targeted anatomy gives: the SNOMED CT codes of JDV_RegionAnatomique_CISIS
   (1.2.250.1.213.1.1.5.695) the request carries (OBX ``REGION_ANATOMIQUE``), looked up in
   :data:`ANATOMY_SUBSPECIALTIES`. Codes not in the table (laterality and other topographic
   precisions) are ignored; when the mapped codes disagree (a thorax-abdomen-pelvis CT) the exam is
   general;
3. else none: a general exam. ``pediatrie`` is never derived, only chosen.

**Contracts.** A contract of the exam's site matches when it is active, its modalities are empty or
name the exam's modality, and its subspecialties are empty or name the exam's subspecialty (a
contract limited to subspecialties never takes a general exam). The most specific matching contract
wins: naming the subspecialty first, then naming the modality (so "group A for neuro, group B for
CT and MR" sends a neuro CT to A). Among contracts that match equally, a group with a radiologist on
call now for the exam wins over one without (a night / week-end group during its shifts); then the
oldest contract (the day rule).

**On call.** A shift covers an exam at ``now`` when ``start_at <= now < end_at``, its group is the
exam's and its subspecialty is empty or the exam's. When a reading task becomes ready it is
pre-assigned to the radiologist of a covering shift: one naming the subspecialty before a general
one, then the one ending last, then by login. The task shows "de garde : Dr X" and every radiologist
of the group may still claim it. While it stays ready, the assignment follows the schedule: the
periodic check hands it over when the shift ends or when a shift starts (:func:`assignment_due`).

**Escalation.** When the deadline of an unclaimed task is near (``reading_escalate_minutes``) and
has not passed, the radiologist on call for it is alerted first (the task is assigned to them,
``oncall_alerted_at`` set, shown on their worklist); the group's administrators are alerted when the
deadline passes. Without anyone on call, for a claimed task, or when the deadline has already
passed, the group's administrators are alerted at once (:mod:`simral.reading.tasks`).

**Schedule.** The group's administrators (:func:`simral.access.policy.may_schedule_on_call`) add and
remove shifts (``simral oncall add|list|remove``, the portal page ``/reading/oncall``). A shift names
an active radiologist of the group, ends after it starts, lasts at most :data:`MAX_SHIFT` and does
not overlap another shift of the same radiologist in the group (several radiologists may be on call
at once). Schedule changes and assignments are
audited.

The functions taking ``now`` never read the clock, so the rules are the same in tests at fixed times.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import Session

from simral.access.policy import AccessDenied, Principal, may_read_on_call, may_schedule_on_call
from simral.audit import service as audit
from simral.db.base import as_utc, utcnow
from simral.identity.models import Membership, Organisation, Professional
from simral.reading.models import (
    TASK_READY,
    OnCallShift,
    ReadingContract,
    ReadingTask,
)

#: The subspecialties an exam may need: code → French label (closed list).
SUBSPECIALTIES: dict[str, str] = {
    "neuro": "Neuroradiologie",
    "orl": "ORL, tête et cou",
    "thorax": "Thorax",
    "cardio": "Cardiaque",
    "vasculaire": "Vasculaire",
    "abdomen": "Abdomen et pelvis",
    "osteo": "Ostéo-articulaire",
    "sein": "Sein (sénologie)",
    "pediatrie": "Pédiatrie",
}
#: English labels (``?lang=en``).
SUBSPECIALTIES_EN: dict[str, str] = {
    "neuro": "Neuroradiology",
    "orl": "Head and neck (ENT)",
    "thorax": "Chest",
    "cardio": "Cardiac",
    "vasculaire": "Vascular",
    "abdomen": "Abdomen and pelvis",
    "osteo": "Musculoskeletal",
    "sein": "Breast",
    "pediatrie": "Paediatrics",
}
#: Other spellings accepted where a subspecialty is typed (CLI, HL7 free text), accents ignored.
_ALIASES = {
    "neuroradiologie": "neuro",
    "neurologie": "neuro",
    "tete et cou": "orl",
    "msk": "osteo",
    "osteo-articulaire": "osteo",
    "osteoarticulaire": "osteo",
    "cardiaque": "cardio",
    "senologie": "sein",
    "mammo": "sein",
    "pediatrique": "pediatrie",
    "abdominal": "abdomen",
    "abdomino-pelvien": "abdomen",
}

#: Targeted anatomy (SNOMED CT body structures of JDV_RegionAnatomique_CISIS, OID
#: 1.2.250.1.213.1.1.5.695, as OBX REGION_ANATOMIQUE carries them) → subspecialty.
ANATOMY_SUBSPECIALTIES: dict[str, str] = {
    # neuroradiologie
    "12738006": "neuro",  # encéphale
    "69536005": "neuro",  # tête
    "774007": "neuro",  # tête et/ou cou (the ANS sample: IRM cerveau)
    "89546000": "neuro",  # crâne
    "2748008": "neuro",  # moelle épinière
    # ORL, tête et cou
    "45048000": "orl",  # cou
    "45206002": "orl",  # nez
    "2095001": "orl",  # sinus paranasaux
    "4596009": "orl",  # larynx
    "69748006": "orl",  # thyroïde
    # thorax
    "51185008": "thorax",  # thorax
    "39607008": "thorax",  # poumon
    # cardiaque, vasculaire
    "80891009": "cardio",  # cœur
    "15825003": "vasculaire",  # aorte
    "59820001": "vasculaire",  # vaisseau sanguin
    # abdomen et pelvis
    "818983003": "abdomen",  # abdomen
    "113345001": "abdomen",  # abdomen (structure)
    "12921003": "abdomen",  # pelvis
    "10200004": "abdomen",  # foie
    "64033007": "abdomen",  # rein
    "15776009": "abdomen",  # pancréas
    "71854001": "abdomen",  # côlon
    "89837001": "abdomen",  # vessie
    # ostéo-articulaire
    "421060004": "osteo",  # colonne vertébrale
    "122494005": "osteo",  # rachis cervical
    "122495006": "osteo",  # rachis thoracique
    "122496007": "osteo",  # rachis lombaire
    "16982005": "osteo",  # épaule
    "127949000": "osteo",  # coude
    "8205005": "osteo",  # poignet
    "85562004": "osteo",  # main
    "29836001": "osteo",  # hanche
    "72696002": "osteo",  # genou
    "344001": "osteo",  # cheville
    "56459004": "osteo",  # pied
    # sein
    "76752008": "sein",  # sein
}

#: The longest shift accepted (a week-end on call is about 62 h; a typo of a month is refused).
MAX_SHIFT = timedelta(days=14)


class ScheduleError(ValueError):
    """A subspecialty or on-call shift that cannot be accepted; ``reason`` names the rule broken
    (``unknown_subspecialty``, ``time_zone``, ``not_group``, ``not_radiologist``, ``order``,
    ``too_long``, ``overlap``, ``no_shift``) for callers that word it themselves."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


# ------------------------------------------------------------------------------ subspecialty


def _plain(value: str) -> str:
    decomposed = unicodedata.normalize("NFKD", value.strip().lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def normalise_subspecialty(value: str) -> str:
    """The :data:`SUBSPECIALTIES` code ``value`` names (its code, French label or a known alias,
    accents and case ignored); empty for empty. :class:`ScheduleError` when unknown."""
    text = _plain(value)
    if not text:
        return ""
    if text in SUBSPECIALTIES:
        return text
    for code, label in SUBSPECIALTIES.items():
        if text == _plain(label):
            return code
    if text in _ALIASES:
        return _ALIASES[text]
    raise ScheduleError(
        f"unknown subspecialty {value!r} (one of {', '.join(SUBSPECIALTIES)})", "unknown_subspecialty"
    )


def subspecialty_label(code: str, language: str = "fr") -> str:
    """The label of a subspecialty code (the code itself if unknown)."""
    labels = SUBSPECIALTIES_EN if language == "en" else SUBSPECIALTIES
    return labels.get(code, code)


def subspecialty_of(anatomy: Iterable[Mapping[str, Any]]) -> str:
    """The subspecialty the targeted anatomy gives (rule 2 of the module docstring): the one every
    mapped SNOMED CT code agrees on, else empty."""
    found = {
        ANATOMY_SUBSPECIALTIES[code]
        for item in anatomy
        if (code := str(item.get("code") or "").strip()) in ANATOMY_SUBSPECIALTIES
    }
    return found.pop() if len(found) == 1 else ""


def exam_subspecialty(explicit: str, anatomy: Iterable[Mapping[str, Any]]) -> str:
    """The subspecialty of an exam: the explicit choice, else the anatomy's, else none."""
    return normalise_subspecialty(explicit) or subspecialty_of(anatomy)


def parse_subspecialties(value: str) -> str:
    """A list of subspecialties (backslash, comma or space separated) as stored on a contract."""
    items = [normalise_subspecialty(v) for v in re.split(r"[\\,;]+", value) if v.strip()]
    return "\\".join(dict.fromkeys(items))


# --------------------------------------------------------------------------------- contracts


def _items(value: str) -> list[str]:
    return [v for v in value.split("\\") if v]


def contract_matches(contract: ReadingContract, *, modality: str, subspecialty: str) -> bool:
    """Whether an active ``contract`` takes an exam of ``modality`` needing ``subspecialty``."""
    modalities = _items(contract.modalities)
    subspecialties = _items(contract.subspecialties or "")
    return (
        bool(contract.active)
        and (not modalities or modality.strip().upper() in modalities)
        and (not subspecialties or subspecialty in subspecialties)
    )


def choose_contract(
    contracts: Sequence[ReadingContract], *, modality: str, subspecialty: str, on_call_groups: set[str]
) -> ReadingContract | None:
    """The contract that reads the exam (the "Contracts" rule): matching, most specific
    (subspecialty, then modality), then with a group on call now, then the oldest."""
    matching = [c for c in contracts if contract_matches(c, modality=modality, subspecialty=subspecialty)]
    if not matching:
        return None
    return min(
        matching,
        key=lambda c: (
            0 if c.subspecialties else 1,
            0 if c.modalities else 1,
            0 if c.group_code in on_call_groups else 1,
            c.id,
        ),
    )


def route(
    session: Session, *, site_code: str, modality: str, subspecialty: str = "", now: datetime
) -> ReadingContract | None:
    """The active contract of ``site_code`` that reads an exam of ``modality`` needing
    ``subspecialty`` at ``now`` (:func:`choose_contract` over the site's contracts)."""
    contracts = list(
        session.scalars(
            select(ReadingContract)
            .where(ReadingContract.site_code == site_code, ReadingContract.active.is_(True))
            .order_by(ReadingContract.id)
        )
    )
    matching = [c for c in contracts if contract_matches(c, modality=modality, subspecialty=subspecialty)]
    if not matching:
        return None
    on_call = groups_on_call(session, {c.group_code for c in matching}, now=now, subspecialty=subspecialty)
    return choose_contract(matching, modality=modality, subspecialty=subspecialty, on_call_groups=on_call)


# ----------------------------------------------------------------------------------- on call


def shift_covers(shift: OnCallShift, *, now: datetime, subspecialty: str) -> bool:
    """Whether ``shift`` covers an exam needing ``subspecialty`` at ``now``."""
    start, end = as_utc(shift.start_at), as_utc(shift.end_at)
    now = now.astimezone(UTC)
    return (
        start is not None
        and end is not None
        and start <= now < end
        and (not shift.subspecialty or shift.subspecialty == subspecialty)
    )


def choose_on_call(shifts: Iterable[OnCallShift], *, now: datetime, subspecialty: str) -> OnCallShift | None:
    """The shift whose radiologist takes the exam (the "On call" rule): covering it, naming its
    subspecialty before a general one, ending last, then by login."""
    covering = [s for s in shifts if shift_covers(s, now=now, subspecialty=subspecialty)]
    if not covering:
        return None
    return min(
        covering,
        key=lambda s: (0 if s.subspecialty else 1, -(as_utc(s.end_at) or now).timestamp(), s.login),
    )


def _covering(now: datetime, subspecialty: Any) -> Any:
    """SQL: an on-call shift covering ``now`` and ``subspecialty`` (a value or a column). Stored
    times are UTC (SQLite keeps no offset), so ``now`` is compared in UTC."""
    now = now.astimezone(UTC)
    return and_(
        OnCallShift.start_at <= now,
        OnCallShift.end_at > now,
        or_(OnCallShift.subspecialty == "", OnCallShift.subspecialty == subspecialty),
    )


def _active_radiologist(group_code: Any) -> Any:
    """SQL: the shift's radiologist is an active radiologist of ``group_code``."""
    return exists().where(
        Professional.login == OnCallShift.login,
        Professional.active.is_(True),
        Membership.professional_id == Professional.id,
        Membership.role == "radiologist",
        Membership.organisation_id == Organisation.id,
        Organisation.code == group_code,
    )


def on_call_shifts(
    session: Session, *, group_code: str, now: datetime, subspecialty: str
) -> list[OnCallShift]:
    """The group's shifts covering an exam needing ``subspecialty`` at ``now`` (active
    radiologists only)."""
    return list(
        session.scalars(
            select(OnCallShift)
            .where(
                OnCallShift.group_code == group_code,
                _covering(now, subspecialty),
                _active_radiologist(group_code),
            )
            .order_by(OnCallShift.id)
        )
    )


def groups_on_call(session: Session, group_codes: set[str], *, now: datetime, subspecialty: str) -> set[str]:
    """Which of ``group_codes`` have a radiologist on call now for ``subspecialty``."""
    if not group_codes:
        return set()
    return set(
        session.scalars(
            select(OnCallShift.group_code)
            .where(
                OnCallShift.group_code.in_(sorted(group_codes)),
                _covering(now, subspecialty),
                _active_radiologist(OnCallShift.group_code),
            )
            .distinct()
        )
    )


def on_call_radiologist(session: Session, *, group_code: str, now: datetime, subspecialty: str) -> str:
    """The login of the radiologist who takes the group's exam needing ``subspecialty`` at ``now``
    (:func:`choose_on_call`), empty when nobody is on call."""
    chosen = choose_on_call(
        on_call_shifts(session, group_code=group_code, now=now, subspecialty=subspecialty),
        now=now,
        subspecialty=subspecialty,
    )
    return chosen.login if chosen is not None else ""


def assign_on_call(
    session: Session, task: ReadingTask, *, now: datetime, principal: Principal, alert: bool = False
) -> str:
    """Pre-assign a ready, unclaimed ``task`` to the radiologist on call for it now (or clear the
    assignment when nobody is); with ``alert``, also mark them alerted of the near deadline. A
    conditional UPDATE (the task must still be ready), audited when something changed. Returns the
    assignee (empty: none)."""
    now = now.astimezone(UTC)
    login = on_call_radiologist(session, group_code=task.group_code, now=now, subspecialty=task.subspecialty)
    alert = alert and bool(login)  # nobody on call: nobody alerted (the group will be)
    if login == task.assigned_to and not alert:
        return login
    values: dict[str, Any] = {"updated_at": now}
    if login != task.assigned_to:
        values.update(assigned_to=login, assigned_at=now if login else None)
    conditions = [ReadingTask.id == task.id, ReadingTask.state == TASK_READY]
    if alert:
        values["oncall_alerted_at"] = now
        conditions += [ReadingTask.oncall_alerted_at.is_(None), ReadingTask.escalated_at.is_(None)]
    result = session.execute(
        update(ReadingTask).where(*conditions).values(**values).execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        return task.assigned_to
    previous = task.assigned_to
    session.refresh(task)
    audit.record(
        session,
        action="reading-task.alert-on-call" if alert else "reading-task.assign-on-call",
        principal=principal,
        study_uid=task.study_uid,
        detail={
            "task": task.id,
            "group": task.group_code,
            "subspecialty": task.subspecialty,
            "to": login,
            "previous": previous,
        },
    )
    return login


def assignment_due(session: Session, *, now: datetime, limit: int = 500) -> list[int]:
    """Ready tasks whose on-call assignment no longer follows the schedule: assigned to someone no
    longer covering them, or unassigned while someone is on call for them."""
    still_covered = (
        exists()
        .where(
            OnCallShift.group_code == ReadingTask.group_code,
            OnCallShift.login == ReadingTask.assigned_to,
            _covering(now, ReadingTask.subspecialty),
            _active_radiologist(ReadingTask.group_code),
        )
        .correlate(ReadingTask)
    )
    someone_on_call = (
        exists()
        .where(
            OnCallShift.group_code == ReadingTask.group_code,
            _covering(now, ReadingTask.subspecialty),
            _active_radiologist(ReadingTask.group_code),
        )
        .correlate(ReadingTask)
    )
    return list(
        session.scalars(
            select(ReadingTask.id)
            .where(
                ReadingTask.state == TASK_READY,
                or_(
                    and_(ReadingTask.assigned_to != "", ~still_covered),
                    and_(ReadingTask.assigned_to == "", someone_on_call),
                ),
            )
            .order_by(ReadingTask.id)
            .limit(limit)
        )
    )


# ---------------------------------------------------------------------------------- schedule


def _aware(value: datetime, what: str) -> datetime:
    if value.tzinfo is None:
        raise ScheduleError(f"the {what} of a shift needs its time zone", "time_zone")
    return value.astimezone(UTC)


def is_group_radiologist(session: Session, login: str, group_code: str) -> bool:
    """Whether ``login`` is an active radiologist of the group ``group_code``."""
    return (
        session.scalar(
            select(Professional.id)
            .join(Membership, Membership.professional_id == Professional.id)
            .join(Organisation, Organisation.id == Membership.organisation_id)
            .where(
                Professional.login == login,
                Professional.active.is_(True),
                Organisation.code == group_code,
                Membership.role == "radiologist",
            )
        )
        is not None
    )


def _check_radiologist(session: Session, group_code: str, login: str) -> None:
    group = session.scalar(select(Organisation).where(Organisation.code == group_code))
    if group is None or group.kind != "teleradiology-group":
        raise ScheduleError(f"{group_code} is not a teleradiology group", "not_group")
    if not is_group_radiologist(session, login, group_code):
        raise ScheduleError(f"{login} is not an active radiologist of {group_code}", "not_radiologist")


def add_shift(
    session: Session,
    *,
    group_code: str,
    login: str,
    start_at: datetime,
    end_at: datetime,
    subspecialty: str = "",
    principal: Principal,
) -> OnCallShift:
    """Put ``login`` on call for ``group_code`` from ``start_at`` to ``end_at`` (aware datetimes),
    for every exam or only ``subspecialty`` (the group's administrators)."""
    if not may_schedule_on_call(principal, group_code):
        raise AccessDenied(f"{principal.audit_name} may not change the on-call schedule of {group_code}")
    start, end = _aware(start_at, "start"), _aware(end_at, "end")
    if end <= start:
        raise ScheduleError("a shift ends after it starts", "order")
    if end - start > MAX_SHIFT:
        raise ScheduleError(f"a shift lasts at most {MAX_SHIFT.days} days", "too_long")
    code = normalise_subspecialty(subspecialty)
    _check_radiologist(session, group_code, login)
    clash = session.scalar(
        select(OnCallShift)
        .where(
            OnCallShift.group_code == group_code,
            OnCallShift.login == login,
            OnCallShift.start_at < end,
            OnCallShift.end_at > start,
        )
        .order_by(OnCallShift.start_at)
        .limit(1)
    )
    if clash is not None:
        raise ScheduleError(
            f"{login} is already on call for {group_code} in shift {clash.id} (overlap)", "overlap"
        )
    shift = OnCallShift(
        group_code=group_code,
        login=login,
        start_at=start,
        end_at=end,
        subspecialty=code,
        created_by=principal.name[:128],
        created_at=utcnow(),
    )
    session.add(shift)
    session.flush()
    audit.record(
        session,
        action="on-call.add",
        principal=principal,
        detail={
            "shift": shift.id,
            "group": group_code,
            "login": login,
            "start": start.isoformat(),
            "end": end.isoformat(),
            "subspecialty": code,
        },
    )
    return shift


def readable_groups(session: Session, principal: Principal) -> list[tuple[str, str]]:
    """(code, name) of the teleradiology groups whose on-call schedule ``principal`` may read
    (:func:`simral.access.policy.may_read_on_call`), by code."""
    groups = session.execute(
        select(Organisation.code, Organisation.name)
        .where(Organisation.kind == "teleradiology-group")
        .order_by(Organisation.code)
    ).all()
    return [(code, name) for code, name in groups if may_read_on_call(principal, code)]


def list_shifts(
    session: Session, *, group_code: str = "", ending_after: datetime | None = None
) -> list[OnCallShift]:
    """The schedule (of one group, or all), by start: the shifts still running or to come after
    ``ending_after`` (every shift when None)."""
    query = select(OnCallShift)
    if group_code:
        query = query.where(OnCallShift.group_code == group_code)
    if ending_after is not None:
        query = query.where(OnCallShift.end_at > ending_after)
    return list(
        session.scalars(query.order_by(OnCallShift.start_at, OnCallShift.group_code, OnCallShift.login))
    )


def remove_shift(session: Session, shift_id: int, *, principal: Principal) -> OnCallShift:
    """Take a shift off the schedule (the group's administrators); tasks assigned under it are
    handed over by the next periodic check."""
    shift = session.get(OnCallShift, shift_id)
    if shift is None:
        raise ScheduleError(f"no on-call shift {shift_id}", "no_shift")
    if not may_schedule_on_call(principal, shift.group_code):
        raise AccessDenied(
            f"{principal.audit_name} may not change the on-call schedule of {shift.group_code}"
        )
    session.delete(shift)
    session.flush()
    audit.record(
        session,
        action="on-call.remove",
        principal=principal,
        detail={
            "shift": shift_id,
            "group": shift.group_code,
            "login": shift.login,
            "start": (as_utc(shift.start_at) or shift.start_at).isoformat(),
            "end": (as_utc(shift.end_at) or shift.end_at).isoformat(),
            "subspecialty": shift.subspecialty,
        },
    )
    return shift
