"""IHE RAD IOCM rejection notes hide the instances they reject on DIMSE and DICOMweb (issue 9 item 4).

One ``simral serve`` (embedded backend). A modality of the test organisation stores a synthetic
CT series of three slices with dcmtk ``storescu``, then a rejection note built with highdicom (a
Key Object Selection Document titled (113001, DCM, "Rejected for Quality Reasons"), PS3.16 CID
7011) rejecting the second slice. Afterwards the rejected slice is gone from dcmtk ``findscu``
at IMAGE level, from the STUDY-level NumberOfStudyRelatedInstances, from dcmtk ``getscu`` (C-GET
of the series), from QIDO-RS, WADO-RS (404 for the instance, absent from the series and the
metadata) and WADO-URI (404), while the two other slices and the note itself stay visible.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import httpx
import pytest
from pydicom import dcmread
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from tests.corpus import ct_series
from tests.dcmtk_tools import storescu
from tests.simral_proc import SimralProcess

MODALITY_AE = "IOCM_CT"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"


@dataclass
class Stored:
    simral: SimralProcess
    study_uid: str
    series_uid: str
    slices: list[str]
    rejected: str
    note: str
    workdir: Path


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    base = tmp_path_factory.mktemp("iocm")
    simral = SimralProcess(base / "data")
    simral.add_node("ct", MODALITY_AE, 104)
    images = base / "images"
    images.mkdir()
    paths = ct_series(
        images, slices=3, rows=32, cols=32, patient_id="IOCM-1", patient_name="IOCM^REJET", seed=7
    )
    first = dcmread(paths[0])
    slices = [str(dcmread(p).SOPInstanceUID) for p in paths]
    rejected_image = dcmread(paths[1])
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=[rejected_image],
        content=hd.ko.KeyObjectSelection(
            document_title=codes.DCM.RejectedForQualityReasons, referenced_objects=[rejected_image]
        ),
        series_instance_uid=str(generate_uid()),
        series_number=99,
        sop_instance_uid=str(generate_uid()),
        instance_number=1,
        manufacturer="Modalité",
    )
    note_path = base / "rejection.dcm"
    note.save_as(note_path, enforce_file_format=True)
    with simral:
        storescu(simral, MODALITY_AE, paths)
        storescu(simral, MODALITY_AE, [note_path])
        yield Stored(
            simral,
            str(first.StudyInstanceUID),
            str(first.SeriesInstanceUID),
            slices,
            slices[1],
            str(note.SOPInstanceUID),
            base,
        )


def _dcmtk(stored: Stored, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    simral = stored.simral
    argv = [f"/usr/bin/{tool}", "-aet", MODALITY_AE, "-aec", simral.ae_title, *args]
    result = subprocess.run(
        [*argv, "127.0.0.1", str(simral.dicom_port)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _find(stored: Stored, name: str, level: str, *keys: str) -> list[dict[str, str]]:
    out = stored.workdir / name
    out.mkdir()
    args = ["-S", "-X", "-od", str(out), "-k", f"QueryRetrieveLevel={level}"]
    for key in keys:
        args += ["-k", key]
    _dcmtk(stored, "findscu", *args)
    answers = []
    for path in sorted(out.glob("rsp*.dcm")):
        ds = dcmread(path)
        answers.append({key.split("=")[0]: str(ds.get(key.split("=")[0], "")) for key in keys})
    return answers


def test_findscu_image_level_hides_the_rejected_instance(stored: Stored) -> None:
    answers = _find(
        stored,
        "find-image",
        "IMAGE",
        f"StudyInstanceUID={stored.study_uid}",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
    )
    found = {a["SOPInstanceUID"] for a in answers}
    assert found == {stored.slices[0], stored.slices[2], stored.note}
    assert {a["SOPClassUID"] for a in answers if a["SOPInstanceUID"] == stored.note} == {KOS}


def test_findscu_counts_leave_it_out(stored: Stored) -> None:
    (study,) = _find(
        stored,
        "find-study",
        "STUDY",
        f"StudyInstanceUID={stored.study_uid}",
        "NumberOfStudyRelatedInstances",
        "NumberOfStudyRelatedSeries",
    )
    assert (study["NumberOfStudyRelatedInstances"], study["NumberOfStudyRelatedSeries"]) == ("3", "2")
    series = _find(
        stored,
        "find-series",
        "SERIES",
        f"StudyInstanceUID={stored.study_uid}",
        f"SeriesInstanceUID={stored.series_uid}",
        "NumberOfSeriesRelatedInstances",
    )
    assert [s["NumberOfSeriesRelatedInstances"] for s in series] == ["2"]


def test_getscu_retrieves_only_what_is_not_rejected(stored: Stored) -> None:
    out = stored.workdir / "get"
    out.mkdir()
    _dcmtk(
        stored,
        "getscu",
        "-S",
        "-od",
        str(out),
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={stored.study_uid}",
        "-k",
        f"SeriesInstanceUID={stored.series_uid}",
    )
    received = {str(dcmread(p).SOPInstanceUID) for p in out.iterdir()}
    assert received == {stored.slices[0], stored.slices[2]}


def test_dicomweb_hides_the_rejected_instance(stored: Stored) -> None:
    simral = stored.simral
    base = f"{simral.dicomweb_url}/studies/{stored.study_uid}"
    with httpx.Client(headers=simral.auth_headers, timeout=30) as client:
        qido = client.get(f"{base}/instances", headers={"Accept": "application/dicom+json"})
        assert qido.status_code == 200, qido.text
        listed = {item["00080018"]["Value"][0] for item in qido.json()}
        assert listed == {stored.slices[0], stored.slices[2], stored.note}
        studies = client.get(
            f"{simral.dicomweb_url}/studies",
            params={"StudyInstanceUID": stored.study_uid, "includefield": "NumberOfStudyRelatedInstances"},
        )
        assert studies.json()[0]["00201208"]["Value"] == [3]

        series_path = f"{base}/series/{stored.series_uid}"
        gone = client.get(
            f"{series_path}/instances/{stored.rejected}",
            headers={"Accept": 'multipart/related; type="application/dicom"'},
        )
        assert gone.status_code == 404
        kept = client.get(
            f"{series_path}/instances/{stored.slices[0]}",
            headers={"Accept": 'multipart/related; type="application/dicom"'},
        )
        assert kept.status_code == 200
        metadata = client.get(f"{base}/metadata", headers={"Accept": "application/dicom+json"})
        assert metadata.status_code == 200
        assert {item["00080018"]["Value"][0] for item in metadata.json()} == listed
        uri = client.get(
            f"{simral.http_url}/wado",
            params={
                "requestType": "WADO",
                "studyUID": stored.study_uid,
                "seriesUID": stored.series_uid,
                "objectUID": stored.rejected,
                "contentType": "application/dicom",
            },
        )
        assert uri.status_code == 404
        # The rejection note itself stays retrievable (IHE IOCM).
        note_series = client.get(f"{base}/instances", params={"SOPInstanceUID": stored.note}).json()
        note_url = f"{base}/series/{note_series[0]['0020000E']['Value'][0]}/instances/{stored.note}"
        assert (
            client.get(
                note_url, headers={"Accept": 'multipart/related; type="application/dicom"'}
            ).status_code
            == 200
        )
