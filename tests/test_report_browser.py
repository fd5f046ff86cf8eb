"""A radiologist's reporting session in headless Chromium (Debian's), issue 6 item 5.

dr_roux logs in (password + TOTP), finds the urgent head CT on the reading worklist, claims it,
opens it in the OHIF viewer (the images show), comes back and writes its report: the "scanner
cérébral" template pre-fills the sections (the request's indications, the equipment and dose of
the scanner's MPPS), the autosave says "Brouillon enregistré à HH:MM:SS", a colleague's opinion
is asked, a wrong TOTP code is refused and the right one signs; the signed report is read-only
with its version history, and an addendum is written and signed as version 2. Screenshots go to
``test-artifacts/report-*.png``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from tests.portal_login import login_page
from tests.report_setup import JUSTIFICATION, PASSWORD, Platform, start_platform
from tests.test_viewer_browser import CHROMIUM, CHROMIUM_ARGS, wait_for_image

PLACER = "CRB-200"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    platform = start_platform(tmp_path_factory.mktemp("report-browser"), {PLACER: ("DUBOIS", "HELENE")})
    try:
        yield platform
    finally:
        platform.simral.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _new_page(browser: Browser) -> Page:
    context = browser.new_context(locale="fr-FR", viewport={"width": 1440, "height": 1000})
    return context.new_page()


def test_worklist_deadline_counts_down_with_the_clock(browser: Browser, platform: Platform) -> None:
    """The time left ticks in the page (``/static/reading-countdown.js``, every 30 s, from the row's
    ``data-deadline``): Playwright's clock jumps ahead; the urgent task (60 min contract deadline)
    is marked near its deadline, then overdue, without a reload."""
    page = _new_page(browser)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "console",
        lambda message: errors.append(message.text) if "Content Security Policy" in message.text else None,
    )
    login_page(page, platform.url, "dr_roux", PASSWORD, platform.devices["dr_roux"])
    page.clock.install()
    page.goto(platform.url + "/reading")
    row = page.locator("table.reading tbody tr:has-text('DUBOIS HELENE')")
    due = row.locator("[data-deadline]")
    expect(due).to_have_text(re.compile(r"^dans [45]\d min$"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", due.get_attribute("data-deadline") or "")
    expect(row).not_to_have_class(re.compile(r"due-soon|overdue"))
    page.clock.fast_forward("40:00")
    expect(due).to_have_text(re.compile(r"^dans (\d|1\d) min$"))
    expect(row).to_have_class(re.compile(r"\bdue-soon\b"))
    page.clock.fast_forward("30:00")
    expect(due).to_have_text(re.compile(r"^en retard de \d+ min$"))
    expect(row).to_have_class(re.compile(r"\boverdue\b"))
    expect(row).not_to_have_class(re.compile(r"due-soon"))
    page.clock.fast_forward("03:00:00")
    expect(due).to_have_text(re.compile(r"^en retard de [23] h( \d\d)?$"))
    assert not errors, errors  # no CSP violation, no script error
    page.context.close()


def test_radiologist_writes_signs_and_completes_a_report(
    browser: Browser, platform: Platform, artifacts_dir: Path
) -> None:
    page = _new_page(browser)
    device = platform.devices["dr_roux"]
    login_page(page, platform.url, "dr_roux", PASSWORD, device)

    # The worklist: claim the study, open it in the viewer.
    page.click("nav a[href='/reading']")
    page.wait_for_load_state("domcontentloaded")
    row = page.locator("table.reading tbody tr:has-text('DUBOIS HELENE')")
    row.get_by_role("button", name="Prendre").click()
    page.wait_for_load_state("domcontentloaded")
    mine = page.locator("tr[data-state='claimed']:has-text('DUBOIS HELENE')")
    expect(mine.get_by_role("link", name="Rédiger")).to_be_visible()
    page.screenshot(path=str(artifacts_dir / "report-worklist.png"), full_page=True)
    mine.get_by_role("link", name="Ouvrir").click()
    page.wait_for_url("**/viewer/viewer?StudyInstanceUIDs=*")
    assert platform.studies[PLACER] in page.url
    wait_for_image(page)
    page.screenshot(path=str(artifacts_dir / "report-viewer.png"))

    # Back to the worklist, "Rédiger": the request's clinical information and the template choice.
    page.goto(platform.url + "/reading")
    page.locator("tr[data-state='claimed']:has-text('DUBOIS HELENE')").get_by_role(
        "link", name="Rédiger"
    ).click()
    page.wait_for_load_state("domcontentloaded")
    assert page.locator("h1").inner_text() == "Compte rendu"
    clinical = page.locator("section.clinical")
    assert JUSTIFICATION in clinical.inner_text() and "DUBOIS HELENE" in clinical.inner_text()
    template = page.get_by_label("Modèle de compte rendu")
    assert template.input_value() == "ct-head"  # suggested from the modality and the anatomy
    # The viewer link opens a new tab on the study.
    with page.context.expect_page() as opened:
        page.get_by_role("link", name="Ouvrir l'examen dans la visionneuse (nouvel onglet)").click()
    viewer_tab = opened.value
    viewer_tab.wait_for_url("**/viewer/viewer?StudyInstanceUIDs=*")
    assert platform.studies[PLACER] in viewer_tab.url
    viewer_tab.close()
    page.screenshot(path=str(artifacts_dir / "report-template.png"), full_page=True)
    page.get_by_role("button", name="Rédiger à partir de ce modèle").click()
    page.wait_for_load_state("domcontentloaded")

    # The draft: pre-filled from the request, the template and the MPPS.
    indications = page.get_by_label("Indications")
    assert JUSTIFICATION in indications.input_value()
    technique = page.get_by_label("Technique")
    assert "Siemens SOMATOM go.Up" in technique.input_value()
    assert "IDSV (CTDIvol) 52.4 mGy, PDL 912.5 mGy·cm" in technique.input_value()
    assert page.get_by_label("PDL (mGy·cm)").input_value() == "912.5"
    results = page.get_by_label("Résultats")
    results.fill(
        "Hyperdensité spontanée des citernes de la base et de la vallée sylvienne droite.\n"
        "Pas d'hydrocéphalie. Pas d'effet de masse."
    )
    page.get_by_label("Conclusion").fill("Hémorragie méningée de la base, Fisher 3.")
    page.get_by_label("PDL (mGy·cm)").fill("930")
    page.get_by_label("Conclusion").focus()  # leaving the dose field saves at once
    status = page.locator("#autosave-status")
    expect(status).to_have_text(re.compile(r"^Brouillon enregistré à \d\d:\d\d:\d\d$"), timeout=15000)
    # The dose sentence follows the dose fields.
    expect(technique).to_have_value(re.compile("PDL 930 mGy·cm"), timeout=15000)
    page.screenshot(path=str(artifacts_dir / "report-draft.png"), full_page=True)

    # A colleague's opinion.
    page.get_by_label("Radiologue sollicité").select_option(label="Dr Paul Blanc")
    page.get_by_label("Question").fill("Anévrisme visible sur les coupes fines ?")
    page.get_by_role("button", name="Demander un avis").click()
    page.wait_for_load_state("domcontentloaded")
    assert "Demande d'avis envoyée" in page.locator("[role=status]").first.inner_text()
    assert "Dr Paul Blanc" in page.locator(".opinion").inner_text()
    # The autosaved text was kept across the page load.
    assert "Fisher 3" in page.get_by_label("Conclusion").input_value()

    # Signature: a wrong code is refused, the right one signs.
    page.get_by_label("Code de vérification").fill("000000")
    page.get_by_role("button", name="Signer le compte rendu").click()
    page.wait_for_load_state("domcontentloaded")
    assert "Code de vérification refusé" in page.locator("[role=alert]").inner_text()
    page.screenshot(path=str(artifacts_dir / "report-bad-code.png"), full_page=True)
    page.get_by_label("Code de vérification").fill(device.code())
    page.get_by_role("button", name="Signer le compte rendu").click()
    page.wait_for_load_state("domcontentloaded")
    assert "Compte rendu signé" in page.locator("[role=status]").first.inner_text()
    article = page.locator("article.report").first
    assert "Fisher 3" in article.inner_text() and "Signé par Dr Claire Roux" in article.inner_text()
    assert page.locator("textarea[name=results]").count() == 0  # read-only now
    assert page.locator("table.history tbody tr").count() == 1
    assert "Publication" in page.locator("#publication").inner_text()
    page.screenshot(path=str(artifacts_dir / "report-signed.png"), full_page=True)

    # The addendum: version 2, signed the same way.
    page.get_by_role("button", name="Ajouter un addendum").click()
    page.wait_for_load_state("domcontentloaded")
    addendum = page.get_by_label("Addendum", exact=True)
    addendum.fill("Après avis du Dr Blanc : angioscanner du polygone de Willis recommandé en urgence.")
    page.get_by_label("Code de vérification").focus()
    expect(page.locator("#autosave-status")).to_have_text(
        re.compile(r"^Brouillon enregistré à "), timeout=15000
    )
    page.screenshot(path=str(artifacts_dir / "report-addendum-draft.png"), full_page=True)
    page.get_by_label("Code de vérification").fill(device.code())
    page.get_by_role("button", name="Signer l'addendum").click()
    page.wait_for_load_state("domcontentloaded")
    assert "Compte rendu signé" in page.locator("[role=status]").first.inner_text()
    added = page.locator("article.addendum[data-version='2']")
    assert "polygone de Willis" in added.inner_text() and "Signé par Dr Claire Roux" in added.inner_text()
    versions = page.locator("table.history tbody tr")
    assert versions.count() == 2 and "Signé" in versions.nth(1).inner_text()
    page.screenshot(path=str(artifacts_dir / "report-addendum-signed.png"), full_page=True)

    # English is available.
    page.goto(page.url.split("?")[0] + "?lang=en")
    assert page.locator("h1").inner_text() == "Report"
    assert page.locator("table.history thead").inner_text().startswith("Version")
    page.screenshot(path=str(artifacts_dir / "report-signed-en.png"), full_page=True)
    page.context.close()


def test_colleague_answers_the_opinion_and_the_author_finds_the_report(
    browser: Browser, platform: Platform, artifacts_dir: Path
) -> None:
    # dr_blanc is told on the worklist that an opinion is asked of him, opens the study and answers.
    page = _new_page(browser)
    login_page(page, platform.url, "dr_blanc", PASSWORD, platform.devices["dr_blanc"])
    page.goto(platform.url + "/reading")
    page.get_by_role("link", name=re.compile(r"^examen n° \d+$")).click()
    page.wait_for_load_state("domcontentloaded")
    assert "DUBOIS HELENE" in page.locator("section.clinical").inner_text()
    expect(
        page.get_by_role("link", name="Ouvrir l'examen dans la visionneuse (nouvel onglet)")
    ).to_be_visible()
    assert page.locator("textarea[name=results]").count() == 0  # he reads, he does not write
    page.get_by_label("Réponse").fill("Pas d'anévrisme visible ; angioscanner conseillé.")
    page.get_by_role("button", name="Envoyer l'avis").click()
    page.wait_for_load_state("domcontentloaded")
    assert "Avis envoyé" in page.locator("[role=status]").first.inner_text()
    assert "angioscanner conseillé" in page.locator(".opinion[data-state='answered']").inner_text()
    page.screenshot(path=str(artifacts_dir / "report-opinion-answered.png"), full_page=True)
    page.context.close()

    # dr_roux finds the report again under "Mes comptes rendus" (the task left the worklist).
    page = _new_page(browser)
    login_page(page, platform.url, "dr_roux", PASSWORD, platform.devices["dr_roux"])
    page.goto(platform.url + "/reading")
    page.get_by_role("link", name="Mes comptes rendus").click()
    page.wait_for_load_state("domcontentloaded")
    row = page.locator("table.my-reports tbody tr")
    assert row.count() == 1 and "DUBOIS HELENE" in row.inner_text() and "Signé" in row.inner_text()
    assert row.locator("td").nth(2).inner_text() == "2"
    page.screenshot(path=str(artifacts_dir / "report-mine.png"), full_page=True)
    row.get_by_role("link", name="Voir").click()
    page.wait_for_load_state("domcontentloaded")
    assert "angioscanner conseillé" in page.locator(".opinion").inner_text()
    page.context.close()
