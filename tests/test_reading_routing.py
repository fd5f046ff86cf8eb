"""Teleradiology routing by subspecialty and on-call schedule (issue 6 item 4; :mod:`simral.reading.routing`).

Site CHSUD has three reading contracts: TLRJ (the day group, every exam, the oldest), TLRN (neuro
only) and TLRG (the night / week-end group, every exam). TLRG publishes its on-call schedule
("tableau de garde"): dr_garde on call for every exam on the night of 5-6 December 2030,
dr_thorax for chest exams the same night. Everything runs in-process on the SQLite database; the
routing and the periodic checks get fixed moments (never the clock), far from today so that the
requests received now are routed by the day rule.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select
from tests.corpus import ct_series
from tests.simral_proc import SIMRAL

from simral.access.policy import SYSTEM, AccessDenied, Principal
from simral.app import open_app
from simral.archive.service import IngestItem, ingest_files
from simral.audit.models import AuditEvent
from simral.config import load_settings
from simral.context import AppContext
from simral.db.base import as_utc
from simral.identity import service as identity
from simral.identity.models import AdminAlert
from simral.patients.service import AuthorityRef, Traits
from simral.reading import routing, tasks
from simral.reading import service as reading
from simral.reading.models import TASK_READY, OnCallShift, ReadingContract, ReadingTask

PARIS = ZoneInfo("Europe/Paris")
OID_SITE = "1.2.250.1.999.17.1"
#: Thursday 5 December 2030, 22:00 in Paris (the platform's clock is UTC): the night shift covers it.
NIGHT = datetime(2030, 12, 5, 22, 0, tzinfo=PARIS).astimezone(UTC)
#: Monday 9 December 2030, 10:00 in Paris: nobody on call.
DAY = datetime(2030, 12, 9, 10, 0, tzinfo=PARIS).astimezone(UTC)
QUIET = timedelta(0)
WARN = timedelta(minutes=30)

USERS = (
    ("dr_jour", "TLRJ", "radiologist", "Dr Jean Jour"),
    ("dr_neuro", "TLRN", "radiologist", "Dr Nadia Neuro"),
    ("dr_garde", "TLRG", "radiologist", "Dr Gilles Garde"),
    ("dr_thorax", "TLRG", "radiologist", "Dr Thea Thorax"),
    ("dr_autre", "TLRG", "radiologist", "Dr Alain Autre"),
    ("coord_garde", "TLRG", "site-admin", "Coordination TLRG"),
)


@dataclass
class Region:
    ctx: AppContext
    base: Path
    data_dir: Path

    def principal(self, login: str) -> Principal:
        with self.ctx.db.reading() as session:
            professional = identity.get_professional(session, login)
            assert professional is not None
            return identity.principal_for(session, professional)

    def task(self, study_uid: str) -> ReadingTask:
        with self.ctx.db.reading() as session:
            task = session.scalar(select(ReadingTask).where(ReadingTask.study_uid == study_uid))
            assert task is not None
            session.expunge(task)
            return task

    def audit(self, action: str, study_uid: str) -> list[AuditEvent]:
        with self.ctx.db.reading() as session:
            return list(
                session.scalars(
                    select(AuditEvent).where(AuditEvent.action == action, AuditEvent.study_uid == study_uid)
                )
            )

    def tick(self, now: datetime) -> tasks.DueWork:
        """One run of the periodic reading check at ``now``."""
        with self.ctx.db.reading() as session:
            work = tasks.due_work(session, now=now, quiet=QUIET, warn_before=WARN)
        with self.ctx.db.unit_of_work() as session:
            return tasks.do_work(session, work, now=now, quiet=QUIET, warn_before=WARN)


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    base = tmp_path_factory.mktemp("routing")
    data_dir = base / "data"
    ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(data_dir)}))
    with ctx.db.unit_of_work() as session:
        identity.create_organisation(
            session, code="CHSUD", name="CH Sud", patient_id_oid=OID_SITE, principal=SYSTEM
        )
        for code, name in (
            ("TLRJ", "Télé-imagerie Jour"),
            ("TLRN", "Neuro-imagerie"),
            ("TLRG", "Garde Occitanie"),
        ):
            identity.create_organisation(
                session, code=code, name=name, kind="teleradiology-group", principal=SYSTEM
            )
        session.flush()
        for login, group, role, display in USERS:
            identity.create_professional(
                session, login=login, organisation=group, role=role, display_name=display, principal=SYSTEM
            )
        reading.add_contract(session, site_code="CHSUD", group_code="TLRJ", principal=SYSTEM)
        reading.add_contract(
            session, site_code="CHSUD", group_code="TLRN", subspecialties="neuro", principal=SYSTEM
        )
        reading.add_contract(session, site_code="CHSUD", group_code="TLRG", principal=SYSTEM)
        for login, subspecialty in (("dr_garde", ""), ("dr_thorax", "thorax")):
            routing.add_shift(
                session,
                group_code="TLRG",
                login=login,
                start_at=datetime(2030, 12, 5, 20, 0, tzinfo=PARIS),
                end_at=datetime(2030, 12, 6, 8, 0, tzinfo=PARIS),
                subspecialty=subspecialty,
                principal=SYSTEM,
            )
    yield Region(ctx=ctx, base=base, data_dir=data_dir)
    ctx.db.engine.dispose()


def _request(
    region: Region, placer: str, *, modality: str, anatomy: list[dict[str, str]], subspecialty: str = ""
) -> int:
    patient = reading.PatientRef(
        traits=Traits(birth_name="DURAND", first_birth_given_name="Marie", sex="F", birth_date="19700101"),
        ipp=f"IPP-{placer}",
        ipp_authority=AuthorityRef(oid=OID_SITE),
    )
    details = reading.RequestDetails(
        placer_number=placer,
        priority="urgent",
        modality=modality,
        justification="Bilan en urgence",
        anatomy=anatomy,
        subspecialty=subspecialty,
    )
    with region.ctx.db.unit_of_work() as session:
        request = reading.receive_request(
            session, site_code="CHSUD", patient=patient, details=details, principal=SYSTEM, source="portal"
        )
        return request.id


def _scan(region: Region, request_id: int, seed: int) -> str:
    """Accept the request and store its images (the site's scanner, in-process ingest): returns the
    Study Instance UID."""
    with region.ctx.db.unit_of_work() as session:
        _, step = reading.accept_request(session, request_id, protocol="Protocole standard", principal=SYSTEM)
        study_uid = step.study_uid
    paths = ct_series(
        region.base / f"scan{seed}", slices=2, rows=64, cols=64, patient_id=f"IPP-S{seed}",
        patient_name="DURAND^Marie", study_uid=study_uid, seed=seed,
    )  # fmt: skip
    node = Principal(kind="dicom-node", name="SCANNER_SUD", organisation="CHSUD")
    results = ingest_files(region.ctx, [IngestItem(p) for p in paths], principal=node, source=node.name)
    assert [r.outcome for r in results] == ["stored", "stored"]
    return study_uid


BRAIN = [{"code": "12738006", "system": "SNOMED CT", "display": "Encéphale"}]
CHEST = [{"code": "51185008", "system": "SNOMED CT", "display": "Thorax"}]
KNEE_RIGHT = [
    {"code": "72696002", "system": "SNOMED CT", "display": "Genou", "sub_id": "1.1"},
    {"code": "24028007", "system": "SNOMED CT", "display": "côté droit", "sub_id": "1.2"},
]


def test_subspecialty_from_anatomy_or_explicit_choice() -> None:
    assert routing.subspecialty_of(BRAIN) == "neuro"
    assert routing.subspecialty_of(KNEE_RIGHT) == "osteo"  # the laterality precision is ignored
    # Thorax-abdomen-pelvis: the mapped codes disagree, the exam is general.
    tap = [*CHEST, {"code": "818983003", "display": "Abdomen"}, {"code": "12921003", "display": "Pelvis"}]
    assert routing.subspecialty_of(tap) == ""
    assert routing.subspecialty_of([{"code": "", "display": "Thorax"}]) == ""  # free text: no guess
    assert routing.exam_subspecialty("Pédiatrie", BRAIN) == "pediatrie"  # the explicit choice wins
    assert routing.normalise_subspecialty("ostéo-articulaire") == "osteo"
    assert routing.normalise_subspecialty("Sein (sénologie)") == "sein"
    assert routing.parse_subspecialties("neuro, ORL\\neuro") == "neuro\\orl"
    with pytest.raises(routing.ScheduleError, match="unknown subspecialty"):
        routing.normalise_subspecialty("dermatologie")


def test_neuro_request_goes_to_the_neuro_group_and_other_anatomy_to_the_general_group(region: Region) -> None:
    neuro = _request(region, "RT-NEURO", modality="MR", anatomy=BRAIN)
    chest = _request(region, "RT-CHEST", modality="CT", anatomy=CHEST)
    knee = _request(region, "RT-KNEE", modality="MR", anatomy=KNEE_RIGHT, subspecialty="")
    with region.ctx.db.reading() as session:
        got = {
            rid: reading.get_request(session, rid, principal=SYSTEM, audited=False)
            for rid in (neuro, chest, knee)
        }
        assert (got[neuro].group_code, got[neuro].subspecialty) == ("TLRN", "neuro")
        # Day rule (nobody on call now): the oldest of the equally matching contracts, TLRJ.
        assert (got[chest].group_code, got[chest].subspecialty) == ("TLRJ", "thorax")
        assert (got[knee].group_code, got[knee].subspecialty) == ("TLRJ", "osteo")
        # The neuro contract wins at night too: specificity comes before the on-call preference.
        neuro_at_night = routing.route(
            session, site_code="CHSUD", modality="CT", subspecialty="neuro", now=NIGHT
        )
        assert neuro_at_night is not None and neuro_at_night.group_code == "TLRN"
    received = region.audit("imaging-request.receive", "")
    assert {e.detail["subspecialty"] for e in received if e.detail["request"] == neuro} == {"neuro"}


def test_contract_specificity_subspecialty_before_modality(region: Region) -> None:
    def contract(cid: int, group: str, modalities: str = "", subspecialties: str = "") -> ReadingContract:
        return ReadingContract(
            id=cid,
            site_code="S",
            group_code=group,
            modalities=modalities,
            subspecialties=subspecialties,
            active=True,
        )

    contracts = [
        contract(1, "GEN"),
        contract(2, "CTMR", modalities="CT\\MR"),
        contract(3, "NEURO", subspecialties="neuro"),
    ]
    choose = routing.choose_contract
    assert choose(contracts, modality="CT", subspecialty="neuro", on_call_groups=set()).group_code == "NEURO"
    assert choose(contracts, modality="CT", subspecialty="", on_call_groups=set()).group_code == "CTMR"
    assert choose(contracts, modality="US", subspecialty="", on_call_groups={"CTMR"}).group_code == "GEN"
    night = [contract(1, "JOUR"), contract(2, "GARDE")]
    assert choose(night, modality="US", subspecialty="", on_call_groups={"GARDE"}).group_code == "GARDE"
    assert choose(night, modality="US", subspecialty="", on_call_groups=set()).group_code == "JOUR"
    assert (
        choose(
            [contract(3, "NEURO", subspecialties="neuro")],
            modality="CT",
            subspecialty="",
            on_call_groups=set(),
        )
        is None
    )


def test_night_shift_routes_to_the_on_call_group_and_assigns_the_on_call_radiologist(region: Region) -> None:
    with region.ctx.db.reading() as session:
        at_night = routing.route(session, site_code="CHSUD", modality="CT", subspecialty="osteo", now=NIGHT)
        by_day = routing.route(session, site_code="CHSUD", modality="CT", subspecialty="osteo", now=DAY)
        assert at_night is not None and at_night.group_code == "TLRG"
        assert by_day is not None and by_day.group_code == "TLRJ"
    knee = _request(region, "RT-NIGHT-KNEE", modality="CT", anatomy=KNEE_RIGHT)
    chest = _request(region, "RT-NIGHT-CHEST", modality="CT", anatomy=CHEST)
    knee_uid, chest_uid = _scan(region, knee, seed=71), _scan(region, chest, seed=72)
    done = region.tick(NIGHT)
    assert len(done.open_procedures) == 2 and len(done.ready_tasks) == 2
    knee_task, chest_task = region.task(knee_uid), region.task(chest_uid)
    # The images arrived at night: the reading task goes to the on-call group, whatever group
    # answered the request by day.
    assert (knee_task.group_code, knee_task.state, knee_task.subspecialty) == ("TLRG", TASK_READY, "osteo")
    assert knee_task.assigned_to == "dr_garde"  # the general shift
    assert chest_task.assigned_to == "dr_thorax"  # the shift naming the subspecialty comes first
    assigned = region.audit("reading-task.assign-on-call", knee_uid)
    assert [e.detail["to"] for e in assigned] == ["dr_garde"]
    # The worklist shows who is on call for it; a colleague may still claim it.
    with region.ctx.db.reading() as session:
        rows = {
            r.task.study_uid: r for r in tasks.list_tasks(session, principal=region.principal("dr_autre"))
        }
    assert rows[knee_uid].assignee_name == "Dr Gilles Garde"
    with region.ctx.db.unit_of_work() as session:
        claimed = tasks.claim(session, chest_task.id, principal=region.principal("dr_autre"))
        assert claimed.claimed_by == "dr_autre"
    # Outside the shift the day rule applies: the ready task is no longer pre-assigned.
    done = region.tick(DAY)
    assert done.assign_tasks == [knee_task.id]
    assert region.task(knee_uid).assigned_to == ""


def test_near_deadline_alerts_the_on_call_radiologist_first_then_the_group(region: Region) -> None:
    request_id = _request(region, "RT-NIGHT-ALERT", modality="CT", anatomy=KNEE_RIGHT)
    study_uid = _scan(region, request_id, seed=73)
    region.tick(NIGHT)
    task = region.task(study_uid)
    assert task.due_at is not None and task.assigned_to == "dr_garde"
    due_utc = as_utc(task.due_at)
    assert due_utc is not None and due_utc == NIGHT + timedelta(
        minutes=60
    )  # the contract's urgent turnaround
    # 20 min before the deadline: the on-call radiologist is alerted, not yet the group.
    near = due_utc - timedelta(minutes=20)
    done = region.tick(near)
    assert done.escalate_tasks == [task.id]
    task = region.task(study_uid)
    assert task.oncall_alerted_at is not None and task.escalated_at is None and task.assigned_to == "dr_garde"
    assert [e.detail["to"] for e in region.audit("reading-task.alert-on-call", study_uid)] == ["dr_garde"]
    with region.ctx.db.reading() as session:
        alerts = list(session.scalars(select(AdminAlert).where(AdminAlert.study_uid == study_uid)))
    assert alerts == []
    assert not region.tick(near + timedelta(minutes=5)).escalate_tasks  # nothing more before the deadline
    # The deadline passes, still unread: the group's administrators are alerted, once.
    late = due_utc + timedelta(minutes=1)
    assert region.tick(late).escalate_tasks == [task.id]
    assert not region.tick(late + timedelta(minutes=1)).escalate_tasks
    with region.ctx.db.reading() as session:
        alerts = list(session.scalars(select(AdminAlert).where(AdminAlert.study_uid == study_uid)))
    assert (
        len(alerts) == 1
        and alerts[0].organisation_code == "TLRG"
        and "on-call dr_garde alerted" in alerts[0].message
    )
    escalated = region.audit("reading-task.escalate", study_uid)
    assert len(escalated) == 1 and escalated[0].detail["on_call"] == "dr_garde"


def test_only_the_group_administrators_edit_its_schedule(region: Region) -> None:
    start = datetime(2030, 12, 12, 20, 0, tzinfo=PARIS)
    shift = {"login": "dr_autre", "start_at": start, "end_at": start + timedelta(hours=12)}
    with region.ctx.db.unit_of_work() as session:
        with pytest.raises(AccessDenied):
            routing.add_shift(session, group_code="TLRG", principal=region.principal("dr_garde"), **shift)
        with pytest.raises(AccessDenied):  # TLRG's coordinator is not TLRN's
            routing.add_shift(
                session, group_code="TLRN", login="dr_neuro", start_at=start,
                end_at=start + timedelta(hours=2), principal=region.principal("coord_garde"),
            )  # fmt: skip
        added = routing.add_shift(
            session, group_code="TLRG", principal=region.principal("coord_garde"), **shift
        )
        added_id = added.id
    with region.ctx.db.unit_of_work() as session:
        with pytest.raises(AccessDenied):
            routing.remove_shift(session, added_id, principal=region.principal("dr_autre"))
        with pytest.raises(routing.ScheduleError, match="not an active radiologist of TLRG"):
            routing.add_shift(
                session, group_code="TLRG", login="dr_neuro", start_at=start,
                end_at=start + timedelta(hours=2), principal=region.principal("coord_garde"),
            )  # fmt: skip
        with pytest.raises(routing.ScheduleError, match="ends after it starts"):
            routing.add_shift(
                session, group_code="TLRG", login="dr_autre", start_at=start, end_at=start,
                principal=region.principal("coord_garde"),
            )  # fmt: skip
        routing.remove_shift(session, added_id, principal=region.principal("coord_garde"))
    with region.ctx.db.reading() as session:
        assert session.get(OnCallShift, added_id) is None
        actions = [
            e.action
            for e in session.scalars(
                select(AuditEvent).where(AuditEvent.action.in_(("on-call.add", "on-call.remove")))
            )
            if e.detail.get("shift") == added_id
        ]
    assert actions == ["on-call.add", "on-call.remove"]


def test_reviewer_sets_the_subspecialty_and_the_task_follows(region: Region) -> None:
    request_id = _request(region, "RT-REVIEW", modality="CT", anatomy=[{"code": "", "display": "Crâne"}])
    with region.ctx.db.unit_of_work() as session:
        assert reading.get_request(session, request_id, principal=SYSTEM, audited=False).subspecialty == ""
        with pytest.raises(AccessDenied):  # a radiologist of another group
            reading.set_subspecialty(
                session, request_id, subspecialty="neuro", principal=region.principal("dr_neuro")
            )
        changed = reading.set_subspecialty(
            session, request_id, subspecialty="neuro", principal=region.principal("dr_jour")
        )
        assert changed.subspecialty == "neuro" and changed.group_code == "TLRJ"
    study_uid = _scan(region, request_id, seed=74)
    region.tick(DAY)
    # The reading task is routed with the reviewer's subspecialty: the neuro group reads it.
    task = region.task(study_uid)
    assert (task.group_code, task.subspecialty) == ("TLRN", "neuro")


def test_cli_round_trip(region: Region) -> None:
    env = {**os.environ}
    env.pop("SIMRAL_CONFIG", None)

    def simral(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SIMRAL, "oncall", *args, "--data-dir", str(region.data_dir)],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    added = simral("add", "TLRG", "dr_autre", "--start", "2030-12-24T20:00", "--end", "2030-12-25T08:00",
                   "--subspecialty", "Ostéo-articulaire")  # fmt: skip
    assert added.returncode == 0, added.stderr
    with region.ctx.db.reading() as session:
        shift = session.scalar(select(OnCallShift).where(OnCallShift.login == "dr_autre"))
        assert shift is not None and shift.subspecialty == "osteo"
        assert as_utc(shift.start_at) == datetime(2030, 12, 24, 20, 0, tzinfo=PARIS)  # local time
        shift_id = shift.id
    listed = simral("list", "--group", "TLRG")
    assert listed.returncode == 0, listed.stderr
    assert "dr_autre" in listed.stdout and "2030-12-24 20:00" in listed.stdout and "osteo" in listed.stdout
    refused = simral("add", "TLRG", "dr_neuro", "--start", "2030-12-24T20:00", "--end", "2030-12-25T08:00")
    assert refused.returncode == 1 and "not an active radiologist" in refused.stdout + refused.stderr
    removed = simral("remove", str(shift_id))
    assert removed.returncode == 0, removed.stderr
    assert "dr_autre" not in simral("list", "--group", "TLRG").stdout
