"""The portal in headless Chromium: login with TOTP, organisation walls, break-glass, audit.

A technologist of organisation CHA logs in (password, then TOTP enrolment from the QR page), sees
CHA's study and not CLINB's; opening CLINB's study by its URL shows "no such study or no access"
with the break-glass form; break-glass with a reason opens that one study; the auditor then finds
the emergency access, its author and its reason in the audit trail. Screenshots go to
``test-artifacts/``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from pydicom import dcmread
from tests.corpus import ct_series
from tests.portal_login import TotpDevice, login_page, submit_password
from tests.simral_proc import SimralProcess
from tests.test_viewer_browser import CHROMIUM, CHROMIUM_ARGS

PASSWORD = "Portail-Essai-2026!"


@dataclass
class Portal:
    simral: SimralProcess
    study_a: str
    study_b: str
    devices: dict[str, TotpDevice]

    @property
    def url(self) -> str:
        return self.simral.http_url


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    base = tmp_path_factory.mktemp("portal")
    simral = SimralProcess(base / "data")
    simral.cli("organisations", "add", "CHA", "--name", "CH A", "--finess", "990000011")
    simral.cli("organisations", "add", "CLINB", "--name", "Cabinet B", "--kind", "practice")
    simral.cli("organisations", "add", "REGION", "--name", "GRADeS", "--kind", "regional-operator")
    for login, org, role in (("tech_a", "CHA", "technologist"), ("auditrice", "REGION", "auditor")):
        simral.cli(
            "users",
            "add",
            login,
            "--organisation",
            org,
            "--role",
            role,
            "--rpps",
            "10003000001" if login == "tech_a" else "10003000002",
            "--name",
            login.replace("_", " ").title(),
            "--password-stdin",
            input=PASSWORD + "\n",
        )
    # A technologist working at both sites: acts for one at a time.
    simral.cli(
        "users",
        "add",
        "tech_ab",
        "--organisation",
        "CHA",
        "--role",
        "technologist",
        "--rpps",
        "10003000003",
        "--name",
        "Tech Ab",
        "--password-stdin",
        input=PASSWORD + "\n",
    )
    simral.cli("users", "grant", "tech_ab", "--organisation", "CLINB", "--role", "technologist")
    a = ct_series(
        base / "a", slices=2, rows=64, cols=64, patient_id="PAT-A", patient_name="ALPHA^ANNE", seed=51
    )
    b = ct_series(
        base / "b", slices=2, rows=64, cols=64, patient_id="PAT-B", patient_name="BETA^BRUNO", seed=52
    )
    simral.cli("import", str(base / "a"), "--organisation", "CHA")
    simral.cli("import", str(base / "b"), "--organisation", "CLINB")
    uid = {
        key: str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        for key, paths in (("a", a), ("b", b))
    }
    with simral:
        yield Portal(
            simral, uid["a"], uid["b"], {name: TotpDevice() for name in ("tech_a", "tech_ab", "auditrice")}
        )


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _page(browser: Browser) -> Page:
    return browser.new_context(locale="fr-FR", viewport={"width": 1280, "height": 900}).new_page()


def test_wrong_password_and_wrong_code_are_refused(
    browser: Browser, portal: Portal, artifacts_dir: Path
) -> None:
    page = _page(browser)
    submit_password(page, portal.url, "tech_a", "Mauvais-Mot-2026!")
    assert "/login" in page.url and page.locator("[role=alert]").count() == 1
    page.screenshot(path=str(artifacts_dir / "portal-login-refused.png"))
    submit_password(page, portal.url, "tech_a", PASSWORD)
    assert "/login/enrol" in page.url
    page.fill("input[name=code]", "000000")
    page.click("button[type=submit]")
    assert "/login/enrol" in page.url and page.locator("[role=alert]").count() == 1
    # Not logged in: the study list sends back to the login page.
    page.goto(portal.url + "/")
    assert "/login?next=" in page.url
    page.context.close()


def test_technologist_break_glass_and_audit(browser: Browser, portal: Portal, artifacts_dir: Path) -> None:
    page = _page(browser)
    login_page(page, portal.url, "tech_a", PASSWORD, portal.devices["tech_a"])
    page.goto(portal.url + "/")
    assert page.locator("h1").inner_text() == "Examens"
    assert page.locator("tbody").inner_text().count("PAT-A") == 1
    assert "PAT-B" not in page.locator("tbody").inner_text()
    page.screenshot(path=str(artifacts_dir / "portal-study-list.png"))
    # The session cookie alone does not authorise a state change: the CSRF token must come with it.
    forged = page.request.post(portal.url + "/account/tokens", form={"lifetime": "1h"})
    assert forged.status == 403
    stow = page.request.post(
        portal.url + "/dicom-web/studies",
        data=b"--b--\r\n",
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
    )
    assert stow.status == 403

    # CLINB's study by URL: refused as if it did not exist, with the break-glass form.
    page.goto(f"{portal.url}/studies/{portal.study_b}")
    assert "vous n'y avez pas accès" in page.locator("[role=alert]").inner_text()
    assert "BETA" not in page.content() and "PAT-B" not in page.content()
    page.screenshot(path=str(artifacts_dir / "portal-study-refused.png"))

    page.fill("textarea[name=reason]", "Patient transféré aux urgences, images antérieures nécessaires")
    page.select_option("select[name=duration]", "30m")
    page.click("form[action*=break-glass] button[type=submit]")
    page.wait_for_load_state("domcontentloaded")
    assert page.url.endswith(f"/studies/{portal.study_b}")
    assert "PAT-B" in page.content() and "BETA BRUNO" in page.content()
    # Polled from here: wait_for_function's in-page polling is eval, which the portal's CSP refuses.
    thumbnails_shown = (
        "() => [...document.querySelectorAll('.thumbs img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    deadline = time.monotonic() + 30
    while not page.evaluate(thumbnails_shown):
        assert time.monotonic() < deadline, "thumbnails not shown"
        time.sleep(0.1)
    page.screenshot(path=str(artifacts_dir / "portal-study-break-glass.png"))
    # Only that study was opened: the list now shows it too, and still nothing else of CLINB.
    page.goto(portal.url + "/")
    assert "PAT-B" in page.locator("tbody").inner_text()
    page.click("form[action='/logout'] button")
    page.wait_for_load_state("domcontentloaded")
    assert "/login" in page.url
    # Logged out for real; logging in again asks for a code, no second enrolment.
    page.goto(portal.url + "/")
    assert "/login?next=" in page.url
    submit_password(page, portal.url, "tech_a", PASSWORD)
    assert "/login/totp" in page.url and page.locator("#totp-secret").count() == 0
    page.fill("input[name=code]", portal.devices["tech_a"].code())
    page.click("button[type=submit]")
    page.wait_for_load_state("domcontentloaded")
    assert page.url.rstrip("/") == portal.url
    page.context.close()

    auditor = _page(browser)
    login_page(auditor, portal.url, "auditrice", PASSWORD, portal.devices["auditrice"])
    auditor.goto(f"{portal.url}/audit?study={portal.study_b}")
    trail = auditor.locator("tbody").inner_text()
    assert "Accès d'urgence (bris de glace)" in trail
    assert auditor.locator("td[title='break-glass.open']").count() == 1
    assert "user:tech_a (810003000001)" in trail and "CHA" in trail
    assert "Patient transféré aux urgences" in trail
    assert "PAT-B" in trail
    auditor.screenshot(path=str(artifacts_dir / "portal-audit.png"), full_page=True)
    # The auditor sees no images.
    auditor.goto(f"{portal.url}/studies/{portal.study_a}")
    assert auditor.locator("[role=alert]").count() == 1
    auditor.context.close()


def test_professional_of_two_organisations_acts_for_one_at_a_time(
    browser: Browser, portal: Portal, artifacts_dir: Path
) -> None:
    page = _page(browser)
    login_page(page, portal.url, "tech_ab", PASSWORD, portal.devices["tech_ab"])
    page.goto(portal.url + "/")
    # Acting for CHA (the first organisation): CHA's study only.
    assert page.locator("select[name=organisation]").input_value() == "CHA"
    listing = page.locator("tbody").inner_text()
    assert "PAT-A" in listing and "PAT-B" not in listing
    page.select_option("select[name=organisation]", "CLINB")
    page.click("form[action='/session/organisation'] button")
    page.wait_for_load_state("domcontentloaded")
    assert page.locator("select[name=organisation]").input_value() == "CLINB"
    listing = page.locator("tbody").inner_text()
    assert "PAT-B" in listing and "PAT-A" not in listing
    page.screenshot(path=str(artifacts_dir / "portal-switch-organisation.png"))
    # CHA's study is now behind the wall, like any other organisation's.
    page.goto(f"{portal.url}/studies/{portal.study_a}")
    assert page.locator("[role=alert]").count() == 1
    # A forged switch to an organisation the user does not belong to is refused; so is one
    # without the CSRF token.
    token = page.locator("form[action='/session/organisation'] input[name=csrf_token]").first
    page.goto(portal.url + "/")
    csrf = token.input_value()
    refused = page.request.post(
        portal.url + "/session/organisation", form={"organisation": "REGION", "csrf_token": csrf}
    )
    assert refused.status == 403
    forged = page.request.post(portal.url + "/session/organisation", form={"organisation": "CHA"})
    assert forged.status == 403
    page.goto(portal.url + "/")
    assert page.locator("select[name=organisation]").input_value() == "CLINB"
    page.context.close()


def test_first_start_creates_the_regional_administrator(browser: Browser, tmp_path: Path) -> None:
    simral = SimralProcess(tmp_path / "data")
    with simral:
        password_file = simral.data_dir / "initial-admin-password"
        assert "first start: log in at http://127.0.0.1:" in simral.log_tail()
        assert str(password_file.resolve()) in simral.log_tail()
        assert password_file.stat().st_mode & 0o777 == 0o600
        password = password_file.read_text().strip()
        assert password not in simral.log_tail()
        page = _page(browser)
        login_page(page, simral.http_url, "admin", password, TotpDevice())
        page.goto(simral.http_url + "/admin")
        assert page.locator("h1").inner_text() == "Administration"
        assert "REGION" in page.content() and "regional-admin@REGION" in page.content()
        page.context.close()
    with simral:  # a second start creates nobody
        assert simral.log_tail().count("first start:") == 1
