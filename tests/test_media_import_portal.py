"""Importing another site's CD from the portal (issue 7 item 4; IHE IRWF.b), in headless Chromium.

A CHA technologist opens "Importer", picks a ZIP of CLINB's CD (DICOMDIR written by pydicom's
FileSet; CLINB's IPP and issuer, the patient's ANS test INS) and the media folder of a second CD,
keeps "Rattacher au patient de l'établissement", and sees the upload progress and the summary. The
instances are stored under CHA's IPP for that INS, CLINB's identifier kept in Other Patient IDs
Sequence. A post without the CSRF header and a user who may not store are refused.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from pydicom import dcmread
from sqlalchemy import select
from tests.corpus import ct_series
from tests.portal_login import TotpDevice, login_page
from tests.simral_proc import SimralProcess
from tests.test_media_reconciliation import OID_CHA, OID_CLINB, _burn, _patient
from tests.test_viewer_browser import CHROMIUM, CHROMIUM_ARGS

from simral.app import open_app
from simral.archive.models import Blob, Instance, Series, Study
from simral.archive.service import open_blob
from simral.config import load_settings

PASSWORD = "Import-Essai-2026!"


@dataclass
class Site:
    simral: SimralProcess
    base: Path
    zip_path: Path
    zip_study: str
    folder: Path
    folder_study: str

    @property
    def url(self) -> str:
        return self.simral.http_url


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("import-portal")
    simral = SimralProcess(base / "data", extra_env={"SIMRAL_INS_TEST_OIDS_ALLOWED": "true"})
    simral.cli("organisations", "add", "CHA", "--name", "CH A", "--patient-id-oid", OID_CHA)
    simral.cli(
        "organisations",
        "add",
        "CLINB",
        "--name",
        "Cabinet B",
        "--kind",
        "practice",
        "--patient-id-oid",
        OID_CLINB,
    )
    for login, role, rpps in (
        ("tech_a", "technologist", "10005000001"),
        ("ref_a", "referring-physician", "10005000002"),
    ):
        simral.cli(
            "users", "add", login, "--organisation", "CHA", "--role", role, "--rpps", rpps,
            "--name", login.replace("_", " ").title(), "--password-stdin", input=PASSWORD + "\n",
        )  # fmt: skip
    own = ct_series(base / "own", slices=1, rows=32, cols=32, patient_id="IPP-A1", seed=101)
    _patient(own, name="MARTIN^DOMI", issuer=None, ins=True)
    simral.cli("import", str(base / "own"), "--organisation", "CHA")
    # CLINB's CD as a ZIP, and a second CD as a folder.
    cd = ct_series(base / "cd", slices=2, rows=32, cols=32, patient_id="B-777", seed=102)
    _patient(cd, name="PAT-TROIS^DOMINIQUE", issuer=("CLINB", OID_CLINB), ins=True)
    media = base / "cd-media"
    _burn(cd, media)
    zip_path = base / "cd-clinb.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(media.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(media).as_posix())
    cd2 = ct_series(base / "cd2", slices=1, rows=32, cols=32, patient_id="B-777", seed=103)
    _patient(cd2, name="PAT-TROIS^DOMINIQUE", issuer=("CLINB", OID_CLINB), ins=True)
    folder = base / "CDROM"
    _burn(cd2, folder)
    with simral:
        yield Site(
            simral,
            base,
            zip_path,
            str(dcmread(cd[0]).StudyInstanceUID),
            folder,
            str(dcmread(cd2[0]).StudyInstanceUID),
        )


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _stored_patient_ids(site: Site, study_uid: str) -> list[tuple[str, list[str]]]:
    ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(site.simral.data_dir)}))
    try:
        with ctx.db.reading() as session:
            keys = list(
                session.scalars(
                    select(Blob.key)
                    .join(Instance, Instance.id == Blob.instance_pk)
                    .join(Series, Series.id == Instance.series_pk)
                    .join(Study, Study.id == Series.study_pk)
                    .where(Study.study_uid == study_uid)
                )
            )
        out = []
        for key in keys:
            with open_blob(ctx, key) as stream:
                ds = dcmread(stream, stop_before_pixels=True)
            out.append((str(ds.PatientID), sorted(str(i.PatientID) for i in ds.OtherPatientIDsSequence)))
        return out
    finally:
        ctx.db.dispose()


def _wait_for_outcome(page: Page) -> None:
    """Until the status line says how the import ended (finished or failed)."""
    # A locator assertion, not wait_for_function: its in-page polling is eval, which the CSP refuses.
    expect(page.locator("#import-status")).to_have_text(
        re.compile("Import terminé|import a échoué"), timeout=60000
    )


def test_technologist_imports_a_cd_from_the_portal(browser: Browser, site: Site, artifacts_dir: Path) -> None:
    page = browser.new_context(locale="fr-FR", viewport={"width": 1280, "height": 900}).new_page()
    login_page(page, site.url, "tech_a", PASSWORD, TotpDevice())
    page.click("nav >> text=Importer")
    assert page.url.endswith("/import")
    page.set_input_files("#media-files", str(site.zip_path))
    assert page.is_checked("input[name=reconcile]")
    page.click("#media-import button[type=submit]")
    status = page.locator("#import-status")
    _wait_for_outcome(page)
    text = status.inner_text()
    assert "2 enregistré(s)" in text and "0 refusé(s)" in text, text
    assert "2 rattaché(s) au patient de l'établissement" in text, text
    assert int(page.get_attribute("#upload-progress", "value") or 0) > 0
    page.screenshot(path=str(artifacts_dir / "media-import.png"), full_page=True)
    stored = _stored_patient_ids(site, site.zip_study)
    assert stored == [("IPP-A1", ["279035121518989", "B-777"])] * 2

    # A CD folder (webkitdirectory): the browser sends the relative paths, DICOMDIR included.
    page.set_input_files("#media-folder", str(site.folder))
    page.click("#media-import button[type=submit]")
    _wait_for_outcome(page)
    assert "1 enregistré(s)" in status.inner_text(), status.inner_text()
    assert _stored_patient_ids(site, site.folder_study) == [("IPP-A1", ["279035121518989", "B-777"])]
    page.context.close()


def test_upload_needs_the_csrf_header_and_the_right_to_store(browser: Browser, site: Site) -> None:
    context = browser.new_context()
    page = context.new_page()
    login_page(page, site.url, "ref_a", PASSWORD, TotpDevice())
    # A referring physician sees studies but does not add any: no nav entry, 403.
    assert page.locator("nav >> text=Importer").count() == 0
    assert page.goto(site.url + "/import").status == 403  # type: ignore[union-attr]
    cookies = {c["name"]: c["value"] for c in context.cookies()}
    context.close()
    files = {"media": ("x.zip", site.zip_path.read_bytes(), "application/zip")}
    refused = httpx.post(f"{site.url}/import", files=files, cookies=cookies, timeout=30)
    assert refused.status_code == 403  # no X-CSRF-Token header: refused before anything is read
    token = site.simral.token_for("ref_a")
    forbidden = httpx.post(
        f"{site.url}/import", files=files, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert forbidden.status_code == 403
