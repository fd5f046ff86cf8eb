"""The reading worklist in headless Chromium (Debian's): a radiologist of the teleradiology group
logs in (password + TOTP), finds the group's tasks on ``/reading`` (urgent first, time left "dans
… min", the one a colleague holds marked as such), claims the urgent one, and opens it in the
OHIF viewer, which shows the images. Screenshots go to ``test-artifacts/reading-*.png``.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from pydicom import dcmread
from tests.corpus import ct_series
from tests.portal_login import TotpDevice, login_page
from tests.simral_proc import SimralProcess
from tests.test_viewer_browser import CHROMIUM, CHROMIUM_ARGS, wait_for_image

from simral.access.policy import SYSTEM
from simral.app import open_app
from simral.config import load_settings
from simral.db.base import utcnow
from simral.patients.service import AuthorityRef, Traits
from simral.reading import service as reading
from simral.web.reading import delay_text

PASSWORD = "Lecture-Navigateur-2026!"
OID_SITE = "1.2.250.1.999.8.1"
MODALITY_AE = "SCANNER1"


@dataclass
class Reading:
    simral: SimralProcess
    urgent: str
    routine: str
    tokens: dict[str, str]
    device: TotpDevice
    #: dr_roux's logged-in browser state, for the tests after the first.
    state: object = None

    @property
    def url(self) -> str:
        return self.simral.http_url

    def tasks(self, login: str) -> list[dict[str, object]]:
        response = httpx.get(
            f"{self.url}/api/reading/tasks",
            headers={"Authorization": f"Bearer {self.tokens[login]}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return list(response.json()["tasks"])


def _schedule(
    ctx: object, *, placer: str, name: tuple[str, str], modality: str, priority: str, delay: str = ""
) -> tuple[str, str]:
    """An accepted request of site CHSUD; its Study Instance UID and accession number."""
    patient = reading.PatientRef(
        traits=Traits(birth_name=name[0], first_birth_given_name=name[1], sex="M", birth_date="19600512",
                      used_name=name[0], used_given_name=name[1]),
        ipp=f"IPP-{placer}",
        ipp_authority=AuthorityRef(oid=OID_SITE),
    )  # fmt: skip
    details = reading.RequestDetails(
        placer_number=placer,
        priority=priority,
        desired_delay=delay,
        modality=modality,
        anatomy=[{"code": "69536005", "system": "SNOMED CT", "display": "Tête"}],
        appointment_at=utcnow() + timedelta(minutes=30),
    )
    with ctx.db.unit_of_work() as session:  # type: ignore[attr-defined]
        request = reading.receive_request(
            session, site_code="CHSUD", patient=patient, details=details, principal=SYSTEM, source="portal"
        )
        _, step = reading.accept_request(session, request.id, protocol="Sans injection", principal=SYSTEM)
        return step.study_uid, step.accession_number


def _store(
    simral: SimralProcess,
    base: Path,
    study_uid: str,
    accession: str,
    name: str,
    seed: int,
    patient_id: str = "",
) -> None:
    """The scanner stores the exam (dcmtk storescu) under the scheduled Study Instance UID."""
    paths = ct_series(
        base / f"s{seed}", slices=12, rows=128, cols=128, patient_id=patient_id or f"IPP-{seed}",
        patient_name=name, study_uid=study_uid, seed=seed,
    )  # fmt: skip
    for path in paths:
        ds = dcmread(path)
        ds.AccessionNumber = accession
        ds.save_as(path)
    result = subprocess.run(
        ["storescu", "-aet", MODALITY_AE, "-aec", simral.ae_title, "127.0.0.1", str(simral.dicom_port)]
        + [str(p) for p in paths],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reading]:
    base = tmp_path_factory.mktemp("reading-browser")
    simral = SimralProcess(
        base / "data", extra_env={"SIMRAL_READING_QUIET_SECONDS": "1", "SIMRAL_READING_CHECK_SECONDS": "0.3"}
    )
    simral.cli("organisations", "add", "CHSUD", "--name", "CH Sud", "--patient-id-oid", OID_SITE)
    simral.cli(
        "organisations", "add", "TLR", "--name", "Téléradiologie Occitanie", "--kind", "teleradiology-group"
    )
    for login, rpps, display in (
        ("dr_roux", "10006000001", "Dr Claire Roux"),
        ("dr_blanc", "10006000002", "Dr Paul Blanc"),
    ):
        simral.cli(
            "users", "add", login, "--organisation", "TLR", "--role", "radiologist", "--rpps", rpps,
            "--name", display, "--password-stdin", input=PASSWORD + "\n",
        )  # fmt: skip
    simral.add_node("scanner", MODALITY_AE, 104, organisation="CHSUD")
    tokens = {login: simral.token_for(login) for login in ("dr_roux", "dr_blanc")}
    ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(simral.data_dir)}))
    try:
        with ctx.db.unit_of_work() as session:
            reading.add_contract(
                session, site_code="CHSUD", group_code="TLR", urgent_minutes=60, routine_minutes=4 * 60,
                principal=SYSTEM,
            )  # fmt: skip
        routine = _schedule(ctx, placer="R-100", name=("BERNARD", "LOUIS"), modality="CT", priority="routine")
        urgent = _schedule(ctx, placer="U-200", name=("GARCIA", "ELENA"), modality="CT", priority="urgent")
        other = _schedule(
            ctx, placer="R-300", name=("PETIT", "JULES"), modality="CT", priority="routine", delay="PT45M"
        )
    finally:
        ctx.db.dispose()
    with simral:
        for (study_uid, accession), name, seed in (
            (routine, "BERNARD^LOUIS", 91),
            (urgent, "GARCIA^ELENA", 92),
            (other, "PETIT^JULES", 93),
        ):
            _store(simral, base, study_uid, accession, name, seed)
        setup = Reading(simral, urgent[0], routine[0], tokens, TotpDevice())
        deadline = utcnow() + timedelta(seconds=30)
        while len(setup.tasks("dr_roux")) < 3 and utcnow() < deadline:
            time.sleep(0.3)
        assert len(setup.tasks("dr_roux")) == 3
        # A colleague already holds one of them.
        held = next(t for t in setup.tasks("dr_blanc") if t["study_uid"] == other[0])
        response = httpx.post(
            f"{setup.url}/api/reading/tasks/{held['id']}/claim",
            headers={"Authorization": f"Bearer {tokens['dr_blanc']}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        yield setup


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _page(browser: Browser, locale: str = "fr-FR", state: object = None) -> Page:
    context = browser.new_context(
        locale=locale,
        viewport={"width": 1366, "height": 900},
        storage_state=state,  # type: ignore[arg-type]
    )
    return context.new_page()


def test_radiologist_claims_the_urgent_study_and_opens_it(
    browser: Browser, setup: Reading, artifacts_dir: Path
) -> None:
    page = _page(browser)
    login_page(page, setup.url, "dr_roux", PASSWORD, setup.device)
    setup.state = page.context.storage_state()
    page.click("nav a[href='/reading']")
    page.wait_for_load_state("domcontentloaded")
    assert page.locator("h1").inner_text() == "Liste de lecture"
    rows = page.locator("table.reading tbody tr")
    assert rows.count() == 3
    # Urgent first, then by deadline; the time left as a reader says it.
    first = rows.nth(0)
    assert first.get_attribute("data-task") and "GARCIA ELENA" in first.inner_text()
    assert "Urgent" in first.inner_text() and "dans " in first.inner_text()
    assert "PETIT JULES" in rows.nth(1).inner_text() and "Pris par Dr Paul Blanc" in rows.nth(1).inner_text()
    assert "BERNARD LOUIS" in rows.nth(2).inner_text() and "À lire" in rows.nth(2).inner_text()
    # The colleague's task offers no claim button.
    assert rows.nth(1).locator("button").count() == 0
    page.screenshot(path=str(artifacts_dir / "reading-worklist.png"), full_page=True)

    first.get_by_role("button", name="Prendre").click()
    page.wait_for_load_state("domcontentloaded")
    assert "Examen pris" in page.locator("[role=status]").inner_text()
    mine = page.locator("tr[data-state='claimed']:has-text('GARCIA ELENA')")
    assert "Pris par vous" in mine.inner_text()
    page.screenshot(path=str(artifacts_dir / "reading-claimed.png"), full_page=True)
    # The colleague's list shows who holds it, and a second claim is refused.
    held = next(t for t in setup.tasks("dr_blanc") if t["study_uid"] == setup.urgent)
    assert held["state"] == "claimed" and held["claimed_by"] == "dr_roux"

    mine.get_by_role("link", name="Ouvrir").click()
    page.wait_for_url("**/viewer/viewer?StudyInstanceUIDs=*")
    assert setup.urgent in page.url
    png = wait_for_image(page)
    (artifacts_dir / "reading-viewer-viewport.png").write_bytes(png)
    page.screenshot(path=str(artifacts_dir / "reading-viewer.png"))
    page.context.close()


def test_release_and_english(browser: Browser, setup: Reading, artifacts_dir: Path) -> None:
    page = _page(browser, locale="en-GB", state=setup.state)
    if setup.state is None:
        login_page(page, setup.url, "dr_roux", PASSWORD, setup.device)
    page.goto(setup.url + "/reading?lang=en")
    assert page.locator("h1").inner_text() == "Reading worklist"
    mine = page.locator("tr[data-state='claimed']:has-text('GARCIA ELENA')")
    assert "Claimed by you" in mine.inner_text()
    mine.get_by_role("button", name="Release").click()
    page.wait_for_load_state("domcontentloaded")
    assert "lang=en" in page.url and "handed back" in page.locator("[role=status]").inner_text()
    again = page.locator("tr:has-text('GARCIA ELENA')")
    assert again.get_attribute("data-state") == "ready" and "in " in again.inner_text()
    page.screenshot(path=str(artifacts_dir / "reading-worklist-en.png"), full_page=True)
    page.context.close()


def test_time_left_is_said_as_a_reader_says_it() -> None:
    now = utcnow()
    assert delay_text(now + timedelta(minutes=35, seconds=20), now, "fr") == ("dans 35 min", False)
    assert delay_text(now - timedelta(minutes=10, seconds=5), now, "fr") == ("en retard de 10 min", True)
    assert delay_text(now + timedelta(hours=2, minutes=5, seconds=1), now, "fr") == ("dans 2 h 05", False)
    assert delay_text(now + timedelta(days=3, minutes=1), now, "fr") == ("dans 3 j", False)
    assert delay_text(now - timedelta(minutes=75, seconds=1), now, "en") == ("overdue by 1 h 15", True)
    assert delay_text(None, now, "fr") == ("sans échéance", False)
