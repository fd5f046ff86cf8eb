"""Modality Worklist, MPPS and reading tasks against a real ``simral serve`` (issue 6 items 3–4;
DESIGN.md §7; PS3.4 K and F.7; IHE RAD Scheduled Workflow).

On both backends (SQLite + filesystem, PostgreSQL + S3). Site SITEA has its exams read by the
teleradiology group TELE. Two requests of SITEA are accepted in-process with the request service
(an urgent CT scheduled in an hour, a routine MR in three days), so each is a Scheduled Procedure
Step on the worklist:

- dcmtk ``findscu -W`` from SITEA's modality sees both items with the patient as the site knows
  them (IPP, issuer, qualified INS in Other Patient IDs Sequence), the accession number and the
  Study Instance UID to use; a modality of SITEB sees nothing; date ranges and modality select;
- the CT modality reports its procedure step (pynetdicom N-CREATE IN PROGRESS: the scheduled step
  becomes IN PROGRESS), stores its images with dcmtk ``storescu`` under the scheduled Study
  Instance UID, and completes it (N-SET COMPLETED): the task becomes ready for TELE at once; a
  later N-SET is refused (0110H, Error ID A710H, PS3.4 F.7.2.2.2);
- the MR modality sends no MPPS: its task becomes ready after the quiet time;
- two radiologists claim the same task at the same moment over HTTP: exactly one wins;
- urgent comes before routine whatever the deadlines; a deadline near or passed escalates the
  task once (escalated_at, an alert for TELE, an audit record).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep
from sqlalchemy import select, update
from tests.conftest import BACKENDS, backend_env
from tests.corpus import ct_series
from tests.dcmtk_tools import findscu_worklist
from tests.dcmtk_tools import storescu as dcmtk_storescu
from tests.simral_proc import SimralProcess

from simral.access.policy import SYSTEM
from simral.app import open_app
from simral.audit.models import AuditEvent
from simral.config import load_settings
from simral.context import AppContext
from simral.db.base import as_utc, utcnow
from simral.identity.models import AdminAlert
from simral.patients.models import INS_TEST_OID, STATUS_QUAL
from simral.patients.service import AuthorityRef, Ins, Traits
from simral.reading import service as reading
from simral.reading.models import (
    STEP_IN_PROGRESS,
    TASK_CLAIMED,
    TASK_READY,
    ImagingRequest,
    PerformedProcedureStep,
    ReadingTask,
    ScheduledProcedure,
)
from simral.reading.worklist import scheduled_at

PASSWORD = "Lecture-Essai-2026!x"
OID_SITEA = "1.2.250.1.999.7.1"
NIR = "279035121518989"  # the ANS test NIR of tests/test_identity_queries.py
MOD_A, MOD_B = "MODA", "MODB"
QUIET_SECONDS = 8
T = TypeVar("T")


@dataclass
class Exam:
    request_id: int
    study_uid: str
    accession: str
    step_id: str
    modality: str
    start_date: str


@dataclass
class Region:
    simral: SimralProcess
    ctx: AppContext
    tokens: dict[str, str]
    ct: Exam
    mr: Exam
    base: Path

    def api(self, login: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(
            method,
            f"{self.simral.http_url}{path}",
            headers={"Authorization": f"Bearer {self.tokens[login]}"},
            timeout=30,
            **kwargs,
        )

    def task(self, study_uid: str) -> ReadingTask | None:
        with self.ctx.db.reading() as session:
            return session.scalar(select(ReadingTask).where(ReadingTask.study_uid == study_uid))

    def audit(self, action: str, study_uid: str) -> list[AuditEvent]:
        with self.ctx.db.reading() as session:
            return list(
                session.scalars(
                    select(AuditEvent)
                    .where(AuditEvent.action == action, AuditEvent.study_uid == study_uid)
                    .order_by(AuditEvent.id)
                )
            )


def _wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _request(
    ctx: AppContext, *, placer: str, modality: str, priority: str, delay: str, appointment_in: timedelta
) -> Exam:
    patient = reading.PatientRef(
        traits=Traits(
            birth_name="PAT-TROIS",
            birth_given_names="DOMINIQUE MARIE",
            first_birth_given_name="DOMINIQUE",
            sex="F",
            birth_date="19790328",
            used_name="MARTIN",
            used_given_name="DOMI",
        ),
        ipp="IPP-7001",
        ipp_authority=AuthorityRef(oid=OID_SITEA),
        ins=Ins(NIR, INS_TEST_OID),
        status=STATUS_QUAL,
    )
    details = reading.RequestDetails(
        placer_number=placer,
        placer_authority=OID_SITEA,
        priority=priority,
        desired_delay=delay,
        justification="Douleur thoracique",
        modality=modality,
        anatomy=[{"code": "51185008", "system": "SNOMED CT", "display": "Thorax"}],
        appointment_at=utcnow() + appointment_in,
        requester={"id": "10001234567", "family": "DUPONT", "given": "JEAN"},
        consent=True,
    )
    with ctx.db.unit_of_work() as session:
        request = reading.receive_request(
            session,
            site_code="SITEA",
            patient=patient,
            details=details,
            principal=SYSTEM,
            source="portal",
            allow_test_ins=True,
        )
        _, step = reading.accept_request(
            session, request.id, protocol=f"{modality} standard", principal=SYSTEM
        )
        start_date, _ = scheduled_at(step.start_at)
        return Exam(request.id, step.study_uid, step.accession_number, step.step_id, modality, start_date)


@pytest.fixture(scope="module", params=BACKENDS)
def region(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    base = tmp_path_factory.mktemp(f"worklist-{request.param}")
    backend = backend_env(request.param, request)
    simral = SimralProcess(
        base / "data",
        env=backend,
        extra_env={
            "SIMRAL_INS_TEST_OIDS_ALLOWED": "true",
            "SIMRAL_READING_QUIET_SECONDS": str(QUIET_SECONDS),
            "SIMRAL_READING_CHECK_SECONDS": "0.3",
            "SIMRAL_READING_ESCALATE_MINUTES": "30",
        },
    )
    simral.cli("organisations", "add", "SITEA", "--name", "Hôpital A", "--patient-id-oid", OID_SITEA)
    simral.cli("organisations", "add", "SITEB", "--name", "Clinique B")
    simral.cli("organisations", "add", "TELE", "--name", "Télé-imagerie Sud", "--kind", "teleradiology-group")
    for login, org, role, rpps in (
        ("radio1", "TELE", "radiologist", "10005000001"),
        ("radio2", "TELE", "radiologist", "10005000002"),
        ("chef", "TELE", "site-admin", "10005000003"),
    ):
        simral.cli(
            "users", "add", login, "--organisation", org, "--role", role, "--rpps", rpps,
            "--name", login.title(), "--password-stdin", input=PASSWORD + "\n",
        )  # fmt: skip
    simral.add_node("mod_a", MOD_A, 104, organisation="SITEA")
    simral.add_node("mod_b", MOD_B, 104, organisation="SITEB")
    tokens = {login: simral.token_for(login) for login in ("radio1", "radio2", "chef")}
    ctx = open_app(load_settings(environ={**backend, "SIMRAL_DATA_DIR": str(simral.data_dir)}))
    try:
        with ctx.db.unit_of_work() as session:
            reading.add_contract(
                session, site_code="SITEA", group_code="TELE", urgent_minutes=120, routine_minutes=24 * 60,
                principal=SYSTEM,
            )  # fmt: skip
        ct = _request(
            ctx,
            placer="CMD-CT-1",
            modality="CT",
            priority="urgent",
            delay="",
            appointment_in=timedelta(hours=1),
        )
        # The routine request wishes a reading within 90 min: earlier than the urgent one's 120.
        mr = _request(
            ctx,
            placer="CMD-MR-1",
            modality="MR",
            priority="routine",
            delay="PT90M",
            appointment_in=timedelta(days=3),
        )
        with simral:
            yield Region(simral, ctx, tokens, ct, mr, base)
    finally:
        ctx.db.dispose()


# ----------------------------------------------------------------------------------- dcmtk


def findscu(region: Region, calling_ae: str, **values: str) -> dict[str, Dataset]:
    """dcmtk findscu -W (Modality Worklist); the answers by Study Instance UID."""
    return findscu_worklist(region.simral, region.base, calling_ae, **values)


def storescu(region: Region, calling_ae: str, paths: list[Path]) -> None:
    dcmtk_storescu(region.simral, calling_ae, paths)


def _images_for(region: Region, exam: Exam, name: str, seed: int) -> list[Path]:
    """What the modality produces from the worklist item: its Study Instance UID, accession number
    and patient."""
    paths = ct_series(
        region.base / name, slices=3, rows=32, cols=32, patient_id="IPP-7001", patient_name="MARTIN^DOMI",
        study_uid=exam.study_uid, seed=seed,
    )  # fmt: skip
    for path in paths:
        ds = dcmread(path)
        ds.AccessionNumber = exam.accession
        ds.Modality = exam.modality
        ds.IssuerOfPatientID = ""
        qualifier = Dataset()
        qualifier.UniversalEntityID = OID_SITEA
        qualifier.UniversalEntityIDType = "ISO"
        ds.IssuerOfPatientIDQualifiersSequence = [qualifier]
        ds.save_as(path)
    return paths


# ----------------------------------------------------------------------------------- MWL


def test_site_modality_sees_its_worklist_with_the_patient_as_the_site_knows_them(region: Region) -> None:
    found = findscu(region, MOD_A)
    assert set(found) == {region.ct.study_uid, region.mr.study_uid}
    ct = found[region.ct.study_uid]
    assert str(ct.PatientName) == "MARTIN^DOMI"
    assert ct.PatientID == "IPP-7001"
    assert ct.PatientBirthDate == "19790328" and ct.PatientSex == "F"
    assert ct.AccessionNumber == region.ct.accession
    assert ct.RequestedProcedureID
    (ins,) = ct.OtherPatientIDsSequence
    assert ins.PatientID == NIR and ins.IssuerOfPatientID == "ASIP-SANTE-INS-NIR"
    assert ins.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == INS_TEST_OID
    (step,) = ct.ScheduledProcedureStepSequence
    assert step.Modality == "CT"
    assert step.ScheduledProcedureStepID == region.ct.step_id
    assert step.ScheduledProcedureStepStatus == "SCHEDULED"
    assert step.ScheduledProcedureStepStartDate == region.ct.start_date
    # Only the keys asked for come back (PS3.4 C.2.2.1.2).
    assert "ImagingServiceRequestComments" not in ct
    # The query is in the audit trail, for the site's node.
    with region.ctx.db.reading() as session:
        query = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "query").order_by(AuditEvent.id.desc()).limit(1)
        ).one()
    assert query.detail["protocol"] == "DIMSE C-FIND MWL" and query.actor == f"dicom-node:{MOD_A}"


def test_a_modality_of_another_organisation_sees_nothing(region: Region) -> None:
    assert findscu(region, MOD_B) == {}
    assert findscu(region, MOD_B, AccessionNumber=region.ct.accession) == {}


def test_matching_by_date_range_modality_and_keys(region: Region) -> None:
    ct_day = region.ct.start_date
    sps = "ScheduledProcedureStepSequence[0]"
    by_day = findscu(region, MOD_A, **{f"{sps}.ScheduledProcedureStepStartDate": f"{ct_day}-{ct_day}"})
    assert set(by_day) == {region.ct.study_uid}
    from_day = findscu(
        region, MOD_A, **{f"{sps}.ScheduledProcedureStepStartDate": f"{region.mr.start_date}-"}
    )
    assert set(from_day) == {region.mr.study_uid}
    assert set(findscu(region, MOD_A, **{f"{sps}.Modality": "MR"})) == {region.mr.study_uid}
    both = findscu(
        region,
        MOD_A,
        **{f"{sps}.Modality": "CT", f"{sps}.ScheduledProcedureStepStartDate": f"{region.mr.start_date}-"},
    )
    assert both == {}
    assert set(findscu(region, MOD_A, PatientName="martin*")) == {region.ct.study_uid, region.mr.study_uid}
    assert set(findscu(region, MOD_A, AccessionNumber=region.mr.accession)) == {region.mr.study_uid}
    assert findscu(region, MOD_A, PatientID="IPP-9999") == {}


# ---------------------------------------------------------------------------------- MPPS


def _mpps_association(region: Region) -> Any:
    ae = AE(ae_title=MOD_A)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", region.simral.dicom_port, ae_title=region.simral.ae_title)
    assert assoc.is_established
    return assoc


def test_mpps_completed_makes_the_task_ready_and_is_final(region: Region) -> None:
    exam = region.ct
    mpps_uid = "1.2.826.0.1.3680043.8.498.777001"
    assoc = _mpps_association(region)
    try:
        create = Dataset()
        scheduled = Dataset()
        scheduled.StudyInstanceUID = exam.study_uid
        scheduled.AccessionNumber = exam.accession
        scheduled.ScheduledProcedureStepID = exam.step_id
        scheduled.RequestedProcedureID = ""
        create.ScheduledStepAttributesSequence = [scheduled]
        create.PatientName = "MARTIN^DOMI"
        create.PatientID = "IPP-7001"
        create.PerformedProcedureStepID = "PPS-1"
        create.PerformedStationAETitle = MOD_A
        create.PerformedProcedureStepStartDate = time.strftime("%Y%m%d")
        create.PerformedProcedureStepStartTime = time.strftime("%H%M%S")
        create.PerformedProcedureStepStatus = "IN PROGRESS"
        create.Modality = "CT"
        create.PerformedSeriesSequence = []
        status, _ = assoc.send_n_create(create, ModalityPerformedProcedureStep, mpps_uid)
        assert status is not None and status.Status == 0x0000, status
        with region.ctx.db.reading() as session:
            step = session.scalars(
                select(ScheduledProcedure).where(ScheduledProcedure.step_id == exam.step_id)
            ).one()
            assert step.state == STEP_IN_PROGRESS
            performed = session.scalars(
                select(PerformedProcedureStep).where(PerformedProcedureStep.sop_instance_uid == mpps_uid)
            ).one()
            assert performed.procedure_id == step.id and performed.attributes["00400252"]["Value"] == [
                "IN PROGRESS"
            ]
        # The worklist shows the step in progress.
        shown = findscu(region, MOD_A, AccessionNumber=exam.accession)[exam.study_uid]
        assert shown.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus == "IN PROGRESS"
        # A second N-CREATE of the same instance is a duplicate.
        status, _ = assoc.send_n_create(create, ModalityPerformedProcedureStep, mpps_uid)
        assert status is not None and status.Status == 0x0111

        paths = _images_for(region, exam, "ct", seed=81)
        storescu(region, MOD_A, paths)
        # The study of a scheduled procedure arrived: its task is opened, waiting for completion.
        task = _wait_for(lambda: region.task(exam.study_uid), 10, "the task to open")
        assert task.group_code == "TELE" and task.priority == "urgent"

        done = Dataset()
        done.PerformedProcedureStepStatus = "COMPLETED"
        done.PerformedProcedureStepEndDate = time.strftime("%Y%m%d")
        done.PerformedProcedureStepEndTime = time.strftime("%H%M%S")
        series = Dataset()
        first = dcmread(paths[0], stop_before_pixels=True)
        series.SeriesInstanceUID = first.SeriesInstanceUID
        series.Modality = "CT"
        series.PerformingPhysicianName = ""
        series.ProtocolName = "THORAX"
        series.OperatorsName = ""
        series.SeriesDescription = ""
        series.RetrieveAETitle = ""
        series.ReferencedNonImageCompositeSOPInstanceSequence = []
        images = []
        for path in paths:
            header = dcmread(path, stop_before_pixels=True)
            ref = Dataset()
            ref.ReferencedSOPClassUID = header.SOPClassUID
            ref.ReferencedSOPInstanceUID = header.SOPInstanceUID
            images.append(ref)
        series.ReferencedImageSequence = images
        done.PerformedSeriesSequence = [series]
        status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, mpps_uid)
        assert status is not None and status.Status == 0x0000, status
        # Ready at once (well before the quiet time), because of the MPPS.
        task = _wait_for(
            lambda: (t := region.task(exam.study_uid)) is not None and t.state == TASK_READY and t,
            3,
            "the task to be ready",
        )
        (ready,) = region.audit("reading-task.ready", exam.study_uid)
        assert ready.detail["because"] == "mpps"
        # The COMPLETED step is the request's post-exam complement (ANS flux 4): it is performed,
        # with the exam's accession number and Study Instance UID, and can no longer be cancelled.
        with region.ctx.db.reading() as session:
            request = session.get(ImagingRequest, exam.request_id)
            assert request is not None
            assert (request.state, request.accession_number, request.study_uid) == (
                "performed",
                exam.accession,
                exam.study_uid,
            )
            assert request.complement["origins"] == ["mpps"] and request.complement["modality"] == "CT"
            assert request.complement["equipment"] == [{"station": MOD_A}]
            assert request.complement["performed_at"]
            with pytest.raises(reading.ReadingError) as refused:
                reading.cancel_request(session, request, reason="trop tard", principal=SYSTEM)
            assert refused.value.code == "206"
        (recorded,) = region.audit("mpps.update", exam.study_uid)
        assert recorded.detail["complement"] == "recorded"
        # COMPLETED is final (PS3.4 F.7.2.2.2).
        again = Dataset()
        again.PerformedProcedureStepStatus = "DISCONTINUED"
        status, _ = assoc.send_n_set(again, ModalityPerformedProcedureStep, mpps_uid)
        assert status is not None and status.Status == 0x0110
        assert status.ErrorID == 0xA710
        status, _ = assoc.send_n_set(again, ModalityPerformedProcedureStep, "1.2.826.0.1.3680043.8.498.404")
        assert status is not None and status.Status == 0x0112
    finally:
        assoc.release()
    assert [e.action for e in region.audit("mpps.update", exam.study_uid)] == ["mpps.update"]
    # The completed step left the worklist.
    assert findscu(region, MOD_A, AccessionNumber=exam.accession) == {}
    # The group's radiologists now see the study (DICOMweb, hence the viewer).
    response = region.api("radio1", "GET", f"/dicom-web/studies?StudyInstanceUID={exam.study_uid}")
    assert response.status_code == 200 and len(response.json()) == 1


def test_without_mpps_the_task_is_ready_after_the_quiet_time(region: Region) -> None:
    exam = region.mr
    storescu(region, MOD_A, _images_for(region, exam, "mr", seed=82))
    stored_at = time.monotonic()
    task = _wait_for(lambda: region.task(exam.study_uid), 10, "the MR task to open")
    assert task.state == "waiting" and task.priority == "routine"
    task = _wait_for(
        lambda: (t := region.task(exam.study_uid)) is not None and t.state == TASK_READY and t,
        QUIET_SECONDS + 15,
        "the MR task to be ready",
    )
    assert time.monotonic() - stored_at >= QUIET_SECONDS - 1
    (ready,) = region.audit("reading-task.ready", exam.study_uid)
    assert ready.detail["because"] == "quiet"
    # The desired 90 minutes run from the request's reception, not from the images' arrival
    # (earlier than the contract's 24 hours from now).
    with region.ctx.db.reading() as session:
        request = session.get(ImagingRequest, exam.request_id)
        assert request is not None and task.due_at is not None
        expected = as_utc(request.created_at) + timedelta(minutes=90)
    assert abs((as_utc(task.due_at) - expected).total_seconds()) < 1


def test_urgent_comes_first_then_by_deadline(region: Region) -> None:
    ct, mr = region.task(region.ct.study_uid), region.task(region.mr.study_uid)
    assert ct is not None and mr is not None and ct.due_at is not None and mr.due_at is not None
    assert mr.due_at < ct.due_at  # the routine one is due earlier...
    response = region.api("radio1", "GET", "/api/reading/tasks")
    assert response.status_code == 200
    listed = [item["study_uid"] for item in response.json()["tasks"]]
    assert listed == [region.ct.study_uid, region.mr.study_uid]  # ...and still comes after the urgent one
    # Not for another organisation's users, nor for no one.
    assert region.api("chef", "GET", "/api/reading/tasks").json()["tasks"]  # the group's administrator
    assert httpx.get(f"{region.simral.http_url}/api/reading/tasks", timeout=10).status_code == 401


def test_two_radiologists_claim_at_once_and_exactly_one_wins(region: Region) -> None:
    task = region.task(region.mr.study_uid)
    assert task is not None and task.state == TASK_READY
    barrier = threading.Barrier(2)
    results: dict[str, httpx.Response] = {}

    def claim(login: str) -> None:
        barrier.wait()
        results[login] = region.api(login, "POST", f"/api/reading/tasks/{task.id}/claim")

    threads = [threading.Thread(target=claim, args=(login,)) for login in ("radio1", "radio2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    statuses = sorted(r.status_code for r in results.values())
    assert statuses == [200, 409], {k: (v.status_code, v.text) for k, v in results.items()}
    winner = next(login for login, r in results.items() if r.status_code == 200)
    loser = next(login for login, r in results.items() if r.status_code == 409)
    assert winner in results[loser].json()["error"]
    claimed = region.task(region.mr.study_uid)
    assert claimed is not None and claimed.state == TASK_CLAIMED and claimed.claimed_by == winner
    (record,) = region.audit("reading-task.claim", region.mr.study_uid)
    assert record.actor == f"user:{winner}"
    # The loser may not release it; the winner may; the group's administrator hands it over.
    assert region.api(loser, "POST", f"/api/reading/tasks/{task.id}/release").status_code == 403
    assert region.api(winner, "POST", f"/api/reading/tasks/{task.id}/release").json()["state"] == TASK_READY
    assert region.audit("reading-task.release", region.mr.study_uid)[0].actor == f"user:{winner}"
    assigned = region.api("chef", "POST", f"/api/reading/tasks/{task.id}/reassign", json={"login": loser})
    assert assigned.status_code == 200 and assigned.json()["claimed_by"] == loser
    assert (
        region.api(
            winner, "POST", f"/api/reading/tasks/{task.id}/reassign", json={"login": winner}
        ).status_code
        == 403
    )
    assert (
        region.api(
            "chef", "POST", f"/api/reading/tasks/{task.id}/reassign", json={"login": "chef"}
        ).status_code
        == 400
    )


def test_deadline_near_or_passed_escalates_once(region: Region) -> None:
    ct, mr = region.task(region.ct.study_uid), region.task(region.mr.study_uid)
    assert ct is not None and mr is not None
    assert ct.escalated_at is None and mr.escalated_at is None  # 90 and 120 min away: not yet
    now = utcnow()
    with region.ctx.db.unit_of_work() as session:
        # Time passes: the CT is 10 minutes late, the MR due in 5 (within the 30-minute warning).
        session.execute(
            update(ReadingTask).where(ReadingTask.id == ct.id).values(due_at=now - timedelta(minutes=10))
        )
        session.execute(
            update(ReadingTask).where(ReadingTask.id == mr.id).values(due_at=now + timedelta(minutes=5))
        )
    for task in (ct, mr):
        _wait_for(
            lambda task=task: (t := region.task(task.study_uid)) is not None and t.escalated_at is not None,
            10,
            "the escalation",
        )
    late = region.audit("reading-task.escalate", ct.study_uid)
    near = region.audit("reading-task.escalate", mr.study_uid)
    assert len(late) == 1 and late[0].detail["overdue"] is True and late[0].outcome == "warning"
    assert len(near) == 1 and near[0].detail["overdue"] is False
    with region.ctx.db.reading() as session:
        alerts = list(session.scalars(select(AdminAlert).where(AdminAlert.kind == "reading-deadline")))
    assert {a.study_uid for a in alerts} == {ct.study_uid, mr.study_uid}
    assert all(a.organisation_code == "TELE" for a in alerts)
    time.sleep(1.5)  # several more checks: still one escalation each
    assert len(region.audit("reading-task.escalate", ct.study_uid)) == 1
    listed = region.api("radio1", "GET", "/api/reading/tasks").json()["tasks"]
    assert {item["study_uid"]: item["escalated"] for item in listed} == {
        ct.study_uid: True,
        mr.study_uid: True,
    }
    assert next(i for i in listed if i["study_uid"] == ct.study_uid)["seconds_left"] < 0
