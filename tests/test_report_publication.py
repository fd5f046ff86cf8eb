"""Publication of a signed report (issue 6 item 6; ANS Téléradiologie flux 5).

Site CHSUD (its RIS registered with ``simral ris add``) has its CT read by group TLR. A request
came from the RIS, was accepted, the complement arrived and the scanner stored the images; a
signed report of dr_roux is queued for publication (:func:`enqueue_publication`, as signing does).
The RIS receives an ORU^R01 (MSH-21 ``2.1^CISIS_CDA_HL7_V2``) whose CDA passes the conformance
kit's ``validate.py cda`` (ANS XSD + CR-IMG 2024.01 schematron); the Encapsulated PDF is in the
study, retrievable over WADO-RS by a member of the site, and ``dciodvfy`` finds no error in it; the
PDF parses. An addendum (version 2) is published while the RIS is down and reaches it when it comes
back, its CDA replacing the first (same setId, versionNumber 2, relatedDocument RPLC). A broken CDA
fails ``validate.py`` (the check is real).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from lxml import etree
from pydicom import dcmread
from sqlalchemy import select
from tests.peers import free_port
from tests.report_setup import ReportText, sign_report
from tests.simral_proc import SimralProcess
from tests.test_reading_browser import _store
from tests.test_teleradiology_requests import RIS_APP, RIS_FACILITY, RisListener

from simral.access.policy import SYSTEM
from simral.app import open_app
from simral.config import load_settings
from simral.context import AppContext
from simral.db.base import utcnow
from simral.jobs.models import Job
from simral.patients.service import AuthorityRef, Traits
from simral.reading import service as reading
from simral.reading.cda import Organisation as CdaOrganisation
from simral.reading.cda import ReportDocument, build_cda
from simral.reading.models import ImagingRequest, Report
from simral.reading.publication import enqueue_publication

REPO = Path(__file__).resolve().parent.parent
#: The conformance kit (never copied): SIMRAL_CONFORMANCE_DIR, else ../shared/conformance.
CONFORMANCE_DIR = Path(os.environ.get("SIMRAL_CONFORMANCE_DIR", REPO.parent / "shared" / "conformance"))
VALIDATE = CONFORMANCE_DIR / "validate.py"
DCIODVFY = "/usr/bin/dciodvfy"
CDA_NS = {"cda": "urn:hl7-org:v3"}
PASSWORD = "Publication-CR-2026!"
OID_SITE = "1.2.250.1.999.9.2"
PLACER_OID = "1.2.250.1.999.9.3"
PLACER = "CR-PUB-1"


@dataclass
class Setup:
    simral: SimralProcess
    ctx: AppContext
    ris: RisListener
    tokens: dict[str, str]
    request_id: int
    study_uid: str


def _wait(check: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("report-publication")
    simral = SimralProcess(
        base / "data", extra_env={"SIMRAL_READING_QUIET_SECONDS": "1", "SIMRAL_READING_CHECK_SECONDS": "0.3"}
    )
    simral.cli("organisations", "add", "CHSUD", "--name", "CH Sud", "--patient-id-oid", OID_SITE)
    added = simral.cli(
        "organisations", "add", "TLR", "--name", "Téléradiologie Occitanie", "--kind", "teleradiology-group",
        "--activity-sector", "SA09",
    )  # fmt: skip
    # A reading group needs a national id: its reports name it as their custodian (ASIP-STRUCT-MIN).
    assert "no FINESS or SIRET" in added.stderr
    refused = simral.cli("organisations", "update", "TLR", "--siret", "1234", check=False)
    assert refused.returncode == 1 and "not 14 digits" in refused.stderr
    simral.cli("organisations", "update", "TLR", "--siret", "12345678900017")
    assert "12345678900017" in simral.cli("organisations", "list").stdout
    # The site's secteur d'activité as its CDA documents name it (healthCareFacility/code).
    updated = simral.cli("organisations", "update", "CHSUD", "--activity-sector", "sa04")
    assert "SA04" in updated.stdout and "ETABLISSEMENT" in updated.stdout
    simral.cli(
        "users", "add", "dr_roux", "--organisation", "TLR", "--role", "radiologist", "--rpps", "10008000001",
        "--name", "Dr Claire Roux", "--password-stdin", input=PASSWORD + "\n",
    )  # fmt: skip
    simral.cli(
        "users", "add", "manip_sud", "--organisation", "CHSUD", "--role", "technologist",
        "--name", "Luc Manip", "--password-stdin", input=PASSWORD + "\n",
    )  # fmt: skip
    simral.cli("organisations", "add", "CHNORD", "--name", "CH Nord")
    simral.cli(
        "users", "add", "manip_nord", "--organisation", "CHNORD", "--role", "technologist",
        "--name", "Léa Nord", "--password-stdin", input=PASSWORD + "\n",
    )  # fmt: skip
    simral.add_node("scanner", "SCANNER1", 104, organisation="CHSUD")
    ris = RisListener(free_port())
    simral.cli(
        "ris", "add", "RIS_CHSUD", "--organisation", "CHSUD", "--host", "127.0.0.1", "--port", str(ris.port),
        "--application", RIS_APP, "--facility", RIS_FACILITY, "--data-dir", str(simral.data_dir),
    )  # fmt: skip
    tokens = {login: simral.token_for(login) for login in ("dr_roux", "manip_sud", "manip_nord")}
    ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(simral.data_dir)}))
    patient = reading.PatientRef(
        traits=Traits(birth_name="MARTIN", first_birth_given_name="Élise", birth_given_names="Élise Anne",
                      sex="F", birth_date="19620514"),
        ipp="IPP-PUB-1",
        ipp_authority=AuthorityRef(oid=OID_SITE),
    )  # fmt: skip
    details = reading.RequestDetails(
        placer_number=PLACER,
        placer_authority=PLACER_OID,
        priority="urgent",
        modality="CT",
        justification="Céphalées brutales",
        clinical_history="HTA traitée",
        purpose="Hémorragie méningée ?",
        pregnancy="N",
        anatomy=[{"code": "69536005", "system": "SNOMED CT", "display": "Tête"}],
    )
    with ctx.db.unit_of_work() as session:
        reading.add_contract(session, site_code="CHSUD", group_code="TLR", principal=SYSTEM)
        request = reading.receive_request(
            session,
            site_code="CHSUD",
            patient=patient,
            details=details,
            principal=SYSTEM,
            source="hl7:RIS_CHSUD",
        )
        _, step = reading.accept_request(session, request.id, protocol="Sans injection", principal=SYSTEM)
        study_uid, accession = step.study_uid, step.accession_number
        reading.record_complement(
            session,
            request,
            reading.Complement(
                accession_number=accession,
                accession_authority="1.2.250.1.999.9.4",
                study_uid=study_uid,
                performed_at=utcnow(),
                exam_codes=[{"code": "30799-1", "system": "LN", "display": "CT Head WO contrast"}],
                modality="CT",
                anatomy=[{"code": "69536005", "system": "SNOMED CT", "display": "Tête"}],
            ),
            principal=SYSTEM,
        )
        request_id = request.id
    ris.start()
    simral.start()
    try:
        _store(simral, base, study_uid, accession, "MARTIN^Élise", 81)
        yield Setup(simral, ctx, ris, tokens, request_id, study_uid)
    finally:
        simral.stop()
        ris.stop()
        ctx.db.dispose()


#: The report the radiologist signs (and the addendum of version 2).
REPORT_TEXT = ReportText(
    indications="Céphalées brutales depuis ce matin.\nHTA traitée.",
    technique="Scanner cérébral sans injection, acquisition hélicoïdale.",
    results="Pas d'hémorragie intra ou extra-axiale.\nPas d'effet de masse.",
    conclusion="Pas d'hémorragie méningée visible.",
    addendum="Relecture : pas de thrombose veineuse visible.",
)


def _signed_report(setup: Setup, *, previous: Report | None = None) -> int:
    """A signed version (1, or the addendum to ``previous``) queued for publication."""
    report = sign_report(
        setup.ctx,
        request_id=setup.request_id,
        study_uid=setup.study_uid,
        text=REPORT_TEXT,
        dose={"equipment": "SOMATOM go.Up", "ctdivol_mgy": "52.4", "dlp_mgycm": "912.5"},
        previous=previous,
    )
    return report.id


def _report(setup: Setup, report_id: int) -> Report:
    with setup.ctx.db.reading() as session:
        report = session.get(Report, report_id)
        assert report is not None
        session.expunge(report)
        return report


def _published(setup: Setup, report_id: int) -> Report:
    _wait(lambda: _report(setup, report_id).publication_state == "done", what="publication done")
    return _report(setup, report_id)


def _cda_of(message_text: str) -> bytes:
    obx = next(s for s in message_text.split("\r") if s.startswith("OBX|1|ED|"))
    fields = obx.split("|")
    assert fields[3].startswith("18748-4^")
    components = fields[5].split("^")
    assert components[1:4] == ["TEXT", "XML", "Base64"]
    return base64.b64decode(components[4])


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    """The conformance kit's CDA check: XSD, the CR-IMG schematron and (``--profiles``) the generic
    ANS ones (Structuration minimale, IHE, CI-SIS content modules)."""
    return subprocess.run(
        [sys.executable, str(VALIDATE), "cda", str(path), "--profiles"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _message_for(setup: Setup, control_id: str, timeout: float = 60) -> str:
    message = setup.ris.wait_for(
        lambda text: f"|{control_id}|" in text and "CISIS_CDA_HL7_V2" in text, timeout
    )
    return str(message.to_er7())


@pytest.fixture(scope="module")
def first(setup: Setup) -> int:
    _wait(
        lambda: _study_count(setup) >= 12,
        what="the images in the archive",
    )
    return _signed_report(setup)


def _study_count(setup: Setup) -> int:
    from simral.archive.models import Study

    with setup.ctx.db.reading() as session:
        study = session.scalar(select(Study).where(Study.study_uid == setup.study_uid))
        return study.num_instances if study is not None else 0


def test_ris_receives_oru_with_a_valid_cda(setup: Setup, first: int, tmp_path: Path) -> None:
    report = _published(setup, first)
    control_id = report.published["hl7_control_id"]
    text = setup.ris.wait_for(lambda t: f"|{control_id}|" in t, 60)
    raw = next(t for t in setup.ris.received if f"|{control_id}|" in t)
    msh = raw.split("\r", 1)[0].split("|")
    assert msh[8] == "ORU^R01^ORU_R01"
    assert msh[20] == "2.1^CISIS_CDA_HL7_V2"
    assert text is not None
    cda = _cda_of(raw)
    assert cda == report.published["cda"].encode("utf-8")
    path = tmp_path / "cr-img.xml"
    path.write_bytes(cda)
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CI-SIS_IMG-CR-IMG_2024.01.sch: PASS" in result.stdout
    assert "ASIP-STRUCT-MIN-StrucMin.sch: PASS" in result.stdout and "FAIL" not in result.stdout
    root = etree.fromstring(cda)
    # The performer's organisation (the group) by its practice setting (JDV_J04, the default of a
    # group), the site by its secteur d'activité (JDV_J02, set with `organisations update`).
    performer = "cda:documentationOf/cda:serviceEvent/cda:performer/cda:assignedEntity"
    industry = root.find(f"{performer}/cda:representedOrganization/cda:standardIndustryClassCode", CDA_NS)
    assert (industry.get("code"), industry.get("codeSystem")) == ("AMBULATOIRE", "1.2.250.1.213.1.1.4.9")
    facility = root.find(
        "cda:componentOf/cda:encompassingEncounter/cda:location/cda:healthCareFacility/cda:code", CDA_NS
    )
    assert (facility.get("code"), facility.get("codeSystem")) == ("SA04", "1.2.250.1.71.4.2.4")
    name = root.find(f"{performer}/cda:assignedPerson/cda:name", CDA_NS)
    assert [(part.tag.split("}")[1], part.text) for part in name] == [("given", "Claire"), ("family", "Roux")]
    assert root.find("cda:id", CDA_NS).get("root") == report.document_uid
    assert root.find("cda:versionNumber", CDA_NS).get("value") == "1"
    order = root.find("cda:inFulfillmentOf/cda:order/cda:id", CDA_NS)
    assert (order.get("root"), order.get("extension")) == (PLACER_OID, PLACER)
    # An identity that is not qualified is referenced by its IPP only.
    ids = [
        (i.get("root"), i.get("extension"))
        for i in root.findall("cda:recordTarget/cda:patientRole/cda:id", CDA_NS)
    ]
    assert ids == [(OID_SITE, "IPP-PUB-1")]


@pytest.mark.parametrize(
    ("display_name", "parts"),
    [
        ("Dr Claire Roux", [("given", "Claire"), ("family", "Roux"), ("suffix", "DR")]),
        ("Professeur Jean de La Tour", [("given", "Jean"), ("family", "de La Tour"), ("suffix", "PR")]),
        ("Roux", [("family", "Roux")]),
    ],
)
def test_professional_names_carry_their_title_as_the_cisis_suffix(
    display_name: str, parts: list[tuple[str, str]], tmp_path: Path
) -> None:
    """A title the display name starts with (Dr, Pr, Docteur, Professeur) is the CI-SIS ``suffix``
    code (JDV_J246-Titre: DR, PR), not a given name; ``prefix`` is the civilité (JDV_J245: M, MME),
    which accounts do not record. A site and a group given no codes get those of their kind."""
    document = ReportDocument(
        document_uid="1.2.250.1.999.9.10.1",
        set_id="1.2.250.1.999.9.10.2",
        version=1,
        signed_at=utcnow(),
        author_name=display_name,
        author_national_id="810008000001",
        indications="Dyspnée.",
        technique="Scanner thoracique.",
        results="Pas d'anomalie.",
        conclusion="Normal.",
        patient={"ipp": "IPP-PUB-9", "ipp_oid": OID_SITE, "birth_name": "MARTIN",
                 "first_birth_given_name": "Élise", "sex": "F", "birth_date": "19620514"},
        study_uid="1.2.250.1.999.9.10.3",
        modality="CT",
        group=CdaOrganisation("TLR", "Téléradiologie Occitanie", siret="12345678900017",
                              activity_sector="SA08", practice_setting="AMBULATOIRE"),
        site=CdaOrganisation("CHSUD", "CH Sud", finess="990000041"),
    )  # fmt: skip
    root = etree.fromstring(build_cda(document))
    for path in ("cda:author/cda:assignedAuthor", "cda:legalAuthenticator/cda:assignedEntity"):
        name = root.find(f"{path}/cda:assignedPerson/cda:name", CDA_NS)
        assert [(part.tag.split("}")[1], part.text) for part in name] == parts
    facility = root.find(
        "cda:componentOf/cda:encompassingEncounter/cda:location/cda:healthCareFacility/cda:code", CDA_NS
    )
    assert (facility.get("code"), facility.get("displayName")) == ("SA01", "Etablissement public de santé")
    if display_name.startswith("Dr"):  # the whole kit once is enough (~15 s)
        path = tmp_path / "cr-img.xml"
        path.write_bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))
        result = _validate(path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "ASIP-STRUCT-MIN-StrucMin.sch: PASS" in result.stdout


def test_encapsulated_pdf_over_wado_rs_passes_dciodvfy(setup: Setup, first: int, tmp_path: Path) -> None:
    report = _published(setup, first)
    study, series, sop = (
        report.published["study_uid"],
        report.published["series_instance_uid"],
        report.published["sop_instance_uid"],
    )
    response = httpx.get(
        f"{setup.simral.http_url}/dicom-web/studies/{study}/series/{series}/instances/{sop}",
        headers={
            "Authorization": f"Bearer {setup.tokens['manip_sud']}",
            "Accept": 'multipart/related; type="application/dicom"',
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text[:300]
    boundary = re.search(r"boundary=\"?([^\";]+)", response.headers["content-type"]).group(1)
    part = response.content.split(b"--" + boundary.encode())[1]
    body = part.split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n")
    path = tmp_path / "report.dcm"
    path.write_bytes(body)
    ds = dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1"
    assert ds.StudyInstanceUID == setup.study_uid and ds.Modality == "DOC"
    assert ds.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    pdf = bytes(ds.EncapsulatedDocument)[: int(ds.EncapsulatedDocumentLength)]
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    assert len(re.findall(rb"/Type\s*/Page\b", pdf)) >= 1
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120, check=False)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], result.stdout + result.stderr
    # A retried job does not store it twice.
    with setup.ctx.db.unit_of_work() as session:
        again = session.get(Report, first)
        assert again is not None
        again.publication_state = "pending"
        enqueue_publication(session, again)
    _wait(lambda: _report(setup, first).publication_state == "done", what="republication")
    from simral.archive.models import Instance

    with setup.ctx.db.reading() as session:
        assert len(list(session.scalars(select(Instance).where(Instance.sop_uid == sop)))) == 1


def test_addendum_reaches_a_ris_that_was_down(setup: Setup, first: int, tmp_path: Path) -> None:
    original = _published(setup, first)
    setup.ris.stop()
    try:
        addendum_id = _signed_report(setup, previous=original)
        control_id = f"CR{addendum_id}V2"

        def failed_once() -> bool:
            with setup.ctx.db.reading() as session:
                jobs = list(session.scalars(select(Job).where(Job.kind == "hl7.send")))
                return any(
                    j.payload.get("control_id") == control_id and j.attempts >= 1 and j.last_error
                    for j in jobs
                )

        _wait(failed_once, what="a failed first delivery")
    finally:
        setup.ris.start()
    raw = _message_for(setup, control_id, timeout=120)
    cda = _cda_of(raw.replace("\n", "\r"))
    path = tmp_path / "addendum.xml"
    path.write_bytes(cda)
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    root = etree.fromstring(cda)
    assert root.find("cda:setId", CDA_NS).get("root") == original.set_id
    assert root.find("cda:versionNumber", CDA_NS).get("value") == "2"
    related = root.find("cda:relatedDocument", CDA_NS)
    assert related.get("typeCode") == "RPLC"
    assert related.find("cda:parentDocument/cda:id", CDA_NS).get("root") == original.document_uid
    assert root.xpath("//cda:section[cda:templateId/@root='1.2.250.1.213.1.1.2.210']", namespaces=CDA_NS)
    addendum = _published(setup, addendum_id)
    assert addendum.published["series_instance_uid"] == original.published["series_instance_uid"]
    assert addendum.published["sop_instance_uid"] != original.published["sop_instance_uid"]


def test_a_broken_cda_fails_validation(setup: Setup, first: int, tmp_path: Path) -> None:
    cda = _published(setup, first).published["cda"].encode("utf-8")
    root = etree.fromstring(cda)
    (conclusion,) = root.xpath(
        "//cda:section[cda:templateId/@root='1.2.250.1.213.1.1.2.209']", namespaces=CDA_NS
    )
    component = conclusion.getparent()
    component.getparent().remove(component)
    path = tmp_path / "broken.xml"
    path.write_bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))
    result = _validate(path)
    assert result.returncode == 1, result.stdout
    assert "FR-DICOM-Conclusion" in result.stdout


def test_request_is_from_the_ris(setup: Setup) -> None:
    with setup.ctx.db.reading() as session:
        request = session.get(ImagingRequest, setup.request_id)
        assert request is not None and request.source == "hl7:RIS_CHSUD"


def test_the_site_reads_the_signed_report_on_its_portal(setup: Setup, first: int) -> None:
    """ANS flux 5 on the portal: the request page of the site lists the signed version with its PDF
    (the one stored in the study) and its CDA; the documents are refused to nobody else."""
    _published(setup, first)
    site = {"Authorization": f"Bearer {setup.tokens['manip_sud']}"}
    page = httpx.get(f"{setup.simral.http_url}/requests/{setup.request_id}", headers=site, timeout=30)
    assert page.status_code == 200
    assert f'data-report="{first}"' in page.text and "Compte rendu" in page.text
    pdf = httpx.get(f"{setup.simral.http_url}/reports/{first}/report.pdf", headers=site, timeout=30)
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    assert (
        pdf.content.startswith(b"%PDF-")
        and hashlib.sha256(pdf.content).hexdigest() == _published(setup, first).published["pdf_sha256"]
    )
    cda = httpx.get(f"{setup.simral.http_url}/reports/{first}/report.xml", headers=site, timeout=30)
    assert cda.status_code == 200 and b"1.2.250.1.213.1.1.1.45" in cda.content
    # Another site's technologist gets neither the documents nor the request.
    other = {"Authorization": f"Bearer {setup.tokens['manip_nord']}"}
    for document in ("report.pdf", "report.xml"):
        assert (
            httpx.get(f"{setup.simral.http_url}/reports/{first}/{document}", headers=other).status_code == 404
        )
    assert httpx.get(f"{setup.simral.http_url}/requests/{setup.request_id}", headers=other).status_code != 200


def test_the_study_download_carries_the_report_as_a_pdf(setup: Setup, first: int, tmp_path: Path) -> None:
    """The PDI ZIP of the study (what a patient downloads) holds the report once more as a plain
    PDF under REPORTS/, the same bytes as the Encapsulated PDF stored in the study."""
    _published(setup, first)
    site = {"Authorization": f"Bearer {setup.tokens['manip_sud']}"}
    response = httpx.get(
        f"{setup.simral.http_url}/studies/{setup.study_uid}/export.zip", headers=site, timeout=60
    )
    assert response.status_code == 200, response.text
    path = tmp_path / "exam.zip"
    path.write_bytes(response.content)
    with zipfile.ZipFile(path) as media:
        reports = sorted(name for name in media.namelist() if name.startswith("REPORTS/"))
        assert reports and reports[0] == "REPORTS/CR0001.PDF"
        pdfs = {hashlib.sha256(media.read(name)).hexdigest() for name in reports}
        assert _published(setup, first).published["pdf_sha256"] in pdfs
        assert "REPORTS/" in media.read("README.TXT").decode("ascii")
