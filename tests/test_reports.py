"""Reports against a real ``simral serve`` (issue 6 item 5; DESIGN.md §7, §9).

dr_roux (group TLR) claims the urgent head CT of CHSUD and starts its report from the "scanner
cérébral" template: the Indications come from the request, the Technique names the equipment and
the dose the scanner's MPPS reported. The draft autosaves; only its author changes it. A wrong TOTP
code refuses the signature (and counts as a failed factor); the right one signs: the task and the
request are reported, publication is queued, and the signed version no longer changes. An
addendum is version 2 of the same document (same set id, new document id), signed the same way.
dr_roux asks dr_blanc (same group) for an opinion: dr_blanc sees the study and answers; dr_noir, a
radiologist of another group, can be neither asked nor answer.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select
from tests.report_setup import HISTORY, JUSTIFICATION, Platform, start_platform

from simral.audit.models import AuditEvent
from simral.identity.models import Professional
from simral.jobs.models import Job
from simral.reading.models import ImagingRequest, ReadingTask, Report

PLACER = "CR-100"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    platform = start_platform(tmp_path_factory.mktemp("reports"), {PLACER: ("MARTIN", "SOPHIE")})
    try:
        yield platform
    finally:
        platform.simral.stop()


@pytest.fixture(scope="module")
def report(platform: Platform) -> dict[str, object]:
    """dr_roux claims the task and starts the report from the head CT template."""
    task = platform.task_of("dr_roux", PLACER)
    # Nobody holds the task yet: nobody may start its report.
    refused = platform.post("dr_roux", f"/api/reading/tasks/{task['id']}/report", {"template": "ct-head"})
    assert refused.status_code == 403, refused.text
    claimed = platform.post("dr_roux", f"/api/reading/tasks/{task['id']}/claim")
    assert claimed.status_code == 200, claimed.text
    # A colleague of the group cannot start the report of a task dr_roux holds.
    other = platform.post("dr_blanc", f"/api/reading/tasks/{task['id']}/report", {"template": "ct-head"})
    assert other.status_code == 403, other.text
    unknown = platform.post("dr_roux", f"/api/reading/tasks/{task['id']}/report", {"template": "nope"})
    assert unknown.status_code == 400, unknown.text
    started = platform.post("dr_roux", f"/api/reading/tasks/{task['id']}/report", {"template": "ct-head"})
    assert started.status_code == 201, started.text
    return dict(started.json())


def test_report_starts_from_the_request_and_the_mpps(report: dict[str, object]) -> None:
    assert report["state"] == "draft" and report["version"] == 1 and report["template"] == "ct-head"
    assert JUSTIFICATION in str(report["indications"]) and HISTORY in str(report["indications"])
    technique = str(report["technique"])
    assert technique.startswith("Scanner cérébral en acquisition hélicoïdale")
    assert "Appareil : Siemens SOMATOM go.Up (Scanner salle 1)." in technique
    assert "Dose délivrée : IDSV (CTDIvol) 52.4 mGy, PDL 912.5 mGy·cm." in technique
    assert report["dose"] == {
        "equipment": "Siemens SOMATOM go.Up (Scanner salle 1)",
        "ctdivol_mgy": "52.4",
        "dlp_mgycm": "912.5",
    }
    assert "Pas d'hémorragie" in str(report["results"]) and str(report["conclusion"])
    assert report["author"] == "dr_roux" and report["author_name"] == "Dr Claire Roux"


def test_draft_autosaves_and_only_its_author_edits_it(platform: Platform, report: dict[str, object]) -> None:
    path = f"/api/reports/{report['id']}/draft"
    results = "Hyperdensité spontanée des citernes de la base.\nPas d'hydrocéphalie."
    saved = platform.post(
        "dr_roux",
        path,
        {
            "results": results,
            "conclusion": "Hémorragie méningée.",
            "dose": {"equipment": "Siemens SOMATOM go.Up (Scanner salle 1)", "ctdivol_mgy": "52.4",
                     "dlp_mgycm": "1010"},
        },
    )  # fmt: skip
    assert saved.status_code == 200, saved.text
    body = saved.json()
    assert len(body["saved_at"]) == 8 and body["saved_at"].count(":") == 2
    # The dose sentence of the Technique follows the dose fields.
    assert "PDL 1010 mGy·cm." in body["technique"]
    again = platform.get("dr_roux", f"/api/reports/{report['id']}").json()
    assert again["results"] == results and again["conclusion"] == "Hémorragie méningée."
    assert again["indications"] == report["indications"]  # not sent: unchanged
    # A colleague of the group reads it but may not change it; another group may not even read it.
    assert platform.get("dr_blanc", f"/api/reports/{report['id']}").status_code == 200
    assert platform.post("dr_blanc", path, {"results": "autre"}).status_code == 403
    assert platform.get("dr_noir", f"/api/reports/{report['id']}").status_code == 403
    assert platform.post("dr_noir", path, {"results": "autre"}).status_code == 403
    assert platform.get("dr_roux", f"/api/reports/{report['id']}").json()["results"] == results


def test_second_opinion_within_the_group(platform: Platform, report: dict[str, object]) -> None:
    task_id = report["task_id"]
    study_uid = platform.studies[PLACER]
    # Not of another group, not of oneself.
    foreign = platform.post(
        "dr_roux",
        f"/api/reading/tasks/{task_id}/second-opinions",
        {"requested_of": "dr_noir", "question": "?"},
    )
    assert foreign.status_code == 403, foreign.text
    self_ask = platform.post(
        "dr_roux",
        f"/api/reading/tasks/{task_id}/second-opinions",
        {"requested_of": "dr_roux", "question": "?"},
    )
    assert self_ask.status_code == 400, self_ask.text
    # Only the holder of the task asks.
    not_holder = platform.post(
        "dr_blanc",
        f"/api/reading/tasks/{task_id}/second-opinions",
        {"requested_of": "dr_roux", "question": "?"},
    )
    assert not_holder.status_code == 403, not_holder.text
    asked = platform.post(
        "dr_roux",
        f"/api/reading/tasks/{task_id}/second-opinions",
        {"requested_of": "dr_blanc", "question": "Anévrisme visible sur les coupes fines ?"},
    )
    assert asked.status_code == 201, asked.text
    opinion = asked.json()
    assert opinion["state"] == "open" and opinion["requested_of"] == "dr_blanc"
    # dr_blanc finds it and sees the study; dr_noir neither.
    mine = platform.get("dr_blanc", "/api/second-opinions").json()["opinions"]
    assert [o["id"] for o in mine] == [opinion["id"]]
    assert platform.get("dr_noir", "/api/second-opinions").json()["opinions"] == []
    seen = platform.get("dr_blanc", f"/dicom-web/studies?StudyInstanceUID={study_uid}")
    assert seen.status_code == 200 and len(seen.json()) == 1, seen.text
    hidden = platform.get("dr_noir", f"/dicom-web/studies?StudyInstanceUID={study_uid}")
    assert hidden.status_code in (200, 204) and (hidden.status_code == 204 or hidden.json() == [])
    # Only the one asked answers, once.
    path = f"/api/second-opinions/{opinion['id']}/answer"
    assert platform.post("dr_noir", path, {"answer": "Non"}).status_code == 403
    assert platform.post("dr_roux", path, {"answer": "Non"}).status_code == 403
    answered = platform.post(
        "dr_blanc", path, {"answer": "Pas d'anévrisme visible ; angioscanner conseillé."}
    )
    assert answered.status_code == 200, answered.text
    assert answered.json()["state"] == "answered"
    assert platform.post("dr_blanc", path, {"answer": "encore"}).status_code == 409
    ctx = platform.context()
    try:
        with ctx.db.reading() as session:
            actions = {
                (event.action, event.actor)
                for event in session.scalars(
                    select(AuditEvent).where(AuditEvent.action.like("second-opinion.%"))
                )
            }
    finally:
        ctx.db.dispose()
    assert ("second-opinion.ask", "user:dr_roux") in actions
    assert ("second-opinion.answer", "user:dr_blanc") in actions


def test_sign_needs_the_right_totp_code(platform: Platform, report: dict[str, object]) -> None:
    path = f"/api/reports/{report['id']}/sign"
    # A colleague cannot sign dr_roux's report, even with their own right code.
    assert (
        platform.post("dr_blanc", path, {"totp_code": platform.devices["dr_blanc"].code()}).status_code == 403
    )
    wrong = platform.post("dr_roux", path, {"totp_code": "000000"})
    assert wrong.status_code == 401, wrong.text
    ctx = platform.context()
    try:
        with ctx.db.reading() as session:
            roux = session.scalar(select(Professional).where(Professional.login == "dr_roux"))
            assert roux is not None and roux.failed_logins == 1
            draft = session.get(Report, report["id"])
            assert draft is not None and draft.state == "draft" and draft.signed_at is None
    finally:
        ctx.db.dispose()
    signed = platform.post("dr_roux", path, {"totp_code": platform.devices["dr_roux"].code()})
    assert signed.status_code == 200, signed.text
    body = signed.json()
    assert body["state"] == "signed" and body["signature_method"] == "totp" and body["signed_at"]
    assert body["publication_state"] in ("pending", "done", "failed")
    # Signed: it never changes again.
    refused = platform.post("dr_roux", f"/api/reports/{report['id']}/draft", {"results": "changé"})
    assert refused.status_code == 409, refused.text
    again = platform.post("dr_roux", path, {"totp_code": "000000"})  # refused for its state, not its code
    assert again.status_code == 409, again.text
    ctx = platform.context()
    try:
        with ctx.db.reading() as session:
            task = session.get(ReadingTask, report["task_id"])
            assert task is not None and task.state == "reported"
            request = session.scalar(select(ImagingRequest).where(ImagingRequest.placer_number == PLACER))
            assert request is not None and request.state == "reported"
            roux = session.scalar(select(Professional).where(Professional.login == "dr_roux"))
            assert roux is not None and roux.failed_logins == 0
            jobs = list(
                session.scalars(select(Job).where(Job.dedupe_key == f"report.publish:{report['id']}"))
            )
            assert len(jobs) == 1
            outcomes = [
                e.outcome
                for e in session.scalars(
                    select(AuditEvent).where(AuditEvent.action == "report.sign").order_by(AuditEvent.id)
                )
            ]
            assert outcomes == ["failure", "success"]
    finally:
        ctx.db.dispose()
    # The reported task left the worklist.
    assert all(
        t["id"] != report["task_id"] for t in platform.get("dr_roux", "/api/reading/tasks").json()["tasks"]
    )


def test_addendum_is_a_new_version_of_the_same_document(
    platform: Platform, report: dict[str, object]
) -> None:
    created = platform.post("dr_roux", f"/api/reports/{report['id']}/addendum")
    assert created.status_code == 201, created.text
    addendum = created.json()
    assert addendum["version"] == 2 and addendum["set_id"] == report["set_id"]
    assert addendum["document_uid"] != report["document_uid"] and addendum["previous_id"] == report["id"]
    assert addendum["state"] == "draft" and addendum["indications"] == report["indications"]
    signed_v1 = platform.get("dr_roux", f"/api/reports/{report['id']}").json()
    assert addendum["results"] == signed_v1["results"]
    # Asking again gives the same open draft.
    assert platform.post("dr_roux", f"/api/reports/{report['id']}/addendum").json()["id"] == addendum["id"]
    path = f"/api/reports/{addendum['id']}"
    # An empty addendum cannot be signed (refused before the code is even checked, so no time step
    # of the authenticator is spent on it).
    empty = platform.post("dr_roux", f"{path}/sign", {"totp_code": "000000"})
    assert empty.status_code == 400, empty.text
    text = "Relecture après avis : angioscanner des troncs supra-aortiques recommandé."
    # Sections of an addendum are those of the version it completes: only its text changes.
    saved = platform.post("dr_roux", f"{path}/draft", {"addendum": text, "results": "ignoré"})
    assert saved.status_code == 200 and saved.json()["results"] == signed_v1["results"]
    signed = platform.post("dr_roux", f"{path}/sign", {"totp_code": platform.devices["dr_roux"].code()})
    assert signed.status_code == 200, signed.text
    assert signed.json()["state"] == "signed" and signed.json()["addendum"] == text
    history = platform.get("dr_roux", f"/api/reports/{report['id']}/history").json()["versions"]
    assert [(v["version"], v["state"]) for v in history] == [(1, "signed"), (2, "signed")]
    assert {v["set_id"] for v in history} == {report["set_id"]}
    assert history[0]["results"] == signed_v1["results"]  # the first version kept as signed
