"""CLI and archive services in-process: settings, import (files, folders, DICOMDIR, ZIP), check.

These run the same code paths as ``simral import`` / ``simral check`` / ``simral nodes`` against
the embedded defaults (SQLite + filesystem) and, for the store, against SeaweedFS S3 too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from tests.conftest import backend_env
from tests.corpus import bad_inputs, ct_series

from simral.access.policy import SYSTEM
from simral.app import open_app
from simral.archive.consistency import check
from simral.archive.importing import import_paths
from simral.archive.service import ingest_file
from simral.config import load_settings
from simral.context import AppContext

SIMRAL = str(Path(sys.executable).parent / "simral")


def _app(tmp_path: Path, env: dict[str, str] | None = None) -> AppContext:
    settings = load_settings(environ={**(env or {}), "SIMRAL_DATA_DIR": str(tmp_path / "data")})
    return open_app(settings)


def test_settings_layers(tmp_path: Path) -> None:
    config = tmp_path / "simral.toml"
    config.write_text('ae_title = "FROMFILE"\n[dicom]\nport = 4242\n[s3]\nbucket = "b1"\n')
    settings = load_settings(config, environ={"SIMRAL_DICOM_PORT": "5000"}, overrides={"ae_title": "FLAG"})
    assert settings.ae_title == "FLAG"  # flag beats file
    assert settings.dicom_port == 5000  # environment beats file
    assert settings.s3_bucket == "b1"  # TOML tables flatten to names
    assert load_settings(environ={}).effective_database_url.startswith("sqlite:///")
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_setting = 1\n")
    with pytest.raises(ValueError, match="unknown setting"):
        load_settings(bad, environ={})


def test_import_dicomdir_zip_and_folder(tmp_path: Path) -> None:
    ctx = _app(tmp_path)
    dicomdir = Path(get_testdata_file("DICOMDIR"))
    referenced = [r for r in dcmread(dicomdir).DirectoryRecordSequence if "ReferencedFileID" in r]
    summary = import_paths(ctx, [dicomdir], principal=SYSTEM)
    assert summary.outcomes["stored"] == len(referenced) == 31
    assert not summary.rejected

    series = ct_series(tmp_path / "ct", slices=5, rows=64, cols=64, patient_id="ZIP1", seed=3)
    archive = tmp_path / "exam.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in series:
            zf.write(path, f"exam/{path.name}")
    summary = import_paths(ctx, [archive], principal=SYSTEM)
    assert summary.outcomes["stored"] == 5

    # A folder holding the same files again: every one is an identical duplicate.
    summary = import_paths(ctx, [tmp_path / "ct"], principal=SYSTEM)
    assert summary.outcomes["duplicate"] == 5
    assert check(ctx).clean


def test_import_cli_reports_rejections(tmp_path: Path) -> None:
    bad = bad_inputs(tmp_path / "bad")
    good = ct_series(tmp_path / "good", slices=2, rows=32, cols=32, patient_id="CLI1", seed=5)
    result = subprocess.run(
        [SIMRAL, "import", "--data-dir", str(tmp_path / "data"), *map(str, bad.values()), *map(str, good)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 1  # some files were rejected
    assert "stored" in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith("rejected:")]
    assert len(lines) == len(bad)
    assert any("missing StudyInstanceUID" in line for line in lines)
    assert any("missing SOPInstanceUID" in line for line in lines)
    ok = subprocess.run(
        [SIMRAL, "check", "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout
    assert "checked 2 indexed blobs" in ok.stdout


def test_nodes_cli(tmp_path: Path) -> None:
    data = str(tmp_path / "data")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SIMRAL, "nodes", *args, "--data-dir", data],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "COLUMNS": "200"},
        )

    # A node belongs to one organisation or is explicitly archive-wide, never silently either.
    unscoped = run("add", "pacs", "--ae", "PACS1", "--host", "127.0.0.1", "--port", "104")
    assert unscoped.returncode == 1 and "--archive-wide" in unscoped.stderr
    unknown_org = run(
        "add", "pacs", "--ae", "PACS1", "--host", "127.0.0.1", "--port", "104", "--organisation", "NOPE"
    )
    assert unknown_org.returncode == 1 and "no organisation" in unknown_org.stderr
    added = run("add", "pacs", "--ae", "PACS1", "--host", "127.0.0.1", "--port", "104", "--archive-wide")
    assert added.returncode == 0, added.stderr
    duplicate = run("add", "other", "--ae", "PACS1", "--host", "127.0.0.1", "--port", "105", "--archive-wide")
    assert duplicate.returncode == 1 and "already registered" in duplicate.stdout + duplicate.stderr
    invalid = run(
        "add", "bad", "--ae", "WAY_TOO_LONG_AE_TITLE", "--host", "h", "--port", "1", "--archive-wide"
    )
    assert invalid.returncode == 1
    listing = run("list")
    assert "PACS1" in listing.stdout and "pacs" in listing.stdout and "(archive-wide)" in listing.stdout
    assert run("remove", "pacs").returncode == 0
    assert "PACS1" not in run("list").stdout
    assert run("remove", "pacs").returncode == 1


@pytest.mark.parametrize("backend", ["sqlite-fs", "postgres-s3"])
def test_check_finds_and_repairs_problems(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    ctx = _app(tmp_path, backend_env(backend, request))
    files = ct_series(tmp_path / "ct", slices=4, rows=32, cols=32, patient_id="CHK1", seed=11)
    for path in files:
        assert ingest_file(ctx, path, principal=SYSTEM).outcome == "stored"
    report = check(ctx)
    assert report.clean and report.checked == 4

    keys = sorted(ctx.store.iter_keys())
    # 1. an orphan blob, 2. a corrupted blob, 3. a missing blob
    with open(files[0], "rb") as fh:
        ctx.store.put_stream("orphan/x/y.dcm", fh)
    with open(files[1], "rb") as fh:
        data = bytearray(fh.read())
    data[-1] ^= 0xFF
    import io

    ctx.store.put_stream(keys[1], io.BytesIO(bytes(data)))
    ctx.store.delete(keys[2])
    report = check(ctx)
    assert not report.clean
    assert report.orphans == ["orphan/x/y.dcm"]
    assert report.mismatches == [keys[1]]
    assert report.missing == [keys[2]]

    repaired = check(ctx, repair=True)
    assert repaired.repaired >= 1
    after = check(ctx)
    assert after.orphans == [] and after.mismatches == [keys[1]] and after.missing == [keys[2]]


def test_interrupted_ingest_is_recovered(tmp_path: Path) -> None:
    """A blob staged and indexed but not published (crash between commit and rename) is published
    at recovery; a staged blob never indexed is discarded (DESIGN.md §3)."""
    from simral.archive.service import recover_staged
    from simral.storage.staging import Staging

    ctx = _app(tmp_path)
    files = ct_series(tmp_path / "ct", slices=2, rows=32, cols=32, patient_id="REC1", seed=13)
    assert ingest_file(ctx, files[0], principal=SYSTEM).outcome == "stored"
    key = next(iter(ctx.store.iter_keys()))
    staging = Staging(ctx.store)
    # Simulate "committed but not published": move the blob back to the staging area.
    local = ctx.store.local_path(key)
    assert local is not None
    shutil.move(local, staging.staged_path(key))
    assert not check(ctx, verify_hashes=False).clean
    # And a staged file whose transaction never committed.
    shutil.copy(files[1], staging.staged_path("1.2.3/4.5.6/7.8.9.0000.dcm"))
    published, deleted = recover_staged(ctx)
    assert (published, deleted) == (1, 1)
    assert check(ctx).clean
