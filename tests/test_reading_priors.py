"""Priors go with a reading task (issue 6 item 4: "opening a task launches OHIF with the study and
the patient's prior studies the radiologist may see"; issue 7 item 1: prefetch to a reading site).

CHSUD holds an earlier CT of the patient (same IPP, imported before the exam) and a study of another
patient. When the new exam's task becomes ready, the reading group receives the patient's earlier
study with it (the site's contract covers it), not the other patient's; "Ouvrir" redirects to OHIF
with both Study Instance UIDs, the current one first. The group's own workstation (a dcmtk storescp
registered as a node, with a prefetch rule ``simral routes add --prefetch-for TLR``) receives the
exam and the prior over C-STORE, and nothing of the other patient.

Across sites: the patient (qualified INS, ANS test NIR) also has a study at the practice CLINB under
its IPP and one at CLINC under another: the identity service links the three identities by INS at
ingest. Once CLINB shares its study with the reading group (a share, the access policy), "Ouvrir"
adds it to the viewer; CLINC's, not shared, stays out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from pydicom import dcmread
from tests.corpus import ct_series, set_test_ins
from tests.peers import StoreSCP
from tests.report_setup import OID_SITE, PASSWORD, _schedule
from tests.simral_proc import SimralProcess
from tests.test_reading_browser import _store

from simral.access.policy import SYSTEM
from simral.app import open_app
from simral.config import load_settings
from simral.reading import service as reading

NIR = "279035121518989"  # ANS test NIR (key checked)
OID_CLINB, OID_CLINC = "1.2.250.1.999.9.2", "1.2.250.1.999.9.3"


@dataclass
class Exam:
    simral: SimralProcess
    token: str
    study_uid: str
    prior_uid: str
    other_uid: str
    workstation: StoreSCP
    #: The patient's studies at CLINB and CLINC (other IPPs, same INS).
    clinb_uid: str
    clinc_uid: str

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(
            self.simral.http_url + path,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
            **kwargs,  # type: ignore[arg-type]
        )


@pytest.fixture(scope="module")
def exam(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exam]:
    base = tmp_path_factory.mktemp("priors")
    simral = SimralProcess(
        base / "data",
        extra_env={
            "SIMRAL_READING_QUIET_SECONDS": "1",
            "SIMRAL_READING_CHECK_SECONDS": "0.3",
            "SIMRAL_INS_TEST_OIDS_ALLOWED": "true",
        },
    )
    simral.cli("organisations", "add", "CHSUD", "--name", "CH Sud", "--patient-id-oid", OID_SITE)
    for code, oid in (("CLINB", OID_CLINB), ("CLINC", OID_CLINC)):
        simral.cli(
            "organisations", "add", code, "--name", f"Cabinet {code[-1]}", "--kind", "practice",
            "--patient-id-oid", oid,
        )  # fmt: skip
    simral.cli(
        "users", "add", "manip_b", "--organisation", "CLINB", "--role", "technologist", "--rpps",
        "10009000003", "--name", "Manip B", "--password-stdin", input=PASSWORD + "\n",
    )  # fmt: skip
    simral.cli("organisations", "add", "TLR", "--name", "Téléradiologie", "--kind", "teleradiology-group")
    simral.cli(
        "users", "add", "dr_roux", "--organisation", "TLR", "--role", "radiologist", "--rpps", "10009000001",
        "--name", "Claire Roux", "--password-stdin", input=PASSWORD + "\n",
    )  # fmt: skip
    simral.add_node("scanner", "SCANNER1", 104, organisation="CHSUD")
    workstation = StoreSCP(aet="LECTURE1")
    simral.add_node("lecture_tlr", "LECTURE1", workstation.port, organisation="TLR")
    simral.cli("routes", "add", "prefetch-tlr", "--to", "lecture_tlr", "--prefetch-for", "TLR")
    prior = ct_series(base / "prior", slices=1, rows=32, cols=32, patient_id="IPP-PRI1", seed=111)
    other = ct_series(base / "other", slices=1, rows=32, cols=32, patient_id="IPP-AUTRE", seed=112)
    clinb = ct_series(base / "clinb", slices=1, rows=32, cols=32, patient_id="IPP-B77", seed=114)
    clinc = ct_series(base / "clinc", slices=1, rows=32, cols=32, patient_id="IPP-C55", seed=115)
    for paths in (prior, clinb, clinc):
        _with_ins(paths)
    simral.cli("import", str(base / "prior"), str(base / "other"), "--organisation", "CHSUD")
    simral.cli("import", str(base / "clinb"), "--organisation", "CLINB")
    simral.cli("import", str(base / "clinc"), "--organisation", "CLINC")
    ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(simral.data_dir)}))
    try:
        with ctx.db.unit_of_work() as session:
            reading.add_contract(session, site_code="CHSUD", group_code="TLR", principal=SYSTEM)
        study_uid, accession = _schedule(ctx, "PRI1", ("MARTIN", "Lou"), with_mpps=True)
    finally:
        ctx.db.dispose()
    token = simral.token_for("dr_roux")
    with workstation, simral:
        _store(simral, base, study_uid, accession, "MARTIN^Lou", 113, patient_id="IPP-PRI1")
        yield Exam(
            simral,
            token,
            study_uid,
            str(dcmread(prior[0], stop_before_pixels=True).StudyInstanceUID),
            str(dcmread(other[0], stop_before_pixels=True).StudyInstanceUID),
            workstation,
            str(dcmread(clinb[0], stop_before_pixels=True).StudyInstanceUID),
            str(dcmread(clinc[0], stop_before_pixels=True).StudyInstanceUID),
        )


def _with_ins(paths: list[Path]) -> None:
    """The patient's traits (those of the request) and qualified INS, in Other Patient IDs Sequence
    as a French modality worklist fills it (DESIGN.md §6)."""
    for path in paths:
        ds = dcmread(path)
        ds.PatientName = "MARTIN^Lou"
        ds.PatientBirthName = "MARTIN^Lou"
        ds.PatientBirthDate = "19580304"
        ds.PatientSex = "F"
        set_test_ins(ds, NIR)
        ds.save_as(path)


def _ready_task(exam: Exam) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for task in exam.get("/api/reading/tasks").json()["tasks"]:
            if task["study_uid"] == exam.study_uid and task["state"] == "ready":
                return int(task["id"])
        time.sleep(0.3)
    raise AssertionError("the reading task did not become ready")


def test_the_group_receives_the_patients_earlier_study_and_opens_both(exam: Exam) -> None:
    task = _ready_task(exam)
    seen = {item["0020000D"]["Value"][0] for item in exam.get("/dicom-web/studies").json()}
    assert exam.study_uid in seen and exam.prior_uid in seen
    assert exam.other_uid not in seen  # another patient of the site: not the group's business
    opened = exam.get(f"/reading/tasks/{task}/viewer", follow_redirects=False)
    assert opened.status_code == 303
    location = urlparse(opened.headers["location"])
    assert location.path == "/viewer/viewer"
    assert parse_qs(location.query)["StudyInstanceUIDs"] == [f"{exam.study_uid},{exam.prior_uid}"]


def test_the_reading_sites_workstation_receives_the_exam_and_its_prior(exam: Exam) -> None:
    _ready_task(exam)
    deadline = time.monotonic() + 60
    received: dict[str, int] = {}
    while time.monotonic() < deadline:
        received = {}
        for path in exam.workstation.files():
            uid = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
            received[uid] = received.get(uid, 0) + 1
        if received.get(exam.study_uid) == 12 and received.get(exam.prior_uid) == 1:
            break
        time.sleep(0.5)
    assert received == {exam.study_uid: 12, exam.prior_uid: 1}  # every instance once, no other patient


def test_a_radiologist_of_no_group_cannot_open_it(exam: Exam, tmp_path: Path) -> None:
    task = _ready_task(exam)
    exam.simral.cli("organisations", "add", "ELSE", "--name", "Ailleurs")
    exam.simral.cli(
        "users", "add", "dr_ailleurs", "--organisation", "ELSE", "--role", "radiologist",
        "--rpps", "10009000002", "--name", "Dr Ailleurs", "--password-stdin", input=PASSWORD + "\n",
    )  # fmt: skip
    stranger = httpx.get(
        f"{exam.simral.http_url}/reading/tasks/{task}/viewer",
        headers={"Authorization": f"Bearer {exam.simral.token_for('dr_ailleurs')}"},
        follow_redirects=False,
        timeout=30,
    )
    assert stranger.status_code == 404


def _viewer_studies(exam: Exam, task: int) -> list[str]:
    opened = exam.get(f"/reading/tasks/{task}/viewer", follow_redirects=False)
    assert opened.status_code == 303
    return parse_qs(urlparse(opened.headers["location"]).query)["StudyInstanceUIDs"][0].split(",")


def test_priors_from_another_site_follow_the_access_policy(exam: Exam) -> None:
    task = _ready_task(exam)
    # The identity service linked the three sites' identities by INS; the group sees none of the
    # practices' studies yet (neither the contract nor a share covers them).
    assert _viewer_studies(exam, task) == [exam.study_uid, exam.prior_uid]
    shared = httpx.post(
        f"{exam.simral.http_url}/studies/{exam.clinb_uid}/shares",
        data={"grantee_kind": "organisation", "grantee": "TLR", "purpose": "Antériorités", "duration": "7d"},
        headers={"Authorization": f"Bearer {exam.simral.token_for('manip_b')}"},
        timeout=30,
    )
    assert shared.status_code == 303, shared.text
    studies = _viewer_studies(exam, task)
    assert studies[0] == exam.study_uid
    assert sorted(studies[1:]) == sorted([exam.prior_uid, exam.clinb_uid])  # CLINB's, under IPP-B77
    assert exam.clinc_uid not in studies  # the same person at CLINC, not shared: not shown
