"""ITI-41 to the DMP: metadata, VIHF, XAdES, SOAP/MTOM over mutual TLS, against a test DMP.

Content: the ANS CR-IMG example (``IMG_CR_IMG_2024.01.xml``) as the report and the DRIMbox ``kos.dcm``
as the KOS, both read from the conformance kit (never copied). Checks: the bodies pass
``validate.py xds``; their slots and classifications match the DRIM-M ``XDS.xml`` samples; the VIHF and
XAdES signatures verify with signxml and stop verifying when one byte changes; the client gets success,
a registry error, XdsUnavailable, and the test DMP records RPLC, ITI-57 and TD0.2 as sent.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from lxml import etree
from signxml import SignatureConfiguration, XMLVerifier
from signxml.exceptions import InvalidDigest, InvalidSignature
from signxml.xades import XAdESVerifier
from tests.xds_registry import (
    CONFORMANCE_DIR,
    DRIMM_SAMPLES,
    VALIDATE,
    Failure,
    NoAnswer,
    Pki,
    TestDmp,
    make_pki,
    shape_differences,
)

from simral.xds import metadata as md
from simral.xds import soap
from simral.xds.client import DmpClient, DmpEndpoint, XdsRegistryError, XdsUnavailable
from simral.xds.metadata import Author, Code, DocumentEntry, ReferenceId, SubmissionSet
from simral.xds.vihf import VihfContext, attributes, vihf_assertion
from simral.xds.xades import DS, SigningIdentity

CDA_PATH = CONFORMANCE_DIR / "ans-cisis" / "ExemplesCDA" / "IMG_CR_IMG_2024.01.xml"
KOS_PATH = CONFORMANCE_DIR / "drim-m" / "drimbox-test-resources" / "kos.dcm"
RIM = f"{{{md.RIM}}}"
INS_TEST_OID = "1.2.250.1.213.1.4.10"
SITE_OID = "1.2.250.1.999.9.2"
ACCESSION_OID = "1.2.250.1.999.9.2.3"
ORDER_OID = "1.2.250.1.999.9.3"

RADIOLOGIST = Author(
    national_id="801234560801",
    family="RADIOLOGUE",
    given="PIERRE",
    role=None,
    specialty=Code("G15_10/SM44", "1.2.250.1.213.1.1.4.5", "Médecin - Radio-diagnostic (SM)"),
    institution_name="CH TEST SIMRAL",
    institution_id="11890000037",
)
FACILITY = Code("SA01", "1.2.250.1.71.4.2.4", "Etablissement public de santé")
PRACTICE = Code("ETABLISSEMENT", "1.2.250.1.213.1.1.4.9", "Etablissement de santé")
CT = Code("CT", "1.2.250.1.213.1.1.5.618", "Tomodensitométrie")
HEAD_NECK = Code("774007", "1.2.250.1.213.1.1.5.695", "tête et cou")
CONTENT_TYPE = Code("04", "1.2.250.1.213.2.2", "Hospitalisation de jour")  # as in the DRIM-M samples


def _ins(matricule: str) -> str:
    return f"{matricule}^^^&{INS_TEST_OID}&ISO^NH"


def _at(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y%m%d%H%M%S%z")


def _references(study_uid: str) -> tuple[ReferenceId, ...]:
    return (
        ReferenceId("984375862", ACCESSION_OID, md.REF_ACCESSION),
        ReferenceId(study_uid, "1.2.250.1.999.9.2.4", md.REF_STUDY_UID),
        ReferenceId("CR-PUB-1", ORDER_OID, md.REF_ORDER),
    )


def report_entry(content: bytes | None = None, *, replaces: str | None = None) -> DocumentEntry:
    """The CR-IMG example as a report entry (classCode 10, typeCode 18748-4, structured format)."""
    content = content if content is not None else CDA_PATH.read_bytes()
    cda = etree.fromstring(content)
    ns = {"h": "urn:hl7-org:v3"}
    ins = cda.find("h:recordTarget/h:patientRole/h:id[@root='1.2.250.1.213.1.4.10']", ns)
    assert ins is not None
    person = cda.find("h:recordTarget/h:patientRole/h:patient", ns)
    assert person is not None
    family = person.findtext("h:name/h:family[@qualifier='BR']", namespaces=ns)
    given = person.findtext("h:name/h:given[@qualifier='BR']", namespaces=ns)
    birth = person.find("h:birthTime", ns)
    sex = person.find("h:administrativeGenderCode", ns)
    effective = cda.find("h:effectiveTime", ns)
    event = cda.find("h:documentationOf/h:serviceEvent/h:effectiveTime", ns)
    assert birth is not None and sex is not None and effective is not None and event is not None
    low, high = event.find("h:low", ns), event.find("h:high", ns)
    assert low is not None and high is not None
    unique = cda.find("h:id", ns)
    assert unique is not None
    unique_id = unique.get("root", "") if replaces is None else md.uuid_oid()
    matricule = ins.get("extension", "")
    return DocumentEntry(
        entry_uuid=md.new_uuid_urn(),
        unique_id=unique_id,
        mime_type="text/xml",
        content=content,
        title="CR d'imagerie médicale",
        class_code=md.REPORT_CLASS,
        type_code=md.REPORT_TYPE,
        format_code=md.REPORT_FORMAT_STRUCTURED,
        confidentiality=(md.CONFIDENTIALITY_NORMAL,),
        healthcare_facility_type=FACILITY,
        practice_setting=PRACTICE,
        event_codes=(CT, HEAD_NECK),
        reference_ids=_references("1.2.250.1.925.994044.27.123.1876360"),
        creation_time=_at(effective.get("value", "")),
        service_start=_at(low.get("value", "")),
        service_stop=_at(high.get("value", "")),
        language="fr-FR",
        author=RADIOLOGIST,
        legal_authenticator=RADIOLOGIST,
        patient_id=_ins(matricule),
        source_patient_id=f"{matricule}^^^&{INS_TEST_OID}&ISO^PI",
        source_patient_info=(
            f"PID-5|{family}^{given}^^^^^L",
            f"PID-7|{birth.get('value', '')[:8]}",
            f"PID-8|{sex.get('code', '')}",
        ),
        replaces_entry_uuid=replaces,
    )


def kos_entry(content: bytes | None = None, *, replaces: str | None = None) -> DocumentEntry:
    """The DRIMbox KOS as a KOS entry (classCode 31, typeCode IMG-KOS, format = KOS SOP class)."""
    content = content if content is not None else KOS_PATH.read_bytes()
    ds = pydicom.dcmread(KOS_PATH)
    unique_id = ds.SOPInstanceUID if replaces is None else md.uuid_oid()
    when = dt.datetime.strptime(ds.StudyDate, "%Y%m%d").replace(tzinfo=dt.UTC)
    return DocumentEntry(
        entry_uuid=md.new_uuid_urn(),
        unique_id=unique_id,
        mime_type="application/dicom",
        content=content,
        title="Reference d'objets d'un examen d'imagerie",
        class_code=md.KOS_CLASS,
        type_code=md.KOS_TYPE,
        format_code=md.KOS_FORMAT,
        confidentiality=(md.CONFIDENTIALITY_NORMAL,),
        healthcare_facility_type=FACILITY,
        practice_setting=PRACTICE,
        event_codes=(CT, HEAD_NECK),
        reference_ids=_references(ds.StudyInstanceUID),
        creation_time=when,
        service_start=when,
        service_stop=when,
        language="fr-FR",
        author=RADIOLOGIST,
        legal_authenticator=RADIOLOGIST,
        patient_id=_ins(ds.PatientID),
        source_patient_id=f"{ds.PatientID}^^^&{INS_TEST_OID}&ISO^PI",
        source_patient_info=(f"PID-5|{ds.PatientName.family_name or 'INCONNU'}^^^^^^L", "PID-8|U"),
        replaces_entry_uuid=replaces,
    )


_serial = iter(range(1, 10_000))


def submission() -> SubmissionSet:
    return SubmissionSet(
        unique_id=f"{SITE_OID}.7.{time.time_ns()}.{next(_serial)}",
        source_id=SITE_OID,
        submission_time=dt.datetime.now(dt.UTC),
        author=RADIOLOGIST,
        content_type_code=CONTENT_TYPE,
        title="Imagerie",
    )


def vihf_context(entry: DocumentEntry) -> VihfContext:
    return VihfContext(
        professional_id=RADIOLOGIST.national_id,
        professional_name=f"{RADIOLOGIST.given} {RADIOLOGIST.family}",
        profession=Code("10", "1.2.250.1.71.1.2.7", "Médecin"),
        specialty=Code("SM44", "1.2.250.1.71.4.2.5", "Radio-diagnostic (SM)"),
        structure_id=RADIOLOGIST.institution_id,
        sector=FACILITY,
        patient_ins=entry.patient_id,
        lps_name="simral",
        lps_version="0.1.0",
        lps_id="simral-test-instance",
        lps_homologation_id="TEST-HOMOLOGATION",
    )


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("dmp-pki"))


@pytest.fixture(scope="module")
def signer(pki: Pki) -> SigningIdentity:
    return SigningIdentity.from_files(pki.org_cert, pki.org_key)


@pytest.fixture(scope="module")
def dmp(pki: Pki) -> Iterator[TestDmp]:
    with TestDmp(pki) as server:
        yield server


def endpoint(dmp: TestDmp, pki: Pki, *, timeout: float = 30.0, rogue: bool = False) -> DmpEndpoint:
    return DmpEndpoint(
        iti41_url=dmp.url("si-dmp-server/v2/services/repository"),
        iti57_url=dmp.url("si-dmp-server/v2/services/registry"),
        td02_url=dmp.url("si-dmp-server/v2/services/patients"),
        tls_certificate=pki.rogue_cert if rogue else pki.org_cert,
        tls_key=pki.rogue_key if rogue else pki.org_key,
        ca_bundle=pki.ca,
        timeout=timeout,
        sender_oid=SITE_OID,
    )


@pytest.fixture
def client(dmp: TestDmp, pki: Pki, signer: SigningIdentity) -> Iterator[DmpClient]:
    dmp.behaviours.clear()
    with DmpClient(endpoint(dmp, pki), signer) as dmp_client:
        yield dmp_client


def _validate_xds(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(VALIDATE), "xds", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _soap_file(
    tmp_path: Path, request: md.ProvideAndRegister, context: VihfContext, signer: SigningIdentity
) -> Path:
    """The ITI-41 SOAP envelope as sent (VIHF included) in a file for validate.py."""
    env = soap.envelope(
        action=soap.ACTION_ITI41,
        to="https://test.dmp/repository",
        body=request.request,
        assertion=vihf_assertion(context, signer),
    )
    path = tmp_path / "iti41.xml"
    path.write_bytes(etree.tostring(env, xml_declaration=True, encoding="UTF-8"))
    return path


# --------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("kind", ["report", "kos"])
def test_iti41_body_passes_validate_xds(kind: str, signer: SigningIdentity, tmp_path: Path) -> None:
    entry = report_entry() if kind == "report" else kos_entry()
    request = md.provide_and_register(submission(), [entry], signer=signer)
    started = time.monotonic()
    result = _validate_xds(_soap_file(tmp_path, request, vihf_context(entry), signer))
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert "IHEXDSB.xsd ProvideAndRegisterDocumentSetRequest: PASS (2 xop:Include" in result.stdout
    assert "WARN" not in result.stdout, (
        result.stdout
    )  # typeCode, confidentiality, facility, practice in the JDVs
    assert elapsed < 30, f"validate.py xds took {elapsed:.1f} s"


@pytest.mark.parametrize("sample", DRIMM_SAMPLES, ids=["validateur-xds", "cross-validateur"])
def test_shape_matches_the_drim_m_sample(sample: Path, signer: SigningIdentity) -> None:
    reference = etree.parse(str(sample)).getroot()
    ours = md.provide_and_register(submission(), [kos_entry()], signer=signer).request
    report = md.provide_and_register(submission(), [report_entry()], signer=signer).request
    assert shape_differences(ours, reference) == []
    assert shape_differences(report, reference) == []
    association_types = {a.get("associationType", "") for a in ours.iter(f"{RIM}Association")}
    assert association_types == {md.HAS_MEMBER, md.SIGNS}


def test_rplc_replaces_the_previous_entry(signer: SigningIdentity) -> None:
    old = report_entry()
    addendum = report_entry(
        CDA_PATH.read_bytes().replace(b"</ClinicalDocument>", b"<!-- add -->\n</ClinicalDocument>"),
        replaces=old.entry_uuid,
    )
    request = md.provide_and_register(submission(), [addendum], signer=signer).request
    rplc = [
        (a.get("sourceObject"), a.get("targetObject"))
        for a in request.iter(f"{RIM}Association")
        if a.get("associationType") == md.RPLC
    ]
    assert rplc == [(addendum.entry_uuid, old.entry_uuid)]


# --------------------------------------------------------------------------- signatures


def test_vihf_verifies_and_one_changed_byte_breaks_it(signer: SigningIdentity, pki: Pki) -> None:
    context = vihf_context(kos_entry())
    assertion = etree.tostring(vihf_assertion(context, signer))
    verified = XMLVerifier().verify(
        assertion,
        ca_pem_file=str(pki.ca),
        id_attribute="ID",
        expect_config=SignatureConfiguration(expect_references=1),
    )
    assert verified.signed_xml is not None
    found = attributes(verified.signed_xml)
    assert found["VIHF_Version"] == ["3.0"]
    assert found["urn:oasis:names:tc:xacml:2.0:resource:resource-id"] == [context.patient_ins]
    assert found["Identifiant_Structure"] == [RADIOLOGIST.institution_id]
    assert (
        verified.signed_xml.findtext("{urn:oasis:names:tc:SAML:2.0:assertion}Issuer") == signer.subject_dn()
    )
    tampered = assertion.replace(b"INDIRECTE", b"INDIRECTF", 1)
    assert tampered != assertion
    with pytest.raises((InvalidDigest, InvalidSignature)):
        XMLVerifier().verify(tampered, ca_pem_file=str(pki.ca), id_attribute="ID")


def test_xades_verifies_and_one_changed_byte_breaks_it(signer: SigningIdentity, pki: Pki) -> None:
    report, kos = report_entry(), kos_entry()
    kos = dataclasses.replace(kos, patient_id=report.patient_id)
    request = md.provide_and_register(submission(), [report, kos], signer=signer)
    assert request.signature_entry is not None
    document = request.signature_entry.content
    results = XAdESVerifier().verify(document, ca_pem_file=str(pki.ca))
    manifest = next(
        r.signed_xml for r in results if r.signed_xml is not None and r.signed_xml.tag == f"{{{DS}}}Manifest"
    )
    digests = {
        ref.get("URI"): ref.findtext(f"{{{DS}}}DigestValue")
        for ref in manifest.iterfind(f"{{{DS}}}Reference")
    }
    for entry in (report, kos):
        assert (
            digests[f"urn:oid:{entry.unique_id}"]
            == base64.b64encode(hashlib.sha256(entry.content).digest()).decode()
        )
    # One byte of a signed document: its digest no longer matches the signed manifest.
    changed = bytearray(kos.content)
    changed[-1] ^= 0x01
    assert (
        digests[f"urn:oid:{kos.unique_id}"]
        != base64.b64encode(hashlib.sha256(bytes(changed)).digest()).decode()
    )
    # One byte of the signed manifest: the signature itself fails.
    position = document.index(b"<ds:DigestValue>", document.index(b"urn:oid:")) + len(b"<ds:DigestValue>")
    flipped = document[:position] + bytes([document[position] ^ 0x01]) + document[position + 1 :]
    with pytest.raises((InvalidDigest, InvalidSignature)):
        XAdESVerifier().verify(flipped, ca_pem_file=str(pki.ca))


# --------------------------------------------------------------------------- against the test DMP


def test_td02_existence_and_authorisation(client: DmpClient, dmp: TestDmp) -> None:
    kos = kos_entry()
    matricule = kos.patient_id.split("^")[0]
    dmp.set_patient(matricule, authorisation="VALIDE")
    status = client.check_patient(vihf_context(kos), ins=matricule, ins_oid=INS_TEST_OID)
    assert (status.exists, status.authorised, status.authorisation) == (True, True, "VALIDE")
    assert dmp.last("TD0.2").problems == []
    dmp.set_patient(matricule, authorisation="INTERDITE")
    status = client.check_patient(vihf_context(kos), ins=matricule, ins_oid=INS_TEST_OID)
    assert (status.exists, status.authorised, status.authorisation) == (True, False, "INTERDITE")
    unknown = "^".join(["279035121518989", *kos.patient_id.split("^")[1:]])
    status = client.check_patient(
        dataclasses.replace(vihf_context(kos), patient_ins=unknown),
        ins="279035121518989",
        ins_oid=INS_TEST_OID,
    )
    assert (status.exists, status.authorised) == (False, False)


def test_iti41_success_is_checked_by_the_test_dmp(
    client: DmpClient, dmp: TestDmp, signer: SigningIdentity
) -> None:
    entry = kos_entry()
    request = md.provide_and_register(submission(), [entry], signer=signer)
    response = client.provide_and_register(request, vihf_context(entry))
    assert response.success and response.errors == ()
    received = dmp.last("ITI-41")
    assert received.problems == [], received.problems
    assert received.answered == "success"
    assert "PASS" in received.validate_output
    assert received.documents()[entry.entry_uuid] == entry.content
    assert "commonName=simral.test" in received.client_subject
    assert received.vihf["NameID"] == [RADIOLOGIST.national_id]


def test_iti41_registry_error_keeps_the_codes(
    client: DmpClient, dmp: TestDmp, signer: SigningIdentity
) -> None:
    entry = report_entry()
    dmp.behaviours.append(Failure([("XDSPatientIdDoesNotMatch", "INS inconnu du DMP")]))
    with pytest.raises(XdsRegistryError) as raised:
        client.provide_and_register(
            md.provide_and_register(submission(), [entry], signer=signer), vihf_context(entry)
        )
    assert raised.value.codes == ("XDSPatientIdDoesNotMatch",)
    assert raised.value.errors[0].context == "INS inconnu du DMP"
    dmp.behaviours.append(Failure([("DMPAccessDenied", "VIHF refusé")], soap_fault=True))
    with pytest.raises(XdsRegistryError) as raised:
        client.provide_and_register(
            md.provide_and_register(submission(), [entry], signer=signer), vihf_context(entry)
        )
    assert raised.value.codes == ("DMPAccessDenied",)


def test_iti41_no_answer_is_unavailable(dmp: TestDmp, pki: Pki, signer: SigningIdentity) -> None:
    entry = kos_entry()
    dmp.behaviours.clear()
    dmp.behaviours.append(NoAnswer(seconds=20))
    with DmpClient(endpoint(dmp, pki, timeout=2.0), signer) as impatient:
        started = time.monotonic()
        with pytest.raises(XdsUnavailable):
            impatient.provide_and_register(
                md.provide_and_register(submission(), [entry], signer=signer), vihf_context(entry)
            )
    assert time.monotonic() - started < 15
    assert dmp.last("ITI-41").answered == "no answer"


def test_tampered_attachment_is_refused(client: DmpClient, dmp: TestDmp, signer: SigningIdentity) -> None:
    entry = kos_entry()
    request = md.provide_and_register(submission(), [entry], signer=signer)
    cid = next(iter(request.attachments))
    request.attachments[cid] = request.attachments[cid][:-1] + bytes([request.attachments[cid][-1] ^ 0x01])
    with pytest.raises(XdsRegistryError) as raised:
        client.provide_and_register(request, vihf_context(entry))
    assert set(raised.value.codes) == {"XDSRegistryMetadataError"}
    problems = dmp.last("ITI-41").problems
    assert any("hash does not match" in p for p in problems), problems
    assert any("XAdES manifest" in p for p in problems), problems


def test_rogue_client_certificate_is_refused(dmp: TestDmp, pki: Pki, signer: SigningIdentity) -> None:
    entry = kos_entry()
    with DmpClient(endpoint(dmp, pki, rogue=True), signer) as rogue, pytest.raises(XdsUnavailable):
        rogue.check_patient(vihf_context(entry), ins="248039263001064", ins_oid=INS_TEST_OID)


def test_rplc_submissions_are_recorded(client: DmpClient, dmp: TestDmp, signer: SigningIdentity) -> None:
    report, kos = report_entry(), kos_entry()
    client.provide_and_register(
        md.provide_and_register(submission(), [report], signer=signer), vihf_context(report)
    )
    addendum = report_entry(
        CDA_PATH.read_bytes().replace(b"</ClinicalDocument>", b"<!-- addendum -->\n</ClinicalDocument>"),
        replaces=report.entry_uuid,
    )
    client.provide_and_register(
        md.provide_and_register(submission(), [addendum], signer=signer), vihf_context(report)
    )
    received = dmp.last("ITI-41")
    assert received.problems == [], received.problems
    assert received.associations(md.RPLC) == [(addendum.entry_uuid, report.entry_uuid)]
    # Image changes: a new KOS replaces the old one.
    client.provide_and_register(
        md.provide_and_register(submission(), [kos], signer=signer), vihf_context(kos)
    )
    new_kos = kos_entry(replaces=kos.entry_uuid)
    client.provide_and_register(
        md.provide_and_register(submission(), [new_kos], signer=signer), vihf_context(kos)
    )
    assert dmp.last("ITI-41").associations(md.RPLC) == [(new_kos.entry_uuid, kos.entry_uuid)]


def test_iti57_deletion_and_masking(client: DmpClient, dmp: TestDmp, signer: SigningIdentity) -> None:
    kos = kos_entry()
    client.provide_and_register(
        md.provide_and_register(submission(), [kos], signer=signer), vihf_context(kos)
    )
    response = client.update_status(
        submission(),
        vihf_context(kos),
        patient_id=kos.patient_id,
        entry_uuid=kos.entry_uuid,
        new_status=md.STATUS_DELETED,
    )
    assert response.success
    received = dmp.last("ITI-57")
    assert received.problems == [], received.problems
    assert received.associations(md.UPDATE_AVAILABILITY_STATUS)[0][1] == kos.entry_uuid
    association = received.objects("Association")[0]
    new_status = association.findtext(f"{RIM}Slot[@name='NewStatus']/{RIM}ValueList/{RIM}Value")
    assert new_status == md.STATUS_DELETED

    masked = dataclasses.replace(
        kos,
        confidentiality=(
            md.CONFIDENTIALITY_NORMAL,
            Code("MASQUE_PS", "1.2.250.1.213.1.1.4.13", "Masqué aux professionnels de santé"),
        ),
    )
    # The registry version of an entry is 1 once registered: another PreviousVersion is refused.
    stale = md.metadata_update(submission(), masked, logical_id=kos.entry_uuid, previous_version="2")
    with pytest.raises(XdsRegistryError) as raised:
        client.update_metadata(stale, vihf_context(kos))
    assert raised.value.codes == ("XDSRegistryMetadataError",)
    assert any("XDSMetadataVersionError" in p for p in dmp.last("ITI-57").problems)
    body = md.metadata_update(submission(), masked, logical_id=kos.entry_uuid, previous_version="1")
    assert client.update_metadata(body, vihf_context(kos)).success
    received = dmp.last("ITI-57")
    assert received.problems == [], received.problems
    codes = {
        c.get("nodeRepresentation")
        for c in received.envelope.iter(f"{RIM}Classification")
        if c.get("classificationScheme") == md.DE_CONFIDENTIALITY
    }
    assert codes == {"N", "MASQUE_PS"}
    assert dmp.registry[kos.entry_uuid] == 2


def test_code_outside_the_value_sets_is_refused(
    client: DmpClient, dmp: TestDmp, signer: SigningIdentity
) -> None:
    entry = dataclasses.replace(kos_entry(), type_code=Code("IMG-XXX", "1.2.250.1.213.1.1.4.12", "inconnu"))
    with pytest.raises(XdsRegistryError):
        client.provide_and_register(
            md.provide_and_register(submission(), [entry], signer=signer), vihf_context(entry)
        )
    problems = dmp.last("ITI-41").problems
    assert any("IMG-XXX" in p and "J07" in p for p in problems), problems  # validate.py's advisory WARN
    assert any("typeCode IMG-XXX" in p for p in problems), problems  # the test DMP's own check


def test_report_not_naming_the_patient_by_ins_is_refused(
    client: DmpClient, dmp: TestDmp, signer: SigningIdentity
) -> None:
    # The CR-IMG example with its recordTarget naming the patient by IPP only (as a report signed
    # before the INS was qualified): the DMP refuses it although the XDS patientId is the INS.
    original = CDA_PATH.read_bytes()
    ipp_only = original.replace(b'<id extension="279035121518989" root="1.2.250.1.213.1.4.10"/>', b"", 1)
    assert ipp_only != original
    entry = dataclasses.replace(report_entry(), content=ipp_only)
    with pytest.raises(XdsRegistryError):
        client.provide_and_register(
            md.provide_and_register(submission(), [entry], signer=signer), vihf_context(entry)
        )
    problems = dmp.last("ITI-41").problems
    assert any("recordTarget does not name the SubmissionSet's patient" in p for p in problems), problems
    # The example as published (INS in the recordTarget) passes, validate.py cda included.
    entry = report_entry()
    assert client.provide_and_register(
        md.provide_and_register(submission(), [entry], signer=signer), vihf_context(entry)
    ).success
    received = dmp.last("ITI-41")
    assert received.problems == [], received.problems
    assert "[SCH] CI-SIS_IMG-CR-IMG_2024.01.sch: PASS" in received.cda_output[entry.entry_uuid]
