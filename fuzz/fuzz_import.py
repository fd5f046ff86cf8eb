"""Fuzz media import (IHE PDI media, ZIP uploads; PS3.10 §8 DICOMDIR): ``archive.importing.import_paths``
as the portal's upload calls it (a folder) and as ``simral import DICOMDIR`` does (the DICOMDIR).

Input: a mode byte then the file. Mode 0: a ZIP uploaded alone (``upload.zip`` in the upload
folder). Mode 1: a DICOMDIR placed at the root of the fixed media (``fuzz/media``: the two files
the seed DICOMDIR references), imported by its path and then as a folder.
Expected: an :class:`~simral.archive.importing.ImportSummary` (unreadable entries counted as
rejected with a reason); no exception, no error logged, no file left in the scratch folder, no
descriptor left open, nothing read outside the media.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fuzz import harness

with harness.instrumented(__name__):
    from simral.access.policy import Principal
    from simral.archive.importing import import_paths

NAME = "import"
MAX_LEN = 32 * 1024
MEDIA = harness.FUZZ_DIR / "media"
IMPORTER = Principal(kind="dicom-node", name="import", organisation=harness.SITE, via="cli")

_site = harness.SiteHolder()
_oracle = harness.Oracle()


def setup() -> None:
    _oracle.install()


def teardown() -> None:
    _oracle.uninstall()
    _site.close()


def _check(summary: object) -> None:
    rejected = getattr(summary, "rejected", [])
    for name, reason in rejected:
        if not reason:
            raise harness.Bug(f"{name} rejected without a reason")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    site = _site.get()
    upload = site.base / "upload"
    shutil.rmtree(upload, ignore_errors=True)
    mode, payload = data[0] % 2, data[1:]
    if mode == 0:
        upload.mkdir()
        (upload / "upload.zip").write_bytes(payload)
        with _oracle.watching(scratch=site.scratch):
            _check(import_paths(site.ctx, [upload], principal=IMPORTER))
    else:
        shutil.copytree(MEDIA, upload)
        dicomdir = Path(upload, "DICOMDIR")
        dicomdir.write_bytes(payload)
        with _oracle.watching(scratch=site.scratch):
            _check(import_paths(site.ctx, [dicomdir], principal=IMPORTER))
            _check(import_paths(site.ctx, [upload], principal=IMPORTER))
    shutil.rmtree(upload, ignore_errors=True)


if harness.fuzzing(__name__):
    harness.main(NAME, setup, test_one_input, max_len=MAX_LEN)
