"""The on-call schedule page ``/reading/oncall`` (issue 6 item 4) against a real ``simral serve``.

The group's administrator (session cookie, CSRF token of the page's form, in Chromium) adds a
shift, sees an overlapping one refused in French (the page passes axe), removes it (both audited by
the routing service); the CLI lists the same shift; a radiologist of the group sees the schedule but
gets no form and his posts are refused; a radiologist of another group sees only his own group, a
site's technologist nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import select
from tests.simral_proc import SimralProcess

from simral.app import open_app
from simral.audit.models import AuditEvent
from simral.config import load_settings

PASSWORD = "Garde-Essai-2026!"
PARIS = ZoneInfo("Europe/Paris")
USERS = (
    ("coord_tlr", "TLR", "site-admin"),
    ("dr_garde", "TLR", "radiologist"),
    ("dr_autre", "TLR", "radiologist"),
    ("dr_ailleurs", "TLR2", "radiologist"),
    ("tech_site", "SITE", "technologist"),
)


@dataclass
class Schedule:
    simral: SimralProcess
    tokens: dict[str, str]
    running: datetime

    def get(self, login: str, path: str = "/reading/oncall", **params: str) -> httpx.Response:
        return httpx.get(
            self.simral.http_url + path,
            params=params,
            headers={"Authorization": f"Bearer {self.tokens[login]}"},
            timeout=30,
        )

    def post(self, login: str, path: str, data: dict[str, str]) -> httpx.Response:
        return httpx.post(
            self.simral.http_url + path,
            data=data,
            headers={"Authorization": f"Bearer {self.tokens[login]}"},
            timeout=30,
        )

    def cli_list(self) -> str:
        """``simral oncall list --group TLR`` (the command takes its data folder explicitly)."""
        return self.simral.cli(
            "oncall", "list", "--group", "TLR", "--data-dir", str(self.simral.data_dir)
        ).stdout

    def audit(self, action: str) -> list[AuditEvent]:
        ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(self.simral.data_dir)}))
        try:
            with ctx.db.reading() as session:
                return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))
        finally:
            ctx.db.dispose()


@pytest.fixture(scope="module")
def schedule(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Schedule]:
    simral = SimralProcess(tmp_path_factory.mktemp("oncall") / "data")
    simral.cli("organisations", "add", "SITE", "--name", "CH de proximité")
    for code, name in (("TLR", "Garde Occitanie"), ("TLR2", "Téléradiologie Nord")):
        simral.cli("organisations", "add", code, "--name", name, "--kind", "teleradiology-group")
    for number, (login, org, role) in enumerate(USERS):
        simral.cli(
            "users", "add", login, "--organisation", org, "--role", role, "--rpps", f"1000700000{number}",
            "--name", login.replace("_", " ").title(), "--password-stdin", input=PASSWORD + "\n",
        )  # fmt: skip
    # A shift running now (started an hour ago, Paris wall clock as the CLI takes it).
    now = datetime.now(PARIS).replace(second=0, microsecond=0)
    simral.cli(
        "oncall", "add", "TLR", "dr_autre", "--start", f"{now - timedelta(hours=1):%Y-%m-%dT%H:%M}",
        "--end", f"{now + timedelta(hours=3):%Y-%m-%dT%H:%M}", "--data-dir", str(simral.data_dir),
    )  # fmt: skip
    tokens = {login: simral.token_for(login) for login, _, _ in USERS}
    with simral:
        yield Schedule(simral, tokens, now - timedelta(hours=1))


def test_group_administrator_adds_refuses_an_overlap_and_removes_a_shift(
    schedule: Schedule, artifacts_dir: Path
) -> None:
    from playwright.sync_api import sync_playwright
    from tests.portal_login import TotpDevice, login_page
    from tests.test_portal_accessibility import assert_accessible
    from tests.test_viewer_browser import CHROMIUM, CHROMIUM_ARGS

    base = schedule.simral.http_url
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(locale="fr-FR", bypass_csp=True).new_page()
            login_page(page, base, "coord_tlr", PASSWORD, TotpDevice())
            page.goto(base + "/reading/oncall")
            assert page.locator("h1").inner_text().startswith("Tableau de garde")
            form = page.locator("section[data-group=TLR] form.oncall-add")
            form.locator("select[name=login]").select_option("dr_garde")
            form.locator("input[name=start]").fill("2030-12-05T20:00")
            form.locator("input[name=end]").fill("2030-12-06T08:00")
            form.locator("select[name=subspecialty]").select_option("neuro")
            form.locator("button[type=submit]").click()
            page.wait_for_load_state("domcontentloaded")
            assert "done=added" in page.url
            assert "Garde ajoutée au tableau." in page.content()
            row = page.locator("section[data-group=TLR] tr", has_text="dr_garde")
            assert row.count() == 1
            cells = row.locator("td").all_inner_texts()
            assert cells[1:5] == ["05/12/2030 20:00", "06/12/2030 08:00", "Neuroradiologie", "coord_tlr"], (
                cells
            )
            # The running shift seeded by the CLI is marked; the future one is not.
            running = page.locator("tr.on-call-now")
            assert running.count() == 1 and "dr_autre" in running.inner_text()
            assert "de garde maintenant" in running.inner_text()
            assert "de garde maintenant" not in row.inner_text()
            assert_accessible(page, "on-call schedule page")
            page.screenshot(path=str(artifacts_dir / "reading-oncall.png"), full_page=True)

            # The same shift for the CLI.
            listed = schedule.simral.cli(
                "oncall", "list", "--group", "TLR", "--data-dir", str(schedule.simral.data_dir)
            ).stdout
            assert "dr_garde" in listed and "2030-12-05 20:00" in listed and "neuro" in listed

            # Overlapping the same radiologist's shift: refused in French, nothing added.
            form = page.locator("section[data-group=TLR] form.oncall-add")
            form.locator("select[name=login]").select_option("dr_garde")
            form.locator("input[name=start]").fill("2030-12-06T06:00")
            form.locator("input[name=end]").fill("2030-12-06T10:00")
            form.locator("button[type=submit]").click()
            page.wait_for_load_state("domcontentloaded")
            alert = page.locator("p.error[role=alert]").inner_text()
            assert "Garde refusée" in alert and "chevauchement" in alert
            assert page.locator("section[data-group=TLR] tr", has_text="dr_garde").count() == 1

            # A form post without the session's CSRF token is refused.
            forged = page.request.post(
                base + "/reading/oncall/add",
                form={
                    "group": "TLR",
                    "login": "dr_garde",
                    "start": "2031-01-01T20:00",
                    "end": "2031-01-02T08:00",
                },
                max_redirects=0,
            )
            assert forged.status == 403

            # Removal, then the audit trail the routing service wrote.
            shift_id = int(row.get_attribute("data-shift") or "0")
            row.locator("button", has_text="Retirer").click()
            page.wait_for_load_state("domcontentloaded")
            assert "Garde retirée du tableau." in page.content()
            assert page.locator("section[data-group=TLR] tr", has_text="dr_garde").count() == 0
        finally:
            browser.close()
    added = [e for e in schedule.audit("on-call.add") if e.detail.get("shift") == shift_id]
    removed = [e for e in schedule.audit("on-call.remove") if e.detail.get("shift") == shift_id]
    assert len(added) == 1 and len(removed) == 1
    assert added[0].actor == removed[0].actor == "user:coord_tlr"
    assert removed[0].detail["login"] == "dr_garde" and removed[0].detail["subspecialty"] == "neuro"
    assert (
        "dr_garde"
        not in schedule.simral.cli(
            "oncall", "list", "--group", "TLR", "--data-dir", str(schedule.simral.data_dir)
        ).stdout
    )


def test_a_radiologist_of_the_group_sees_the_schedule_but_cannot_change_it(schedule: Schedule) -> None:
    page = schedule.get("dr_garde")
    assert page.status_code == 200, page.text
    assert "de garde maintenant" in page.text and "dr_autre" in page.text
    assert "oncall-add" not in page.text and "/remove" not in page.text
    shift = {"group": "TLR", "login": "dr_garde", "start": "2031-02-01T20:00", "end": "2031-02-02T08:00"}
    assert schedule.post("dr_garde", "/reading/oncall/add", shift).status_code == 403
    running = page.text.split('data-shift="', 1)[1].split('"', 1)[0]
    assert schedule.post("dr_garde", f"/reading/oncall/{running}/remove", {}).status_code == 403
    assert "dr_autre" in schedule.get("dr_garde").text  # still there
    # The worklist links to the schedule; English on request.
    assert 'href="/reading/oncall"' in schedule.get("dr_garde", "/reading").text
    english = schedule.get("dr_garde", lang="en")
    assert "On-call schedule" in english.text and "on call now" in english.text


def test_other_organisations_see_nothing_of_the_schedule(schedule: Schedule) -> None:
    elsewhere = schedule.get("dr_ailleurs")
    assert elsewhere.status_code == 200  # his own group's schedule, empty
    assert 'data-group="TLR2"' in elsewhere.text and 'data-group="TLR"' not in elsewhere.text
    assert "dr_autre" not in elsewhere.text
    shift = {"group": "TLR", "login": "dr_garde", "start": "2031-02-01T20:00", "end": "2031-02-02T08:00"}
    assert schedule.post("dr_ailleurs", "/reading/oncall/add", shift).status_code == 403
    technologist = schedule.get("tech_site")
    assert technologist.status_code == 403 and "dr_autre" not in technologist.text
