"""Interoperability with Orthanc as a real DICOMweb client of simral (PS3.18), on both backends.

Orthanc (Debian package) with its DICOMweb plugin (``orthanc-dicomweb``) is configured with simral as a
remote DICOMweb server (``"DicomWeb": {"Servers": {"simral": [".../dicom-web/"]}}``) and driven through
the plugin's REST API:

* ``POST /dicom-web/servers/simral/retrieve`` -- Orthanc pulls studies, a series and an instance from
  simral with WADO-RS (``Accept: multipart/related; type="application/dicom"; transfer-syntax=*``);
* ``POST /dicom-web/servers/simral/get`` -- Orthanc relays QIDO-RS queries to simral;
* ``POST /dicom-web/servers/simral/stow`` -- Orthanc pushes studies into simral with STOW-RS (one chunked
  multipart/related request, answer checked by Orthanc: ReferencedSOPSequence with every instance, no
  FailedSOPSequence).

Each direction uses a multi-series CT study (synthetic) and a compressed study from the pydicom test corpus
(JPEG lossless + JPEG lossy one way, JPEG 2000 lossless + lossy the other, each with an uncompressed
copy). Every instance is compared with its original file: same transfer syntax and the same data set
bytes (simral stores bit-exact and ``transfer-syntax=*`` asks for the stored syntax). What simral holds
after the STOW is read back with our own QIDO-RS and WADO-RS requests.
"""

from __future__ import annotations

import email.message
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from tests.conftest import BACKENDS, backend_env
from tests.corpus import corpus_report, multi_series_study
from tests.dicomcmp import dataset_bytes, same_instance
from tests.peers import DICOMWEB_PLUGIN, HOST, OrthancError, OrthancServer
from tests.simral_proc import SimralProcess

ORTHANC_AET = "ORTHANC"
SERIES = 3
PER_SERIES = 8
SEED_RETRIEVED = 31  # imported into simral, retrieved by Orthanc with WADO-RS
SEED_STOWED = 32  # uploaded to Orthanc, STOWed by Orthanc into simral
# Compressed studies of the pydicom test corpus, named by one of their files.
COMPRESSED_RETRIEVED = "JPEG-LL.dcm"  # + JPEG-lossy.dcm, JPEG2000_UNC.dcm: JPEG Lossless SV1, Extended, LE
COMPRESSED_STOWED = "MR2_J2KR.dcm"  # + MR2_J2KI.dcm, MR2_UNCR.dcm: JPEG 2000 lossless and lossy, LE
DICOM_PARTS = 'multipart/related; type="application/dicom"; transfer-syntax=*'
TAG_STUDY_UID, TAG_SERIES_UID, TAG_SOP_UID = "0020000D", "0020000E", "00080018"
TAG_STUDY_INSTANCES = "00201208"


@dataclass(frozen=True)
class Study:
    """A study to transfer: its UID, series and original files by SOP Instance UID."""

    uid: str
    series: dict[str, set[str]]  # SeriesInstanceUID -> SOP Instance UIDs
    files: dict[str, Path]  # SOP Instance UID -> original file
    syntaxes: frozenset[str]

    @classmethod
    def of(cls, paths: Sequence[Path]) -> Study:
        series: dict[str, set[str]] = {}
        files: dict[str, Path] = {}
        uids, syntaxes = set(), set()
        for path in paths:
            ds = dcmread(path, stop_before_pixels=True)
            uids.add(str(ds.StudyInstanceUID))
            syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
            series.setdefault(str(ds.SeriesInstanceUID), set()).add(str(ds.SOPInstanceUID))
            files[str(ds.SOPInstanceUID)] = path
        assert len(uids) == 1 and len(files) == len(paths), paths
        return cls(uids.pop(), series, files, frozenset(syntaxes))

    @classmethod
    def synthetic(cls, out_dir: Path, seed: int) -> Study:
        study = cls.of(multi_series_study(out_dir, series=SERIES, per_series=PER_SERIES, seed=seed))
        assert len(study.series) == SERIES
        return study

    @classmethod
    def from_corpus(cls, name: str) -> Study:
        """Every storable pydicom corpus file of the study that the file ``name`` belongs to.

        Those studies mix syntaxes: at least two compressed ones (and an uncompressed copy, for some).
        """
        storable = corpus_report()[0]
        (anchor,) = [f for f in storable if f.path.name == name]
        study = cls.of([f.path for f in storable if f.study_instance_uid == anchor.study_instance_uid])
        assert len([ts for ts in study.syntaxes if _compressed(ts)]) >= 2, study
        return study


def _compressed(transfer_syntax: str) -> bool:
    return transfer_syntax.startswith("1.2.840.10008.1.2.4.") or transfer_syntax == "1.2.840.10008.1.2.5"


@dataclass
class Peers:
    simral: SimralProcess
    orthanc: OrthancServer
    web: httpx.Client  # simral's DICOMweb root
    retrieved: list[Study]  # only simral has them at first
    stowed: list[Study]  # only Orthanc has them at first
    base: Path

    def diagnostics(self) -> str:
        return (
            f"\n--- simral log ---\n{self.simral.log_tail()}\n--- orthanc log ---\n{self.orthanc.log_tail()}"
        )

    def orthanc_post(self, path: str, body: Any, timeout: float = 300) -> Any:
        try:
            return self.orthanc.rest_post(path, body, timeout=timeout)
        except OrthancError as exc:
            raise AssertionError(f"{exc}{self.diagnostics()}") from None


@pytest.fixture(scope="module", params=BACKENDS)
def peers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    base = tmp_path_factory.mktemp(f"orthanc-dicomweb-{request.param}")
    retrieved = [
        Study.synthetic(base / "retrieved", SEED_RETRIEVED),
        Study.from_corpus(COMPRESSED_RETRIEVED),
    ]
    stowed = [Study.synthetic(base / "stowed", SEED_STOWED), Study.from_corpus(COMPRESSED_STOWED)]
    simral = SimralProcess(base / "data", env=backend_env(request.param, request))
    root = f"http://{HOST}:{simral.http_port}/dicom-web"
    # Orthanc's plugin talks to simral with the test technologist's bearer token; Orthanc's own
    # DICOMweb server is enabled too (its defaults).
    server = {"Url": root + "/", "HttpHeaders": simral.auth_headers}
    orthanc = OrthancServer(
        aet=ORTHANC_AET,
        plugins=[DICOMWEB_PLUGIN],
        extra_config={"DicomWeb": {"Enable": True, "Servers": {"simral": server}}},
    )
    with orthanc:
        # Imported as files (not dcmsent: a Storage SCU may re-encode the data set), so that simral holds
        # the original bytes and what Orthanc retrieves can be compared with the files bit for bit.
        files = [path for study in retrieved for path in study.files.values()]
        imported = simral.cli("import", *map(str, files))
        with (
            simral,
            httpx.Client(base_url=root, timeout=120, trust_env=False, headers=simral.auth_headers) as web,
        ):
            p = Peers(simral, orthanc, web, retrieved, stowed, base)
            for study in retrieved:
                assert len(qido(p, f"/studies/{study.uid}/instances")) == len(study.files), imported.stdout
            assert orthanc.rest_get("/dicom-web/servers") == ["simral"]
            yield p


# --------------------------------------------------------------------------- helpers


def parse_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart body: (headers with lower-case names, content)."""
    msg = email.message.Message()
    msg["content-type"] = content_type
    boundary = msg.get_param("boundary")
    assert msg.get_content_type() == "multipart/related", content_type
    assert isinstance(boundary, str) and boundary, content_type
    delimiter = b"\r\n--" + boundary.encode("ascii")
    segments = (b"\r\n" + body).split(delimiter)
    assert len(segments) >= 2 and segments[-1].startswith(b"--"), "no closing delimiter"
    parts = []
    for segment in segments[1:-1]:  # segments[0] is the preamble (empty), the last one the epilogue
        # The rest of the delimiter line is transport padding, then the part's headers and a blank line.
        segment = segment[segment.index(b"\r\n") + 2 :]
        head, sep, content = segment.partition(b"\r\n\r\n")
        if segment.startswith(b"\r\n"):  # no headers at all
            head, content = b"", segment[2:]
        else:
            assert sep, "part without a blank line after its headers"
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts


def json_value(item: dict[str, Any], tag: str) -> Any:
    """First value of ``tag`` in a DICOM JSON object (None when absent or empty)."""
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def qido(peers: Peers, path: str, **params: str) -> list[dict[str, Any]]:
    """A QIDO-RS request to simral; the DICOM JSON matches (none: 200 with [] or 204, PS3.18 §10.6.3)."""
    response = peers.web.get(path, params=params, headers={"Accept": "application/dicom+json"})
    assert response.status_code in (200, 204), (
        f"GET {path} {params}: {response.status_code} {response.text[:500]}"
    )
    if response.status_code == 204:
        return []
    result: list[dict[str, Any]] = response.json()
    return result


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


def _identical(original: Path, received: Path) -> str | None:
    """None when ``received`` has the transfer syntax and the data set bytes of ``original``."""
    if dataset_bytes(original) == dataset_bytes(received):
        return None
    detail = same_instance(original, received) or "same elements, other encoding"
    ts_a, ts_b = dataset_bytes(original)[0], dataset_bytes(received)[0]
    return f"{original.name}: not bit-exact (transfer syntax {ts_a} -> {ts_b}; {detail})"


def _assert_orthanc_holds(peers: Peers, study: Study, expected: set[str], out_dir: Path) -> None:
    """Orthanc holds exactly the instances ``expected`` of ``study``, each identical to its original."""
    held = _orthanc_study_instances(peers.orthanc, study.uid)
    missing, extra = sorted(expected - set(held)), sorted(set(held) - expected)
    assert not missing and not extra, f"missing {missing[:3]}, extra {extra[:3]}{peers.diagnostics()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    problems = []
    for sop_uid, orthanc_id in held.items():
        received = out_dir / f"{sop_uid}.dcm"
        received.write_bytes(peers.orthanc.rest_get(f"/instances/{orthanc_id}/file"))
        if problem := _identical(study.files[sop_uid], received):
            problems.append(problem)
    assert not problems, problems[:10]


def _retrieve(peers: Peers, resources: list[dict[str, str]]) -> Any:
    """Have Orthanc retrieve ``resources`` from simral with WADO-RS (synchronous job)."""
    return peers.orthanc_post(
        "/dicom-web/servers/simral/retrieve", {"Resources": resources, "Synchronous": True}
    )


def _relayed_qido(peers: Peers, uri: str, **arguments: str) -> list[dict[str, Any]]:
    """A QIDO-RS request relayed by Orthanc to simral; simral's DICOM JSON answer."""
    answer = peers.orthanc_post("/dicom-web/servers/simral/get", {"Uri": uri, "Arguments": arguments})
    assert isinstance(answer, list), answer
    return answer


# --------------------------------------------------------------------------- simral → Orthanc


def test_orthanc_retrieves_studies_from_simral(peers: Peers, tmp_path: Path) -> None:
    """WADO-RS RetrieveStudy by Orthanc: every instance arrives, bit-exact, compressed ones untouched."""
    for study in peers.retrieved:
        assert _orthanc_study_instances(peers.orthanc, study.uid) == {}
    _retrieve(peers, [{"Study": study.uid} for study in peers.retrieved])
    for n, study in enumerate(peers.retrieved):
        _assert_orthanc_holds(peers, study, set(study.files), tmp_path / str(n))


def test_orthanc_retrieves_series_and_instance_from_simral(peers: Peers, tmp_path: Path) -> None:
    """WADO-RS RetrieveSeries and RetrieveInstance by Orthanc: exactly what was asked for."""
    study = peers.retrieved[0]
    _delete_orthanc_study(peers.orthanc, study.uid)
    first, second = sorted(study.series)[:2]
    instance = sorted(study.series[second])[0]
    _retrieve(
        peers,
        [{"Study": study.uid, "Series": first}, {"Study": study.uid, "Series": second, "Instance": instance}],
    )
    _assert_orthanc_holds(peers, study, study.series[first] | {instance}, tmp_path)


def test_orthanc_queries_simral(peers: Peers) -> None:
    """QIDO-RS relayed by Orthanc: studies, series of a study, instances of a series."""
    study = peers.retrieved[0]
    studies = _relayed_qido(peers, "/studies", StudyInstanceUID=study.uid, includefield=TAG_STUDY_INSTANCES)
    assert [json_value(s, TAG_STUDY_UID) for s in studies] == [study.uid], studies
    assert int(json_value(studies[0], TAG_STUDY_INSTANCES)) == len(study.files), studies
    everything = _relayed_qido(peers, "/studies")
    assert {json_value(s, TAG_STUDY_UID) for s in everything} >= {s.uid for s in peers.retrieved}
    series = _relayed_qido(peers, f"/studies/{study.uid}/series")
    assert sorted(json_value(s, TAG_SERIES_UID) for s in series) == sorted(study.series), series
    one = sorted(study.series)[0]
    instances = _relayed_qido(peers, f"/studies/{study.uid}/series/{one}/instances")
    assert {json_value(i, TAG_SOP_UID) for i in instances} == study.series[one], instances


# --------------------------------------------------------------------------- Orthanc → simral


def test_orthanc_stows_studies_into_simral(peers: Peers, tmp_path: Path) -> None:
    """STOW-RS by Orthanc: simral indexes every instance and gives back the same bytes with WADO-RS."""
    orthanc_ids = []
    for study in peers.stowed:
        answers = [peers.orthanc.upload(path) for path in study.files.values()]
        assert all(a["Status"] == "Success" for a in answers), answers
        (orthanc_id,) = {a["ParentStudy"] for a in answers}
        orthanc_ids.append(orthanc_id)
        assert qido(peers, "/studies", StudyInstanceUID=study.uid) == []
    # Synchronous job: Orthanc fails it unless simral's answer lists every instance as stored.
    peers.orthanc_post("/dicom-web/servers/simral/stow", {"Resources": orthanc_ids, "Synchronous": True})

    for n, study in enumerate(peers.stowed):
        # QIDO-RS on simral: the study, its series and its instances.
        studies = qido(peers, "/studies", StudyInstanceUID=study.uid, includefield=TAG_STUDY_INSTANCES)
        assert [json_value(s, TAG_STUDY_UID) for s in studies] == [study.uid], studies
        assert int(json_value(studies[0], TAG_STUDY_INSTANCES)) == len(study.files), studies
        series = qido(peers, f"/studies/{study.uid}/series")
        assert sorted(json_value(s, TAG_SERIES_UID) for s in series) == sorted(study.series), series
        instances = qido(peers, f"/studies/{study.uid}/instances")
        assert sorted(json_value(i, TAG_SOP_UID) for i in instances) == sorted(study.files), instances

        # WADO-RS RetrieveStudy in the stored syntax: the original bytes.
        response = peers.web.get(f"/studies/{study.uid}", headers={"Accept": DICOM_PARTS})
        assert response.status_code == 200, response.text[:2000] + peers.diagnostics()
        parts = parse_multipart(response.content, response.headers["content-type"])
        assert len(parts) == len(study.files)
        out_dir = tmp_path / str(n)
        out_dir.mkdir()
        problems = []
        for i, (headers, content) in enumerate(parts):
            assert headers.get("content-type", "").split(";")[0].strip() == "application/dicom", headers
            received = out_dir / f"{i}.dcm"
            received.write_bytes(content)
            sop_uid = str(dcmread(received, stop_before_pixels=True).SOPInstanceUID)
            assert sop_uid in study.files, sop_uid
            if problem := _identical(study.files[sop_uid], received):
                problems.append(problem)
        assert not problems, problems[:10]
