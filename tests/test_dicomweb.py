"""DICOMweb (PS3.18) against a running ``simral serve``, driven by the dicomweb-client library.

Data go in through STOW-RS (dicomweb-client ``store_instances``) and come back through QIDO-RS,
WADO-RS (instances, metadata, bulk data, frames, rendered, thumbnail) and WADO-URI, on both
backends (SQLite + filesystem, PostgreSQL + S3).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID, ExplicitVRLittleEndian
from requests.exceptions import HTTPError
from tests.conftest import BACKENDS, backend_env
from tests.corpus import ct_series
from tests.simral_proc import SimralProcess

#: pydicom test files covering the compressed syntaxes and multi-frame layouts, by a short name.
SAMPLES = {
    "jpeg-baseline": "SC_rgb_jpeg_dcmtk.dcm",  # 1.2.840.10008.1.2.4.50, YBR_FULL
    "jpeg-lossless": "JPEG-LL.dcm",  # .4.70
    "jpeg-ls": "MR_small_jpeg_ls_lossless.dcm",  # .4.80
    "jpeg2000-lossless": "MR_small_jp2klossless.dcm",  # .4.90
    "jpeg2000": "JPEG2000.dcm",  # .4.91
    "rle": "MR_small_RLE.dcm",  # .5
    "native-ct": "CT_small.dcm",
    "multiframe-native": "emri_small.dcm",  # 10 frames
    "multiframe-rle": "emri_small_RLE.dcm",
    "multiframe-jpeg": "color3d_jpeg_baseline.dcm",  # 120 frames, YBR_FULL_422
    "waveform": "waveform_ecg.dcm",  # no pixel data; WaveformData (bulk) inside a sequence
}
LOSSLESS = {
    "jpeg-lossless",
    "jpeg-ls",
    "jpeg2000-lossless",
    "rle",
    "native-ct",
    "multiframe-native",
    "multiframe-rle",
}
MULTIPART_DICOM = 'multipart/related; type="application/dicom"'


@dataclass
class Sample:
    name: str
    path: Path
    dataset: Dataset

    @property
    def uids(self) -> tuple[str, str, str]:
        return self.dataset.StudyInstanceUID, self.dataset.SeriesInstanceUID, self.dataset.SOPInstanceUID

    @property
    def syntax(self) -> str:
        return str(self.dataset.file_meta.TransferSyntaxUID)


def _relabel(source: Path, out: Path, index: int) -> Path:
    """A copy of ``source`` as its own patient/study/series (pydicom's files share UIDs)."""
    ds = dcmread(source)
    root = "1.2.826.0.1.3680043.10.1337"
    ds.StudyInstanceUID = f"{root}.1.{index}"
    ds.SeriesInstanceUID = f"{root}.2.{index}"
    ds.SOPInstanceUID = f"{root}.3.{index}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = f"DW{index:03d}"
    ds.PatientName = f"WEB^SAMPLE{index:03d}"
    ds.StudyDate = f"2024{(index % 12) + 1:02d}15"
    ds.AccessionNumber = f"ACC{index:04d}"
    ds.save_as(out, enforce_file_format=True)
    return out


@dataclass
class Web:
    simral: SimralProcess
    client: DICOMwebClient
    samples: dict[str, Sample]
    ct: list[Dataset]

    def get(self, path: str, headers: dict[str, str] | None = None, **kwargs: object) -> httpx.Response:
        headers = {**self.simral.auth_headers, **(headers or {})}
        return httpx.get(self.simral.http_url + path, timeout=60, headers=headers, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=BACKENDS)
def web(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    base = tmp_path_factory.mktemp(f"dicomweb-{request.param}")
    files = base / "files"
    files.mkdir()
    samples = {}
    for index, (name, filename) in enumerate(SAMPLES.items(), start=1):
        path = _relabel(Path(get_testdata_file(filename)), files / f"{name}.dcm", index)
        samples[name] = Sample(name, path, dcmread(path))
    ct_paths = ct_series(
        base / "ct", slices=12, rows=128, cols=128, patient_id="DWCT01", patient_name="DUPONT^JEAN"
    )
    simral = SimralProcess(base / "data", env=backend_env(request.param, request))
    with simral:
        client = DICOMwebClient(url=simral.dicomweb_url, headers=simral.auth_headers)
        # STOW-RS of everything, in two requests (one of them to /studies/{uid}).
        response = client.store_instances([s.dataset for s in samples.values()])
        assert len(response.ReferencedSOPSequence) == len(samples)
        ct = [dcmread(p) for p in ct_paths]
        response = client.store_instances(ct, study_instance_uid=ct[0].StudyInstanceUID)
        assert len(response.ReferencedSOPSequence) == len(ct)
        yield Web(simral, client, samples, ct)


# -- QIDO-RS ------------------------------------------------------------------------------------------


def test_qido_studies_default_attributes_and_counts(web: Web) -> None:
    studies = web.client.search_for_studies()
    assert len(studies) == len(SAMPLES) + 1
    by_uid = {s["0020000D"]["Value"][0]: s for s in studies}
    ct = by_uid[web.ct[0].StudyInstanceUID]
    assert ct["00201208"]["Value"] == [12]  # NumberOfStudyRelatedInstances
    assert ct["00201206"]["Value"] == [1]
    assert ct["00080061"]["Value"] == ["CT"]
    assert ct["00100020"]["Value"] == ["DWCT01"]
    assert ct["00081190"]["Value"][0] == f"{web.simral.dicomweb_url}/studies/{web.ct[0].StudyInstanceUID}"
    assert ct["00080056"]["Value"] == ["ONLINE"]


def test_qido_matching_wildcards_ranges_lists(web: Web) -> None:
    client = web.client
    # dicomweb-client percent-encodes "*" (%2A): wildcards must still match.
    hits = client.search_for_studies(search_filters={"PatientName": "WEB^SAMPLE00*"})
    assert len(hits) == 9
    assert len(client.search_for_studies(search_filters={"PatientID": "DW00?"})) == 9
    assert [
        h["00100020"]["Value"][0] for h in client.search_for_studies(search_filters={"PatientID": "DWCT01"})
    ] == ["DWCT01"]
    # Case-insensitive person names (PS3.4 C.2.2.2.1).
    assert len(client.search_for_studies(search_filters={"PatientName": "dupont^jean"})) == 1
    # Date range: samples 1..3 have months 02..04.
    ranged = client.search_for_studies(search_filters={"StudyDate": "20240201-20240415", "PatientID": "DW0*"})
    assert {h["00100020"]["Value"][0] for h in ranged} == {"DW001", "DW002", "DW003"}
    # A date range is answered in StudyDate order (the index's), and pages walk it without overlap.
    dates = [h["00080020"]["Value"][0] for h in ranged]
    assert dates == sorted(dates) and len(set(dates)) == 3, dates
    ranged_uids = [h["0020000D"]["Value"][0] for h in ranged]
    paged = [
        h["0020000D"]["Value"][0]
        for offset in range(3)
        for h in client.search_for_studies(
            search_filters={"StudyDate": "20240201-20240415", "PatientID": "DW0*"}, limit=1, offset=offset
        )
    ]
    assert paged == ranged_uids
    # UID list matching, comma-separated (PS3.18 8.3.4.1).
    uids = [web.samples["rle"].uids[0], web.samples["jpeg-ls"].uids[0]]
    listed = client.search_for_studies(search_filters={"StudyInstanceUID": ",".join(uids)})
    assert {h["0020000D"]["Value"][0] for h in listed} == set(uids)
    assert client.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []


def test_qido_fuzzy_matching(web: Web) -> None:
    assert web.client.search_for_studies(search_filters={"PatientName": "jea"}) == []
    fuzzy = web.client.search_for_studies(fuzzymatching=True, search_filters={"PatientName": "jea"})
    assert [h["00100020"]["Value"][0] for h in fuzzy] == ["DWCT01"]


def test_qido_includefield_and_paging(web: Web) -> None:
    client = web.client
    hits = client.search_for_studies(
        search_filters={"PatientID": "DWCT01"}, fields=["PatientBirthDate", "00081030", "InstitutionName"]
    )
    assert "00100030" in hits[0] and "00081030" in hits[0]
    everything = client.search_for_studies(search_filters={"PatientID": "DWCT01"}, fields=["all"])
    assert "00080050" in everything[0] and "00100040" in everything[0]
    series_all = client.search_for_series(web.ct[0].StudyInstanceUID, fields=["all"])
    assert series_all[0]["0008103E"]["Value"]
    # Paging: limit/offset walk the same ordered result set without overlap.
    all_uids = [h["0020000D"]["Value"][0] for h in client.search_for_studies()]
    pages = []
    for offset in range(0, len(all_uids), 4):
        pages += [h["0020000D"]["Value"][0] for h in client.search_for_studies(limit=4, offset=offset)]
    assert pages == all_uids
    # More than the limit: the Warning header tells there is more (PS3.18 8.3.4.4).
    response = web.get("/dicom-web/studies?limit=2")
    assert response.status_code == 200 and len(response.json()) == 2
    assert "additional results" in response.headers.get("warning", "")
    assert web.get("/dicom-web/studies?limit=x").status_code == 400
    assert web.get("/dicom-web/studies?NoSuchKeyword=1").status_code == 400


def test_qido_series_and_instances_levels(web: Web) -> None:
    client = web.client
    study = web.ct[0].StudyInstanceUID
    series = client.search_for_series(study)
    assert len(series) == 1 and series[0]["00201209"]["Value"] == [12]
    assert series[0]["00080060"]["Value"] == ["CT"]
    instances = client.search_for_instances(study, series[0]["0020000E"]["Value"][0])
    assert [i["00200013"]["Value"][0] for i in instances] == list(range(1, 13))
    assert all(i["00280010"]["Value"] == [128] for i in instances)
    assert len(client.search_for_instances(study)) == 12
    assert len(client.search_for_series(search_filters={"Modality": "CT"})) >= 2
    every = client.search_for_instances(search_filters={"PatientID": "DWCT01"})
    assert len(every) == 12
    multi = client.search_for_instances(
        search_filters={"SOPInstanceUID": web.samples["multiframe-native"].uids[2]}
    )
    assert multi[0]["00280008"]["Value"] == [10]


# -- WADO-RS instances --------------------------------------------------------------------------------


def _sha(ds: Dataset) -> str:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_retrieve_instance_as_stored_and_transcoded(web: Web, name: str) -> None:
    sample = web.samples[name]
    study, series, sop = sample.uids
    stored = web.client.retrieve_instance(study, series, sop, media_types=(("application/dicom", "*"),))
    assert str(stored.file_meta.TransferSyntaxUID) == sample.syntax
    if "PixelData" not in sample.dataset:
        assert stored == sample.dataset
        return
    assert stored.PixelData == sample.dataset.PixelData
    # Explicit VR Little Endian asked: decoded.
    native = web.client.retrieve_instance(
        study, series, sop, media_types=(("application/dicom", ExplicitVRLittleEndian),)
    )
    assert native.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    expected = sample.dataset.pixel_array
    if name in LOSSLESS:
        assert np.array_equal(native.pixel_array, expected)
    else:
        assert native.pixel_array.shape == expected.shape


def test_retrieve_bytes_are_the_stored_file(web: Web) -> None:
    sample = web.samples["jpeg-lossless"]
    study, series, sop = sample.uids
    response = web.get(
        f"/dicom-web/studies/{study}/series/{series}/instances/{sop}",
        headers={"Accept": f"{MULTIPART_DICOM}; transfer-syntax=*"},
    )
    assert response.status_code == 200
    assert sample.path.read_bytes() in response.content


def test_transfer_syntax_negotiation_q_values_and_406(web: Web) -> None:
    sample = web.samples["native-ct"]
    study, series, sop = sample.uids
    url = f"/dicom-web/studies/{study}/series/{series}/instances/{sop}"
    accept = (
        f"{MULTIPART_DICOM}; transfer-syntax=1.2.840.10008.1.2.5; q=0.4, "
        f"{MULTIPART_DICOM}; transfer-syntax=1.2.840.10008.1.2.4.90; q=0.9"
    )
    response = web.get(url, headers={"Accept": accept})
    assert response.status_code == 200
    assert "transfer-syntax=1.2.840.10008.1.2.4.90" in response.text[:400]
    got = web.client.retrieve_instance(
        study, series, sop, media_types=(("application/dicom", "1.2.840.10008.1.2.4.90"),)
    )
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    assert np.array_equal(got.pixel_array, sample.dataset.pixel_array)
    # JPEG baseline cannot be produced here: 406 Not Acceptable.
    refused = web.get(url, headers={"Accept": f"{MULTIPART_DICOM}; transfer-syntax=1.2.840.10008.1.2.4.50"})
    assert refused.status_code == 406
    assert web.get(url, headers={"Accept": "text/html"}).status_code == 406


def test_retrieve_series_and_study(web: Web) -> None:
    study = web.ct[0].StudyInstanceUID
    series = web.ct[0].SeriesInstanceUID
    got = web.client.retrieve_series(study, series)
    assert sorted(d.SOPInstanceUID for d in got) == sorted(d.SOPInstanceUID for d in web.ct)
    by_uid = {d.SOPInstanceUID: d for d in web.ct}
    assert all(np.array_equal(d.pixel_array, by_uid[d.SOPInstanceUID].pixel_array) for d in got)
    assert len(list(web.client.iter_study(study))) == 12
    assert web.get("/dicom-web/studies/1.2.3.4.404").status_code == 404


# -- metadata and bulk data ----------------------------------------------------------------------------


def test_metadata_at_every_level(web: Web) -> None:
    study, series = web.ct[0].StudyInstanceUID, web.ct[0].SeriesInstanceUID
    study_meta = web.client.retrieve_study_metadata(study)
    series_meta = web.client.retrieve_series_metadata(study, series)
    assert len(study_meta) == len(series_meta) == 12
    one = web.client.retrieve_instance_metadata(study, series, web.ct[3].SOPInstanceUID)
    assert one["00080018"]["Value"] == [web.ct[3].SOPInstanceUID]
    assert one["00083002"]["Value"] == [ExplicitVRLittleEndian]
    assert Dataset.from_json(one).ImagePositionPatient == web.ct[3].ImagePositionPatient
    pixel_uri = one["7FE00010"]["BulkDataURI"]
    assert pixel_uri.startswith(web.simral.dicomweb_url)


def test_bulkdata_uri_and_pixel_data(web: Web) -> None:
    sample = web.samples["multiframe-native"]
    study, series, sop = sample.uids
    meta = web.client.retrieve_instance_metadata(study, series, sop)
    frames = web.client.retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"])
    assert b"".join(frames) == sample.dataset.PixelData
    # A large element nested in a sequence goes by reference too, and comes back byte for byte.
    waveform = web.samples["waveform"]
    meta = web.client.retrieve_instance_metadata(*waveform.uids)
    item = meta["54000100"]["Value"][0]
    uri = item["54001010"]["BulkDataURI"]
    assert uri.startswith(web.simral.dicomweb_url) and uri.endswith("/bulkdata/54001010")
    assert web.client.retrieve_bulkdata(uri)[0] == waveform.dataset.WaveformSequence[0].WaveformData
    assert "7FE00010" not in meta


# -- frames --------------------------------------------------------------------------------------------


def test_frames_uncompressed_from_native_and_compressed(web: Web) -> None:
    for name in ("multiframe-native", "multiframe-rle"):
        sample = web.samples[name]
        study, series, sop = sample.uids
        frames = web.client.retrieve_instance_frames(study, series, sop, frame_numbers=[1, 4, 10])
        pixels = sample.dataset.pixel_array
        for got, n in zip(frames, [1, 4, 10], strict=True):
            assert got == pixels[n - 1].astype(pixels.dtype.newbyteorder("<")).tobytes(), (name, n)


def test_frames_in_the_stored_compressed_type(web: Web) -> None:
    sample = web.samples["multiframe-jpeg"]
    study, series, sop = sample.uids
    frames = web.client.retrieve_instance_frames(
        study, series, sop, frame_numbers=[2, 120], media_types=(("image/jpeg", "1.2.840.10008.1.2.4.50"),)
    )
    expected = list(generate_frames(sample.dataset.PixelData, number_of_frames=120))
    assert frames == [expected[1], expected[119]]
    assert Image.open(io.BytesIO(frames[0])).size == (sample.dataset.Columns, sample.dataset.Rows)
    # transfer-syntax=* on octet-stream: the stored bitstream, labelled with its syntax.
    response = web.get(
        f"/dicom-web/studies/{study}/series/{series}/instances/{sop}/frames/1",
        headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'},
    )
    assert response.status_code == 200 and "transfer-syntax=1.2.840.10008.1.2.4.50" in response.text[:300]
    assert expected[0] in response.content
    # Uncompressed from JPEG: the decoded frame.
    decoded = web.client.retrieve_instance_frames(study, series, sop, frame_numbers=[5])
    assert len(decoded[0]) == sample.dataset.Rows * sample.dataset.Columns * 3
    for sample_name in ("jpeg-ls", "jpeg2000-lossless", "rle"):
        s = web.samples[sample_name]
        (raw,) = web.client.retrieve_instance_frames(*s.uids, frame_numbers=[1])
        assert (
            raw
            == s.dataset.pixel_array.astype("<u2" if s.dataset.PixelRepresentation == 0 else "<i2").tobytes()
        )


def test_frame_errors(web: Web) -> None:
    study, series, sop = web.samples["multiframe-native"].uids
    base = f"/dicom-web/studies/{study}/series/{series}/instances/{sop}/frames"
    assert web.get(f"{base}/11").status_code == 404
    assert web.get(f"{base}/0").status_code == 400
    assert web.get(f"{base}/a").status_code == 400
    assert web.get(f"{base}/1", headers={"Accept": 'multipart/related; type="image/jp2"'}).status_code == 406


# -- rendered and thumbnail -----------------------------------------------------------------------------


def _image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_rendered_instance_window_viewport_quality(web: Web) -> None:
    study, series, sop = web.ct[6].StudyInstanceUID, web.ct[6].SeriesInstanceUID, web.ct[6].SOPInstanceUID
    jpeg = _image(web.client.retrieve_instance_rendered(study, series, sop, media_types=("image/jpeg",)))
    assert jpeg.format == "JPEG" and jpeg.size == (128, 128)
    assert np.asarray(jpeg).std() > 10
    png = _image(
        web.client.retrieve_instance_rendered(
            study,
            series,
            sop,
            media_types=("image/png",),
            params={"viewport": "64,64", "window": "40,400,linear"},
        )
    )
    assert png.format == "PNG" and png.size == (64, 64)
    narrow = _image(
        web.client.retrieve_instance_rendered(
            study,
            series,
            sop,
            media_types=("image/png",),
            params={"viewport": "64,64", "window": "40,80,linear"},
        )
    )
    assert not np.array_equal(np.asarray(png), np.asarray(narrow))
    small = web.client.retrieve_instance_rendered(
        study, series, sop, media_types=("image/jpeg",), params={"quality": 10}
    )
    large = web.client.retrieve_instance_rendered(
        study, series, sop, media_types=("image/jpeg",), params={"quality": 95}
    )
    assert len(small) < len(large)
    assert (
        web.get(f"/dicom-web/studies/{study}/series/{series}/instances/{sop}/rendered?window=a,b").status_code
        == 400
    )


def test_rendered_frames_series_study_and_compressed(web: Web) -> None:
    study, series, sop = web.samples["multiframe-jpeg"].uids
    frame = _image(
        web.client.retrieve_instance_frames_rendered(
            study, series, sop, frame_numbers=[60], media_types=("image/png",)
        )
    )
    assert frame.mode == "RGB" and np.asarray(frame).std() > 1
    for name in ("jpeg-ls", "jpeg2000", "rle", "jpeg-baseline"):
        rendered = _image(
            web.client.retrieve_instance_rendered(*web.samples[name].uids, media_types=("image/png",))
        )
        assert np.asarray(rendered).std() > 1, name
    series_image = _image(
        web.client.retrieve_series_rendered(
            web.ct[0].StudyInstanceUID, web.ct[0].SeriesInstanceUID, media_types=("image/jpeg",)
        )
    )
    assert series_image.size == (128, 128)


def test_thumbnails_at_every_level(web: Web) -> None:
    study, series, sop = web.ct[0].StudyInstanceUID, web.ct[0].SeriesInstanceUID, web.ct[0].SOPInstanceUID
    root = web.simral.dicomweb_url
    for url in (
        f"{root}/studies/{study}/thumbnail",
        f"{root}/studies/{study}/series/{series}/thumbnail",
        f"{root}/studies/{study}/series/{series}/instances/{sop}/thumbnail",
        f"{root}/studies/{study}/series/{series}/instances/{sop}/frames/1/thumbnail",
    ):
        response = web.client._http_get(url, headers={"Accept": "image/jpeg"})
        image = _image(response.content)
        assert image.format == "JPEG" and max(image.size) <= 128, url
    png = web.client._http_get(
        f"{root}/studies/{study}/thumbnail", headers={"Accept": "image/png"}, params={"viewport": "32,32"}
    )
    assert _image(png.content).size == (32, 32)


# -- STOW-RS failures -----------------------------------------------------------------------------------


def test_stow_duplicate_is_success(web: Web) -> None:
    response = web.client.store_instances([web.ct[0]])
    assert len(response.ReferencedSOPSequence) == 1 and "FailedSOPSequence" not in response


def test_stow_bad_bodies(web: Web) -> None:
    url = web.simral.dicomweb_url + "/studies"
    boundary = "xyzzy"
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
    garbage = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\nnot a dicom file\r\n--{boundary}--\r\n"
    ).encode()
    response = httpx.post(
        url, content=garbage, headers={**web.simral.auth_headers, "Content-Type": ctype}, timeout=60
    )
    assert response.status_code == 409
    failed = Dataset.from_json(response.json()).FailedSOPSequence
    assert failed[0].FailureReason in (0xC000, 0xA900, 0x0110)
    with pytest.raises(HTTPError):
        # dicomweb-client posts a well-formed body of a broken data set: refused, not crashed.
        broken = web.ct[0].copy()
        del broken.SOPInstanceUID
        web.client.store_instances([broken])
    truncated = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\npartial".encode()
    assert (
        httpx.post(
            url, content=truncated, headers={**web.simral.auth_headers, "Content-Type": ctype}, timeout=60
        ).status_code
        == 400
    )
    no_boundary = httpx.post(
        url,
        content=b"x",
        headers={**web.simral.auth_headers, "Content-Type": "multipart/related"},
        timeout=60,
    )
    assert no_boundary.status_code == 415
    assert (
        httpx.post(
            url,
            content=b"x",
            headers={**web.simral.auth_headers, "Content-Type": "application/json"},
            timeout=60,
        ).status_code
        == 415
    )
    empty = httpx.post(
        url,
        content=f"--{boundary}--\r\n".encode(),
        headers={**web.simral.auth_headers, "Content-Type": ctype},
        timeout=60,
    )
    assert empty.status_code == 400


def test_stow_partial_success_and_study_mismatch(web: Web, tmp_path: Path) -> None:
    new = ct_series(tmp_path, slices=2, rows=64, cols=64, patient_id="DWSTOW", seed=7)
    good, other = dcmread(new[0]), dcmread(new[1])
    other.StudyInstanceUID = "1.2.826.0.1.3680043.10.1337.9.9"
    response = web.client._http_post(
        f"{web.simral.dicomweb_url}/studies/{good.StudyInstanceUID}",
        data=_multipart([good, other], "b0undary"),
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b0undary'},
    )
    assert response.status_code == 202
    body = Dataset.from_json(response.json())
    assert [i.ReferencedSOPInstanceUID for i in body.ReferencedSOPSequence] == [good.SOPInstanceUID]
    assert body.FailedSOPSequence[0].ReferencedSOPInstanceUID == other.SOPInstanceUID
    assert body.FailedSOPSequence[0].FailureReason == 0xA900
    assert body.RetrieveURL.endswith(good.StudyInstanceUID)


def _multipart(datasets: list[Dataset], boundary: str) -> bytes:
    out = b""
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out += (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + buffer.getvalue() + b"\r\n"
        )
    return out + f"--{boundary}--\r\n".encode()


# -- WADO-URI and the change feed ------------------------------------------------------------------------


def test_wado_uri(web: Web) -> None:
    sample = web.samples["rle"]
    study, series, sop = sample.uids
    base = f"/wado?requestType=WADO&studyUID={study}&seriesUID={series}&objectUID={sop}"
    as_stored = web.get(base + "&contentType=application/dicom&transferSyntax=*")
    assert as_stored.status_code == 200 and as_stored.content == sample.path.read_bytes()
    native = dcmread(io.BytesIO(web.get(base + "&contentType=application/dicom").content))
    assert native.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(native.pixel_array, sample.dataset.pixel_array)
    jpeg = _image(web.get(base).content)
    assert jpeg.format == "JPEG" and np.asarray(jpeg).std() > 1
    sized = _image(web.get(base + "&contentType=image/png&rows=32&windowCenter=600&windowWidth=1200").content)
    assert sized.format == "PNG" and sized.size[1] == 32
    assert web.get(f"/wado?requestType=WADO&studyUID={study}").status_code == 400
    assert web.get("/wado?requestType=WADO&studyUID=1&seriesUID=2&objectUID=3").status_code == 404


def test_change_feed_follows_stores(web: Web, tmp_path: Path) -> None:
    first = web.get("/api/changes?limit=5").json()
    assert len(first["changes"]) == 5 and first["more"] is True
    seqs = [c["seq"] for c in first["changes"]]
    assert seqs == sorted(seqs)
    tail = web.get(f"/api/changes?since={first['last']}&limit=10000").json()
    last = tail["last"]
    new = [dcmread(p) for p in ct_series(tmp_path, slices=3, rows=32, cols=32, patient_id="DWFEED", seed=3)]
    web.client.store_instances(new)
    after = web.get(f"/api/changes?since={last}").json()
    # Parts of one request are ingested concurrently: the feed is in commit order.
    assert sorted((c["kind"], c["sop_uid"]) for c in after["changes"]) == sorted(
        ("created", d.SOPInstanceUID) for d in new
    )
    assert after["last"] > last and after["more"] is False


def test_transcoded_retrieve_is_a_valid_part10(web: Web) -> None:
    sample = web.samples["jpeg2000-lossless"]
    # No transfer-syntax parameter: Explicit VR Little Endian (PS3.18 8.7.3.5.2).
    study, series, sop = sample.uids
    response = web.get(
        f"/dicom-web/studies/{study}/series/{series}/instances/{sop}", headers={"Accept": MULTIPART_DICOM}
    )
    assert b"transfer-syntax=1.2.840.10008.1.2.1\r\n" in response.content[:300]
    got = web.client.retrieve_instance(
        *sample.uids, media_types=(("application/dicom", ExplicitVRLittleEndian),)
    )
    assert UID(got.file_meta.TransferSyntaxUID) == ExplicitVRLittleEndian
    assert got.SOPInstanceUID == sample.dataset.SOPInstanceUID
    assert _sha(got) != hashlib.sha256(sample.path.read_bytes()).hexdigest()
