"""De-identified export (PS3.15 Annex E) checked against an independent Table E.1-1.

simral's action table comes from ``dicom-anonymizer`` (KitwareMedical) and its own option columns;
the reference here is the ``dicom-standard`` package's ``confidentiality_profile_attributes.json``
(innolitics' parse of PS3.15, another source). Instances rich in identifying information (pydicom's
CT, MR and RT Dose test files with names, dates, institution, device, descriptions, private tags,
nested sequences and cross-instance references added) are imported into a real simral, exported
with ``simral export --deidentify`` for each option set, and every reference row whose attribute
is in the input is checked against its action in the output. ``dciodvfy`` finds no error the input
did not have; pixel data are unchanged; the pseudonym map reads back for the exporter only.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import generate_uid
from tests.simral_proc import SimralProcess

DCIODVFY = "/usr/bin/dciodvfy"
REFERENCE = Path(sys.prefix) / "standard" / "confidentiality_profile_attributes.json"

#: Identifying words put into the instances; none may survive anywhere in a de-identified output
#: (except where an option retains the attribute that carries it).
PHI = ["DUPONT", "Jean", "MOREAU", "IPP123456", "1620312345678", "MARTIN", "DURAND", "ACC0001", "19620312"]
#: Option set → (``simral export`` flags, reference column, CID 7050 code).
OPTION_SETS: dict[str, tuple[list[str], str | None, str | None]] = {
    "basic": ([], None, None),
    "retain-dates": (["--retain-dates"], "rtnLongFullDatesOpt", "113106"),
    "retain-uids": (["--retain-uids"], "rtnUIDsOpt", "113110"),
    "clean-descriptors": (["--clean-descriptors"], "cleanDescOpt", "113105"),
}


# ------------------------------------------------------------------------------------------ corpus


def _text(tag: str, vr: str, value: Any) -> DataElement:
    return DataElement(Tag(tag), vr, value)


def _with_phi(ds: Dataset, *, study_uid: str, series_uid: str, sop_uid: str) -> Dataset:
    """Names, dates, identifiers, institution, device, descriptions, private and nested PHI."""
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.PatientName = "DUPONT^JEAN"
    ds.PatientID = "IPP123456"
    ds.IssuerOfPatientID = "HOPITAL-A"
    ds.PatientBirthDate = "19620312"
    ds.PatientSex = "M"
    ds.PatientAge = "063Y"
    ds.PatientWeight = "81"
    ds.PatientAddress = "12 rue des Lilas, 75010 Paris"
    ds.PatientTelephoneNumbers = "0612345678"
    ds.OtherPatientIDs = "1620312345678"
    other = Dataset()
    other.PatientID = "1620312345678"
    other.IssuerOfPatientID = "ASIP-SANTE-INS-NIR"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20250114"
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "101500"
    ds.InstanceCreationDate, ds.InstanceCreationTime = "20250114", "101700"
    ds.AccessionNumber = "ACC0001"
    ds.StudyID = "STUDY42"
    ds.ReferringPhysicianName = "MARTIN^PAUL"
    ds.PerformingPhysicianName = "LEROY^CLAIRE"
    ds.OperatorsName = "DURAND^ANNE"
    ds.InstitutionName = "Hopital Saint-Louis"
    ds.InstitutionAddress = "1 avenue Claude Vellefaux, Paris"
    ds.InstitutionalDepartmentName = "Radiologie"
    ds.StationName = "CTROOM7"
    ds.DeviceSerialNumber = "SN998877"
    ds.StudyDescription = "Scanner thorax DUPONT 12/03/1962"
    ds.SeriesDescription = "Thorax IPP123456 injection"
    ds.ImageComments = "patient Jean DUPONT, controle"
    ds.ProtocolName = "Thorax DUPONT"
    ds.AdditionalPatientHistory = "Suivi nodule, MARTIN"
    request = Dataset()
    request.RequestedProcedureID = "RP777"
    request.ScheduledProcedureStepID = "SPS777"
    request.ScheduledProcedureStepDescription = "Thorax pour DUPONT"
    ds.RequestAttributesSequence = Sequence([request])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study_ref.ReferencedSOPInstanceUID = study_uid
    ds.ReferencedStudySequence = Sequence([study_ref])
    ds.AcquisitionDateTime = "20250114101500"
    ds.PerformedProcedureStepStartDate = "20250114"
    ds.PerformedProcedureStepDescription = "Thorax DUPONT"
    ds.AcquisitionDeviceProcessingDescription = "Lung IPP123456"
    ds.DetectorID = "DET-4455"
    ds.IrradiationEventUID = generate_uid()
    ds.Occupation = "Boulanger"
    ds.MedicalAlerts = "Allergie iode (DUPONT)"
    ds.ClinicalTrialSponsorName = "CHU Paris"
    ds.ClinicalTrialProtocolID = "PROTO-9"
    ds.ClinicalTrialProtocolName = "Etude poumon"
    ds.ClinicalTrialSiteID = "SITE1"
    ds.ClinicalTrialSiteName = "Saint-Louis"
    ds.ClinicalTrialSubjectID = "SUBJ-0042"
    ds.add_new(0x00110010, "LO", "SIMRAL TEST PRIVATE")
    ds.add_new(0x00111001, "LO", "DUPONT^JEAN private copy")
    ds.add_new(0x00111002, "SH", "IPP123456")
    return ds


def _reference(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    return item


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclass
class Corpus:
    paths: list[Path]
    #: Instances of the same patient (CT, CT, MR) and of another (RT Dose).
    ct1: Path
    ct2: Path
    mr: Path
    rt: Path
    plan: Path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    base = tmp_path_factory.mktemp("deid-corpus")
    ct_study, ct_series, mr_study = generate_uid(), generate_uid(), generate_uid()
    ct1_uid, ct2_uid, mr_uid = generate_uid(), generate_uid(), generate_uid()
    ct1 = _with_phi(
        dcmread(pydicom.data.get_testdata_file("CT_small.dcm")),
        study_uid=ct_study,
        series_uid=ct_series,
        sop_uid=ct1_uid,
    )
    ct1.InstanceNumber = 1
    ct2 = _with_phi(
        dcmread(pydicom.data.get_testdata_file("CT_small.dcm")),
        study_uid=ct_study,
        series_uid=ct_series,
        sop_uid=ct2_uid,
    )
    ct2.InstanceNumber = 2
    # References across instances: the second CT points at the first and at the MR.
    ct2.ReferencedImageSequence = Sequence([_reference(ct1.SOPClassUID, ct1_uid)])
    ct2.SourceImageSequence = Sequence([_reference("1.2.840.10008.5.1.4.1.1.4", mr_uid)])
    # An overlay plane with its comments.
    ct2.add_new(0x60000010, "US", 128)
    ct2.add_new(0x60000011, "US", 128)
    ct2.add_new(0x60000040, "CS", "G")
    ct2.add_new(0x60000050, "SS", [1, 1])
    ct2.add_new(0x60000100, "US", 1)
    ct2.add_new(0x60000102, "US", 0)
    ct2.add_new(0x60003000, "OW", b"\x00" * (128 * 128 // 8))
    ct2.add_new(0x60004000, "LT", "annotation by DURAND")
    mr = _with_phi(
        dcmread(pydicom.data.get_testdata_file("MR_small.dcm")),
        study_uid=mr_study,
        series_uid=generate_uid(),
        sop_uid=mr_uid,
    )
    mr.FrameOfReferenceUID = ct1.FrameOfReferenceUID  # same frame of reference as the CTs
    rt = dcmread(pydicom.data.get_testdata_file("rtdose.dcm"))
    rt.StudyInstanceUID, rt.SeriesInstanceUID = generate_uid(), generate_uid()
    rt.SOPInstanceUID = rt.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    rt.PatientName, rt.PatientID, rt.PatientBirthDate = "MOREAU^LUC", "IPP999", "19500101"
    rt.InstanceNumber = 1  # empty in the test file: a DICOMDIR RT DOSE record needs it
    rt.InstitutionName = "Centre Oscar Lambret"
    rt.StudyDescription = "Dosimetrie MOREAU"
    plan = dcmread(pydicom.data.get_testdata_file("rtplan.dcm"))
    plan.StudyInstanceUID, plan.SeriesInstanceUID = rt.StudyInstanceUID, generate_uid()
    plan.SOPInstanceUID = plan.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    plan.PatientName, plan.PatientID, plan.PatientBirthDate = "MOREAU^LUC", "IPP999", "19500101"
    plan.InstanceNumber = 1
    plan.RTPlanLabel, plan.RTPlanName = "Plan MOREAU", "Poumon MOREAU"
    plan.OperatorsName = "DURAND^ANNE"
    rt.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID = plan.SOPInstanceUID
    paths = [
        _save(ct1, base / "in" / "ct1.dcm"),
        _save(ct2, base / "in" / "ct2.dcm"),
        _save(mr, base / "in" / "mr.dcm"),
        _save(rt, base / "in" / "rt.dcm"),
        _save(plan, base / "in" / "plan.dcm"),
    ]
    return Corpus(paths, *paths)


# --------------------------------------------------------------------------------------- reference


@dataclass(frozen=True)
class Row:
    name: str
    tag: int
    basic: str
    options: dict[str, str]

    def action(self, column: str | None) -> str:
        return self.options.get(column, self.basic) if column else self.basic


def reference_table() -> tuple[list[Row], list[dict[str, Any]]]:
    """(rows with a single tag, the masked rows: curves, overlays, private groups)."""
    rows, masked = [], []
    for entry in json.loads(REFERENCE.read_text()):
        match = re.fullmatch(r"\(([0-9A-F]{4}),([0-9A-F]{4})\)", entry["tag"])
        if match is None:
            masked.append(entry)
            continue
        options = {k: v for k, v in entry.items() if k.endswith("Opt")}
        rows.append(Row(entry["name"], int(match[1] + match[2], 16), entry["basicProfile"], options))
    return rows, masked


def test_the_reference_is_the_independent_table() -> None:
    rows, masked = reference_table()
    assert len(rows) > 400 and {row.basic for row in rows} >= {"X", "Z", "D", "U", "X/Z", "X/D", "X/Z/D"}
    assert {entry["tag"] for entry in masked} >= {"(50XX,XXXX)", "(60XX,3000)", "(60XX,4000)"}


# ------------------------------------------------------------------------------------------ checks


def _uids_in(elem: DataElement) -> list[str]:
    if elem.VR == "UI":
        return [str(v) for v in (elem.value if isinstance(elem.value, list | tuple) else [elem.value]) if v]
    if elem.VR == "SQ":
        return [str(e.value) for item in elem.value for e in item.iterall() if e.VR == "UI" and e.value]
    return []


def _instance_uids_in(elem: DataElement) -> list[str]:
    return [str(e.value) for item in elem.value for e in item.iterall() if e.keyword.endswith("InstanceUID")]


def _is_uid(value: str) -> bool:
    return bool(re.fullmatch(r"(0|[1-9]\d*)(\.(0|[1-9]\d*))+", value)) and len(value) <= 64


def _empty(elem: DataElement) -> bool:
    return elem.VM == 0 or elem.value in (None, "", b"") or (elem.VR == "SQ" and len(elem.value) == 0)


def _texts(elem: DataElement) -> str:
    if elem.VR == "SQ":
        return " ".join(str(e.value) for item in elem.value for e in item.iterall() if e.VR != "SQ")
    return str(elem.value)


def _has_phi(text: str) -> list[str]:
    return [word for word in PHI if word.lower() in text.lower()]


def check_row(row: Row, action: str, before: Dataset, after: Dataset, uid_map: dict[str, str]) -> str | None:
    """Why ``after`` breaks ``action`` for ``row``, or None."""
    original = before[row.tag]
    elem = after.get(row.tag)
    present = elem is not None
    anywhere = any(e.tag == row.tag for e in after.iterall())
    changed = present and (elem.value != original.value or _empty(original))
    if row.tag in (0x00100010, 0x00100020):  # Patient's Name and ID: the export's pseudonym
        return None if present and not _empty(elem) and changed else "no pseudonym"
    if action == "X":
        return "still present" if anywhere else None
    if action == "K":
        if not present:
            return "removed"
        if elem.VR == "SQ":
            return None if len(elem.value) == len(original.value) else "items lost"
        return None if elem.value == original.value else f"changed to {elem.value!r}"
    if action == "C":
        if present and _has_phi(_texts(elem)):
            return f"not cleaned: {_texts(elem)!r}"
        return None
    if action == "U":
        if not present:
            return "removed"
        new, old = _uids_in(elem), _uids_in(original)
        if not all(_is_uid(uid) for uid in new):
            return f"invalid UID {new}"
        if new != [uid_map.get(uid) for uid in old] or set(new) & set(old):
            return f"{old} → {new}: not the export's consistent replacement"
        return None
    if action == "X/Z/U*":
        if not present or _empty(elem):
            return None
        # Kept: the instance UIDs it references replaced by the export's (SOP classes stay).
        new, old = _instance_uids_in(elem), _instance_uids_in(original)
        if not all(_is_uid(uid) for uid in new) or new != [uid_map.get(uid) for uid in old]:
            return f"instance UIDs not replaced: {old} → {new}"
        return None
    dummy_ok = present and not _empty(elem) and changed and not _has_phi(str(elem.value))
    if action == "D":
        return None if dummy_ok or (elem is not None and elem.VR == "SQ" and present) else "no dummy"
    if action in ("Z", "Z/D"):
        if not present:
            return "removed (Z keeps the attribute)"
        return None if _empty(elem) or dummy_ok else f"kept {elem.value!r}"
    if action in ("X/Z", "X/D", "X/Z/D"):
        return None if not present or _empty(elem) or dummy_ok else f"kept {elem.value!r}"
    return f"unknown action {action}"


def _normalised_errors(path: Path) -> set[str]:
    """dciodvfy's errors with UIDs masked (a replaced UID is the same finding)."""
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120, check=False)
    lines = (result.stdout + result.stderr).splitlines()
    return {re.sub(r"\d+(\.\d+){2,}", "<UID>", line) for line in lines if line.startswith("Error")}


# ------------------------------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def simral(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> SimralProcess:
    process = SimralProcess(tmp_path_factory.mktemp("deid-simral") / "data")
    process.cli("import", *(str(p) for p in corpus.paths))
    return process


def _study_uids(corpus: Corpus) -> list[str]:
    return sorted({str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in corpus.paths})


def _export_map(simral: SimralProcess, printed: str) -> dict[str, Any]:
    match = re.search(r"de-identified export (\d+)", printed)
    assert match, printed
    shown = simral.cli("deidentified-exports", "show", match[1], "--data-dir", str(simral.data_dir)).stdout
    return dict(json.loads(shown))


@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_deidentified_export_follows_table_e1_1(
    option_set: str, corpus: Corpus, simral: SimralProcess, tmp_path: Path
) -> None:
    flags, column, code = OPTION_SETS[option_set]
    target = tmp_path / "deid.zip"
    printed = simral.cli(
        "export", *_study_uids(corpus), "--deidentify", *flags, "--output", str(target)
    ).stdout
    assert f"{len(corpus.paths)} instances of 3 studies" in printed, printed
    document = _export_map(simral, printed)
    assert document["options"] == [flag.removeprefix("--").replace("-", "_") for flag in flags]
    uid_map: dict[str, str] = document["pseudonym_map"]["uids"]
    patients = {p["original_id"]: p for p in document["pseudonym_map"]["patients"]}
    assert set(patients) == {"IPP123456", "IPP999"}

    media = tmp_path / "media"
    with zipfile.ZipFile(target) as archive:
        archive.extractall(media)
        names = [n for n in archive.namelist() if n not in ("DICOMDIR", "README.TXT")]
    assert _normalised_errors(media / "DICOMDIR") == set()
    readme = (media / "README.TXT").read_text()
    assert "PS3.15" in readme and not _has_phi(readme)

    # Pair each output with its input: by the map (or unchanged UIDs with Retain UIDs).
    inputs = {str(dcmread(p).SOPInstanceUID): p for p in corpus.paths}
    by_new = {uid_map.get(uid, uid): uid for uid in inputs}
    outputs: dict[str, Path] = {}
    for name in names:
        outputs[by_new[str(dcmread(media / name, stop_before_pixels=True).SOPInstanceUID)]] = media / name
    assert set(outputs) == set(inputs)

    rows, _ = reference_table()
    failures: list[str] = []
    checked: set[str] = set()
    after_of: dict[str, Dataset] = {}
    for old_uid, source in inputs.items():
        before, after = dcmread(source), dcmread(outputs[old_uid])
        after_of[old_uid] = after
        for row in rows:
            if row.tag not in before:
                continue
            action = row.action(column)
            problem = check_row(row, action, before, after, uid_map)
            checked.add(row.name)
            if problem:
                failures.append(f"{source.name}: {row.name} ({row.tag:08X}) [{action}]: {problem}")
        # Whole-table rows: private groups, curves, overlay data and comments.
        leftovers = [e.tag for e in after.iterall() if e.tag.is_private or (e.tag.group & 0xFF00) == 0x5000]
        leftovers += [e.tag for e in after if (e.tag.group & 0xFF00) == 0x6000]
        if leftovers:
            failures.append(f"{source.name}: private, curve or overlay attributes left: {leftovers}")
        # Pixel data identical, identification replaced, de-identification recorded.
        if "PixelData" in before:
            assert after.PixelData == before.PixelData
        assert after.PatientIdentityRemoved == "YES"
        assert [c.CodeValue for c in after.DeidentificationMethodCodeSequence] == ["113100"] + (
            [code] if code else []
        )
        assert after.LongitudinalTemporalInformationModified == (
            "UNMODIFIED" if option_set == "retain-dates" else "REMOVED"
        )
        pseudonym = patients[str(before.PatientID)]
        assert (after.PatientID, str(after.PatientName)) == (
            pseudonym["patient_id"],
            pseudonym["patient_name"],
        )
        text = " ".join(str(e.value) for e in after.iterall() if e.VR not in ("SQ", "OB", "OW", "UN"))
        assert not _has_phi(text), f"{source.name}: identifying text left: {_has_phi(text)}"
        # dciodvfy: no error that the input did not already have.
        new_errors = _normalised_errors(outputs[old_uid]) - _normalised_errors(source)
        assert not new_errors, f"{source.name}: new dciodvfy errors {sorted(new_errors)}"
    assert not failures, "\n".join(failures)
    # The rows the corpus exercises (names, dates, UIDs, institution, device, descriptions...).
    assert len(checked) >= 45, sorted(checked)

    # UIDs consistent across instances and references (or all kept with Retain UIDs).
    ct1, ct2, mr = (after_of[str(dcmread(p).SOPInstanceUID)] for p in (corpus.ct1, corpus.ct2, corpus.mr))
    assert ct1.StudyInstanceUID == ct2.StudyInstanceUID
    if "ReferencedStudySequence" in ct2:  # X/Z: removed, unless Retain UIDs keeps it
        assert ct2.ReferencedStudySequence[0].ReferencedSOPInstanceUID == ct1.StudyInstanceUID
    assert ct1.SeriesInstanceUID == ct2.SeriesInstanceUID
    assert mr.FrameOfReferenceUID == ct1.FrameOfReferenceUID
    assert ct2.ReferencedImageSequence[0].ReferencedSOPInstanceUID == ct1.SOPInstanceUID
    assert ct2.SourceImageSequence[0].ReferencedSOPInstanceUID == mr.SOPInstanceUID
    assert (ct1.StudyInstanceUID == dcmread(corpus.ct1).StudyInstanceUID) == (option_set == "retain-uids")
    rt, plan = (after_of[str(dcmread(p).SOPInstanceUID)] for p in (corpus.rt, corpus.plan))
    assert rt.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
    assert rt.StudyInstanceUID == plan.StudyInstanceUID and rt.PatientID == plan.PatientID
    if option_set == "clean-descriptors":  # kept, with the identifying words taken out
        assert (ct1.StudyDescription, ct1.SeriesDescription) == ("Scanner thorax", "Thorax injection")
        assert (ct1.ProtocolName, plan.RTPlanLabel, plan.RTPlanName) == ("Thorax", "Plan", "Poumon")
    # One pseudonym per patient.
    assert ct1.PatientID == mr.PatientID != after_of[str(dcmread(corpus.rt).SOPInstanceUID)].PatientID

    trail = simral.cli("audit", "search", "--action", "study.export-deidentified", "--limit", "200").stdout
    assert trail.count("study.export-deidentified") >= 3


def test_pseudonym_map_follows_the_access_policy(corpus: Corpus, simral: SimralProcess) -> None:
    simral.cli("organisations", "add", "OTHER", "--name", "Autre site")
    simral.cli(
        "users", "add", "tech_other", "--organisation", "OTHER", "--role", "technologist",
        "--password-stdin", input="Autre-Site-2026!x\n",
    )  # fmt: skip
    study_uid = str(dcmread(corpus.ct1, stop_before_pixels=True).StudyInstanceUID)
    with simral:
        url = f"{simral.http_url}/studies/{study_uid}/export.zip"
        outsider = {"Authorization": f"Bearer {simral.token_for('tech_other')}"}
        params = {"deidentify": "1", "retain_dates": "1", "clean_descriptors": "1"}
        assert httpx.get(url, params=params, headers=outsider, timeout=60).status_code == 404
        response = httpx.get(url, params=params, headers=simral.auth_headers, timeout=120)
        assert response.status_code == 200, response.text
        export_id = response.headers["x-simral-deidentified-export"]
        download = Path(simral.data_dir.parent / "api-deid.zip")
        download.write_bytes(response.content)
        with zipfile.ZipFile(download) as archive:
            images = [n for n in archive.namelist() if n not in ("DICOMDIR", "README.TXT")]
            assert len(images) == 2
            with archive.open(images[0]) as fh:
                ds = dcmread(fh)
        assert ds.StudyDate == "20250114" and ds.PatientIdentityRemoved == "YES"
        assert "thorax" in str(ds.StudyDescription).lower() and not _has_phi(str(ds.StudyDescription))

        map_url = f"{simral.http_url}/deidentified-exports/{export_id}"
        mine = httpx.get(map_url, headers=simral.auth_headers, timeout=30)
        assert mine.status_code == 200
        document = mine.json()
        assert document["created_by"] == "user:tester"
        assert document["options"] == ["clean_descriptors", "retain_dates"]
        assert document["pseudonym_map"]["patients"][0]["original_id"] == "IPP123456"
        assert study_uid in document["pseudonym_map"]["uids"]
        assert httpx.get(map_url, headers=outsider, timeout=30).status_code == 404
        assert httpx.get(f"{simral.http_url}/deidentified-exports/999999", headers=simral.auth_headers,
                         timeout=30).status_code == 404  # fmt: skip
    # The CLI operator (an administrator of the platform) reads it too; reading is audited.
    shown = json.loads(
        simral.cli("deidentified-exports", "show", export_id, "--data-dir", str(simral.data_dir)).stdout
    )
    assert shown["id"] == int(export_id)
    trail = simral.cli("audit", "search", "--action", "deidentified-export.read", "--limit", "50").stdout
    assert "deidentified-export.read" in trail


def test_export_options_need_deidentify(corpus: Corpus, simral: SimralProcess, tmp_path: Path) -> None:
    result = simral.cli(
        "export", _study_uids(corpus)[0], "--retain-dates", "--output", str(tmp_path / "x.zip"), check=False
    )
    assert result.returncode == 2 and not (tmp_path / "x.zip").exists()


def test_file_meta_and_private_creators_are_gone(corpus: Corpus) -> None:
    """Unit-level: the library call used by the export, on one data set."""
    from simral.sharing.deidentify import Deidentifier, DeidentifyOptions

    ds = dcmread(corpus.ct1)
    ds.file_meta = FileMetaDataset(ds.file_meta)
    ds.file_meta.SourceApplicationEntityTitle = "HOPITAL_A_CT"
    deidentifier = Deidentifier(DeidentifyOptions())
    out = deidentifier.apply(ds)
    assert "SourceApplicationEntityTitle" not in out.file_meta
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert not [e for e in out.iterall() if e.tag.is_private]
    assert deidentifier.new_uid("1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"
