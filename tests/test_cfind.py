"""C-FIND matching with dcmtk findscu (PS3.4 C.2.2.2 matching, C.6 information models).

A small synthetic archive with known attributes; every query's matches are compared with the set
computed here from the same definitions.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from tests.conftest import BACKENDS, backend_env
from tests.simral_proc import SimralProcess

SCU = "FINDSCU"


@dataclass(frozen=True)
class StudySpec:
    key: str
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    date: str
    time: str
    accession: str
    description: str
    modalities: tuple[str, ...]


STUDIES = [
    StudySpec(
        "S1", "P1", "DUPONT^Jean", "19600101", "M", "20240110", "083000", "A1", "CT THORAX", ("CT", "SR")
    ),
    StudySpec("S2", "P1", "DUPONT^Jean", "19600101", "M", "20240215", "101500", "A22", "IRM GENOU", ("MR",)),
    StudySpec(
        "S3", "P2", "Dupond^Marie", "19751212", "F", "20231105", "235959", "B3", "THORAX FACE", ("CR",)
    ),
    StudySpec(
        "S4", "P3", "MARTIN^Paul", "20010303", "M", "20240110", "143000", "A4", "TEP TDM", ("CT", "PT")
    ),
    StudySpec("S5", "P4", "martinez^Ana", "19900420", "F", "20250701", "090000", "C5", "ECHO", ("US",)),
]
INSTANCES_PER_SERIES = 2


def _uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=["simral-cfind", *parts])


def study_uid(key: str) -> str:
    return _uid(key)


def series_uid(key: str, modality: str) -> str:
    return _uid(key, modality)


def write_corpus(folder: Path) -> list[Path]:
    paths = []
    for spec in STUDIES:
        for series_number, modality in enumerate(spec.modalities, start=1):
            for number in range(1, INSTANCES_PER_SERIES + 1):
                ds = Dataset()
                ds.SpecificCharacterSet = "ISO_IR 100"
                ds.SOPClassUID = SecondaryCaptureImageStorage
                ds.SOPInstanceUID = _uid(spec.key, modality, str(number))
                ds.StudyInstanceUID = study_uid(spec.key)
                ds.SeriesInstanceUID = series_uid(spec.key, modality)
                ds.PatientID = spec.patient_id
                ds.PatientName = spec.patient_name
                ds.PatientBirthDate = spec.birth_date
                ds.PatientSex = spec.sex
                ds.StudyDate = spec.date
                ds.StudyTime = spec.time
                ds.AccessionNumber = spec.accession
                ds.StudyDescription = spec.description
                ds.StudyID = spec.key
                ds.ReferringPhysicianName = "REF^Doc"
                ds.Modality = modality
                ds.SeriesNumber = series_number
                ds.SeriesDescription = f"{modality} series"
                ds.InstanceNumber = number
                ds.ConversionType = "WSD"
                ds.file_meta = FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                path = folder / f"{ds.SOPInstanceUID}.dcm"
                ds.save_as(path, enforce_file_format=True)
                paths.append(path)
    return paths


@pytest.fixture(scope="module", params=BACKENDS)
def simral(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimralProcess]:
    base = tmp_path_factory.mktemp(f"cfind-{request.param}")
    corpus = base / "corpus"
    corpus.mkdir()
    files = write_corpus(corpus)
    server = SimralProcess(base / "data", env=backend_env(request.param, request))
    server.add_node("findscu", SCU, 104)
    with server:
        result = subprocess.run(
            [
                "/usr/bin/dcmsend",
                "-aet",
                SCU,
                "-aec",
                server.ae_title,
                "127.0.0.1",
                str(server.dicom_port),
                *map(str, files),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        yield server


def find(
    simral: SimralProcess, tmp_path: Path, level: str, keys: dict[str, str], *, root: str = "-S"
) -> list[Dataset]:
    """Run findscu with -X and return the response identifiers."""
    out = tmp_path / f"q{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    args = [
        "/usr/bin/findscu",
        "-aet",
        SCU,
        "-aec",
        simral.ae_title,
        root,
        "-X",
        "-k",
        f"QueryRetrieveLevel={level}",
    ]
    for key, value in keys.items():
        args += ["-k", f"{key}={value}" if value != "" else key]
    args += ["127.0.0.1", str(simral.dicom_port)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=out, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def study_keys(responses: list[Dataset]) -> set[str]:
    by_uid = {study_uid(s.key): s.key for s in STUDIES}
    return {by_uid[str(r.StudyInstanceUID)] for r in responses}


STUDY_QUERIES: list[tuple[dict[str, str], set[str]]] = [
    ({}, {"S1", "S2", "S3", "S4", "S5"}),  # universal matching
    ({"PatientName": "DUP*"}, {"S1", "S2", "S3"}),  # wildcard, case-insensitive PN
    ({"PatientName": "dupont^jean"}, {"S1", "S2"}),  # single value, case-insensitive PN
    ({"PatientName": "MARTIN*"}, {"S4", "S5"}),
    ({"PatientName": "M?RTIN^PAUL"}, {"S4"}),  # '?' wildcard
    ({"PatientID": "P1"}, {"S1", "S2"}),
    ({"StudyDate": "20240110"}, {"S1", "S4"}),
    ({"StudyDate": "20240101-20240131"}, {"S1", "S4"}),  # closed range
    ({"StudyDate": "-20231231"}, {"S3"}),  # open start
    ({"StudyDate": "20240201-"}, {"S2", "S5"}),  # open end
    ({"StudyDate": "20240110", "StudyTime": "080000-120000"}, {"S1"}),  # time range
    ({"StudyTime": "-0900"}, {"S1", "S5"}),  # minute precision upper bound includes 09:00:00
    ({"AccessionNumber": "A?"}, {"S1", "S4"}),
    ({"AccessionNumber": "A*"}, {"S1", "S2", "S4"}),
    ({"StudyDescription": "*THORAX*"}, {"S1", "S3"}),
    ({"ModalitiesInStudy": "PT"}, {"S4"}),
    ({"ModalitiesInStudy": "CT"}, {"S1", "S4"}),
    ({"PatientSex": "F"}, {"S3", "S5"}),
    ({"PatientBirthDate": "19700101-19991231"}, {"S3", "S5"}),
    ({"StudyInstanceUID": f"{study_uid('S1')}\\{study_uid('S3')}"}, {"S1", "S3"}),  # UID list
    ({"StudyID": "S5"}, {"S5"}),  # not an indexed key: matched on the stored header
    ({"PatientName": "NOBODY*"}, set()),
]


@pytest.mark.parametrize(("keys", "expected"), STUDY_QUERIES, ids=[str(q[0]) for q in STUDY_QUERIES])
def test_study_level_matches(
    simral: SimralProcess, tmp_path: Path, keys: dict[str, str], expected: set[str]
) -> None:
    responses = find(
        simral, tmp_path, "STUDY", {**keys, "StudyInstanceUID": keys.get("StudyInstanceUID", "")}
    )
    assert study_keys(responses) == expected
    assert len(responses) == len(expected)


def test_study_return_keys(simral: SimralProcess, tmp_path: Path) -> None:
    responses = find(
        simral,
        tmp_path,
        "STUDY",
        {
            "PatientID": "P3",
            "StudyInstanceUID": "",
            "PatientName": "",
            "PatientBirthDate": "",
            "NumberOfStudyRelatedInstances": "",
            "NumberOfStudyRelatedSeries": "",
            "ModalitiesInStudy": "",
            "AccessionNumber": "",
            "StudyDescription": "",
        },
    )
    assert len(responses) == 1
    r = responses[0]
    assert str(r.PatientName) == "MARTIN^Paul"
    assert r.PatientBirthDate == "20010303"
    assert int(r.NumberOfStudyRelatedInstances) == 2 * INSTANCES_PER_SERIES
    assert int(r.NumberOfStudyRelatedSeries) == 2
    assert set(r.ModalitiesInStudy) == {"CT", "PT"}
    assert r.AccessionNumber == "A4"
    assert r.StudyDescription == "TEP TDM"
    # Only requested keys (plus the level's unique key and the SCP's own attributes).
    allowed = {
        "PatientID",
        "StudyInstanceUID",
        "PatientName",
        "PatientBirthDate",
        "NumberOfStudyRelatedInstances",
        "NumberOfStudyRelatedSeries",
        "ModalitiesInStudy",
        "AccessionNumber",
        "StudyDescription",
        "QueryRetrieveLevel",
        "RetrieveAETitle",
        "InstanceAvailability",
        "SpecificCharacterSet",
    }
    assert {e.keyword for e in r} <= allowed


def test_series_level(simral: SimralProcess, tmp_path: Path) -> None:
    s4 = study_uid("S4")
    responses = find(
        simral,
        tmp_path,
        "SERIES",
        {
            "StudyInstanceUID": s4,
            "SeriesInstanceUID": "",
            "Modality": "",
            "NumberOfSeriesRelatedInstances": "",
            "SeriesNumber": "",
        },
    )
    assert {(r.Modality, str(r.SeriesInstanceUID)) for r in responses} == {
        ("CT", series_uid("S4", "CT")),
        ("PT", series_uid("S4", "PT")),
    }
    assert all(int(r.NumberOfSeriesRelatedInstances) == INSTANCES_PER_SERIES for r in responses)
    only_pt = find(
        simral, tmp_path, "SERIES", {"StudyInstanceUID": s4, "SeriesInstanceUID": "", "Modality": "PT"}
    )
    assert [str(r.SeriesInstanceUID) for r in only_pt] == [series_uid("S4", "PT")]
    all_ct = find(simral, tmp_path, "SERIES", {"SeriesInstanceUID": "", "Modality": "CT"})
    assert {str(r.SeriesInstanceUID) for r in all_ct} == {series_uid("S1", "CT"), series_uid("S4", "CT")}


def test_image_level(simral: SimralProcess, tmp_path: Path) -> None:
    series = series_uid("S2", "MR")
    responses = find(
        simral,
        tmp_path,
        "IMAGE",
        {
            "StudyInstanceUID": study_uid("S2"),
            "SeriesInstanceUID": series,
            "SOPInstanceUID": "",
            "InstanceNumber": "",
            "SOPClassUID": "",
        },
    )
    assert sorted(int(r.InstanceNumber) for r in responses) == list(range(1, INSTANCES_PER_SERIES + 1))
    assert {str(r.SOPInstanceUID) for r in responses} == {
        _uid("S2", "MR", str(n)) for n in range(1, INSTANCES_PER_SERIES + 1)
    }
    assert all(r.SOPClassUID == SecondaryCaptureImageStorage for r in responses)
    second = find(
        simral, tmp_path, "IMAGE", {"SeriesInstanceUID": series, "SOPInstanceUID": "", "InstanceNumber": "2"}
    )
    assert [str(r.SOPInstanceUID) for r in second] == [_uid("S2", "MR", "2")]


def test_patient_root(simral: SimralProcess, tmp_path: Path) -> None:
    patients = find(
        simral,
        tmp_path,
        "PATIENT",
        {"PatientName": "MARTIN*", "PatientID": "", "NumberOfPatientRelatedStudies": ""},
        root="-P",
    )
    assert {(r.PatientID, int(r.NumberOfPatientRelatedStudies)) for r in patients} == {("P3", 1), ("P4", 1)}
    p1 = find(
        simral,
        tmp_path,
        "PATIENT",
        {"PatientID": "P1", "NumberOfPatientRelatedStudies": "", "NumberOfPatientRelatedInstances": ""},
        root="-P",
    )
    assert len(p1) == 1
    assert int(p1[0].NumberOfPatientRelatedStudies) == 2
    assert int(p1[0].NumberOfPatientRelatedInstances) == 3 * INSTANCES_PER_SERIES
    studies = find(simral, tmp_path, "STUDY", {"PatientID": "P1", "StudyInstanceUID": ""}, root="-P")
    assert study_keys(studies) == {"S1", "S2"}


def test_study_root_refuses_patient_level(simral: SimralProcess, tmp_path: Path) -> None:
    out = tmp_path / "x"
    out.mkdir()
    result = subprocess.run(
        [
            "/usr/bin/findscu",
            "-v",
            "-aet",
            SCU,
            "-aec",
            simral.ae_title,
            "-S",
            "-k",
            "QueryRetrieveLevel=PATIENT",
            "-k",
            "PatientID=P1",
            "127.0.0.1",
            str(simral.dicom_port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=out,
        check=False,
    )
    # Status A900 "Identifier does not match SOP Class" (PS3.4 C.4.1.1.4), no match returned.
    assert "Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in result.stdout + result.stderr
