"""UPS-RS (PS3.18 §11, UPS Pull of PS3.4 Annex CC): the reading tasks as workitems, on a real server.

Site CHSUD's exams are read by group TLR (dr_roux, dr_blanc); dr_noir reads for TLR2. The
ready tasks are SCHEDULED workitems of TLR only; IN PROGRESS with a Transaction UID is the
exclusive claim of the reading worklist; Update (N-SET) by the holder with that Transaction UID sets
the progress, comments and outputs Retrieve then returns; COMPLETED needs that Transaction UID and
the signed report; CANCELED gives the task back to the group.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select
from tests.report_setup import Platform, start_platform

from simral.audit.models import AuditEvent
from simral.reading.models import ReadingTask

FIRST, SECOND = "UPS-1", "UPS-2"
UPS_PUSH = "1.2.840.10008.5.1.4.34.6.1"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    platform = start_platform(
        tmp_path_factory.mktemp("ups"), {FIRST: ("DURAND", "LUCIE"), SECOND: ("PETIT", "MARC")}
    )
    try:
        yield platform
    finally:
        platform.simral.stop()


def _get(platform: Platform, login: str, path: str) -> httpx.Response:
    headers = {**platform.headers(login), "Accept": "application/dicom+json"}
    return httpx.get(platform.url + "/dicom-web" + path, headers=headers, timeout=30)


def _datasets(response: httpx.Response) -> list[Dataset]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    body = response.json()
    assert isinstance(body, list)
    return [Dataset.from_json(item) for item in body]


def _put_state(platform: Platform, login: str, uid: str, state: str, transaction: str) -> httpx.Response:
    payload: dict[str, Any] = {"00741000": {"vr": "CS", "Value": [state]}}
    if transaction:
        payload["00081195"] = {"vr": "UI", "Value": [transaction]}
    return httpx.put(
        f"{platform.url}/dicom-web/workitems/{uid}/state",
        headers={**platform.headers(login), "Content-Type": "application/dicom+json"},
        content=Dataset.from_json(payload).to_json(),
        timeout=30,
    )


def _update(
    platform: Platform, login: str, uid: str, payload: dict[str, Any], transaction: str = ""
) -> httpx.Response:
    """Update Workitem (PS3.18 11.6), the Transaction UID as the query parameter."""
    return httpx.post(
        f"{platform.url}/dicom-web/workitems/{uid}",
        params={"transaction": transaction} if transaction else None,
        headers={**platform.headers(login), "Content-Type": "application/dicom+json"},
        content=Dataset.from_json(payload).to_json(),
        timeout=30,
    )


def _transaction(platform: Platform, task_id: int) -> str:
    ctx = platform.context()
    try:
        with ctx.db.reading() as session:
            stored = session.get(ReadingTask, task_id)
            assert stored is not None and stored.ups_transaction_uid
            return stored.ups_transaction_uid
    finally:
        ctx.db.dispose()


KEY_IMAGE = (str(generate_uid()), str(generate_uid()), str(generate_uid()))
PROGRESS: dict[str, Any] = {
    "00741002": {
        "vr": "SQ",
        "Value": [
            {
                "00741004": {"vr": "DS", "Value": [40]},
                "00741006": {"vr": "ST", "Value": ["Comparaison avec l'examen antérieur"]},
            }
        ],
    },
    "00400400": {"vr": "LT", "Value": ["Lecture en cours sur la console 2"]},
    "00741216": {
        "vr": "SQ",
        "Value": [
            {
                "00404033": {
                    "vr": "SQ",
                    "Value": [
                        {
                            "0040E020": {"vr": "CS", "Value": ["DICOM"]},
                            "0020000D": {"vr": "UI", "Value": [KEY_IMAGE[0]]},
                            "0020000E": {"vr": "UI", "Value": [KEY_IMAGE[1]]},
                            "00081199": {
                                "vr": "SQ",
                                "Value": [
                                    {
                                        "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.88.59"]},
                                        "00081155": {"vr": "UI", "Value": [KEY_IMAGE[2]]},
                                    }
                                ],
                            },
                        }
                    ],
                }
            }
        ],
    },
}


def _workitem(platform: Platform, login: str, placer: str) -> Dataset:
    study = platform.studies[placer]
    (item,) = _datasets(_get(platform, login, f"/workitems?StudyInstanceUID={study}"))
    return item


def _retrieve(platform: Platform, login: str, uid: str) -> Dataset:
    (item,) = _datasets(_get(platform, login, f"/workitems/{uid}"))
    return item


def test_search_lists_the_ready_tasks_as_scheduled_workitems(platform: Platform) -> None:
    items = _datasets(_get(platform, "dr_roux", "/workitems"))
    assert len(items) == 2
    by_study = {item.InputInformationSequence[0].StudyInstanceUID: item for item in items}
    item = by_study[platform.studies[FIRST]]
    assert item.SOPClassUID == UPS_PUSH and item.SOPInstanceUID.startswith("2.25.")
    assert item.ProcedureStepState == "SCHEDULED"
    assert item.ScheduledProcedureStepPriority == "HIGH"
    assert item.InputReadinessState == "READY"
    assert item.ProcedureStepLabel.startswith("Interpretation CT")
    assert item.WorklistLabel == "Reading TLR"
    (code,) = item.ScheduledWorkitemCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "110005",
        "DCM",
        "Interpretation",
    )
    (source,) = item.InputInformationSequence
    assert source.TypeOfInstances == "DICOM"
    assert source.RetrieveURL == f"{platform.url}/dicom-web/studies/{platform.studies[FIRST]}"
    assert str(item.PatientName) == "DURAND^LUCIE" and item.PatientID
    assert item.ScheduledProcedureStepStartDateTime and item.ExpectedCompletionDateTime
    assert len(item.ScheduledHumanPerformersSequence) == 0
    assert "TransactionUID" not in item  # never returned (PS3.4 CC.2.5.1.2)
    assert item.ReferencedRequestSequence[0].StudyInstanceUID == platform.studies[FIRST]
    # Matching keys, paging, and the same workitem on Retrieve.
    assert len(_datasets(_get(platform, "dr_roux", "/workitems?ProcedureStepState=SCHEDULED"))) == 2
    assert _get(platform, "dr_roux", "/workitems?ProcedureStepState=COMPLETED").status_code == 204
    assert _get(platform, "dr_roux", "/workitems?ScheduledProcedureStepPriority=MEDIUM").status_code == 204
    one = _get(platform, "dr_roux", "/workitems?limit=1")
    assert len(_datasets(one)) == 1 and "additional results" in one.headers["warning"]
    assert len(_datasets(_get(platform, "dr_roux", "/workitems?limit=1&offset=1"))) == 1
    patient = _get(platform, "dr_roux", f"/workitems?PatientID={item.PatientID}")
    assert [i.SOPInstanceUID for i in _datasets(patient)] == [item.SOPInstanceUID]
    nested = _get(platform, "dr_roux", f"/workitems?00404021.0020000D={platform.studies[SECOND]}")
    assert _datasets(nested)[0].SOPInstanceUID != item.SOPInstanceUID
    assert _retrieve(platform, "dr_roux", item.SOPInstanceUID).to_json_dict() == item.to_json_dict()


def test_another_group_sees_nothing(platform: Platform) -> None:
    uid = _workitem(platform, "dr_roux", FIRST).SOPInstanceUID
    assert _get(platform, "dr_noir", "/workitems").status_code == 204
    assert _get(platform, "dr_noir", f"/workitems/{uid}").status_code == 404
    assert _put_state(platform, "dr_noir", uid, "IN PROGRESS", str(generate_uid())).status_code == 404
    assert _get(platform, "dr_roux", f"/workitems/{generate_uid(prefix='2.25.')}").status_code == 404


def test_in_progress_claims_the_task(platform: Platform) -> None:
    uid = _workitem(platform, "dr_roux", FIRST).SOPInstanceUID
    missing = _put_state(platform, "dr_roux", uid, "IN PROGRESS", "")
    assert missing.status_code == 400 and "Transaction UID is missing" in missing.headers["warning"]
    transaction = str(generate_uid())
    started = _put_state(platform, "dr_roux", uid, "IN PROGRESS", transaction)
    assert started.status_code == 200, started.text
    item = _retrieve(platform, "dr_roux", uid)
    assert item.ProcedureStepState == "IN PROGRESS"
    (performer,) = item.ScheduledHumanPerformersSequence
    assert str(performer.HumanPerformerName) == "Dr Claire Roux"
    assert performer.HumanPerformerCodeSequence[0].CodeValue == "810007000001"  # 8 + RPPS
    assert item.ProcedureStepProgressInformationSequence[0].ProcedureStepProgressDescription
    task = platform.task_of("dr_roux", FIRST)
    assert task["state"] == "claimed" and task["claimed_by"] == "dr_roux"
    # The same exclusive claim: a colleague is refused.
    other = _put_state(platform, "dr_blanc", uid, "IN PROGRESS", str(generate_uid()))
    assert other.status_code == 409 and "already IN PROGRESS" in other.headers["warning"]
    assert platform.task_of("dr_blanc", FIRST)["claimed_by"] == "dr_roux"
    ctx = platform.context()
    try:
        with ctx.db.reading() as session:
            stored = session.get(ReadingTask, task["id"])
            assert stored is not None and stored.ups_transaction_uid == transaction
            actions = set(
                session.execute(
                    select(AuditEvent.action, AuditEvent.actor).where(
                        AuditEvent.action.like("reading-task.%")
                    )
                ).all()
            )
        assert ("reading-task.claim", "user:dr_roux") in actions
        assert ("reading-task.ups-start", "user:dr_roux") in actions
    finally:
        ctx.db.dispose()


def test_update_by_the_performer_is_returned_by_retrieve(platform: Platform) -> None:
    uid = _workitem(platform, "dr_roux", FIRST).SOPInstanceUID
    task = platform.task_of("dr_roux", FIRST)
    transaction = _transaction(platform, task["id"])
    # The Transaction UID of the performer: missing or incorrect is a 400 (PS3.18 11.6.3.1).
    missing = _update(platform, "dr_roux", uid, PROGRESS)
    assert missing.status_code == 400 and "Transaction UID is missing" in missing.headers["warning"]
    wrong = _update(platform, "dr_roux", uid, PROGRESS, str(generate_uid()))
    assert wrong.status_code == 400 and "Transaction UID is incorrect" in wrong.headers["warning"]
    # A colleague of the group, even with the right Transaction UID, is not the performer.
    assert _update(platform, "dr_blanc", uid, PROGRESS, transaction).status_code == 403
    # Another group does not see the workitem.
    assert _update(platform, "dr_noir", uid, PROGRESS, transaction).status_code == 404
    # Attributes an Update may not set (PS3.4 Table CC.2.5-3): the state, the patient.
    state = _update(platform, "dr_roux", uid, {"00741000": {"vr": "CS", "Value": ["COMPLETED"]}}, transaction)
    assert state.status_code == 400 and "ProcedureStepState" in state.headers["warning"]
    patient = _update(platform, "dr_roux", uid, {"00100020": {"vr": "LO", "Value": ["X"]}}, transaction)
    assert patient.status_code == 400 and "PatientID" in patient.headers["warning"]
    percent = {"00741002": {"vr": "SQ", "Value": [{"00741004": {"vr": "DS", "Value": [140]}}]}}
    assert _update(platform, "dr_roux", uid, percent, transaction).status_code == 400
    untouched = _retrieve(platform, "dr_roux", uid)
    assert untouched.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress == 0
    # Accepted, with an optional attribute simral does not keep (the worklist label is its own).
    label = {"00741202": {"vr": "LO", "Value": ["Mine"]}}
    done = _update(platform, "dr_roux", uid, {**PROGRESS, **label}, transaction)
    assert done.status_code == 200, done.text
    assert "optional Attributes are not supported: WorklistLabel" in done.headers["warning"]
    item = _retrieve(platform, "dr_roux", uid)
    assert item.ProcedureStepState == "IN PROGRESS" and item.WorklistLabel == "Reading TLR"
    (progress,) = item.ProcedureStepProgressInformationSequence
    assert float(progress.ProcedureStepProgress) == 40
    assert progress.ProcedureStepProgressDescription == "Comparaison avec l'examen antérieur"
    assert item.CommentsOnTheScheduledProcedureStep == "Lecture en cours sur la console 2"
    (performed,) = item.UnifiedProcedureStepPerformedProcedureSequence
    (output,) = performed.OutputInformationSequence
    assert (output.StudyInstanceUID, output.SeriesInstanceUID) == KEY_IMAGE[:2]
    assert output.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == KEY_IMAGE[2]
    assert str(performed.ActualHumanPerformersSequence[0].HumanPerformerName) == "Dr Claire Roux"
    assert "TransactionUID" not in item
    # N-SET semantics: what a later update does not carry is kept; the same on Search.
    later = {"00741002": {"vr": "SQ", "Value": [{"00741004": {"vr": "DS", "Value": [75]}}]}}
    assert _update(platform, "dr_roux", uid, later, transaction).status_code == 200
    (found,) = _datasets(_get(platform, "dr_roux", f"/workitems?StudyInstanceUID={platform.studies[FIRST]}"))
    assert float(found.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress) == 75
    assert found.CommentsOnTheScheduledProcedureStep == "Lecture en cours sur la console 2"
    assert found.to_json_dict() == _retrieve(platform, "dr_roux", uid).to_json_dict()
    ctx = platform.context()
    try:
        with ctx.db.reading() as session:
            events = list(
                session.scalars(select(AuditEvent).where(AuditEvent.action == "reading-task.ups-update"))
            )
    finally:
        ctx.db.dispose()
    assert [e.actor for e in events] == ["user:dr_roux", "user:dr_roux"]
    assert events[0].detail["workitem"] == uid and events[0].detail["ignored"] == ["WorklistLabel"]
    assert transaction not in str(events[0].detail)  # the performer's token is not recorded
    # The trail names what was set; the values (free text) are kept with the task, not in the trail.
    assert events[1].detail["set"] == ["progress"]
    assert "console 2" not in str([e.detail for e in events])


def test_completed_needs_the_signed_report_and_the_transaction(platform: Platform) -> None:
    uid = _workitem(platform, "dr_roux", FIRST).SOPInstanceUID
    task = platform.task_of("dr_roux", FIRST)
    ctx = platform.context()
    try:
        with ctx.db.reading() as session:
            stored = session.get(ReadingTask, task["id"])
            assert stored is not None
            transaction = stored.ups_transaction_uid
    finally:
        ctx.db.dispose()
    early = _put_state(platform, "dr_roux", uid, "COMPLETED", transaction)
    assert early.status_code == 409 and "not signed" in early.headers["warning"]
    assert _retrieve(platform, "dr_roux", uid).ProcedureStepState == "IN PROGRESS"
    # dr_roux writes and signs the report (the reports API, with the authenticator).
    started = platform.post("dr_roux", f"/api/reading/tasks/{task['id']}/report", {"template": "ct-head"})
    assert started.status_code == 201, started.text
    code = platform.devices["dr_roux"].code()
    signed = platform.post("dr_roux", f"/api/reports/{started.json()['id']}/sign", {"totp_code": code})
    assert signed.status_code == 200, signed.text
    wrong = _put_state(platform, "dr_roux", uid, "COMPLETED", str(generate_uid()))
    assert wrong.status_code == 400 and "Transaction UID is incorrect" in wrong.headers["warning"]
    done = _put_state(platform, "dr_roux", uid, "COMPLETED", transaction)
    assert done.status_code == 200, done.text
    item = _retrieve(platform, "dr_roux", uid)
    assert item.ProcedureStepState == "COMPLETED"
    (performed,) = item.UnifiedProcedureStepPerformedProcedureSequence
    assert str(performed.ActualHumanPerformersSequence[0].HumanPerformerName) == "Dr Claire Roux"
    assert performed.PerformedProcedureStepEndDateTime and performed.PerformedProcedureStepStartDateTime
    assert performed.PerformedWorkitemCodeSequence[0].CodeValue == "110005"
    # The outputs the performer reported go with the completed step.
    assert performed.OutputInformationSequence[0].StudyInstanceUID == KEY_IMAGE[0]
    # Final: no more updates (PS3.18 11.6.2).
    final = _update(platform, "dr_roux", uid, PROGRESS, transaction)
    assert final.status_code == 400 and "inconsistent with the current state" in final.headers["warning"]
    completed = _datasets(_get(platform, "dr_roux", "/workitems?ProcedureStepState=COMPLETED"))
    assert [i.SOPInstanceUID for i in completed] == [uid]
    # Final: it cannot be cancelled.
    assert _put_state(platform, "dr_roux", uid, "CANCELED", transaction).status_code == 409
    ctx = platform.context()
    try:
        with ctx.db.reading() as session:
            event = session.scalar(select(AuditEvent).where(AuditEvent.action == "reading-task.ups-complete"))
            assert event is not None and event.actor == "user:dr_roux" and event.detail["workitem"] == uid
    finally:
        ctx.db.dispose()


def test_canceled_releases_the_claim(platform: Platform) -> None:
    uid = _workitem(platform, "dr_blanc", SECOND).SOPInstanceUID
    transaction = str(generate_uid())
    assert _put_state(platform, "dr_blanc", uid, "IN PROGRESS", transaction).status_code == 200
    assert platform.task_of("dr_blanc", SECOND)["claimed_by"] == "dr_blanc"
    # Only with the Transaction UID of the performer.
    wrong = _put_state(platform, "dr_blanc", uid, "CANCELED", str(generate_uid()))
    assert wrong.status_code == 400
    canceled = _put_state(platform, "dr_blanc", uid, "CANCELED", transaction)
    assert canceled.status_code == 200, canceled.text
    task = platform.task_of("dr_blanc", SECOND)
    assert task["state"] == "ready" and task["claimed_by"] == ""
    item = _retrieve(platform, "dr_blanc", uid)
    assert item.ProcedureStepState == "SCHEDULED" and len(item.ScheduledHumanPerformersSequence) == 0
    # A SCHEDULED workitem is not updated: it is nobody's (409).
    scheduled = _update(platform, "dr_blanc", uid, PROGRESS, transaction)
    assert scheduled.status_code == 409 and "did not reference a claimed" in scheduled.headers["warning"]
    # Free again: another radiologist of the group takes it.
    assert _put_state(platform, "dr_roux", uid, "IN PROGRESS", str(generate_uid())).status_code == 200


def test_create_cancel_request_and_subscriptions_are_not_implemented(platform: Platform) -> None:
    uid = _workitem(platform, "dr_roux", SECOND).SOPInstanceUID
    subscribe = httpx.post(
        f"{platform.url}/dicom-web/workitems/{uid}/subscribers/READER1", headers=platform.headers("dr_roux")
    )
    assert subscribe.status_code == 501
    cancel = httpx.post(
        f"{platform.url}/dicom-web/workitems/{uid}/cancelrequest", headers=platform.headers("dr_roux")
    )
    assert cancel.status_code == 501
    assert (
        httpx.post(f"{platform.url}/dicom-web/workitems", headers=platform.headers("dr_roux")).status_code
        == 501
    )
