"""Accessibility of the portal's pages: axe-core (npm, pinned in ``tests/axe``) in Chromium.

Every server-rendered page a user meets (login, TOTP enrolment and code, study list, study page,
the refused study with its break-glass form, account, administration, identity vigilance and
identity changes, audit trail) is checked against the WCAG 2.1 A and AA rules axe-core implements;
any violation fails with its rule, impact and the offending elements. The CSP forbids injected
scripts, so the test contexts bypass it (the pages themselves are served as users get them).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from tests.portal_login import TotpDevice, login_page, submit_password
from tests.test_portal_browser import PASSWORD, Portal
from tests.test_portal_browser import portal as portal  # the module fixture: a server of its own
from tests.test_viewer_browser import CHROMIUM, CHROMIUM_ARGS

AXE = Path(__file__).parent / "axe" / "node_modules" / "axe-core" / "axe.min.js"
WCAG_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert AXE.is_file(), f"{AXE} missing: run `make test` (npm ci in tests/axe)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _page(browser: Browser, locale: str = "fr-FR") -> Page:
    context = browser.new_context(locale=locale, viewport={"width": 1280, "height": 900}, bypass_csp=True)
    return context.new_page()


def violations(page: Page) -> list[dict[str, Any]]:
    """axe-core's WCAG 2.1 A/AA violations on the page as it is now."""
    page.add_script_tag(path=str(AXE))
    result: dict[str, Any] = page.evaluate(
        "async (tags) => await axe.run(document, {runOnly: {type: 'tag', values: tags}})", WCAG_TAGS
    )
    return list(result["violations"])


def assert_accessible(page: Page, what: str) -> None:
    found = violations(page)
    summary = [
        f"{v['id']} ({v['impact']}): {v['help']} — " + ", ".join(n["target"][0] for n in v["nodes"][:5])
        for v in found
    ]
    assert not found, f"{what} ({page.url}):\n" + "\n".join(summary)


def test_rules_are_checked(browser: Browser) -> None:
    """axe really runs: a page with an unlabelled field and an image without text is flagged."""
    page = _page(browser)
    page.set_content(
        '<html lang="fr"><title>t</title><main><input type="text"><img src="x.png"></main></html>'
    )
    ids = {v["id"] for v in violations(page)}
    assert {"label", "image-alt"} <= ids, ids
    page.context.close()


def test_login_and_enrolment_pages(browser: Browser, portal: Portal) -> None:
    page = _page(browser)
    page.goto(portal.url + "/login")
    assert_accessible(page, "login")
    submit_password(page, portal.url, "tech_ab", PASSWORD)
    assert "/login/enrol" in page.url
    assert_accessible(page, "TOTP enrolment")
    page.fill("input[name=code]", "000000")
    page.click("button[type=submit]")
    assert page.locator("[role=alert]").count() == 1
    assert_accessible(page, "TOTP enrolment with an error")
    page.context.close()


@pytest.mark.parametrize("locale", ["fr-FR", "en-GB"])
def test_clinical_pages(browser: Browser, portal: Portal, locale: str) -> None:
    page = _page(browser, locale)
    device = portal.devices["tech_a"]
    login_page(page, portal.url, "tech_a", PASSWORD, device)
    for path, what in (
        ("/", "study list"),
        ("/?patient_name=ALPHA", "study list with a search"),
        (f"/studies/{portal.study_a}", "study page"),
        (f"/studies/{portal.study_b}", "refused study with the break-glass form"),
        ("/account", "account page"),
    ):
        page.goto(portal.url + path)
        assert_accessible(page, what)
    if locale == "fr-FR":
        page.click("form[action='/logout'] button")
    page.context.close()


def test_audit_and_administration_pages(browser: Browser, portal: Portal) -> None:
    simral = portal.simral
    simral.cli(
        "users", "add", "admin_a", "--organisation", "CHA", "--role", "site-admin", "--rpps", "10003000009",
        "--name", "Admin A", "--password-stdin", input=PASSWORD + "\n",
    )  # fmt: skip
    page = _page(browser)
    login_page(page, portal.url, "admin_a", PASSWORD, TotpDevice())
    page.goto(portal.url + "/admin")
    assert_accessible(page, "administration")
    # A user created through the form: the page that shows the one-time password, then the
    # same form refused (duplicate login) with its error.
    for attempt in ("created", "refused"):
        form = page.locator("form[action='/admin/users']")
        form.locator("input[name=login]").fill("tech_new")
        form.locator("input[name=name]").fill("Tech New")
        form.locator("button[type=submit]").click()
        page.wait_for_load_state("domcontentloaded")
        assert (page.locator("[role=alert]").count() == 1) == (attempt == "refused"), page.content()
        assert_accessible(page, f"administration, user {attempt}")
    for path, what in (
        ("/identities/vigilance", "identity-vigilance worklist"),
        ("/identities/changes", "identity changes"),
    ):
        page.goto(portal.url + path)
        assert_accessible(page, what)
    page.context.close()
    auditor = _page(browser)
    login_page(auditor, portal.url, "auditrice", PASSWORD, portal.devices["auditrice"])
    auditor.goto(f"{portal.url}/audit?study={portal.study_b}")
    assert_accessible(auditor, "audit trail")
    auditor.context.close()
