"""Queries across linked identities, with the identifier the asker knows (issue 5 item 4;
DESIGN.md §6; IHE ITI TF-1 Patient Information Reconciliation for the coercion).

Against a real ``simral serve`` (DIMSE, DICOMweb and the HL7 MLLP feed):

- CHA and CLINB store studies of one patient under their own IPPs with the same (ANS test) INS:
  one person, two identities. Once CLINB shares its study with CHA, CHA's DICOM node asking C-FIND
  by CHA's IPP gets CLINB's study too, with PatientID coerced to CHA's IPP (its issuer too); a CHA
  radiologist's QIDO-RS gets the same. Before the share, the policy hides it; CLINB's node still
  sees only what it may, under its own IPP. The stored files are not changed.
- An A40 merge sent over MLLP folds CHA's old IPP into the surviving one: C-FIND and QIDO-RS by the
  old IPP find the merged person's studies, shown under the surviving IPP; the unmerge restores
  the previous answers.
"""

from __future__ import annotations

import hashlib
import io
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hl7apy.parser import parse_message
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from tests.corpus import ct_series, set_test_ins
from tests.dimse_client import c_get_study
from tests.simral_proc import SimralProcess
from tests.test_hl7_adt import adt_merge

from simral.access.policy import Principal
from simral.app import open_app
from simral.config import load_settings
from simral.patients import service as patients
from simral.patients.service import AuthorityRef

PASSWORD = "Identite-Essai-2026!"
OID_CHA = "1.2.250.1.999.1.1"  # the authority of tests/test_hl7_adt.py's messages
OID_CLINB = "1.2.250.1.999.2.1"
NIR = "279035121518989"  # ANS test NIR, the one test_hl7_adt's PID segments carry
NODE_A, NODE_B = "NODEA", "NODEB"
OPERATOR = Principal(kind="system", name="test-identity-queries", archive_wide=True)


@dataclass
class Region:
    simral: SimralProcess
    study: dict[str, str]
    tokens: dict[str, str]
    #: SHA-256 of every file imported.
    sha256: set[str]

    def c_find(
        self, calling_ae: str, patient_id: str, *, level: str = "STUDY", patient_root: bool = False
    ) -> dict[str, Dataset]:
        """C-FIND by PatientID; the matches by StudyInstanceUID."""
        model = (
            PatientRootQueryRetrieveInformationModelFind
            if patient_root
            else StudyRootQueryRetrieveInformationModelFind
        )
        ae = AE(ae_title=calling_ae)
        ae.add_requested_context(model)
        assoc = ae.associate("127.0.0.1", self.simral.dicom_port, ae_title=self.simral.ae_title)
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = level
        query.PatientID = patient_id
        query.IssuerOfPatientID = ""
        query.IssuerOfPatientIDQualifiersSequence = []
        query.PatientName = ""
        query.StudyInstanceUID = ""
        found: dict[str, Dataset] = {}
        try:
            for status, identifier in assoc.send_c_find(query, model):
                assert status is not None
                if status.Status in (0xFF00, 0xFF01):
                    assert identifier is not None
                    found[str(identifier.StudyInstanceUID)] = identifier
                else:
                    assert status.Status == 0x0000, f"C-FIND status 0x{status.Status:04X}"
        finally:
            assoc.release()
        return found

    def c_get(self, calling_ae: str, study_uid: str) -> list[Dataset]:
        """C-GET a study; the datasets received (C-STORE sub-operations on the association)."""
        return c_get_study(self.simral.dicom_port, self.simral.ae_title, calling_ae, study_uid)

    def get(self, login: str, path: str, accept: str) -> httpx.Response:
        response = httpx.get(
            f"{self.simral.dicomweb_url}{path}",
            headers={"Authorization": f"Bearer {self.tokens[login]}", "Accept": accept},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return response

    def qido(self, login: str, patient_id: str, **params: str) -> dict[str, dict[str, object]]:
        response = httpx.get(
            f"{self.simral.dicomweb_url}/studies",
            params={"PatientID": patient_id, "includefield": "00100021", **params},
            headers={"Authorization": f"Bearer {self.tokens[login]}"},
            timeout=30,
        )
        assert response.status_code in (200, 204), response.text
        items = response.json() if response.content else []
        return {item["0020000D"]["Value"][0]: item for item in items}


def _with_identity(paths: list[Path], *, ins: bool, used: str, birth: str) -> None:
    """Give the synthetic series the traits and (optionally) the INS of one test patient, the way
    a French modality worklist fills them (INS in Other Patient IDs Sequence, DESIGN.md §6)."""
    for path in paths:
        ds = dcmread(path)
        ds.PatientName = used
        ds.PatientBirthName = birth
        ds.PatientBirthDate = "19790328"
        ds.PatientSex = "F"
        if ins:
            set_test_ins(ds, NIR)
        ds.save_as(path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    base = tmp_path_factory.mktemp("identity-queries")
    simral = SimralProcess(base / "data", hl7=True, extra_env={"SIMRAL_INS_TEST_OIDS_ALLOWED": "true"})
    simral.cli("organisations", "add", "CHA", "--name", "CH A", "--patient-id-oid", OID_CHA)
    simral.cli(
        "organisations",
        "add",
        "CLINB",
        "--name",
        "Cabinet B",
        "--kind",
        "practice",
        "--patient-id-oid",
        OID_CLINB,
    )
    for login, org, role, rpps in (
        ("radio_a", "CHA", "radiologist", "10004000011"),
        ("tech_b", "CLINB", "technologist", "10004000012"),
    ):
        simral.cli(
            "users", "add", login, "--organisation", org, "--role", role, "--rpps", rpps,
            "--name", login.replace("_", " ").title(), "--password-stdin", input=PASSWORD + "\n",
        )  # fmt: skip
    simral.add_node("node_a", NODE_A, 104, organisation="CHA")
    simral.add_node("node_b", NODE_B, 104, organisation="CLINB")
    series = {
        # CHA's study of the patient under IPP-A1, with her INS.
        "a1": ct_series(base / "a1", slices=2, rows=32, cols=32, patient_id="IPP-A1", seed=71),
        # CHA's older study under a duplicate IPP, no INS (the identity an A40 will fold in).
        "a0": ct_series(base / "a0", slices=2, rows=32, cols=32, patient_id="IPP-A0", seed=72),
        # CLINB's study of the same patient under its IPP, with the same INS.
        "b9": ct_series(base / "b9", slices=2, rows=32, cols=32, patient_id="IPP-B9", seed=73),
    }
    _with_identity(series["a1"], ins=True, used="MARTIN^DOMI", birth="PAT-TROIS^DOMINIQUE")
    _with_identity(series["a0"], ins=False, used="MARTIN^DOMINIQUE", birth="PAT-TROIS")
    _with_identity(series["b9"], ins=True, used="MARTIN^DOMI", birth="PAT-TROIS^DOMINIQUE")
    simral.cli("import", str(base / "a1"), str(base / "a0"), "--organisation", "CHA")
    simral.cli("import", str(base / "b9"), "--organisation", "CLINB")
    study = {k: str(dcmread(v[0], stop_before_pixels=True).StudyInstanceUID) for k, v in series.items()}
    tokens = {login: simral.token_for(login) for login in ("radio_a", "tech_b")}
    with simral:
        yield Region(simral, study, tokens, {_sha256(path) for paths in series.values() for path in paths})


def _patient_ids(found: dict[str, Dataset]) -> dict[str, str]:
    return {uid: str(identifier.PatientID) for uid, identifier in found.items()}


def _qido_patient_ids(found: dict[str, dict[str, object]]) -> dict[str, str]:
    return {uid: item["00100020"]["Value"][0] for uid, item in found.items()}  # type: ignore[index]


def _share_with_cha(region: Region) -> None:
    response = httpx.post(
        f"{region.simral.http_url}/studies/{region.study['b9']}/shares",
        data={"grantee_kind": "organisation", "grantee": "CHA", "purpose": "Antériorités", "duration": "7d"},
        headers={"Authorization": f"Bearer {region.tokens['tech_b']}"},
        timeout=30,
    )
    assert response.status_code == 303, response.text


def _send_hl7(region: Region, message: bytes) -> tuple[str, str]:
    with socket.create_connection(("127.0.0.1", region.simral.hl7_port), timeout=30) as sock:
        sock.sendall(b"\x0b" + message + b"\x1c\r")
        data = b""
        while not data.endswith(b"\x1c\r"):
            chunk = sock.recv(65536)
            assert chunk, "connection closed before the acknowledgement"
            data += chunk
    ack = parse_message(data.strip(b"\x0b\x1c\r").decode("utf-8").replace("\n", "\r"))
    return ack.msa.msa_1.to_er7(), ack.msa.msa_2.to_er7()


def test_same_ins_at_two_sites_is_found_by_either_ipp_under_the_askers_ipp(region: Region) -> None:
    study = region.study
    # One person, two identities: the INS joined them at ingest.
    ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(region.simral.data_dir)}))
    try:
        with ctx.db.reading() as session:
            a1 = patients.get_identity_or_raise(
                session, local_id="IPP-A1", authority=AuthorityRef(oid=OID_CHA)
            )
            b9 = patients.get_identity_or_raise(
                session, local_id="IPP-B9", authority=AuthorityRef(oid=OID_CLINB)
            )
            assert a1.person_id == b9.person_id and a1.id != b9.id
    finally:
        ctx.db.dispose()

    # The policy first: CLINB has not shared its study, so CHA does not see it.
    assert set(region.c_find(NODE_A, "IPP-A1")) == {study["a1"]}
    assert set(region.qido("radio_a", "IPP-A1")) == {study["a1"]}

    _share_with_cha(region)
    found = region.c_find(NODE_A, "IPP-A1")
    assert _patient_ids(found) == {study["a1"]: "IPP-A1", study["b9"]: "IPP-A1"}
    coerced = found[study["b9"]]
    qualifiers = coerced.IssuerOfPatientIDQualifiersSequence
    assert qualifiers[0].UniversalEntityID == OID_CHA and qualifiers[0].UniversalEntityIDType == "ISO"
    assert str(coerced.PatientName) == "MARTIN^DOMI"
    # Patient Root, STUDY level, same answer.
    assert _patient_ids(region.c_find(NODE_A, "IPP-A1", patient_root=True)) == _patient_ids(found)
    # QIDO-RS of a CHA radiologist: the same studies, PatientID and issuer coerced.
    qido = region.qido("radio_a", "IPP-A1")
    assert _qido_patient_ids(qido) == {study["a1"]: "IPP-A1", study["b9"]: "IPP-A1"}
    assert qido[study["b9"]]["00100021"] == {"vr": "LO", "Value": ["CHA"]}  # CHA's authority (its code)
    # By CHA's IPP with its issuer's OID given explicitly (QIDO-RS: IssuerOfPatientID=<OID>).
    assert set(region.qido("radio_a", "IPP-A1", IssuerOfPatientID=OID_CHA)) == {study["a1"], study["b9"]}
    # CLINB's node asks by its own IPP: its study, its IPP; CHA's study was not shared with it.
    assert _patient_ids(region.c_find(NODE_B, "IPP-B9")) == {study["b9"]: "IPP-B9"}
    # Another site's IPP, asked by CHA: it matches the stored header of the shared study (as in
    # any PACS) and is not expanded (not CHA's identifier), and the answer shows CHA's IPP.
    assert _patient_ids(region.c_find(NODE_A, "IPP-B9")) == {study["b9"]: "IPP-A1"}


def test_retrieved_headers_carry_the_askers_identifier(region: Region) -> None:
    """C-GET, WADO-RS (instances and metadata) and WADO-URI of CLINB's shared study, by CHA: the
    headers say IPP-A1 with CHA's issuer; the pixel data is what was stored. CLINB's own retrieve
    of the same study is the stored file, byte for byte."""
    study = region.study["b9"]
    source = {
        str(ds.SOPInstanceUID): ds
        for ds in (dcmread(p) for p in sorted((region.simral.data_dir.parent / "b9").glob("*.dcm")))
    }
    got = region.c_get(NODE_A, study)
    assert len(got) == len(source) == 2
    for dataset in got:
        assert dataset.PatientID == "IPP-A1" and dataset.IssuerOfPatientID == "CHA"
        assert dataset.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == OID_CHA
        assert dataset.PixelData == source[str(dataset.SOPInstanceUID)].PixelData
        assert dataset.OtherPatientIDsSequence[0].PatientID == NIR  # the INS travels as stored
    metadata = region.get("radio_a", f"/studies/{study}/metadata", "application/dicom+json").json()
    assert {item["00100020"]["Value"][0] for item in metadata} == {"IPP-A1"}
    body = region.get("radio_a", f"/studies/{study}", 'multipart/related; type="application/dicom"')
    parts = [dcmread(io.BytesIO(part.content)) for part in _multipart_parts(body)]
    assert {str(ds.PatientID) for ds in parts} == {"IPP-A1"}
    assert all(ds.PixelData == source[str(ds.SOPInstanceUID)].PixelData for ds in parts)
    any_uid = next(iter(source))
    series_uid = str(source[any_uid].SeriesInstanceUID)
    wado_uri = httpx.get(
        f"{region.simral.http_url}/wado",
        params={
            "requestType": "WADO",
            "studyUID": study,
            "seriesUID": series_uid,
            "objectUID": any_uid,
            "contentType": "application/dicom",
            "transferSyntax": "*",
        },
        headers={"Authorization": f"Bearer {region.tokens['radio_a']}"},
        timeout=30,
    )
    assert wado_uri.status_code == 200, wado_uri.text
    assert dcmread(io.BytesIO(wado_uri.content)).PatientID == "IPP-A1"
    # CLINB's technologist gets CLINB's file unchanged.
    own = region.get("tech_b", f"/studies/{study}", 'multipart/related; type="application/dicom"')
    own_parts = _multipart_parts(own)
    assert len(own_parts) == 2 and {_digest(part.content) for part in own_parts} <= region.sha256


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _multipart_parts(response: httpx.Response) -> list[httpx.Response]:
    """The parts of a multipart/related body (each as a small Response holding its bytes)."""
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    parts = []
    for chunk in response.content.split(b"--" + boundary.encode())[1:-1]:
        _head, _, payload = chunk.partition(b"\r\n\r\n")
        parts.append(httpx.Response(200, content=payload.removesuffix(b"\r\n")))
    return parts


def test_a40_merge_then_queries_by_the_old_ipp_and_the_unmerge(region: Region) -> None:
    study = region.study
    # Before the merge IPP-A0 is another person.
    assert _patient_ids(region.c_find(NODE_A, "IPP-A0")) == {study["a0"]: "IPP-A0"}
    before_a1 = _patient_ids(region.c_find(NODE_A, "IPP-A1"))
    assert study["a0"] not in before_a1

    assert _send_hl7(region, adt_merge("IDQ-MERGE-1", survivor="IPP-A1", prior="IPP-A0")) == (
        "AA",
        "IDQ-MERGE-1",
    )
    everyone = {uid: "IPP-A1" for uid in before_a1} | {study["a0"]: "IPP-A1"}
    # By the old IPP: the merged person's studies (CLINB's shared one too), under the survivor's IPP.
    assert _patient_ids(region.c_find(NODE_A, "IPP-A0")) == everyone
    assert _qido_patient_ids(region.qido("radio_a", "IPP-A0")) == everyone
    # By the surviving IPP: the old IPP's study is there too.
    assert _patient_ids(region.c_find(NODE_A, "IPP-A1")) == everyone

    ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(region.simral.data_dir)}))
    try:
        with ctx.db.unit_of_work() as session:
            survivor = patients.get_identity_or_raise(
                session, local_id="IPP-A1", authority=AuthorityRef(oid=OID_CHA)
            )
            merged = patients.get_identity_or_raise(
                session, local_id="IPP-A0", authority=AuthorityRef(oid=OID_CHA)
            )
            merge = patients.last_merge(session, survivor=survivor, merged=merged)
            assert merge is not None
            patients.unmerge(session, merge.id, principal=OPERATOR, source="test")
    finally:
        ctx.db.dispose()
    # The unmerge restores the previous answers.
    assert _patient_ids(region.c_find(NODE_A, "IPP-A0")) == {study["a0"]: "IPP-A0"}
    assert _qido_patient_ids(region.qido("radio_a", "IPP-A0")) == {study["a0"]: "IPP-A0"}
    assert _patient_ids(region.c_find(NODE_A, "IPP-A1")) == before_a1


def test_stored_files_are_never_rewritten(region: Region) -> None:
    """Coercion changes answers, not the archive: after the queries, merges and unmerge above, the
    store holds exactly the bytes imported."""
    blobs = [path for path in region.simral.data_dir.rglob("*.dcm") if not path.name.startswith(".")]
    assert {_sha256(path) for path in blobs} == region.sha256
