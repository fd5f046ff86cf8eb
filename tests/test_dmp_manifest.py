"""The DMP / DRIM-M KOS manifest of a study (issue 8 item 2; DESIGN.md §8, IHE RAD XDS-I.b).

A study of site CHA (a CT series of two slices, an MR series of two slices and an RT Plan, all
from pydicom's shipped test files, with an ANS test INS in Other Patient IDs) is ingested by the
site's modality into an in-process archive. Its manifest lists every instance, per series with a
Retrieve URL to simral's WADO-RS, under PatientID = INS with issuer ``ASIP-SANTE-INS-NIR`` and
the INS OID qualifiers, with the request (accession + issuer, placer order); it passes the
conformance kit's ``validate.py kos`` and ``dciodvfy`` with no error. Stored through the ingest
path it is read back from the index; two versions are two instances of one series and a retry is
a duplicate. Simral's own report PDF, earlier manifests and the instances an IOCM rejection note
withdraws are left out. A manifest with a series taken out fails ``validate.py`` (the check is real).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import Dataset, dcmread
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from tests.corpus import ANS_TEST_INS_OID, data_file, set_test_ins

from simral.access.policy import Principal
from simral.app import open_app
from simral.archive import service as archive
from simral.archive.models import Blob, Instance, Patient, Series
from simral.audit.models import AuditEvent
from simral.config import load_settings
from simral.context import AppContext
from simral.dmp.manifest import (
    KOS_SOP_CLASS,
    MANIFEST_PUBLISHER,
    ManifestContent,
    ManifestError,
    ManifestOrder,
    ManifestPatient,
    build_manifest,
    manifest_bytes,
    manifest_content,
    manifest_references,
    manifest_uids,
    store_manifest,
)
from simral.identity import service as identity
from simral.reading.pdf import EncapsulatedPdfIdentity, ReportPdf, encapsulated_pdf, render_pdf
from simral.reading.publication import PUBLISHER_NAME as REPORT_PUBLISHER

REPO = Path(__file__).resolve().parent.parent
#: The conformance kit (never copied): SIMRAL_CONFORMANCE_DIR, else ../shared/conformance.
CONFORMANCE_DIR = Path(os.environ.get("SIMRAL_CONFORMANCE_DIR", REPO.parent / "shared" / "conformance"))
VALIDATE = CONFORMANCE_DIR / "validate.py"
DCIODVFY = "/usr/bin/dciodvfy"

OPERATOR = Principal(kind="system", name="test", archive_wide=True)
MODALITY = Principal(kind="dicom-node", name="MOD_CHA", organisation="CHA")
OID_CHA = "1.2.250.1.999.1.1"
ACCESSION_OID = "1.2.250.1.999.1.2"
PLACER_OID = "1.2.250.1.999.1.3"
INS_TEST_OID = ANS_TEST_INS_OID
#: ANS test NIR (valid key), never a real person.
NIR = "279035121518989"
BASE_URL = "https://simral.example.test"
CREATED = datetime(2026, 3, 2, 10, 15, 0, tzinfo=UTC)

PATIENT = ManifestPatient(
    ins=NIR,
    ins_oid=INS_TEST_OID,
    family_name="Pat-Trois",
    given_names="Dominique Marie",
    birth_date="19790328",
    sex="F",
)
ORDER = ManifestOrder(
    accession_number="ACC-KOS-1",
    accession_issuer=ACCESSION_OID,
    placer_number="DEM-KOS-1",
    placer_issuer=PLACER_OID,
    requested_procedure_id="RP1",
    requested_procedure_description="Scanner et IRM cérébraux",
)


@dataclass
class Exam:
    ctx: AppContext
    study_uid: str
    #: What the site stored: series UID -> SOP Instance UIDs (read from the files written).
    stored: dict[str, set[str]]
    #: SOP Instance UIDs of the images (IMAGE items) among them.
    images: set[str]
    tmp: Path


def _site_instance(source: str, path: Path, *, study_uid: str, series_uid: str, number: int) -> Path:
    """A pydicom test file moved into the exam of site CHA (its IPP, the test INS, the accession)."""
    ds = dcmread(data_file(source))
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = number
    ds.PatientName = "PAT-TROIS^DOMINIQUE"
    ds.PatientID = "IPP-KOS-1"
    ds.IssuerOfPatientID = "CHA"
    qualifier = Dataset()
    qualifier.UniversalEntityID = OID_CHA
    qualifier.UniversalEntityIDType = "ISO"
    ds.IssuerOfPatientIDQualifiersSequence = [qualifier]
    set_test_ins(ds, NIR)
    ds.PatientBirthDate = "19790328"
    ds.PatientSex = "F"
    ds.AccessionNumber = ORDER.accession_number
    ds.StudyDate = "20260302"
    ds.StudyTime = "094500"
    ds.StudyID = "KOS1"
    ds.save_as(path, enforce_file_format=True)
    return path


def _ingest(ctx: AppContext, paths: list[Path], principal: Principal, source: str) -> None:
    for path in paths:
        result = archive.ingest_file(ctx, path, principal=principal, source=source)
        assert result.outcome == "stored", result


@pytest.fixture
def exam(tmp_path: Path) -> Iterator[Exam]:
    ctx = open_app(
        load_settings(
            environ={"SIMRAL_DATA_DIR": str(tmp_path / "data"), "SIMRAL_INS_TEST_OIDS_ALLOWED": "true"}
        )
    )
    with ctx.db.unit_of_work() as session:
        identity.create_organisation(
            session, code="CHA", name="CH A", patient_id_oid=OID_CHA, principal=OPERATOR
        )
    study_uid = str(generate_uid())
    plan = [("CT_small.dcm", 2), ("MR_small.dcm", 2), ("rtplan.dcm", 1)]
    files: list[Path] = []
    for s, (source, count) in enumerate(plan):
        series_uid = str(generate_uid())
        for n in range(count):
            path = tmp_path / f"s{s}_{n}.dcm"
            files.append(
                _site_instance(source, path, study_uid=study_uid, series_uid=series_uid, number=n + 1)
            )
    _ingest(ctx, files, MODALITY, MODALITY.name)
    stored: dict[str, set[str]] = {}
    images: set[str] = set()
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        stored.setdefault(str(ds.SeriesInstanceUID), set()).add(str(ds.SOPInstanceUID))
        if "Rows" in ds:
            images.add(str(ds.SOPInstanceUID))
    try:
        yield Exam(ctx, study_uid, stored, images, tmp_path)
    finally:
        ctx.db.dispose()


def _content(exam: Exam) -> ManifestContent:
    with exam.ctx.db.reading() as session:
        return manifest_content(
            session,
            exam.study_uid,
            patient=PATIENT,
            order=ORDER,
            retrieve_base_url=BASE_URL + "/",
            institution_name="CH A",
        )


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    if not VALIDATE.is_file():
        pytest.fail(f"conformance kit not found at {CONFORMANCE_DIR} (set SIMRAL_CONFORMANCE_DIR)")
    return subprocess.run(
        [sys.executable, str(VALIDATE), "kos", str(path)], capture_output=True, text=True, timeout=120
    )


def _write(dataset: Dataset, path: Path) -> Path:
    path.write_bytes(manifest_bytes(dataset))
    return path


def test_manifest_lists_every_instance_and_passes_the_kit(exam: Exam) -> None:
    kos = build_manifest(_content(exam), version=1, created=CREATED)

    assert kos.SOPClassUID == KOS_SOP_CLASS and kos.Modality == "KO"
    assert kos.StudyInstanceUID == exam.study_uid
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == ("113030", "DCM", "Manifest")
    # Patient ID = INS, issuer ASIP-SANTE-INS-NIR, qualifiers = INS OID, type ISO (DESIGN.md §6).
    assert (kos.PatientID, kos.IssuerOfPatientID) == (NIR, "ASIP-SANTE-INS-NIR")
    qualifiers = kos.IssuerOfPatientIDQualifiersSequence[0]
    assert (qualifiers.UniversalEntityID, qualifiers.UniversalEntityIDType) == (INS_TEST_OID, "ISO")
    assert str(kos.PatientName) == "PAT-TROIS^Dominique Marie"
    assert (str(kos.PatientBirthDate), kos.PatientSex) == ("19790328", "F")
    # Referenced Request Sequence: accession + issuer, placer order + issuer.
    request = kos.ReferencedRequestSequence[0]
    assert request.StudyInstanceUID == exam.study_uid
    assert request.AccessionNumber == ORDER.accession_number
    assert request.IssuerOfAccessionNumberSequence[0].UniversalEntityID == ACCESSION_OID
    assert request.PlacerOrderNumberImagingServiceRequest == ORDER.placer_number
    assert request.OrderPlacerIdentifierSequence[0].UniversalEntityID == PLACER_OID
    assert request.RequestedProcedureDescription == ORDER.requested_procedure_description
    # Evidence: one study, each series with its WADO-RS Retrieve URL and every stored instance.
    (study_item,) = kos.CurrentRequestedProcedureEvidenceSequence
    assert study_item.StudyInstanceUID == exam.study_uid
    urls = {item.SeriesInstanceUID: item.RetrieveURL for item in study_item.ReferencedSeriesSequence}
    assert urls == {
        series: f"{BASE_URL}/dicom-web/studies/{exam.study_uid}/series/{series}" for series in exam.stored
    }
    assert manifest_references(kos) == exam.stored
    # Content: one IMAGE item per image, a COMPOSITE item for the RT Plan, nothing else.
    items = [item for item in kos.ContentSequence if item.ValueType in ("IMAGE", "COMPOSITE")]
    by_type: dict[str, set[str]] = {"IMAGE": set(), "COMPOSITE": set()}
    for item in items:
        by_type[item.ValueType].add(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    assert by_type["IMAGE"] == exam.images
    assert by_type["COMPOSITE"] == set().union(*exam.stored.values()) - exam.images
    assert len(items) == sum(len(sops) for sops in exam.stored.values())
    # Identity of this version.
    sop_uid, series_uid = manifest_uids(exam.study_uid, 1)
    assert (kos.SOPInstanceUID, kos.SeriesInstanceUID, kos.InstanceNumber) == (sop_uid, series_uid, 1)
    assert (str(kos.ContentDate), str(kos.ContentTime)) == ("20260302", "101500")

    path = _write(kos, exam.tmp / "manifest.dcm")
    checked = _validate(path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "[KOS] DRIM-M structural checks: PASS" in checked.stdout
    assert "[FAIL]" not in checked.stdout
    iod = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    report = iod.stdout + iod.stderr
    assert not re.findall(r"^Error", report, re.MULTILINE), report


def test_stored_through_ingest_versions_and_retry(exam: Exam) -> None:
    first = build_manifest(_content(exam), version=1, created=CREATED)
    assert store_manifest(exam.ctx, first, organisation_code="CHA") == "stored"
    # A retried job rebuilds the same version: same bytes, a duplicate, no second instance.
    again = build_manifest(_content(exam), version=1, created=CREATED)
    assert manifest_bytes(again) == manifest_bytes(first)
    assert store_manifest(exam.ctx, again, organisation_code="CHA") == "duplicate"
    # Version 2 (the stored version 1 is not listed in it): another instance of the same series.
    content = _content(exam)
    assert manifest_references(first) == dict(content.references)
    second = build_manifest(content, version=2, created=CREATED.replace(hour=11))
    assert store_manifest(exam.ctx, second, organisation_code="CHA") == "stored"
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.SeriesInstanceUID == first.SeriesInstanceUID

    with exam.ctx.db.reading() as session:
        rows = session.execute(
            select(
                Instance.sop_uid, Instance.sop_class_uid, Instance.source, Instance.instance_number, Blob.key
            )
            .join(Blob, Blob.instance_pk == Instance.id)
            .join(Series, Series.id == Instance.series_pk)
            .where(Series.series_uid == first.SeriesInstanceUID)
            .order_by(Instance.instance_number)
        ).all()
        same_uid = select(func.count(Instance.id)).where(Instance.sop_uid == first.SOPInstanceUID)
        total = session.scalar(same_uid)
    assert total == 1
    assert [(r.sop_uid, r.sop_class_uid, r.source, r.instance_number) for r in rows] == [
        (first.SOPInstanceUID, KOS_SOP_CLASS, MANIFEST_PUBLISHER, 1),
        (second.SOPInstanceUID, KOS_SOP_CLASS, MANIFEST_PUBLISHER, 2),
    ]
    with archive.open_blob(exam.ctx, rows[1].key) as stream:
        read_back = dcmread(stream)
    assert manifest_references(read_back) == exam.stored
    assert (read_back.PatientID, read_back.IssuerOfPatientID) == (NIR, "ASIP-SANTE-INS-NIR")
    # Named by INS, the manifest joins the study's patient (held under the site's IPP): no second
    # patient row, no patient-mismatch warning for identity vigilance.
    with exam.ctx.db.reading() as session:
        assert session.scalar(select(func.count(Patient.id)).where(Patient.patient_id == NIR)) == 0
        assert session.scalar(select(func.count(Patient.id))) == 1
        mismatch = select(func.count(AuditEvent.id)).where(AuditEvent.action == "study.patient-mismatch")
        assert session.scalar(mismatch) == 0


def _report_pdf(exam: Exam) -> Path:
    """The Encapsulated PDF of a report as simral's report publication stores it."""
    header = dcmread(next(exam.tmp.glob("s0_*.dcm")), stop_before_pixels=True)
    pdf = render_pdf(
        ReportPdf(
            title="Compte rendu d'imagerie médicale",
            organisation="CH A",
            patient_line="Patient : PAT-TROIS Dominique",
            exam_line="Examen du 02/03/2026",
            author_line="Signé",
            sections=[("Conclusion", "Pas d'anomalie.")],
        ),
        created=CREATED,
    )
    dataset = encapsulated_pdf(
        pdf,
        header,
        EncapsulatedPdfIdentity(
            sop_instance_uid=str(generate_uid()),
            series_instance_uid=str(generate_uid()),
            document_title="Compte rendu d'imagerie médicale v1",
            created=CREATED,
        ),
    )
    path = exam.tmp / "report.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def _rejection_note(exam: Exam, rejected: str) -> Path:
    """An IHE IOCM rejection note (KOS titled 113001) for one stored MR slice, as a modality sends it."""
    source = next(p for p in exam.tmp.glob("s1_*.dcm") if str(dcmread(p).SOPInstanceUID) == rejected)
    image = dcmread(source)
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=[image],
        content=hd.ko.KeyObjectSelection(
            document_title=codes.DCM.RejectedForQualityReasons, referenced_objects=[image]
        ),
        series_instance_uid=str(generate_uid()),
        series_number=99,
        sop_instance_uid=str(generate_uid()),
        instance_number=1,
        manufacturer="Modalité",
    )
    path = exam.tmp / "rejection.dcm"
    note.save_as(path, enforce_file_format=True)
    return path


def test_report_pdf_manifests_and_rejected_instances_are_left_out(exam: Exam) -> None:
    publisher = Principal(kind="system", name=REPORT_PUBLISHER, organisation="CHA", archive_wide=True)
    _ingest(exam.ctx, [_report_pdf(exam)], publisher, REPORT_PUBLISHER)
    (mr_series,) = {str(dcmread(p).SeriesInstanceUID) for p in exam.tmp.glob("s1_*.dcm")}
    rejected = sorted(exam.stored[mr_series])[0]
    _ingest(exam.ctx, [_rejection_note(exam, rejected)], MODALITY, MODALITY.name)
    first = build_manifest(_content(exam), version=1, created=CREATED)
    store_manifest(exam.ctx, first, organisation_code="CHA")

    references = manifest_references(build_manifest(_content(exam), version=2, created=CREATED))
    expected = {series: set(sops) for series, sops in exam.stored.items()}
    expected[mr_series].discard(rejected)
    assert references == expected


def test_a_manifest_missing_a_series_fails_the_kit(exam: Exam) -> None:
    kos = build_manifest(_content(exam), version=1, created=CREATED)
    series_items = kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    dropped = series_items.pop(0)
    assert set(manifest_references(kos)) == set(exam.stored) - {dropped.SeriesInstanceUID}
    # The content still lists the dropped series' instances: they are no longer in the evidence.
    checked = _validate(_write(kos, exam.tmp / "broken.dcm"))
    assert checked.returncode == 1, checked.stdout
    assert "[FAIL] Content Sequence references" in checked.stdout
    # A series without its Retrieve URL fails too.
    kos = build_manifest(_content(exam), version=1, created=CREATED)
    del kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].RetrieveURL
    checked = _validate(_write(kos, exam.tmp / "no-url.dcm"))
    assert checked.returncode == 1 and re.search(r"\[FAIL\] series .*Retrieve URL \(None\)", checked.stdout)


def test_nothing_to_list_or_no_ins_is_refused(exam: Exam) -> None:
    with exam.ctx.db.reading() as session:
        with pytest.raises(ManifestError, match="not in the archive"):
            manifest_content(
                session, str(generate_uid()), patient=PATIENT, order=ORDER, retrieve_base_url=BASE_URL
            )
        with pytest.raises(ManifestError, match="INS"):
            manifest_content(
                session,
                exam.study_uid,
                patient=ManifestPatient("", "", "X", "Y", "", ""),
                order=ORDER,
                retrieve_base_url=BASE_URL,
            )
