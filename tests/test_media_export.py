"""Media export (IHE PDI ZIP): a valid DICOMDIR, re-imported elsewhere identically, access-checked.

A multi-series CT study and small SC/MR/CR studies are exported with ``simral export`` and with the
portal's download (``/studies/{uid}/export.zip``). The ZIP has DICOMDIR and README.TXT at its root
and PS3.10 file IDs; dicom3tools' ``dciodvfy`` finds no error in the DICOMDIR (Basic Directory IOD);
pydicom reads it back as a File-set referencing every instance; a second simral imports the ZIP
and holds data sets equal to the originals. A user of another organisation gets 404, and every
export is in the audit trail.
"""

from __future__ import annotations

import subprocess
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.fileset import FileSet
from tests.corpus import multi_series_study, small_instances
from tests.dicomcmp import same_instance
from tests.simral_proc import SimralProcess

DCIODVFY = "/usr/bin/dciodvfy"
XORRISO = "/usr/bin/xorriso"


def _uids(paths: list[Path]) -> dict[str, Path]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}


def _dciodvfy_errors(dicomdir: Path) -> list[str]:
    result = subprocess.run(
        [DCIODVFY, str(dicomdir)], capture_output=True, text=True, timeout=120, check=False
    )
    output = result.stdout + result.stderr
    return [line for line in output.splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    base = tmp_path_factory.mktemp("export-corpus")
    ct = multi_series_study(base / "ct", series=2, per_series=4, rows=64, cols=64, seed=31)
    small = small_instances(base / "small", count=12, per_series=2, seed=32, rows=32, cols=32)
    return {"ct": ct, "small": small}


def test_export_reimport_and_validate(originals: dict[str, list[Path]], tmp_path: Path) -> None:
    source = SimralProcess(tmp_path / "a")
    source.cli("import", str(originals["ct"][0].parent), str(originals["small"][0].parent))
    study_uids = sorted(
        {
            str(dcmread(p, stop_before_pixels=True).StudyInstanceUID)
            for p in originals["ct"] + originals["small"]
        }
    )
    target = tmp_path / "export.zip"
    printed = source.cli("export", *study_uids, "--output", str(target)).stdout
    everything = _uids(originals["ct"] + originals["small"])
    assert f"{len(everything)} instances of {len(study_uids)} studies" in printed

    with zipfile.ZipFile(target) as archive:
        names = archive.namelist()
        assert names[:2] == ["DICOMDIR", "README.TXT"]
        images = [n for n in names if n not in ("DICOMDIR", "README.TXT")]
        assert len(images) == len(everything)
        # PS3.10 §8.2 file IDs: upper-case letters, digits and underscore, 8 characters a component.
        for name in images:
            for component in name.split("/"):
                assert len(component) <= 8 and component.replace("_", "").isalnum() and component.isupper()
        archive.extractall(tmp_path / "media")
    media = tmp_path / "media"
    assert _dciodvfy_errors(media / "DICOMDIR") == []
    file_set = FileSet(dcmread(media / "DICOMDIR"))
    assert {str(i.SOPInstanceUID) for i in file_set} == set(everything)
    assert f"Images: {len(everything)}" in (media / "README.TXT").read_text()

    # Re-imported into another simral: equal data sets.
    other = SimralProcess(tmp_path / "b")
    summary = other.cli("import", str(target)).stdout
    assert "stored" in summary
    with other:
        for uid, original in everything.items():
            header = dcmread(original, stop_before_pixels=True)
            params = {
                "requestType": "WADO",
                "studyUID": header.StudyInstanceUID,
                "seriesUID": header.SeriesInstanceUID,
                "objectUID": uid,
                "contentType": "application/dicom",
                "transferSyntax": "*",
            }
            response = httpx.get(
                f"{other.http_url}/wado", params=params, headers=other.auth_headers, timeout=30
            )
            assert response.status_code == 200, response.text
            copy = tmp_path / "reimported.dcm"
            copy.write_bytes(response.content)
            assert same_instance(original, copy) is None
    trail = source.cli("audit", "search", "--action", "study.export", "--limit", "100").stdout
    assert trail.count("study.export") == len(study_uids)


def test_portal_download_follows_the_access_policy(originals: dict[str, list[Path]], tmp_path: Path) -> None:
    simral = SimralProcess(tmp_path / "a")
    simral.cli("import", str(originals["ct"][0].parent))
    study_uid = str(dcmread(originals["ct"][0], stop_before_pixels=True).StudyInstanceUID)
    simral.cli("organisations", "add", "OTHER", "--name", "Autre site")
    simral.cli(
        "users", "add", "tech_other", "--organisation", "OTHER", "--role", "technologist",
        "--password-stdin", input="Autre-Site-2026!x\n",
    )  # fmt: skip
    with simral:
        url = f"{simral.http_url}/studies/{study_uid}/export.zip"
        anonymous = httpx.get(url, timeout=30)  # a portal path: sent to the login page
        assert anonymous.status_code == 303 and "/login" in anonymous.headers["location"]
        outsider = {"Authorization": f"Bearer {simral.token_for('tech_other')}"}
        assert httpx.get(url, headers=outsider, timeout=30).status_code == 404
        response = httpx.get(url, headers=simral.auth_headers, timeout=60)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/zip"
        assert "attachment" in response.headers["content-disposition"]
        download = tmp_path / "download.zip"
        download.write_bytes(response.content)
        with zipfile.ZipFile(download) as archive:
            assert "DICOMDIR" in archive.namelist()
            assert len(archive.namelist()) == len(originals["ct"]) + 2
        # The temporary ZIP is removed once sent (a background task after the response).
        deadline = time.monotonic() + 10
        while (scratch := list(simral.data_dir.rglob(".export-*"))) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert scratch == [], f"scratch files left behind: {scratch}"


def test_cd_image_export_read_by_xorriso(originals: dict[str, list[Path]], tmp_path: Path) -> None:
    """``simral export --iso``: an ISO 9660 image (PS3.12 Annex F, 120 mm CD-R) that another tool
    (Debian's xorriso) lists and extracts: DICOMDIR and README.TXT at the root, PS3.10 file IDs,
    the DICOMDIR valid for dciodvfy, every instance's data set equal to the original."""
    source = SimralProcess(tmp_path / "a")
    source.cli("import", str(originals["ct"][0].parent))
    everything = _uids(originals["ct"])
    study_uid = str(dcmread(originals["ct"][0], stop_before_pixels=True).StudyInstanceUID)
    image = tmp_path / "exam.iso"
    source.cli("export", study_uid, "--iso", "--output", str(image))
    listed = subprocess.run(
        [XORRISO, "-indev", str(image), "-find", "/", "-type", "f"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    files = sorted(line.strip().strip("'") for line in listed.splitlines() if line.strip().startswith("'/"))
    assert "/DICOMDIR" in files and "/README.TXT" in files
    images = [f for f in files if f not in ("/DICOMDIR", "/README.TXT")]
    assert len(images) == len(everything)
    for name in images:
        for component in name.strip("/").split("/"):
            assert len(component) <= 8 and component.isupper()
    extracted = tmp_path / "cd"
    subprocess.run(
        [XORRISO, "-osirrox", "on", "-indev", str(image), "-extract", "/", str(extracted)],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert _dciodvfy_errors(extracted / "DICOMDIR") == []
    file_set = FileSet(dcmread(extracted / "DICOMDIR"))
    assert {str(i.SOPInstanceUID) for i in file_set} == set(everything)
    for instance in file_set:
        assert same_instance(everything[str(instance.SOPInstanceUID)], Path(instance.path)) is None
