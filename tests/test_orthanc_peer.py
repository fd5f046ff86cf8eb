"""Interoperability with Orthanc as a real DICOM peer, on both backends.

Orthanc (Debian package, ``/usr/sbin/Orthanc``) is driven through its REST API:

* Orthanc C-STOREs a study into simral (PS3.4 Annex B) -- simral as Storage SCP;
* Orthanc C-FINDs simral at STUDY and SERIES level (PS3.4 C.4.1) -- simral as Query SCP;
* Orthanc C-MOVEs a study from simral to itself (PS3.4 C.4.2) -- simral as Move SCP and Storage SCU;
* dcmtk movescu asks simral to C-MOVE a study into Orthanc -- Orthanc as Storage SCP.

Every transfer is checked instance by instance against the original files with ``same_instance``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from tests.conftest import BACKENDS, backend_env
from tests.corpus import multi_series_study
from tests.dicomcmp import same_instance
from tests.peers import HOST, OrthancError, OrthancServer
from tests.simral_proc import SimralProcess

ORTHANC_AET = "ORTHANC"
SCU = "DCMTK"
SERIES = 3
PER_SERIES = 10
SEED_PUSHED = 11  # study uploaded to Orthanc and pushed into simral
SEED_LOCAL = 22  # study that only simral has (dcmsend), pulled by Orthanc


@dataclass(frozen=True)
class Study:
    """A synthetic study: its UIDs and its original files by SOP Instance UID."""

    uid: str
    patient_name: str
    series: dict[str, set[str]]  # SeriesInstanceUID -> SOP Instance UIDs
    files: dict[str, Path]  # SOP Instance UID -> original file

    @classmethod
    def write(cls, out_dir: Path, seed: int) -> Study:
        paths = multi_series_study(out_dir, series=SERIES, per_series=PER_SERIES, seed=seed)
        series: dict[str, set[str]] = {}
        files: dict[str, Path] = {}
        study_uids, names = set(), set()
        for path in paths:
            ds = dcmread(path, stop_before_pixels=True)
            study_uids.add(str(ds.StudyInstanceUID))
            names.add(str(ds.PatientName))
            series.setdefault(str(ds.SeriesInstanceUID), set()).add(str(ds.SOPInstanceUID))
            files[str(ds.SOPInstanceUID)] = path
        assert len(study_uids) == 1 and len(names) == 1 and len(series) == SERIES
        return cls(study_uids.pop(), names.pop(), series, files)


@dataclass
class Peers:
    simral: SimralProcess
    orthanc: OrthancServer
    pushed: Study  # Orthanc → simral (test 1), then simral → Orthanc with movescu (test 4)
    local: Study  # dcmsend → simral, then Orthanc pulls it (test 3)
    base: Path

    def dcmtk(
        self, tool: str, *args: str, files: Sequence[Path] = (), timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run dcmtk ``tool`` (absolute path: the venv holds pynetdicom scripts of the same names)."""
        argv = [f"/usr/bin/{tool}", "-aet", SCU, "-aec", self.simral.ae_title, *args]
        argv += [HOST, str(self.simral.dicom_port), *map(str, files)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)

    def diagnostics(self) -> str:
        return (
            f"\n--- simral log ---\n{self.simral.log_tail()}\n--- orthanc log ---\n{self.orthanc.log_tail()}"
        )


@pytest.fixture(scope="module", params=BACKENDS)
def peers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    base = tmp_path_factory.mktemp(f"orthanc-{request.param}")
    pushed = Study.write(base / "pushed", SEED_PUSHED)
    local = Study.write(base / "local", SEED_LOCAL)
    simral = SimralProcess(base / "data", env=backend_env(request.param, request))
    # Both ports are chosen before either server starts: each one is configured with the other.
    orthanc = OrthancServer(
        aet=ORTHANC_AET, modalities={"simral": (simral.ae_title, HOST, simral.dicom_port)}
    )
    with orthanc:
        simral.add_node("orthanc", ORTHANC_AET, orthanc.dicom_port)
        simral.add_node("dcmtk", SCU, 104)
        with simral:
            p = Peers(simral, orthanc, pushed, local, base)
            sent = p.dcmtk("dcmsend", "--decompress-never", files=list(local.files.values()), timeout=300)
            assert sent.returncode == 0, sent.stdout + sent.stderr + p.diagnostics()
            orthanc.c_echo("simral")
            yield p


@pytest.fixture(scope="module")
def pushed_into_simral(peers: Peers) -> dict[str, Any]:
    """Upload the study to Orthanc over REST and have Orthanc C-STORE it to simral."""
    answers = [peers.orthanc.upload(path) for path in peers.pushed.files.values()]
    assert all(a["Status"] == "Success" for a in answers), answers
    study_ids = {a["ParentStudy"] for a in answers}
    assert len(study_ids) == 1
    try:
        result: dict[str, Any] = peers.orthanc.c_store("simral", study_ids)
    except OrthancError as exc:
        raise AssertionError(f"{exc}{peers.diagnostics()}") from None
    return {"orthanc_study": study_ids.pop(), "result": result}


# --------------------------------------------------------------------------- helpers


def _findscu(peers: Peers, out_dir: Path, level: str, keys: dict[str, str]) -> list[Any]:
    """C-FIND simral (Study Root) with dcmtk findscu; the responses as pydicom data sets."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["-S", "-X", "-od", str(out_dir), "-k", f"QueryRetrieveLevel={level}"]
    for key, value in keys.items():
        args += ["-k", f"{key}={value}"]
    result = peers.dcmtk("findscu", *args)
    assert result.returncode == 0, result.stdout + result.stderr + peers.diagnostics()
    return [dcmread(p) for p in sorted(out_dir.glob("rsp*.dcm"))]


def _orthanc_study_instances(orthanc: OrthancServer, study_uid: str) -> dict[str, str]:
    """SOP Instance UID -> Orthanc instance ID, for the study ``study_uid`` held by Orthanc."""
    found = orthanc.rest_post("/tools/lookup", study_uid.encode())
    ids = [item["ID"] for item in found if item["Type"] == "Study"]
    if not ids:
        return {}
    instances = orthanc.rest_get(f"/studies/{ids[0]}/instances")
    return {item["MainDicomTags"]["SOPInstanceUID"]: item["ID"] for item in instances}


def _delete_orthanc_study(orthanc: OrthancServer, study_uid: str) -> None:
    for item in orthanc.rest_post("/tools/lookup", study_uid.encode()):
        if item["Type"] == "Study":
            orthanc.rest_delete(f"/studies/{item['ID']}")
    assert _orthanc_study_instances(orthanc, study_uid) == {}


def _assert_orthanc_has(peers: Peers, study: Study, out_dir: Path) -> None:
    """Orthanc holds every instance of ``study``, each identical to the original file."""
    held = _orthanc_study_instances(peers.orthanc, study.uid)
    missing, extra = sorted(set(study.files) - set(held)), sorted(set(held) - set(study.files))
    assert not missing and not extra, f"missing {missing[:3]}, extra {extra[:3]}{peers.diagnostics()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    problems = []
    for sop_uid, orthanc_id in held.items():
        received = out_dir / f"{sop_uid}.dcm"
        received.write_bytes(peers.orthanc.rest_get(f"/instances/{orthanc_id}/file"))
        if problem := same_instance(study.files[sop_uid], received):
            problems.append(problem)
    assert not problems, problems[:10]


# --------------------------------------------------------------------------- tests


def test_orthanc_stores_study_into_simral(
    peers: Peers, pushed_into_simral: dict[str, Any], tmp_path: Path
) -> None:
    """Orthanc as Storage SCU: every instance arrives, and simral gives back the same data sets."""
    result = pushed_into_simral["result"]
    # The synchronous store job's summary: every instance sent and acknowledged with success.
    assert result["InstancesCount"] == len(peers.pushed.files), result
    assert result["FailedInstancesCount"] == 0, result
    assert result["RemoteAet"] == peers.simral.ae_title, result
    responses = _findscu(
        peers, tmp_path / "find", "IMAGE", {"StudyInstanceUID": peers.pushed.uid, "SOPInstanceUID": ""}
    )
    assert sorted(str(r.SOPInstanceUID) for r in responses) == sorted(peers.pushed.files)

    got = tmp_path / "get"
    got.mkdir()
    result_get = peers.dcmtk(
        "getscu",
        "-S",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={peers.pushed.uid}",
        "+B",
        "-od",
        str(got),
    )
    assert result_get.returncode == 0, result_get.stdout + result_get.stderr + peers.diagnostics()
    received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in got.iterdir()}
    assert set(received) == set(peers.pushed.files)
    problems = [p for uid, path in received.items() if (p := same_instance(peers.pushed.files[uid], path))]
    assert not problems, problems[:10]


def test_orthanc_finds_in_simral(peers: Peers, pushed_into_simral: dict[str, Any]) -> None:
    """Orthanc as Query SCU: STUDY and SERIES level, exact UID and PatientName wildcard."""
    orthanc = peers.orthanc
    both = {peers.pushed.uid, peers.local.uid}

    studies = orthanc.c_find("simral", "Study", {"StudyInstanceUID": "", "PatientName": ""})
    assert sorted(a["StudyInstanceUID"] for a in studies) == sorted(both), studies
    names = {a["StudyInstanceUID"]: a["PatientName"] for a in studies}
    assert names == {peers.pushed.uid: peers.pushed.patient_name, peers.local.uid: peers.local.patient_name}

    # "MULTI^STUDY^1*" matches the pushed study only (MULTI^STUDY^11), "MUL*" both.
    prefix = peers.pushed.patient_name[: len("MULTI^STUDY^1")]
    studies = orthanc.c_find(
        "simral",
        "Study",
        {"PatientName": prefix + "*", "StudyInstanceUID": "", "NumberOfStudyRelatedInstances": ""},
    )
    assert [a["StudyInstanceUID"] for a in studies] == [peers.pushed.uid], studies
    assert int(studies[0]["NumberOfStudyRelatedInstances"]) == SERIES * PER_SERIES
    studies = orthanc.c_find("simral", "Study", {"PatientName": "MUL*", "StudyInstanceUID": ""})
    assert sorted(a["StudyInstanceUID"] for a in studies) == sorted(both), studies
    assert orthanc.c_find("simral", "Study", {"PatientName": "NOBODY*", "StudyInstanceUID": ""}) == []
    # Person names match case-insensitively (PS3.4 C.2.2.2.1, README conformance statement).
    lower = peers.local.patient_name[: len("MULTI^STUDY^2")].lower() + "*"
    studies = orthanc.c_find("simral", "Study", {"PatientName": lower, "StudyInstanceUID": ""})
    assert [a["StudyInstanceUID"] for a in studies] == [peers.local.uid], studies

    for study in (peers.pushed, peers.local):
        series = orthanc.c_find(
            "simral",
            "Series",
            {
                "StudyInstanceUID": study.uid,
                "SeriesInstanceUID": "",
                "Modality": "",
                "NumberOfSeriesRelatedInstances": "",
            },
        )
        assert sorted(a["SeriesInstanceUID"] for a in series) == sorted(study.series), series
        assert {a["Modality"] for a in series} == {"CT"}
        assert {a["StudyInstanceUID"] for a in series} == {study.uid}
        assert [int(a["NumberOfSeriesRelatedInstances"]) for a in series] == [PER_SERIES] * SERIES


def test_orthanc_moves_study_from_simral(peers: Peers, tmp_path: Path) -> None:
    """Orthanc as Move SCU (destination: itself): simral sends every instance of a study only it has."""
    assert _orthanc_study_instances(peers.orthanc, peers.local.uid) == {}
    try:
        peers.orthanc.c_move_from("simral", "Study", {"StudyInstanceUID": peers.local.uid}, ORTHANC_AET)
    except OrthancError as exc:
        raise AssertionError(f"{exc}{peers.diagnostics()}") from None
    _assert_orthanc_has(peers, peers.local, tmp_path)


def test_simral_moves_study_into_orthanc(
    peers: Peers, pushed_into_simral: dict[str, Any], tmp_path: Path
) -> None:
    """dcmtk movescu asks simral to send a study to Orthanc (Storage SCP)."""
    # Orthanc got this study by REST upload: remove it so that what it holds afterwards came from simral.
    _delete_orthanc_study(peers.orthanc, peers.pushed.uid)
    result = peers.dcmtk(
        "movescu",
        "-S",
        "-aem",
        ORTHANC_AET,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={peers.pushed.uid}",
    )
    assert result.returncode == 0, result.stdout + result.stderr + peers.diagnostics()
    _assert_orthanc_has(peers, peers.pushed, tmp_path)
