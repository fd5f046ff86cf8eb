"""DMP publication of a report received from a site's RIS (issue 8 item 1, second trigger: the DRIMbox
"source" trigger; DESIGN.md §7 flux 5, §8; CI-SIS "Transmission de documents CDA-R2 en HL7 v2").

A running ``simral serve --hl7-port`` publishes for site CHSUD (``simral dmp enable``) to the test DMP
of :mod:`tests.xds_registry` (mutual TLS, VIHF and XAdES checked, ``validate.py xds``, CI-SIS value
sets). Site CHNORD does not publish through simral. Both have a RIS (``simral ris add``) that sends
over MLLP. The report is the ANS CR-IMG 2024.01 example of the conformance kit, adapted to the test
patient (ANS test INS, the site's IPP) and to a study the scanner stored with dcmtk; the patient's
identity is QUAL through the ADT feed.

- ORU^R01 (MSH-21 ``2.1^CISIS_CDA_HL7_V2``) → ACK AA → the report and a KOS of the study are
  published in one submission without problems; the DMP got exactly the CDA bytes the RIS sent, with
  the CDA's author, legal authenticator and format; the CDA is kept under ``documents/dmp/`` and
  ``simral check`` counts it; the reception is audited.
- MDM^T10 with version 2 of the same setId → published, replacing version 1 (RPLC); the unchanged
  study is not published again.
- MDM^T02 with another report of the study (a new setId) → published as a first version.
- CHNORD's RIS: a level 1 report for one of its requests is kept as a prior document and a structured
  one refused, as before; nothing goes to the DMP.
- A CDA that is not well-formed, lacks its author's RPPS id, or names another patient → AE.
- ``/dmp``: CHSUD's clinical members see all its DMP entries (these reports have no request page),
  with state, patient and exam, audited; CHNORD's members see none of them.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from lxml import etree
from pydicom.uid import generate_uid
from sqlalchemy import select
from tests.simral_proc import SimralProcess
from tests.test_reading_browser import _store
from tests.test_request_documents import Platform, _ack, _err
from tests.test_teleradiology_requests import _segment
from tests.xds_registry import Received, TestDmp, make_pki

from simral.access.policy import SYSTEM
from simral.app import open_app
from simral.archive.consistency import check
from simral.audit.models import AuditEvent
from simral.config import load_settings
from simral.context import AppContext
from simral.dmp.models import DmpDocument
from simral.patients.models import PatientIdentity
from simral.patients.service import AuthorityRef, Ins, Traits
from simral.reading import service as reading
from simral.reading.models import RequestDocument
from simral.xds import metadata as md

REPO = Path(__file__).resolve().parent.parent
CONFORMANCE_DIR = Path(os.environ.get("SIMRAL_CONFORMANCE_DIR", REPO.parent / "shared" / "conformance"))
EXAMPLES = CONFORMANCE_DIR / "ans-cisis" / "ExemplesCDA"
CR_IMG = EXAMPLES / "IMG_CR_IMG_2024.01.xml"
CR_IMG_LEVEL1 = EXAMPLES / "IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml"

NIR = "279035121518989"  # ANS test NIR (PAT-TROIS DOMINIQUE), the CR-IMG example's patient
INS_TEST_OID = "1.2.250.1.213.1.4.10"
OTHER_NIR = "248039263001064"  # another ANS test NIR
OID_SUD = "1.2.250.1.999.8.1"
OID_NORD = "1.2.250.1.999.8.2"
ACCESSION_OID = "1.2.250.1.999.8.3"
PLACER_OID = "1.2.250.1.999.8.4"
IPP = "IPP-RIS-1"
AUTHOR_IDNPS = "801234560801"  # the example's radiologist (8 + RPPS)
RIS_SUD = ("RIS_SUD_APP", "CHSUD")
RIS_NORD = ("RIS_NORD_APP", "CHNORD")
REPORT_TYPE = "18748-4^CR d'imagerie médicale^LN"

CDA = "urn:hl7-org:v3"
NS = {"cda": CDA, "ps3-20": "urn:dicom-org:ps3-20"}


@dataclass
class Setup:
    simral: SimralProcess
    ctx: AppContext
    dmp: TestDmp
    ris: Platform
    study_uid: str
    set_id: str
    base: Path


def _wait(check_: Callable[[], bool], timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check_():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- the documents


def adapted_report(
    study_uid: str, *, set_id: str, version: int, replaces: str = "", source: Path = CR_IMG
) -> tuple[bytes, str]:
    """The kit's CR-IMG example for the test patient and study: its document id (new), setId and
    version, the site's IPP, one documented study, one order (placer, accession); RPLC ``replaces``."""
    tree = etree.parse(str(source), etree.XMLParser(remove_blank_text=False))
    root = tree.getroot()
    document_id = str(generate_uid())
    root.find("cda:id", NS).attrib.update({"root": document_id})
    root.find("cda:setId", NS).attrib.update({"root": set_id})
    root.find("cda:versionNumber", NS).set("value", str(version))
    ipp = root.findall("cda:recordTarget/cda:patientRole/cda:id", NS)[1]
    ipp.attrib.update({"root": OID_SUD, "extension": IPP})
    orders = root.findall("cda:inFulfillmentOf", NS)
    for extra in orders[1:]:
        root.remove(extra)
    orders[0].find("cda:order/cda:id", NS).attrib.update({"root": PLACER_OID, "extension": "CMD-RIS-1"})
    orders[0].find("cda:order/ps3-20:accessionNumber", NS).attrib.update(
        {"root": ACCESSION_OID, "extension": "ACC-RIS-1"}
    )
    studies = [
        d
        for d in root.findall("cda:documentationOf", NS)
        if d.find("cda:serviceEvent/cda:id", NS) is not None
    ]
    studies[0].find("cda:serviceEvent/cda:id", NS).set("root", study_uid)
    for extra in studies[1:]:
        root.remove(extra)
    for related in root.findall("cda:relatedDocument", NS):
        if replaces:
            related.find("cda:parentDocument/cda:id", NS).set("root", replaces)
        else:
            root.remove(related)
    return etree.tostring(tree, xml_declaration=True, encoding="UTF-8"), document_id


def _pid(
    message: Message, *, nir: str = NIR, ipp: str = IPP, oid: str = OID_SUD, status: str = "QUAL"
) -> None:
    _segment(
        message,
        "PID",
        {
            3: [f"{nir}^^^ASIP-SANTE-INS-NIR&{INS_TEST_OID}&ISO^INS", f"{ipp}^^^SITE&{oid}&ISO^PI"],
            5: ["PAT-TROIS^DOMINIQUE^DOMINIQUE MARIE-LOUISE^^^^L"],
            7: "19790328",
            8: "F",
            11: ["^^^^^^BDL^^51215"],
            32: status,
        },
    )


def _msh(message: Message, trigger: str, control_id: str, sender: tuple[str, str], profile: str) -> None:
    msh = message.msh
    msh.msh_3, msh.msh_4, msh.msh_5, msh.msh_6 = sender[0], sender[1], "SIMRAL", "SIMRAL"
    msh.msh_7 = "20260106134418"
    msh.msh_9 = trigger
    msh.msh_10 = control_id
    msh.msh_11, msh.msh_12, msh.msh_17, msh.msh_18 = "P", "2.5.1", "FRA", "UNICODE UTF-8"
    if profile:
        msh.msh_21 = profile


def adt_qual(control_id: str) -> bytes:
    """ADT^A28 (PAM France): the patient with a qualified INS (PID-32 QUAL)."""
    message = Message("ADT_A05", version="2.5", validation_level=VALIDATION_LEVEL.TOLERANT)
    _msh(message, "ADT^A28^ADT_A05", control_id, RIS_SUD, "")
    message.msh.msh_12 = "2.5"
    _segment(message, "EVN", {2: "20260106134418"})
    _pid(message)
    _segment(message, "PV1", {2: "N"})
    return str(message.to_er7()).encode("utf-8")


def _ed(cda: bytes) -> str:
    return f"^TEXT^XML^Base64^{base64.b64encode(cda).decode()}"


def report_oru(
    control_id: str,
    cda: bytes,
    *,
    study_uid: str,
    sender: tuple[str, str] = RIS_SUD,
    placer: str = "CMD-RIS-1",
    status: str = "F",
    nir: str = NIR,
    ipp: str = IPP,
    oid: str = OID_SUD,
) -> bytes:
    """ORU^R01 (CI-SIS CDA-R2 in HL7 v2, MSH-21 ``2.1^CISIS_CDA_HL7_V2``) carrying ``cda``."""
    message = Message("ORU_R01", version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
    _msh(message, "ORU^R01^ORU_R01", control_id, sender, "2.1^CISIS_CDA_HL7_V2")
    _pid(message, nir=nir, ipp=ipp, oid=oid)
    _segment(message, "PV1", {2: "O"})
    _segment(message, "ORC", {1: "SC", 2: f"{placer}^^{PLACER_OID}^ISO"})
    _segment(message, "OBR", {1: "1", 2: f"{placer}^^{PLACER_OID}^ISO", 4: REPORT_TYPE})
    _segment(message, "OBX", {1: "1", 2: "ED", 3: REPORT_TYPE, 5: _ed(cda), 11: status})
    if study_uid:
        _segment(message, "IPC", {1: f"ACC-RIS-1^^{ACCESSION_OID}^ISO", 3: study_uid})
    return str(message.to_er7()).encode("utf-8")


def report_mdm(control_id: str, cda: bytes, *, event: str, document_id: str, parent: str = "") -> bytes:
    """MDM^T02 / MDM^T10 (CI-SIS CDA-R2 in HL7 v2) carrying ``cda``; TXA-12 / TXA-13 the documents."""
    message = Message("MDM_T02", version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
    _msh(message, f"MDM^{event}^MDM_T02", control_id, RIS_SUD, "2.1^CISIS_CDA_HL7_V2")
    _segment(message, "EVN", {2: "20260106134418"})
    _pid(message)
    _segment(message, "PV1", {2: "O"})
    txa: dict[int, str | list[str]] = {1: "1", 2: "CR", 3: "TX", 12: document_id, 17: "AU"}
    if parent:
        txa[13] = parent
    _segment(message, "TXA", txa)
    _segment(message, "OBX", {1: "1", 2: "ED", 3: REPORT_TYPE, 5: _ed(cda), 11: "C" if parent else "F"})
    return str(message.to_er7()).encode("utf-8")


# ---------------------------------------------------------------------------- the platform


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("dmp-ris-report")
    pki = make_pki(base / "pki")
    dmp = TestDmp(pki)
    dmp.set_patient(NIR, authorisation="VALIDE")
    simral = SimralProcess(
        base / "data",
        hl7=True,
        extra_env={
            "SIMRAL_INS_TEST_OIDS_ALLOWED": "true",
            "SIMRAL_DMP_ITI41_URL": dmp.url("iti41"),
            "SIMRAL_DMP_ITI57_URL": dmp.url("iti57"),
            "SIMRAL_DMP_TD02_URL": dmp.url("td02"),
            "SIMRAL_DMP_CA_FILE": str(pki.ca),
            "SIMRAL_DMP_TIMEOUT": "5",
            "SIMRAL_DMP_CHECK_SECONDS": "0.5",
            "SIMRAL_DMP_LPS_ID": "HOMOLOGATION-TEST-1",
        },
    )
    data = ["--data-dir", str(simral.data_dir)]
    simral.cli(
        "organisations", "add", "CHSUD", "--name", "CH Sud", "--patient-id-oid", OID_SUD,
        "--finess", "340780477", "--accession-oid", ACCESSION_OID,
    )  # fmt: skip
    simral.cli("organisations", "add", "CHNORD", "--name", "CH Nord", "--patient-id-oid", OID_NORD)
    simral.cli(
        "organisations", "add", "TLR", "--name", "Téléradiologie Occitanie", "--kind", "teleradiology-group"
    )
    simral.add_node("scanner", "SCANNER1", 104, organisation="CHSUD")
    for name, (application, facility), site in (
        ("RIS_SUD", RIS_SUD, "CHSUD"),
        ("RIS_NORD", RIS_NORD, "CHNORD"),
    ):
        simral.cli(
            "ris", "add", name, "--organisation", site, "--host", "127.0.0.1", "--port", "9",
            "--application", application, "--facility", facility, *data,
        )  # fmt: skip
    simral.cli(
        "dmp", "enable", "CHSUD", "--auth-cert", str(pki.org_cert), "--auth-key", str(pki.org_key),
        "--signing-cert", str(pki.org_cert), "--signing-key", str(pki.org_key),
    )  # fmt: skip
    ctx = open_app(
        load_settings(
            environ={"SIMRAL_DATA_DIR": str(simral.data_dir), "SIMRAL_INS_TEST_OIDS_ALLOWED": "true"}
        )
    )
    study_uid = str(generate_uid())
    dmp.start()
    simral.start()
    try:
        ris = Platform(simral, ctx, {})
        # The patient's identity, qualified, comes through the ADT feed before the exam.
        ack = ris.send(adt_qual("ADT-RIS-1"))
        assert _ack(ack) == "AA", ack.to_er7()
        _store(simral, base, study_uid, "ACC-RIS-1", "PAT-TROIS^DOMINIQUE", 93, patient_id=IPP)
        yield Setup(simral, ctx, dmp, ris, study_uid, str(generate_uid()), base)
    finally:
        simral.stop()
        dmp.stop()
        ctx.db.dispose()


def _documents(setup: Setup) -> list[DmpDocument]:
    with setup.ctx.db.reading() as session:
        rows = list(session.scalars(select(DmpDocument).order_by(DmpDocument.id)))
        session.expunge_all()
    return rows


def _states(setup: Setup) -> list[tuple[str, int, str]]:
    return [(d.kind, d.version, d.state) for d in _documents(setup)]


def _iti41(setup: Setup) -> list[Received]:
    return [r for r in setup.dmp.received if r.transaction == "ITI-41"]


def _entries_by_unique_id(received: Received) -> dict[str, etree._Element]:
    found = {}
    for element in received.objects("ExtrinsicObject"):
        for external in element.iter(f"{{{md.RIM}}}ExternalIdentifier"):
            if external.get("identificationScheme") == md.DE_UNIQUE_ID:
                found[external.get("value")] = element
    return found


def _classification(entry: etree._Element, scheme: str) -> str:
    found = entry.find(f"{{{md.RIM}}}Classification[@classificationScheme='{scheme}']")
    assert found is not None, scheme
    return str(found.get("nodeRepresentation"))


def _slot(element: etree._Element, name: str) -> list[str]:
    return [
        v.text or ""
        for v in element.iterfind(
            f".//{{{md.RIM}}}Slot[@name='{name}']/{{{md.RIM}}}ValueList/{{{md.RIM}}}Value"
        )
    ]


# ------------------------------------------------------------------------------------ tests


def test_report_from_the_ris_is_published_with_the_study_manifest(setup: Setup) -> None:
    cda, document_id = adapted_report(setup.study_uid, set_id=setup.set_id, version=1)
    ack = setup.ris.send(report_oru("ORU-RIS-1", cda, study_uid=setup.study_uid))
    assert _ack(ack) == "AA", ack.to_er7()
    # Kept durably before the ACK, queued with the manifest of the stored study.
    documents = _documents(setup)
    assert [(d.kind, d.source) for d in documents] == [("report", "ris:RIS_SUD"), ("manifest", "ris:RIS_SUD")]
    report = documents[0]
    assert report.unique_id == document_id and report.set_id == setup.set_id and report.request_id is None
    assert report.content_key.startswith("documents/dmp/CHSUD/")
    assert report.content_sha256 == hashlib.sha256(cda).hexdigest()
    with setup.ctx.db.reading() as session:
        identity = session.get(PatientIdentity, report.identity_id)
        assert identity is not None and (identity.local_id, identity.ins_matricule, identity.status) == (
            IPP,
            NIR,
            "QUAL",
        )
        audited = session.scalar(select(AuditEvent).where(AuditEvent.action == "dmp.report-received"))
        assert audited is not None and audited.detail["document"] == report.id
        assert audited.study_uid == setup.study_uid

    _wait(
        lambda: _states(setup) == [("report", 1, "published"), ("manifest", 1, "published")],
        what="the received report and the manifest published",
    )
    submission = _iti41(setup)[-1]
    assert not submission.problems, submission.problems
    assert submission.answered == "success"
    assert submission.vihf["NameID"] == [AUTHOR_IDNPS]  # the CDA's author is the professional
    assert submission.vihf["urn:oasis:names:tc:xacml:2.0:resource:resource-id"] == [
        f"{NIR}^^^&{INS_TEST_OID}&ISO^NH"
    ]
    entries = _entries_by_unique_id(submission)
    attached = submission.documents()
    report_entry = entries[document_id]
    assert attached[report_entry.get("id")] == cda  # exactly the bytes the RIS sent
    assert report_entry.get("mimeType") == "text/xml"
    assert (
        _classification(report_entry, md.DE_FORMAT) == "urn:ihe:rad:CDA:ImagingReportStructuredHeadings:2013"
    )
    assert _classification(report_entry, md.DE_TYPE) == "18748-4"
    authors = _slot(report_entry, "authorPerson")
    assert authors and authors[0].startswith(f"{AUTHOR_IDNPS}^BIDEAULT^Jacques")
    assert _slot(report_entry, "legalAuthenticator")[0].startswith(f"{AUTHOR_IDNPS}^BIDEAULT")
    references = _slot(report_entry, "urn:ihe:iti:xds:2013:referenceIdList")
    assert any(r.startswith(f"ACC-RIS-1^^^&{ACCESSION_OID}&ISO") for r in references), references
    assert any(r.startswith(setup.study_uid) for r in references), references
    manifest_entry = entries[documents[1].unique_id]
    assert manifest_entry.get("mimeType") == "application/dicom"
    # ``simral check`` counts the kept CDA as indexed, not as an orphan to sweep.
    consistency = check(setup.ctx)
    assert not (consistency.orphans or consistency.missing or consistency.mismatches), consistency


def test_a_second_version_replaces_the_first(setup: Setup) -> None:
    first = next(d for d in _documents(setup) if d.kind == "report")
    assert first.state == "published"
    before = len(_iti41(setup))
    cda, document_id = adapted_report(
        setup.study_uid, set_id=setup.set_id, version=2, replaces=first.unique_id
    )
    ack = setup.ris.send(
        report_mdm("MDM-RIS-2", cda, event="T10", document_id=document_id, parent=first.unique_id)
    )
    assert _ack(ack) == "AA", ack.to_er7()
    _wait(lambda: ("report", 2, "published") in _states(setup), what="version 2 published")
    assert _states(setup) == [
        ("report", 1, "replaced"),
        ("manifest", 1, "published"),
        ("report", 2, "published"),
    ]
    (submission,) = _iti41(setup)[before:]
    assert not submission.problems, submission.problems
    replacements = submission.associations(md.RPLC)
    assert len(replacements) == 1 and replacements[0][1] == first.entry_uuid
    entries = _entries_by_unique_id(submission)
    assert submission.documents()[entries[document_id].get("id")] == cda
    assert len(submission.objects("ExtrinsicObject")) == 2  # version 2 and the signature document

    # A version older than the one known is refused.
    again, _ = adapted_report(setup.study_uid, set_id=setup.set_id, version=1)
    ack = setup.ris.send(report_oru("ORU-RIS-3", again, study_uid=setup.study_uid))
    code, location, reason = _err(ack)
    assert _ack(ack) == "AE" and code == "102" and location == "OBX^1^5" and "not newer" in reason
    assert len(_documents(setup)) == 3


def test_an_original_report_in_mdm_t02_is_published(setup: Setup) -> None:
    """MDM^T02 (original document notification and content) carrying another report of the study (a
    new setId): ACK AA, published as a first version of its own (no RPLC); the unchanged study's
    manifest is not published again."""
    before = len(_iti41(setup))
    known = len(_documents(setup))
    cda, document_id = adapted_report(setup.study_uid, set_id=str(generate_uid()), version=1)
    ack = setup.ris.send(report_mdm("MDM-RIS-T02", cda, event="T02", document_id=document_id))
    assert _ack(ack) == "AA", ack.to_er7()
    documents = _documents(setup)
    assert [(d.kind, d.version, d.source) for d in documents[known:]] == [("report", 1, "ris:RIS_SUD")]
    report = documents[known]
    assert report.unique_id == document_id and report.replaces_id is None
    _wait(
        lambda: next(d.state for d in _documents(setup) if d.id == report.id) == "published",
        what="the MDM^T02 report published",
    )
    (submission,) = _iti41(setup)[before:]
    assert not submission.problems, submission.problems
    assert not submission.associations(md.RPLC)
    entries = _entries_by_unique_id(submission)
    assert submission.documents()[entries[document_id].get("id")] == cda
    # The report and the signature document: no manifest again.
    assert len(submission.objects("ExtrinsicObject")) == 2
    assert all(e.get("mimeType") != "application/dicom" for e in entries.values())


def test_a_site_that_does_not_publish_keeps_its_request_documents(setup: Setup) -> None:
    patient = reading.PatientRef(
        traits=Traits(birth_name="PAT-TROIS", first_birth_given_name="DOMINIQUE",
                      birth_given_names="DOMINIQUE MARIE-LOUISE", sex="F", birth_date="19790328"),
        ipp="IPP-NORD-1", ipp_authority=AuthorityRef(oid=OID_NORD), ins=Ins(NIR, INS_TEST_OID), status="QUAL",
    )  # fmt: skip
    with setup.ctx.db.unit_of_work() as session:
        reading.add_contract(session, site_code="CHNORD", group_code="TLR", principal=SYSTEM)
        request = reading.receive_request(
            session,
            site_code="CHNORD",
            patient=patient,
            details=reading.RequestDetails(
                placer_number="CMD-NORD-1", placer_authority=PLACER_OID, modality="CT"
            ),
            principal=SYSTEM,
            source="test",
            allow_test_ins=True,
        )
        request_id = request.id
    before = len(_documents(setup))
    level1, _ = adapted_report(setup.study_uid, set_id=str(generate_uid()), version=1, source=CR_IMG_LEVEL1)
    ack = setup.ris.send(
        report_oru(
            "ORU-NORD-1",
            level1,
            study_uid="",
            sender=RIS_NORD,
            placer="CMD-NORD-1",
            ipp="IPP-NORD-1",
            oid=OID_NORD,
        )
    )
    assert _ack(ack) == "AA", ack.to_er7()
    with setup.ctx.db.reading() as session:
        kept = list(session.scalars(select(RequestDocument).where(RequestDocument.request_id == request_id)))
    assert [(d.kind, d.type_code, d.media_type) for d in kept] == [
        ("anteriorite", "18748-4", "application/pdf")
    ]
    structured, _ = adapted_report(setup.study_uid, set_id=str(generate_uid()), version=1)
    ack = setup.ris.send(
        report_oru(
            "ORU-NORD-2",
            structured,
            study_uid="",
            sender=RIS_NORD,
            placer="CMD-NORD-1",
            ipp="IPP-NORD-1",
            oid=OID_NORD,
        )
    )
    code, location, reason = _err(ack)
    assert _ack(ack) == "AE" and code == "102" and location == "OBX^1^5" and "level 1" in reason
    assert len(_documents(setup)) == before


def test_a_malformed_report_is_refused(setup: Setup) -> None:
    before = len(_documents(setup))
    cda, _ = adapted_report(setup.study_uid, set_id=str(generate_uid()), version=1)
    truncated = cda[: len(cda) // 2]
    ack = setup.ris.send(report_oru("ORU-BAD-1", truncated, study_uid=setup.study_uid))
    code, location, reason = _err(ack)
    assert _ack(ack) == "AE" and code == "102" and location == "OBX^1^5" and "well-formed" in reason

    root = etree.fromstring(cda)
    no_rpps = copy.deepcopy(root)
    for author_id in no_rpps.iterfind("cda:author/cda:assignedAuthor/cda:id", NS):
        author_id.set("root", "1.2.250.1.999.99")
    ack = setup.ris.send(report_oru("ORU-BAD-2", etree.tostring(no_rpps), study_uid=setup.study_uid))
    code, location, reason = _err(ack)
    assert _ack(ack) == "AE" and code == "101" and "RPPS" in reason

    # The CDA's patient is not the message's.
    ack = setup.ris.send(
        report_oru("ORU-BAD-3", cda, study_uid=setup.study_uid, nir=OTHER_NIR, ipp="IPP-RIS-OTHER")
    )
    code, location, reason = _err(ack)
    assert _ack(ack) == "AE" and code == "204" and "INS" in reason
    assert len(_documents(setup)) == before


def test_the_site_follows_its_dmp_documents_on_the_dmp_page(setup: Setup) -> None:
    """The RIS's reports name no imaging request, so no request page shows them: ``/dmp`` lists
    every DMP entry of the organisation acted for — kind and version, state and reason, source,
    patient, exam, dates — to its clinical members only; the patients shown are audited."""
    for login, organisation, role in (
        ("manip_sud", "CHSUD", "technologist"),
        ("manip_nord", "CHNORD", "technologist"),
        ("admin_sud", "CHSUD", "site-admin"),
    ):
        setup.simral.cli(
            "users", "add", login, "--organisation", organisation, "--role", role,
            "--password-stdin", input="Suivi-DMP-2026!\n",
        )  # fmt: skip

    def dmp_page(login: str, **params: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {setup.simral.token_for(login)}"}
        return httpx.get(f"{setup.simral.http_url}/dmp", params=params, headers=headers, timeout=30)

    documents = _documents(setup)
    assert documents and all(d.organisation_code == "CHSUD" and d.request_id is None for d in documents)
    answer = dmp_page("manip_sud")
    assert answer.status_code == 200, answer.text
    page = answer.text
    assert "Publications au DMP" in page
    assert '<a href="/dmp">DMP</a>' in page  # in the navigation of the site's clinical members
    rows = re.findall(r'<tr data-dmp="(\d+)" data-state="(\w+)">', page)
    assert rows == [(str(d.id), d.state) for d in reversed(documents)]  # newest first
    assert "remplacé par une version plus récente" in page and "publié le " in page
    assert "Compte rendu v2" in page and "Manifeste d&#x27;images (KOS) v1" in page
    assert "reçu du RIS RIS_SUD" in page
    assert "PAT-TROIS DOMINIQUE" in page and f"({IPP})" in page and "ACC-RIS-1" in page
    assert setup.study_uid in page
    english = dmp_page("manip_sud", lang="en").text
    assert "DMP publications" in english and "replaced by a newer version" in english
    assert "received from the RIS RIS_SUD" in english
    replaced = dmp_page("manip_sud", state="replaced").text
    assert re.findall(r'data-dmp="(\d+)"', replaced) == [
        str(d.id) for d in documents if d.state == "replaced"
    ]

    # Another site's member sees none of CHSUD's; an administrator without a clinical role, nothing.
    other = dmp_page("manip_nord")
    assert other.status_code == 200 and "data-dmp=" not in other.text and IPP not in other.text
    assert "Aucun document" in other.text
    admin = dmp_page("admin_sud")
    assert admin.status_code == 403 and IPP not in admin.text
    assert '<a href="/dmp">' not in admin.text

    with setup.ctx.db.reading() as session:
        viewed = list(
            session.scalars(
                select(AuditEvent).where(AuditEvent.action == "dmp.status.view").order_by(AuditEvent.id)
            )
        )
        session.expunge_all()
    assert viewed and {e.actor for e in viewed} == {"user:manip_sud"}
    assert {(e.study_uid, e.patient_id, e.patient_issuer) for e in viewed} == {
        (setup.study_uid, IPP, OID_SUD)
    }
    assert all(e.detail == {"organisation": "CHSUD"} for e in viewed)
