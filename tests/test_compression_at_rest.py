"""Compression at rest by rule (issue 9, item 2) against one ``simral serve``.

A generated corpus of native CT / MR / CR / OT instances (and pydicom's 10-frame MR, a JPEG
Baseline file, a native MR flagged lossy) is imported; a JPEG-LS rule for CT and MR is run with
``simral compression run``, then a JPEG 2000 rule for CR and OT is applied by the server's
background pass. Checked: stored bytes drop, syntaxes are the rules', every pixel of every stored
instance equals the original's, ``simral check`` is clean, dcmtk ``getscu`` and ``movescu`` to a
``storescp`` accepting only uncompressed syntaxes receive the original syntax with identical data,
WADO-RS ``transfer-syntax=*`` gets the compressed syntax, lossy inputs are left untouched.
PS3.5 §8.2.3 (JPEG-LS), §8.2.4 (JPEG 2000), §10 (transfer syntaxes); PS3.4 C.4.2, C.4.3.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    generate_uid,
)
from tests.corpus import ct_series, small_instances
from tests.dicomcmp import same_instance
from tests.peers import StoreSCP
from tests.simral_proc import TEST_ORGANISATION, SimralProcess

from simral.access.policy import SYSTEM
from simral.app import open_app
from simral.archive import consistency
from simral.audit import service as audit
from simral.compression import service as compression
from simral.config import load_settings
from simral.context import AppContext
from simral.dicom.compression import NotCompressible, compress_file
from simral.nodes import service as nodes

SCU = "DCMTK"
DEST = "LESCP"


class LittleEndianStoreSCP(StoreSCP):
    """dcmtk ``storescp`` with its default transfer syntaxes: uncompressed only (no ``--accept-all``)."""

    def command(self) -> list[str]:
        return [arg for arg in super().command() if arg != "--accept-all"]


@dataclass
class Archive:
    simral: SimralProcess
    dest: StoreSCP
    originals: dict[str, Path]  # SOP Instance UID -> file imported
    modality: dict[str, str]
    study: dict[str, str]  # SOP Instance UID -> Study Instance UID
    before: dict[str, tuple[str, int, str]]  # SOP UID -> (syntax, size, sha256) of the stored blob
    after_run: dict[str, tuple[str, int, str]]
    after_pass: dict[str, tuple[str, int, str]]
    run_summary: dict[str, dict[str, object]]
    jpeg_uid: str
    lossy_flag_uid: str
    #: The same data folder opened in this process (service calls without a CLI start-up each).
    ctx: AppContext

    def dcmtk(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                f"/usr/bin/{tool}",
                "-aet",
                SCU,
                "-aec",
                self.simral.ae_title,
                *args,
                "127.0.0.1",
                str(self.simral.dicom_port),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def _stored(simral: SimralProcess) -> dict[str, tuple[str, int, str]]:
    """Every blob of the filesystem store by SOP Instance UID: (transfer syntax, size, SHA-256)."""
    blobs: dict[str, tuple[str, int, str]] = {}
    for path in (simral.data_dir / "blobs").glob("*/*/*.dcm"):
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # replaced by its compressed copy meanwhile
            continue
        meta = dcmread(io.BytesIO(data), stop_before_pixels=True)
        blobs[str(meta.SOPInstanceUID)] = (
            str(meta.file_meta.TransferSyntaxUID),
            len(data),
            hashlib.sha256(data).hexdigest(),
        )
    return blobs


def _blob_path(simral: SimralProcess, sop_uid: str) -> Path:
    return next((simral.data_dir / "blobs").glob(f"*/*/{sop_uid}.*.dcm"))


def _corpus(folder: Path) -> tuple[list[Path], str, str]:
    """CT, MR, CR and OT instances, a 10-frame MR, a JPEG Baseline file and an MR flagged lossy."""
    paths = ct_series(folder / "ct", slices=16, rows=128, cols=128, patient_id="COMPCT01")
    paths += small_instances(folder / "small", count=18, per_series=3, studies=3, seed=7)
    for name in ("emri_small.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        target = folder / "pydicom" / name
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(str(get_testdata_file(name)), target)
        paths.append(target)
    jpeg_uid = str(dcmread(paths[-1], stop_before_pixels=True).SOPInstanceUID)
    mr = next(p for p in paths if dcmread(p, stop_before_pixels=True).get("Modality") == "MR")
    flagged = dcmread(mr)
    flagged.SOPInstanceUID = generate_uid(entropy_srcs=["compression-test", "lossy-flag"])
    flagged.file_meta.MediaStorageSOPInstanceUID = flagged.SOPInstanceUID
    flagged.LossyImageCompression = "01"
    flagged.LossyImageCompressionRatio = "8"
    flagged.LossyImageCompressionMethod = "ISO_10918_1"
    lossy_path = folder / "small" / "lossy-flagged.dcm"
    flagged.save_as(lossy_path, enforce_file_format=True)
    paths.append(lossy_path)
    return paths, jpeg_uid, str(flagged.SOPInstanceUID)


def _wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    base = tmp_path_factory.mktemp("compression")
    paths, jpeg_uid, lossy_flag_uid = _corpus(base / "corpus")
    headers = {p: dcmread(p, stop_before_pixels=True) for p in paths}
    originals = {str(h.SOPInstanceUID): p for p, h in headers.items()}
    modality = {str(h.SOPInstanceUID): str(h.get("Modality", "")) for h in headers.values()}
    study = {str(h.SOPInstanceUID): str(h.StudyInstanceUID) for h in headers.values()}
    with LittleEndianStoreSCP(aet=DEST, extra_args=["+B"]) as dest:
        simral = SimralProcess(base / "data", extra_env={"SIMRAL_COMPRESSION_CHECK_SECONDS": "0.5"})
        simral.ensure_directory()
        # The same data folder opened in this process: service calls cost no CLI start-up each.
        ctx = open_app(load_settings(environ={}, overrides={"data_dir": simral.data_dir}))
        with ctx.db.unit_of_work() as session:
            for name, ae, port in (("dcmtk", SCU, 104), ("lescp", DEST, dest.dicom_port)):
                nodes.create(
                    session,
                    name=name,
                    ae_title=ae,
                    host="127.0.0.1",
                    port=port,
                    organisation=TEST_ORGANISATION,
                    principal=SYSTEM,
                )
        with simral:
            simral.cli("import", *(str(p) for p in paths))
            before = _stored(simral)
            assert set(before) == set(originals)
            simral.cli(
                "compression",
                "rule",
                "add",
                "--syntax",
                "jpeg-ls",
                "--modality",
                "CT,MR",
                "--organisation",
                TEST_ORGANISATION,
                "--older-than-days",
                "0",
            )
            started = time.monotonic()
            run = simral.cli("compression", "run", "--json")
            print(f"compression run: {time.monotonic() - started:.1f} s")
            run_summary = json.loads(run.stdout)
            after_run = _stored(simral)
            with ctx.db.unit_of_work() as session:
                compression.create_rule(session, syntax="j2k", modalities=["CR", "OT"], principal=SYSTEM)

            def pass_done() -> bool:
                stored = _stored(simral)
                return all(
                    stored.get(uid, ("",))[0] == JPEG2000Lossless
                    for uid, m in modality.items()
                    if m in ("CR", "OT") and uid != jpeg_uid
                )

            _wait_for(pass_done, 60, "the background pass to compress CR and OT")
            after_pass = _stored(simral)
            yield Archive(
                simral,
                dest,
                originals,
                modality,
                study,
                before,
                after_run,
                after_pass,
                run_summary,
                jpeg_uid,
                lossy_flag_uid,
                ctx,
            )
        ctx.db.dispose()


def test_rules_choose_the_syntax_and_sizes_drop(archive: Archive) -> None:
    special = {archive.jpeg_uid, archive.lossy_flag_uid}
    for uid, m in archive.modality.items():
        if uid in special:
            continue
        # The JPEG-LS rule compressed CT and MR only; the others waited for the second rule.
        expected_run = JPEGLSLossless if m in ("CT", "MR") else ExplicitVRLittleEndian
        assert archive.after_run[uid][0] == expected_run, (m, archive.after_run[uid][0])
        expected = JPEGLSLossless if m in ("CT", "MR") else JPEG2000Lossless
        assert archive.after_pass[uid][0] == expected, (m, archive.after_pass[uid][0])
    total_before = sum(size for _, size, _ in archive.before.values())
    total_after = sum(size for _, size, _ in archive.after_pass.values())
    ratio = total_before / total_after
    print(f"stored bytes {total_before} -> {total_after}: ratio {ratio:.2f}")
    assert ratio > 1.5
    compressed = [uid for uid in archive.modality if uid not in special]
    assert all(archive.after_pass[uid][1] < archive.before[uid][1] for uid in compressed)
    total = archive.run_summary["total"]
    assert total["compressed"] == sum(1 for u in compressed if archive.modality[u] in ("CT", "MR"))
    assert total["skipped"] == 1
    assert any("Lossy Image Compression is 01" in reason for reason in total["reasons"])  # type: ignore[union-attr]


def test_lossy_inputs_left_untouched(archive: Archive) -> None:
    for uid in (archive.jpeg_uid, archive.lossy_flag_uid):
        assert archive.after_pass[uid] == archive.before[uid]
    assert archive.after_pass[archive.jpeg_uid][0] == JPEGBaseline8Bit
    with archive.ctx.db.reading() as session:
        skipped = {o.sop_uid: o.reason for o in compression.outcomes(session, state="skipped")}
    assert skipped == {archive.lossy_flag_uid: "Lossy Image Compression is 01 (PS3.3 C.7.6.1.1.5)"}


def test_a_job_run_again_changes_nothing(archive: Archive) -> None:
    """A retry after a crash that followed the switch finds other bytes: nothing to do (idempotent)."""
    uid = next(u for u, m in archive.modality.items() if m == "CT")
    result = compression.compress_instance(
        archive.ctx, sop_uid=uid, expected_sha256=archive.before[uid][2], syntax_uid=JPEGLSLossless
    )
    assert result.state == "unchanged"
    assert _stored(archive.simral)[uid] == archive.after_pass[uid]


def test_every_stored_pixel_equals_the_original(archive: Archive) -> None:
    compared = frames = 0
    for uid, original_path in archive.originals.items():
        if uid == archive.jpeg_uid:
            continue
        stored = dcmread(_blob_path(archive.simral, uid))
        original = dcmread(original_path)
        assert stored.SOPInstanceUID == original.SOPInstanceUID
        if stored.file_meta.TransferSyntaxUID.is_compressed:
            assert stored.LossyImageCompression == "00"
            assert stored.PhotometricInterpretation == original.PhotometricInterpretation
        assert np.array_equal(stored.pixel_array, original.pixel_array), uid
        compared += 1
        frames += int(original.get("NumberOfFrames", 1) or 1)
    assert compared == len(archive.originals) - 1
    assert frames >= 40


def test_check_is_clean_and_compression_audited(archive: Archive) -> None:
    report = consistency.check(archive.ctx)  # what `simral check` runs
    assert report.clean and report.checked == len(archive.originals), report
    ct_study = next(archive.study[u] for u, m in archive.modality.items() if m == "CT")
    with archive.ctx.db.reading() as session:
        records = audit.search(session, organisations=None, study_uid=ct_study, action="instance.compress")
        assert records and all(r.actor == "system:compression" for r in records)
        assert sum(r.detail["compressed"] for r in records) == 16
        assert records[0].patient_id == "COMPCT01"


def _compare_received(archive: Archive, received: list[Path], expected_uids: set[str]) -> None:
    by_uid = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in received}
    assert set(by_uid) == expected_uids, sorted(expected_uids ^ set(by_uid))[:5]
    for uid, path in by_uid.items():
        syntax = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert not syntax.is_compressed, (uid, syntax)
        problem = same_instance(archive.originals[uid], path)
        assert problem is None, problem


def _studies(archive: Archive, *modalities: str) -> dict[str, set[str]]:
    studies: dict[str, set[str]] = {}
    for uid, m in archive.modality.items():
        if m in modalities and uid != archive.jpeg_uid:
            studies.setdefault(archive.study[uid], set()).add(uid)
    return studies


def test_getscu_little_endian_receives_the_original_syntax(archive: Archive, tmp_path: Path) -> None:
    studies = _studies(archive, "CT", "MR", "CR")
    expected: set[str] = set()
    for study_uid, uids in studies.items():
        result = archive.dcmtk(
            "getscu", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
            "+B", "-od", str(tmp_path),
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        expected |= uids
    _compare_received(archive, sorted(tmp_path.iterdir()), expected)


def test_movescu_to_uncompressed_only_peer_receives_the_original_syntax(archive: Archive) -> None:
    archive.dest.clear()
    studies = _studies(archive, "CT", "MR", "OT")
    result = archive.dcmtk(
        "movescu", "-S", "-aem", DEST, "-k", "QueryRetrieveLevel=STUDY",
        "-k", "StudyInstanceUID=" + "\\".join(sorted(studies)),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    _compare_received(archive, archive.dest.files(), set().union(*studies.values()))


def test_wado_rs_any_syntax_gets_the_compressed_bytes(archive: Archive) -> None:
    client = DICOMwebClient(url=archive.simral.dicomweb_url, headers=archive.simral.auth_headers)
    for m, expected in (("CT", JPEGLSLossless), ("MR", JPEGLSLossless), ("CR", JPEG2000Lossless)):
        uid = next(u for u, mod in archive.modality.items() if mod == m and u != archive.lossy_flag_uid)
        original = dcmread(archive.originals[uid])
        series = str(original.SeriesInstanceUID)
        stored = client.retrieve_instance(
            archive.study[uid], series, uid, media_types=(("application/dicom", "*"),)
        )
        assert stored.file_meta.TransferSyntaxUID == expected
        assert stored.PixelData == dcmread(_blob_path(archive.simral, uid)).PixelData
        assert np.array_equal(stored.pixel_array, original.pixel_array)
        native = client.retrieve_instance(
            archive.study[uid], series, uid, media_types=(("application/dicom", ExplicitVRLittleEndian),)
        )
        assert native.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert native.PixelData == original.PixelData
        # No transfer-syntax parameter: Explicit VR Little Endian (PS3.18 §8.7.3.5.2).
        response = httpx.get(
            f"{archive.simral.dicomweb_url}/studies/{archive.study[uid]}/series/{series}/instances/{uid}",
            headers={**archive.simral.auth_headers, "Accept": 'multipart/related; type="application/dicom"'},
            timeout=60,
        )
        assert response.status_code == 200
        assert f"transfer-syntax={ExplicitVRLittleEndian}".encode() in response.content[:2000]


def test_rules_cli_and_errors(archive: Archive) -> None:
    rules = json.loads(archive.simral.cli("compression", "rule", "list", "--json").stdout)
    assert [(r["syntax"], r["modalities"], r["transfer_syntax_uid"]) for r in rules] == [
        ("jpeg-ls", ["CT", "MR"], JPEGLSLossless),
        ("j2k", ["CR", "OT"], JPEG2000Lossless),
    ]
    assert rules[0]["organisation"] == TEST_ORGANISATION and rules[0]["older_than_days"] == 0
    with archive.ctx.db.unit_of_work() as session:
        for syntax, organisation, message in (
            ("htj2k", "", "no encoder"),  # pydicom 3.0 has no HTJ2K encoder: refused, not left idle
            ("webp", "", "unknown syntax"),
            ("j2k", "NOSUCHORG", "NOSUCHORG"),
        ):
            with pytest.raises(compression.CompressionError, match=message):
                compression.create_rule(session, syntax=syntax, organisation=organisation, principal=SYSTEM)
        with pytest.raises(compression.CompressionError, match="no compression rule 999"):
            compression.delete_rule(session, 999, principal=SYSTEM)
        extra = compression.create_rule(session, syntax="j2k", modalities="xa", principal=SYSTEM).id
    with archive.ctx.db.unit_of_work() as session:
        compression.delete_rule(session, extra, principal=SYSTEM)
    with archive.ctx.db.reading() as session:
        assert [rule.id for rule in compression.list_rules(session)] == [r["id"] for r in rules]


# -- the codec alone (no server) -----------------------------------------------------------------


def test_j2k_keeps_rgb_and_every_frame(tmp_path: Path) -> None:
    source = Path(str(get_testdata_file("SC_rgb_2frame.dcm")))
    result = compress_file(source, JPEG2000Lossless, tmp_path / "out.dcm")
    copy, original = dcmread(result.path), dcmread(source)
    assert result.frames == 2 and copy.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert copy.PhotometricInterpretation == "RGB"  # no multi-component transform (PS3.5 §8.2.4)
    assert copy.LossyImageCompression == "00"
    assert np.array_equal(copy.pixel_array, original.pixel_array)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("rtdose.dcm", "encoding failed"),  # 32 bits per sample: beyond JPEG-LS and JPEG 2000
        ("MR_small_bigendian.dcm", "only native little endian"),
        ("JPEG2000.dcm", "already encapsulated"),
        ("rtplan.dcm", "no Pixel Data"),
    ],
)
def test_left_as_stored_with_a_reason(tmp_path: Path, name: str, reason: str) -> None:
    with pytest.raises(NotCompressible, match=reason):
        compress_file(Path(str(get_testdata_file(name))), JPEGLSLossless, tmp_path / "out.dcm")
