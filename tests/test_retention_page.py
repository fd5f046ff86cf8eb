"""The retention page (/admin/retention) in headless Chromium: a site administrator runs a review
of her organisation's records (CSP R.1112-7), reads the proposed batch with its patients and
exams, approves it, and the deletion job removes the study; another site's administrator cannot
see the batch, a technologist cannot open the page, a form without its CSRF token is refused, and
every step is in the audit trail."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from pydicom import dcmread
from tests.corpus import ct_series
from tests.simral_proc import TEST_ORGANISATION, TEST_PASSWORD, TEST_USER, SimralProcess

SITE_ADMIN = "admin_site"
OTHER_ADMIN = "admin_other"


def _old_study(
    folder: Path, *, patient_id: str, name: str, study_date: str, seed: int
) -> tuple[str, list[Path]]:
    paths = ct_series(folder, slices=2, rows=16, cols=16, patient_id=patient_id, seed=seed)
    for path in paths:
        ds = dcmread(path)
        ds.StudyDate = ds.SeriesDate = study_date
        ds.PatientBirthDate = "19500101"
        ds.PatientName = name
        ds.StudyDescription = "TDM THORAX"
        ds.save_as(path, enforce_file_format=True)
    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def test_site_admin_reviews_reads_and_approves_a_deletion_batch(tmp_path: Path, artifacts_dir: Path) -> None:
    from playwright.sync_api import sync_playwright
    from tests.portal_login import TotpDevice, login_page
    from tests.test_portal_accessibility import assert_accessible
    from tests.test_viewer_browser import CHROMIUM, CHROMIUM_ARGS

    simral = SimralProcess(tmp_path / "data")
    simral.ensure_directory()
    expired_uid = _old_study(
        tmp_path / "old", patient_id="RET001", name="ANCIEN^Paul", study_date="19980312", seed=71
    )
    recent_uid = _old_study(
        tmp_path / "recent", patient_id="RET002", name="RECENT^Anne", study_date="20240105", seed=72
    )
    simral.cli("import", str(tmp_path / "old"), str(tmp_path / "recent"))
    simral.cli("organisations", "add", "AUTRE", "--name", "Clinique Autre", "--kind", "practice")
    for login, organisation, rpps in (
        (SITE_ADMIN, TEST_ORGANISATION, "10003000028"),
        (OTHER_ADMIN, "AUTRE", "10003000036"),
    ):
        simral.cli(
            "users", "add", login, "--organisation", organisation, "--role", "site-admin",
            "--rpps", rpps, "--name", login, "--password-stdin", input=TEST_PASSWORD + "\n",
        )  # fmt: skip
    # A legal hold on the recent study: listed to its site's administrator, not to another site's.
    simral.cli("retention", "hold", "add", "--study", recent_uid, "--reason", "recours contentieux 2026-04")
    with simral:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            context = browser.new_context(
                locale="fr-FR", viewport={"width": 1400, "height": 900}, bypass_csp=True
            )
            page = context.new_page()
            login_page(page, simral.http_url, SITE_ADMIN, TEST_PASSWORD, TotpDevice())
            page.goto(simral.http_url + "/admin")
            page.click("a[href='/admin/retention']")
            page.wait_for_load_state("domcontentloaded")
            assert page.locator("tbody tr[data-batch]").count() == 0
            assert "recours contentieux 2026-04" in page.locator("main").inner_text()
            # Her scope is her organisation (no region-wide review for a site administrator).
            assert page.locator("select[name=organisation] option").all_inner_texts() == [TEST_ORGANISATION]
            page.click("form[action^='/admin/retention/review'] button")
            page.wait_for_load_state("domcontentloaded")
            notice = page.locator("p.notice").inner_text()
            assert "proposé" in notice, notice
            rows = page.locator("tbody tr[data-batch]")
            assert rows.count() == 1 and "à valider" in rows.first.inner_text()
            batch_id = rows.first.get_attribute("data-batch")
            assert_accessible(page, "retention page")
            rows.first.locator("a").click()
            page.wait_for_load_state("domcontentloaded")
            listing = page.locator("main table").inner_text()
            # The expired study only (1998 + 20 years), with what the reviewer needs to decide.
            assert "ANCIEN Paul" in listing and "RET001" in listing and "12/03/1998" in listing
            assert "TDM THORAX" in listing and "examen entier" in listing and "12/03/2018" in listing
            assert "RECENT" not in listing and recent_uid not in listing
            page.screenshot(path=str(artifacts_dir / "admin-retention-batch.png"), full_page=True)
            assert_accessible(page, "deletion batch page")
            # Without the CSRF token the approval is refused.
            assert (
                page.request.post(f"{simral.http_url}/admin/retention/batches/{batch_id}/approve").status
                == 403
            )

            other = browser.new_context(locale="fr-FR").new_page()
            login_page(other, simral.http_url, OTHER_ADMIN, TEST_PASSWORD, TotpDevice())
            other.goto(simral.http_url + "/admin/retention")
            assert other.locator("tbody tr[data-batch]").count() == 0
            assert "recours contentieux" not in other.content()
            response = other.goto(f"{simral.http_url}/admin/retention/batches/{batch_id}")
            assert response is not None and response.status == 404
            assert "ANCIEN" not in other.content()
            technologist = browser.new_context(locale="fr-FR").new_page()
            login_page(technologist, simral.http_url, TEST_USER, TEST_PASSWORD, TotpDevice())
            response = technologist.goto(simral.http_url + "/admin/retention")
            assert response is not None and response.status == 403

            page.click("form[action*='/approve'] button")
            page.wait_for_load_state("domcontentloaded")
            assert "1 suppression(s) mise(s) en file" in page.locator("p.notice").inner_text()
            deadline = time.monotonic() + 60
            while "supprimé" not in page.locator("main table").inner_text() and time.monotonic() < deadline:
                time.sleep(1)
                page.reload()
            assert "supprimé" in page.locator("main table").inner_text(), simral.log_tail(20)
            assert page.locator("form[action*='/approve']").count() == 0
            page.screenshot(path=str(artifacts_dir / "admin-retention-approved.png"), full_page=True)
            browser.close()
        studies = httpx.get(f"{simral.dicomweb_url}/studies", headers=simral.auth_headers, timeout=30).json()
        found = {s["0020000D"]["Value"][0] for s in studies}
        assert recent_uid in found and expired_uid not in found
        trail = simral.cli("audit", "search", "--actor", SITE_ADMIN, "--limit", "50").stdout
        for action in ("retention.review", "retention.batch.view", "retention.approve"):
            assert action in trail, trail
