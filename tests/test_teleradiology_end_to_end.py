"""The teleradiology workflow end to end, through the real interfaces of one running
``simral serve --hl7-port`` (issue 6, "must show"; DESIGN.md §7).

Site CHX (its RIS registered with ``simral ris add``) has its CT read by the teleradiology group
TLRG (``simral contracts add``); TLR2 is another group. In order:

1. the RIS test client sends an IHE OMI^O23 ORC-1 NW (hl7apy, ANS test INS only) over MLLP;
2. radio_t (TLRG) accepts it with a protocol through the portal (bearer token); the RIS listener
   receives the answer to its OMI^O23: an ORL^O22 (MSA AA with the order's control id, ORC-1 OK,
   the protocol in NTE) — the ANS flux 3 ORU^R01 is for the guide's ORM^O01 requesters;
3. dcmtk ``findscu -W`` from the site's scanner sees the worklist item;
4. the scanner starts its MPPS (pynetdicom N-CREATE IN PROGRESS: dcmtk has no MPPS SCU), stores
   CT images with dcmtk ``storescu`` under the worklist's Study Instance UID, accession number and
   patient, and completes the MPPS (N-SET COMPLETED);
5. the reading task becomes ready for TLRG (the quiet time is long: the MPPS made it ready) and a
   radiologist of TLR2 does not see it;
6. radio_t claims it, drafts the report and signs it with a TOTP code;
7. the RIS listener receives the ORU^R01 (MSH-21 ``2.1^CISIS_CDA_HL7_V2``) whose CDA passes the
   conformance kit's ``validate.py cda``;
8. a member of the site finds the Encapsulated PDF in the study (QIDO, Modality DOC), retrieves it
   over WADO-RS, and ``dciodvfy`` reports no error in it.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pyotp
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep
from tests.corpus import ct_series
from tests.dcmtk_tools import findscu_worklist, storescu
from tests.peers import free_port
from tests.portal_login import TotpDevice
from tests.report_setup import enrol_totp
from tests.simral_proc import SimralProcess
from tests.test_report_publication import DCIODVFY, _cda_of, _validate
from tests.test_teleradiology_requests import (
    CHX_IPP_OID,
    CR,
    FS,
    RIS_APP,
    RIS_FACILITY,
    VT,
    RisListener,
    ihe_omi,
)

from simral.app import open_app
from simral.config import load_settings

PASSWORD = "Bout-en-Bout-Radio-2026!"
SCANNER_AE = "SCANNER1"
PLACER = "E2E-OMI-1"
ACCESSION = "ACNE2E1"
PROTOCOL = "TDM thoracique sans injection\nCoupes fines 1 mm, filtre parenchymateux"
T = TypeVar("T")


@dataclass
class EndToEnd:
    simral: SimralProcess
    ris: RisListener
    tokens: dict[str, str]
    devices: dict[str, TotpDevice]
    base: Path

    def headers(self, login: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[login]}", **extra}

    def get(self, login: str, path: str, **headers: str) -> httpx.Response:
        return httpx.get(self.simral.http_url + path, headers=self.headers(login, **headers), timeout=60)

    def post_json(self, login: str, path: str, payload: object = None) -> httpx.Response:
        return httpx.post(
            self.simral.http_url + path, headers=self.headers(login), json=payload or {}, timeout=60
        )

    def tasks(self, login: str) -> list[dict[str, Any]]:
        response = self.get(login, "/api/reading/tasks")
        assert response.status_code == 200, response.text
        return list(response.json()["tasks"])


def _poll(check: Callable[[], T | None], what: str, timeout: float = 60) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EndToEnd]:
    base = tmp_path_factory.mktemp("teleradiology-e2e")
    simral = SimralProcess(
        base / "data",
        hl7=True,
        extra_env={
            "SIMRAL_INS_TEST_OIDS_ALLOWED": "true",
            "SIMRAL_READING_CHECK_SECONDS": "0.3",
            # Far beyond the test's time: only the MPPS can make the task ready.
            "SIMRAL_READING_QUIET_SECONDS": "3600",
        },
    )
    data = ["--data-dir", str(simral.data_dir)]
    simral.cli(
        "organisations", "add", "CHX", "--name", "CH X", "--finess", "990000021",
        "--patient-id-oid", CHX_IPP_OID,
    )  # fmt: skip
    simral.cli(
        "organisations", "add", "TLRG", "--name", "Téléradiologie Grand Est", "--finess", "990000031",
        "--kind", "teleradiology-group",
    )  # fmt: skip
    simral.cli(
        "organisations", "add", "TLR2", "--name", "Télé-imagerie Ouest", "--kind", "teleradiology-group"
    )
    for login, organisation, role, rpps, name in (
        ("radio_t", "TLRG", "radiologist", "10009000001", "Dr Claire Roux"),
        ("radio_o", "TLR2", "radiologist", "10009000002", "Dr Anne Noir"),
        ("tech_x", "CHX", "technologist", "10009000003", "Luc Manip"),
    ):
        simral.cli(
            "users", "add", login, "--organisation", organisation, "--role", role, "--rpps", rpps,
            "--name", name, "--password-stdin", input=PASSWORD + "\n",
        )  # fmt: skip
    simral.add_node("scanner", SCANNER_AE, 104, organisation="CHX")
    ris = RisListener(free_port())
    simral.cli(
        "ris", "add", "RIS_CHX", "--organisation", "CHX", "--host", "127.0.0.1", "--port", str(ris.port),
        "--application", RIS_APP, "--facility", RIS_FACILITY, *data,
    )  # fmt: skip
    simral.cli("contracts", "add", "CHX", "TLRG", "--modalities", "CT", "--urgent-minutes", "60", *data)
    tokens = {login: simral.token_for(login) for login in ("radio_t", "radio_o", "tech_x")}
    # The radiologist's authenticator app, enrolled beforehand (there is no CLI for it).
    devices = {"radio_t": TotpDevice(secret=pyotp.random_base32())}
    ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(simral.data_dir)}))
    try:
        with ctx.db.unit_of_work() as session:
            enrol_totp(session, devices)
    finally:
        ctx.db.dispose()
    ris.start()
    try:
        with simral:
            yield EndToEnd(simral, ris, tokens, devices, base)
    finally:
        ris.stop()


def _send(simral: SimralProcess, message: bytes) -> Message:
    """One message to the platform's MLLP port, as the RIS sends it; the acknowledgement (parsed)."""
    with socket.create_connection(("127.0.0.1", simral.hl7_port), timeout=60) as sock:
        sock.sendall(VT + message + FS + CR)
        buffer = b""
        while FS + CR not in buffer:
            data = sock.recv(65536)
            assert data, "connection closed before the acknowledgement"
            buffer += data
    text = buffer.split(FS + CR, 1)[0].lstrip(VT).decode("utf-8")
    return parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)


def _images(e2e: EndToEnd, item: Dataset) -> list[Path]:
    """What the scanner acquires for the worklist item: its Study Instance UID, accession number and
    patient (identifiers as the worklist gave them)."""
    paths = ct_series(
        e2e.base / "ct", slices=6, rows=64, cols=64, patient_id=str(item.PatientID),
        patient_name=str(item.PatientName), study_uid=str(item.StudyInstanceUID), seed=417,
    )  # fmt: skip
    for path in paths:
        ds = dcmread(path)
        ds.AccessionNumber = item.AccessionNumber
        ds.PatientBirthDate = item.PatientBirthDate
        ds.PatientSex = item.PatientSex
        # Copied as the worklist returned them, an empty Other Patient IDs Sequence included.
        for keyword in (
            "IssuerOfPatientID",
            "IssuerOfPatientIDQualifiersSequence",
            "OtherPatientIDsSequence",
        ):
            if keyword in item:
                ds[keyword] = item[keyword]
        ds.save_as(path)
    return paths


def _mpps_create(item: Dataset, mpps_uid: str, assoc: Any) -> None:
    step = item.ScheduledProcedureStepSequence[0]
    create = Dataset()
    scheduled = Dataset()
    scheduled.StudyInstanceUID = item.StudyInstanceUID
    scheduled.AccessionNumber = item.AccessionNumber
    scheduled.ScheduledProcedureStepID = step.ScheduledProcedureStepID
    scheduled.RequestedProcedureID = item.RequestedProcedureID
    create.ScheduledStepAttributesSequence = [scheduled]
    create.PatientName = item.PatientName
    create.PatientID = item.PatientID
    create.PerformedProcedureStepID = "PPS-E2E-1"
    create.PerformedStationAETitle = SCANNER_AE
    create.PerformedProcedureStepStartDate = time.strftime("%Y%m%d")
    create.PerformedProcedureStepStartTime = time.strftime("%H%M%S")
    create.PerformedProcedureStepStatus = "IN PROGRESS"
    create.Modality = "CT"
    create.PerformedSeriesSequence = []
    status, _ = assoc.send_n_create(create, ModalityPerformedProcedureStep, mpps_uid)
    assert status is not None and status.Status == 0x0000, status


def _mpps_complete(paths: list[Path], mpps_uid: str, assoc: Any) -> None:
    done = Dataset()
    done.PerformedProcedureStepStatus = "COMPLETED"
    done.PerformedProcedureStepEndDate = time.strftime("%Y%m%d")
    done.PerformedProcedureStepEndTime = time.strftime("%H%M%S")
    # The dose the report must state (PS3.3 C.4.16 Radiation Dose Module; the DLP in the comments).
    done.CTDIvol = 8.7
    done.CommentsOnRadiationDose = "DLP total 312.4 mGy.cm"
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
    references = []
    for path in paths:
        header = dcmread(path, stop_before_pixels=True)
        reference = Dataset()
        reference.ReferencedSOPClassUID = header.SOPClassUID
        reference.ReferencedSOPInstanceUID = header.SOPInstanceUID
        references.append(reference)
    series.ReferencedImageSequence = references
    done.PerformedSeriesSequence = [series]
    status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, mpps_uid)
    assert status is not None and status.Status == 0x0000, status


def _tag(item: dict[str, Any], tag: str) -> str:
    return str(item[tag]["Value"][0])


def test_request_to_published_report(e2e: EndToEnd) -> None:
    study_uid = str(generate_uid())

    # 1. The RIS sends an IHE OMI^O23 NW (accession number and Study Instance UID in IPC).
    ack = _send(e2e.simral, ihe_omi("E2E-1", "NW", PLACER, accession=ACCESSION, study_uid=study_uid))
    assert (ack.msa.msa_1.to_er7(), ack.msa.msa_2.to_er7()) == ("AA", "E2E-1"), ack.to_er7()
    assert ack.msh.msh_9.to_er7() == "ACK^O23^ACK"

    # 2. The group's radiologist finds it on the portal and accepts it with a protocol.
    listing = e2e.get("radio_t", "/requests")
    assert listing.status_code == 200, listing.text
    rows = re.findall(r'<tr class="request[^"]*" data-request="(\d+)">(.*?)</tr>', listing.text, re.S)
    (request_id,) = [number for number, row in rows if "PAT-TROIS" in row]
    assert "PAT-TROIS" not in e2e.get("radio_o", "/requests").text  # not another group's request
    accepted = httpx.post(
        f"{e2e.simral.http_url}/requests/{request_id}/accept",
        data={"protocol": PROTOCOL},
        headers=e2e.headers("radio_t"),
        timeout=60,
        follow_redirects=False,
    )
    assert accepted.status_code == 303, accepted.text
    # The answer the RIS receives: an ORL^O22 answering its OMI^O23 (simral.hl7.answers), with the
    # protocol; not the ANS flux 3 ORU^R01, which the guide's ORM^O01 requesters get.
    answer = e2e.ris.wait_for(lambda text: PLACER in text and "ORL^O22" in text, timeout=60)
    assert answer.msh.msh_9.to_er7() == "ORL^O22^ORL_O22"
    assert (answer.msa.msa_1.to_er7(), answer.msa.msa_2.to_er7()) == ("AA", "E2E-1")
    order = answer.orl_o22_response.orl_o22_patient.orl_o22_order
    assert order.orc.orc_1.to_er7() == "OK" and order.orc.orc_2.to_er7().startswith(f"{PLACER}^")
    assert order.orc.orc_5.to_er7() == "SC"
    assert order.orl_o22_observation_request.obr.obr_4.to_er7() == "24627-2^TDM thorax^LN"
    assert answer.nte.nte_4.to_er7().startswith("PROTOCOLE_IMAGERIE^")
    assert [rep.to_er7() for rep in answer.nte.nte_3] == PROTOCOL.splitlines()
    assert not any(PLACER in text and "ORU^R01" in text for text in e2e.ris.received)

    # 3. The scanner's worklist query (dcmtk findscu -W) sees the scheduled item.
    found = findscu_worklist(e2e.simral, e2e.base, SCANNER_AE, IssuerOfPatientIDQualifiersSequence="")
    assert set(found) == {study_uid}
    item = found[study_uid]
    assert item.AccessionNumber == ACCESSION and item.PatientID == "IPP-CHX-1"
    assert str(item.PatientName).startswith("PAT-TROIS^DOMINIQUE")
    (step,) = item.ScheduledProcedureStepSequence
    assert step.Modality == "CT" and step.ScheduledProcedureStepStatus == "SCHEDULED"
    assert item.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == CHX_IPP_OID
    # PID-32 VALI: the identity is not qualified, so its INS is not used (RNIV) — not on the worklist.
    assert item.OtherPatientIDsSequence == []

    # 4. MPPS IN PROGRESS, the images (dcmtk storescu), MPPS COMPLETED.
    mpps_uid = str(generate_uid())
    ae = AE(ae_title=SCANNER_AE)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", e2e.simral.dicom_port, ae_title=e2e.simral.ae_title)
    assert assoc.is_established
    try:
        _mpps_create(item, mpps_uid, assoc)
        in_progress = findscu_worklist(e2e.simral, e2e.base, SCANNER_AE, AccessionNumber=ACCESSION)
        assert in_progress[study_uid].ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus == (
            "IN PROGRESS"
        )
        paths = _images(e2e, item)
        storescu(e2e.simral, SCANNER_AE, paths)
        _mpps_complete(paths, mpps_uid, assoc)
    finally:
        assoc.release()

    # 5. Ready for the contracted group (the MPPS, not the quiet time); not for another group.
    task = _poll(
        lambda: next(
            (t for t in e2e.tasks("radio_t") if t["study_uid"] == study_uid and t["state"] == "ready"), None
        ),
        "the reading task to be ready for TLRG",
    )
    assert task["priority"] == "urgent"
    assert all(t["study_uid"] != study_uid for t in e2e.tasks("radio_o"))
    assert e2e.post_json("radio_o", f"/api/reading/tasks/{task['id']}/claim").status_code == 403

    # 6. Claim, draft, sign with the TOTP code.
    claimed = e2e.post_json("radio_t", f"/api/reading/tasks/{task['id']}/claim")
    assert claimed.status_code == 200 and claimed.json()["claimed_by"] == "radio_t", claimed.text
    report = e2e.post_json("radio_t", f"/api/reading/tasks/{task['id']}/report", {"template": "ct-thorax"})
    assert report.status_code == 201, report.text
    report_id = report.json()["id"]
    dose = report.json()["dose"]  # as the MPPS reported it
    assert (dose["ctdivol_mgy"], dose["dlp_mgycm"], dose["equipment"]) == ("8.7", "312.4", SCANNER_AE)
    draft = e2e.post_json(
        "radio_t",
        f"/api/reports/{report_id}/draft",
        {
            "results": "Pas d'embolie pulmonaire.\nPas d'épanchement pleural.",
            "conclusion": "Scanner thoracique sans anomalie significative.",
        },
    )
    assert draft.status_code == 200, draft.text
    signed = e2e.post_json(
        "radio_t", f"/api/reports/{report_id}/sign", {"totp_code": e2e.devices["radio_t"].code()}
    )
    assert signed.status_code == 200, signed.text
    assert signed.json()["state"] == "signed" and signed.json()["signature_method"] == "totp"

    # 7. The RIS receives the ORU^R01 with the CDA R2 report, which the conformance kit accepts.
    e2e.ris.wait_for(lambda text: PLACER in text and "CISIS_CDA_HL7_V2" in text, timeout=60)
    raw = next(t for t in e2e.ris.received if PLACER in t and "CISIS_CDA_HL7_V2" in t)
    msh = raw.split("\r", 1)[0].split("|")
    assert msh[8] == "ORU^R01^ORU_R01" and msh[20] == "2.1^CISIS_CDA_HL7_V2"
    cda = e2e.base / "cr-img.xml"
    cda.write_bytes(_cda_of(raw))
    validation = _validate(cda)
    assert validation.returncode == 0, validation.stdout + validation.stderr

    # 8. The Encapsulated PDF is in the study: QIDO (Modality DOC), WADO-RS, dciodvfy.
    def doc_series() -> list[dict[str, Any]]:
        response = e2e.get("tech_x", f"/dicom-web/studies/{study_uid}/series?Modality=DOC")
        assert response.status_code in (200, 204), response.text
        return list(response.json()) if response.status_code == 200 else []

    (series,) = _poll(doc_series, "the Encapsulated PDF series in the study")
    series_uid = _tag(series, "0020000E")
    instances = e2e.get("tech_x", f"/dicom-web/studies/{study_uid}/series/{series_uid}/instances")
    assert instances.status_code == 200, instances.text
    (instance,) = instances.json()
    sop_uid = _tag(instance, "00080018")
    response = e2e.get(
        "tech_x",
        f"/dicom-web/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}",
        Accept='multipart/related; type="application/dicom"',
    )
    assert response.status_code == 200, response.text[:300]
    boundary = re.search(r"boundary=\"?([^\";]+)", response.headers["content-type"])
    assert boundary is not None
    part = response.content.split(b"--" + boundary.group(1).encode())[1]
    path = e2e.base / "report.dcm"
    path.write_bytes(part.split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n"))
    ds = dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1" and ds.Modality == "DOC"
    assert ds.StudyInstanceUID == study_uid and ds.AccessionNumber == ACCESSION
    assert bytes(ds.EncapsulatedDocument).startswith(b"%PDF-")
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120, check=False)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], result.stdout + result.stderr
