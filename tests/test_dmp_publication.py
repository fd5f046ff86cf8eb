"""DMP publication of a signed report and its image manifest (issue 8; DESIGN.md §8, IHE ITI-41).

A running ``simral serve`` publishes for site CHSUD (``simral dmp enable``: its certificates from a
test PKI) to a test DMP on loopback (:mod:`tests.xds_registry`), which checks each request the way
the DMP does — mutual TLS, the VIHF and XAdES signatures (signxml), ``validate.py xds``, the CI-SIS
value sets, hash and size — and answers from a scripted queue. The report is signed the way the
signing code does it (the report's own publication then queues the DMP's).

- The patient's INS is not yet qualified: the report and manifest *wait*, with the reason on the
  site's request page; once the identity is QUAL they are published in one submission (TD0.2 first,
  from the configured sender OID; the VIHF's LPS_ID is the configured instance id) whose KOS passes
  ``validate.py kos`` and is stored in the study, whose report CDA — signed while the INS was not
  qualified — names the patient by the qualified INS and passes ``validate.py cda``, both entries with
  the signer as legal authenticator, and whose shape (slots, classifications, external identifiers,
  associations) is the DRIM-M samples'.
- An addendum meets a registry error, then no answer, then success: it ends published, replacing
  the first version (RPLC association), and the unchanged images are not published again.
- A new series arrives in the study: a new manifest version listing both series replaces the first.
- The site withdraws entries (``simral dmp withdraw``): ITI-57 logical deletion, and masking to
  professionals (confidentialityCode MASQUE_PS, a new version of the registered entry: PreviousVersion
  is its registry version, 1, whatever the manifest's version).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from lxml import etree
from pydicom import dcmread
from sqlalchemy import select
from tests.report_setup import ReportText, sign_report
from tests.simral_proc import SimralProcess
from tests.test_reading_browser import _store
from tests.xds_registry import (
    DRIMM_SAMPLES,
    Failure,
    NoAnswer,
    Pki,
    Success,
    TestDmp,
    event_codes,
    make_pki,
    record_target_ins,
    shape_differences,
)

from simral.access.policy import SYSTEM
from simral.app import open_app
from simral.archive.models import Instance, Series, Study
from simral.audit.models import AuditEvent
from simral.config import load_settings
from simral.context import AppContext
from simral.db.base import utcnow
from simral.dmp.manifest import manifest_references
from simral.dmp.models import DmpDocument
from simral.patients import service as patients
from simral.patients.models import PatientIdentity
from simral.patients.service import AuthorityRef, Ins, Traits
from simral.reading import service as reading
from simral.reading.models import ImagingRequest, Report
from simral.xds import metadata as md

REPO = Path(__file__).resolve().parent.parent
CONFORMANCE_DIR = Path(os.environ.get("SIMRAL_CONFORMANCE_DIR", REPO.parent / "shared" / "conformance"))
VALIDATE = CONFORMANCE_DIR / "validate.py"
NIR = "279035121518989"  # ANS test NIR
INS_TEST_OID = "1.2.250.1.213.1.4.10"
OID_SITE = "1.2.250.1.999.7.1"
ACCESSION_OID = "1.2.250.1.999.7.2"
PLACER_OID = "1.2.250.1.999.7.3"
PASSWORD = "Publication-DMP-2026!"
#: Configuration: the TD0.2 sender OID and the VIHF LPS_ID of this installation.
SENDER_OID = "1.2.250.1.999.7.9"
LPS_INSTANCE_ID = "SIMRAL-REGION-TEST-01"
CDA = "urn:hl7-org:v3"


@dataclass
class Setup:
    simral: SimralProcess
    ctx: AppContext
    dmp: TestDmp
    pki: Pki
    request_id: int
    study_uid: str
    site_token: str
    base: Path


def _wait(check: Callable[[], bool], timeout: float = 90, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("dmp-publication")
    pki = make_pki(base / "pki")
    dmp = TestDmp(pki)
    dmp.set_patient(NIR, authorisation="VALIDE")
    simral = SimralProcess(
        base / "data",
        extra_env={
            "SIMRAL_READING_QUIET_SECONDS": "1",
            "SIMRAL_READING_CHECK_SECONDS": "0.3",
            "SIMRAL_INS_TEST_OIDS_ALLOWED": "true",
            "SIMRAL_DMP_ITI41_URL": dmp.url("iti41"),
            "SIMRAL_DMP_ITI57_URL": dmp.url("iti57"),
            "SIMRAL_DMP_TD02_URL": dmp.url("td02"),
            "SIMRAL_DMP_CA_FILE": str(pki.ca),
            "SIMRAL_DMP_TIMEOUT": "3",
            "SIMRAL_DMP_CHECK_SECONDS": "0.5",
            "SIMRAL_DMP_LPS_ID": "HOMOLOGATION-TEST-1",
            "SIMRAL_DMP_SENDER_OID": SENDER_OID,
            "SIMRAL_DMP_LPS_INSTANCE_ID": LPS_INSTANCE_ID,
        },
    )
    simral.cli(
        "organisations", "add", "CHSUD", "--name", "CH Sud", "--patient-id-oid", OID_SITE,
        "--finess", "340780477",
    )  # fmt: skip
    simral.cli(
        "organisations", "add", "TLR", "--name", "Téléradiologie Occitanie", "--kind", "teleradiology-group"
    )
    simral.cli(
        "users", "add", "manip_sud", "--organisation", "CHSUD", "--role", "technologist",
        "--name", "Luc Manip", "--password-stdin", input=PASSWORD + "\n",
    )  # fmt: skip
    simral.add_node("scanner", "SCANNER1", 104, organisation="CHSUD")
    enabled = simral.cli(
        "dmp", "enable", "CHSUD", "--auth-cert", str(pki.org_cert), "--auth-key", str(pki.org_key),
        "--signing-cert", str(pki.org_cert), "--signing-key", str(pki.org_key),
    )  # fmt: skip
    assert "enabled for CHSUD" in enabled.stdout
    site_token = simral.token_for("manip_sud")
    ctx = open_app(
        load_settings(
            environ={"SIMRAL_DATA_DIR": str(simral.data_dir), "SIMRAL_INS_TEST_OIDS_ALLOWED": "true"}
        )
    )
    patient = reading.PatientRef(
        traits=Traits(birth_name="PAT-TROIS", first_birth_given_name="Dominique",
                      birth_given_names="Dominique",
                      sex="F", birth_date="19790315", birth_place_code="51215"),
        ipp="IPP-DMP-1",
        ipp_authority=AuthorityRef(oid=OID_SITE),
        ins=Ins(NIR, INS_TEST_OID),
        status="VALI",
    )  # fmt: skip
    details = reading.RequestDetails(
        placer_number="DMP-1",
        placer_authority=PLACER_OID,
        priority="routine",
        modality="CT",
        justification="Douleur thoracique",
        purpose="Embolie pulmonaire ?",
        anatomy=[{"code": "51185008", "system": "SNOMED CT", "display": "Thorax"}],
    )
    with ctx.db.unit_of_work() as session:
        reading.add_contract(session, site_code="CHSUD", group_code="TLR", principal=SYSTEM)
        request = reading.receive_request(
            session,
            site_code="CHSUD",
            patient=patient,
            details=details,
            principal=SYSTEM,
            source="portal",
            allow_test_ins=True,
        )
        _, step = reading.accept_request(session, request.id, protocol="Angioscanner", principal=SYSTEM)
        study_uid, accession = step.study_uid, step.accession_number
        reading.record_complement(
            session,
            request,
            reading.Complement(
                accession_number=accession,
                accession_authority=ACCESSION_OID,
                study_uid=study_uid,
                performed_at=utcnow(),
                modality="CT",
            ),
            principal=SYSTEM,
        )
        request_id = request.id
    dmp.start()
    simral.start()
    try:
        _store(simral, base, study_uid, accession, "PAT-TROIS^Dominique", 91, patient_id="IPP-DMP-1")
        yield Setup(simral, ctx, dmp, pki, request_id, study_uid, site_token, base)
    finally:
        simral.stop()
        dmp.stop()
        ctx.db.dispose()


#: The report the radiologist signs (and the addendum of version 2).
REPORT_TEXT = ReportText(
    indications="Douleur thoracique, dyspnée.",
    technique="Angioscanner thoracique, injection iodée.",
    results="Pas de défect endoluminal des artères pulmonaires.",
    conclusion="Pas d'embolie pulmonaire.",
    addendum="Relecture : nodule de 4 mm du lobe inférieur droit.",
)


def _sign(setup: Setup, *, previous: Report | None = None) -> Report:
    return sign_report(
        setup.ctx,
        request_id=setup.request_id,
        study_uid=setup.study_uid,
        text=REPORT_TEXT,
        dose={"equipment": "SOMATOM go.Up", "ctdivol_mgy": "8.1", "dlp_mgycm": "310"},
        previous=previous,
    )


def _documents(setup: Setup) -> list[DmpDocument]:
    with setup.ctx.db.reading() as session:
        rows = list(session.scalars(select(DmpDocument).order_by(DmpDocument.id)))
        for row in rows:
            session.expunge(row)
        return rows


def _states(setup: Setup) -> list[tuple[str, int, str]]:
    return [(d.kind, d.version, d.state) for d in _documents(setup)]


def _request_page(setup: Setup, *, lang: str = "fr") -> str:
    headers = {"Authorization": f"Bearer {setup.site_token}"}
    page = httpx.get(
        f"{setup.simral.http_url}/requests/{setup.request_id}",
        params={"lang": lang},
        headers=headers,
        timeout=30,
    )
    assert page.status_code == 200
    return page.text


def test_waits_for_a_qualified_ins_then_publishes_report_and_manifest(setup: Setup) -> None:
    first = _sign(setup)
    _wait(
        lambda: _states(setup) == [("report", 1, "waiting"), ("manifest", 1, "waiting")],
        what="documents waiting for a qualified INS",
    )
    assert all("INS non qualifiée (statut VALI)" in d.reason for d in _documents(setup))
    assert not [r for r in setup.dmp.received if r.transaction == "ITI-41"]
    page = _request_page(setup)
    assert "Publication au DMP" in page and "INS non qualifiée" in page

    # Identity vigilance qualifies the identity (INSi retrieval + document check): QUAL.
    with setup.ctx.db.unit_of_work() as session:
        request = session.get(ImagingRequest, setup.request_id)
        assert request is not None and request.identity_id is not None
        identity = session.get(PatientIdentity, request.identity_id)
        assert identity is not None
        patients.set_status(session, identity, status="QUAL", principal=SYSTEM, source="INSi")
    _wait(
        lambda: _states(setup) == [("report", 1, "published"), ("manifest", 1, "published")],
        what="report and manifest published",
    )
    td02 = setup.dmp.last("TD0.2")
    assert not td02.problems, td02.problems
    assert td02.td02_sender() == SENDER_OID
    iti41 = setup.dmp.last("ITI-41")
    assert not iti41.problems, iti41.problems
    assert iti41.answered == "success"
    # VIHF: the signing radiologist, the site's structure, the patient's INS, the LPS.
    assert iti41.vihf["VIHF_Version"] == ["3.0"]
    assert iti41.vihf["Identifiant_Structure"] == ["1340780477"]
    assert iti41.vihf["urn:oasis:names:tc:xacml:2.0:resource:resource-id"] == [
        f"{NIR}^^^&{INS_TEST_OID}&ISO^NH"
    ]
    assert iti41.vihf["LPS_ID_HOMOLOGATION_DMP"] == ["HOMOLOGATION-TEST-1"]
    assert iti41.vihf["LPS_ID"] == [LPS_INSTANCE_ID]

    documents = _documents(setup)
    report_doc, manifest_doc = documents
    entries = {e.get("id"): e for e in iti41.objects("ExtrinsicObject")}
    by_unique = {}
    for element in entries.values():
        for external in element.iter(f"{{{md.RIM}}}ExternalIdentifier"):
            if external.get("identificationScheme") == md.DE_UNIQUE_ID:
                by_unique[external.get("value")] = element
    assert report_doc.unique_id == first.document_uid and report_doc.unique_id in by_unique
    assert manifest_doc.unique_id in by_unique
    assert by_unique[report_doc.unique_id].get("mimeType") == "text/xml"
    assert by_unique[manifest_doc.unique_id].get("mimeType") == "application/dicom"
    # The submission carries the CDA the report's publication produced and the stored KOS, signed.
    attached = iti41.documents()
    with setup.ctx.db.reading() as session:
        report = session.get(Report, first.id)
        assert report is not None
        cda = str(report.published["cda"]).encode("utf-8")
        manifest_stored = session.scalar(
            select(Instance.id).where(Instance.sop_uid == manifest_doc.unique_id)
        )
    assert manifest_stored is not None
    # Signed while the INS was VALI, the report's CDA names the patient by IPP only; the DMP's copy
    # names them by the qualified INS (the XDS patientId), and is otherwise the signed document.
    ins = f"{NIR}^^^&{INS_TEST_OID}&ISO^NH"
    report_entry_id = by_unique[report_doc.unique_id].get("id", "")
    sent = attached[report_entry_id]
    assert record_target_ins(cda) == []
    assert record_target_ins(sent) == [ins]
    ids = etree.fromstring(sent).findall(f"{{{CDA}}}recordTarget/{{{CDA}}}patientRole/{{{CDA}}}id")
    assert [(i.get("root"), i.get("extension")) for i in ids] == [
        (INS_TEST_OID, NIR),
        (OID_SITE, "IPP-DMP-1"),
    ]

    def without_patient(document: bytes) -> bytes:
        root = etree.fromstring(document)
        record_target = root.find(f"{{{CDA}}}recordTarget")
        assert record_target is not None
        root.remove(record_target)
        return bytes(etree.tostring(root, method="c14n"))

    assert without_patient(sent) == without_patient(cda)
    assert etree.fromstring(sent).find(f"{{{CDA}}}id").get("root") == report_doc.unique_id  # type: ignore[union-attr]
    assert "[SCH] CI-SIS_IMG-CR-IMG_2024.01.sch: PASS" in iti41.cda_output[report_entry_id]
    assert (report_doc.size, report_doc.sha1) == (len(sent), hashlib.sha1(sent).hexdigest())
    # Both entries name the signing radiologist as legal authenticator (as the DRIM-M sample's KOS).
    legal = {
        uid: [
            v.text
            for v in element.iterfind(
                f"{{{md.RIM}}}Slot[@name='legalAuthenticator']/{{{md.RIM}}}ValueList/{{{md.RIM}}}Value"
            )
        ]
        for uid, element in by_unique.items()
    }
    assert legal[manifest_doc.unique_id] == legal[report_doc.unique_id]
    assert str(legal[manifest_doc.unique_id][0]).startswith(f"{first.author_national_id}^")
    # The eventCodeList in the CI-SIS value sets, as the DRIM-M samples code them.
    for uid in (report_doc.unique_id, manifest_doc.unique_id):
        assert event_codes(by_unique[uid]) == {
            ("CT", "1.2.250.1.213.1.1.5.618"),
            ("51185008", "1.2.250.1.213.1.1.5.695"),
        }
    # The body actually sent has the shape of the DRIM-M samples.
    for sample in DRIMM_SAMPLES:
        assert shape_differences(iti41.envelope, etree.parse(str(sample)).getroot()) == [], sample
    kos = next(b for b in attached.values() if b[128:132] == b"DICM")
    kos_path = setup.base / "published-kos.dcm"
    kos_path.write_bytes(kos)
    checked = subprocess.run(
        [sys.executable, str(VALIDATE), "kos", str(kos_path)], capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert len(iti41.associations(md.SIGNS)) == 1
    assert not iti41.associations(md.RPLC)

    page = _request_page(setup)
    assert 'data-state="published"' in page and "INS non qualifiée" not in page


def test_addendum_retried_until_published_replaces_the_first_version(setup: Setup) -> None:
    with setup.ctx.db.reading() as session:
        first = session.scalar(
            select(Report).where(Report.request_id == setup.request_id, Report.version == 1)
        )
        assert first is not None
        session.expunge(first)
    first_entry = next(d.entry_uuid for d in _documents(setup) if d.kind == "report")
    before = len([r for r in setup.dmp.received if r.transaction == "ITI-41"])
    setup.dmp.behaviours.extend(
        [Failure([("XDSRegistryBusy", "Le DMP est momentanément indisponible")]), NoAnswer(10), Success()]
    )
    _sign(setup, previous=first)
    _wait(lambda: ("report", 2, "published") in _states(setup), timeout=120, what="the addendum published")
    submissions = [r for r in setup.dmp.received if r.transaction == "ITI-41"][before:]
    assert [r.answered for r in submissions] == ["failure", "no answer", "success"]
    last = submissions[-1]
    assert not last.problems, last.problems
    # The addendum replaces the first version; the images did not change: no new manifest.
    assert _states(setup) == [
        ("report", 1, "replaced"),
        ("manifest", 1, "published"),
        ("report", 2, "published"),
    ]
    replacements = last.associations(md.RPLC)
    assert len(replacements) == 1 and replacements[0][1] == first_entry
    assert len(last.objects("ExtrinsicObject")) == 2  # the addendum and the signature document

    status = setup.simral.cli("dmp", "status", "--organisation", "CHSUD", "--json")
    rows = json.loads(status.stdout)
    assert [(r["kind"], r["version"], r["state"]) for r in rows] == [
        ("report", 2, "published"),
        ("manifest", 1, "published"),
        ("report", 1, "replaced"),
    ]
    assert rows[0]["replaces_entry_uuid"] == first_entry


def test_new_images_publish_a_manifest_replacing_the_old_one(setup: Setup) -> None:
    first_manifest = next(d for d in _documents(setup) if d.kind == "manifest")
    before = len([r for r in setup.dmp.received if r.transaction == "ITI-41"])
    with setup.ctx.db.reading() as session:
        request = session.get(ImagingRequest, setup.request_id)
        assert request is not None
        accession = request.accession_number
    # The site sends a second series (a reconstruction) into the same study.
    _store(
        setup.simral,
        setup.base,
        setup.study_uid,
        accession,
        "PAT-TROIS^Dominique",
        92,
        patient_id="IPP-DMP-1",
    )
    _wait(lambda: ("manifest", 2, "published") in _states(setup), timeout=120, what="manifest v2 published")
    submissions = [r for r in setup.dmp.received if r.transaction == "ITI-41"][before:]
    assert len(submissions) == 1 and not submissions[0].problems, submissions[0].problems
    assert submissions[0].associations(md.RPLC) == [
        (next(d.entry_uuid for d in _documents(setup) if (d.kind, d.version) == ("manifest", 2)),
         first_manifest.entry_uuid)
    ]  # fmt: skip
    assert ("manifest", 1, "replaced") in _states(setup)
    kos = next(b for b in submissions[0].documents().values() if b[128:132] == b"DICM")
    references = manifest_references(dcmread(BytesIO(kos)))
    with setup.ctx.db.reading() as session:
        series = {
            uid
            for uid, modality in session.execute(
                select(Series.series_uid, Series.modality)
                .join(Study, Study.id == Series.study_pk)
                .where(Study.study_uid == setup.study_uid)
            )
            if modality not in ("KO", "DOC")
        }
    assert set(references) == series and len(series) == 2


def test_site_withdraws_entries_through_iti57(setup: Setup) -> None:
    documents = _documents(setup)
    report = next(d for d in documents if (d.kind, d.version, d.state) == ("report", 2, "published"))
    manifest = next(d for d in documents if (d.kind, d.state) == ("manifest", "published"))
    # Only a published entry can be withdrawn.
    refused = setup.simral.cli("dmp", "withdraw", str(documents[0].id), check=False)
    assert refused.returncode == 1 and "only a published entry" in refused.stdout + refused.stderr

    setup.simral.cli("dmp", "withdraw", str(report.id))
    _wait(lambda: ("report", 2, "deleted") in _states(setup), what="the report deleted from the DMP")
    deletion = setup.dmp.last("ITI-57")
    assert not deletion.problems, deletion.problems
    assert deletion.associations(md.UPDATE_AVAILABILITY_STATUS)[0][1] == report.entry_uuid
    association = deletion.objects("Association")[0]
    status = association.findtext(
        f"{{{md.RIM}}}Slot[@name='NewStatus']/{{{md.RIM}}}ValueList/{{{md.RIM}}}Value"
    )
    assert status == md.STATUS_DELETED

    setup.simral.cli("dmp", "withdraw", str(manifest.id), "--mask")
    _wait(lambda: ("manifest", manifest.version, "masked") in _states(setup), what="the manifest masked")
    masking = setup.dmp.last("ITI-57")
    assert not masking.problems, masking.problems
    codes = {
        c.get("nodeRepresentation")
        for c in masking.envelope.iter(f"{{{md.RIM}}}Classification")
        if c.get("classificationScheme") == md.DE_CONFIDENTIALITY
    }
    assert codes == {"N", "MASQUE_PS"}
    # A new version of the registered entry (its logicalId): PreviousVersion is the entry's registry
    # version (1, the test DMP checks it), not the manifest's version (2).
    new_version = masking.objects("ExtrinsicObject")[0]
    assert new_version.get("lid") == manifest.entry_uuid and manifest.version == 2
    member = next(a for a in masking.objects("Association") if a.get("associationType") == md.HAS_MEMBER)
    previous = member.findtext(
        f"{{{md.RIM}}}Slot[@name='PreviousVersion']/{{{md.RIM}}}ValueList/{{{md.RIM}}}Value"
    )
    assert previous == "1"
    assert setup.dmp.registry[manifest.entry_uuid] == 2
    # The site's request page says what became of each withdrawn entry (French, then English).
    page = _request_page(setup)
    assert f'data-dmp="{report.id}" data-state="deleted"' in page
    assert f'data-dmp="{manifest.id}" data-state="masked"' in page
    assert "retiré du DMP le " in page and "(suppression logique)" in page
    assert "masqué aux professionnels de santé le " in page
    english = _request_page(setup, lang="en")
    assert "withdrawn from the DMP on " in english and "masked to health professionals on " in english
    assert '<a href="/dmp">Toutes les publications au DMP du site</a>' in page
    with setup.ctx.db.reading() as session:
        actions = [
            (e.action, e.detail.get("action"))
            for e in session.scalars(select(AuditEvent).where(AuditEvent.action.like("dmp.withdraw%")))
        ]
    assert actions == [
        ("dmp.withdraw-request", "delete"),
        ("dmp.withdraw", "delete"),
        ("dmp.withdraw-request", "mask"),
        ("dmp.withdraw", "mask"),
    ]


def test_a_publication_that_fails_for_good_shows_the_failure_and_its_reason(setup: Setup) -> None:
    """A report version meets registry errors (retried, the reason on the page), then the site stops
    publishing through simral before the next try: the publication fails for good (no retry helps),
    and the site's request page says "échec" with the reason."""
    with setup.ctx.db.reading() as session:
        latest = session.scalar(
            select(Report)
            .where(Report.request_id == setup.request_id)
            .order_by(Report.version.desc())
            .limit(1)
        )
        assert latest is not None
        session.expunge(latest)
    setup.dmp.behaviours.extend([Failure([("XDSRegistryError", "Erreur interne du registre")])] * 8)
    try:
        signed = _sign(setup, previous=latest)

        def document() -> DmpDocument | None:
            return next((d for d in _documents(setup) if d.unique_id == signed.document_uid), None)

        def retried() -> bool:
            found = document()
            return found is not None and found.state == "pending" and "Erreur du DMP" in found.reason

        _wait(retried, what="a registry error, to be retried")
        page = _request_page(setup)
        assert "en attente d&#x27;envoi — Erreur du DMP : XDSRegistryError" in page
        setup.simral.cli("dmp", "disable", "CHSUD")
        _wait(lambda: (found := document()) is not None and found.state == "failed", what="the failure")
    finally:
        setup.dmp.behaviours.clear()
        setup.simral.cli(
            "dmp", "enable", "CHSUD", "--auth-cert", str(setup.pki.org_cert),
            "--auth-key", str(setup.pki.org_key), "--signing-cert", str(setup.pki.org_cert),
            "--signing-key", str(setup.pki.org_key),
        )  # fmt: skip
    failed = document()
    assert failed is not None and failed.reason == "CHSUD no longer publishes to the DMP through simral"
    page = _request_page(setup)
    assert f'data-dmp="{failed.id}" data-state="failed"' in page
    assert f"échec — {failed.reason}" in page
    assert f"failed — {failed.reason}" in _request_page(setup, lang="en")
    # The site's list of its DMP entries shows it too.
    listed = httpx.get(
        f"{setup.simral.http_url}/dmp",
        params={"state": "failed"},
        headers={"Authorization": f"Bearer {setup.site_token}"},
        timeout=30,
    )
    assert listed.status_code == 200
    assert f'data-dmp="{failed.id}" data-state="failed"' in listed.text
    assert f"échec — {failed.reason}" in listed.text
