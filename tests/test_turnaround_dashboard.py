"""The teleradiology turnaround dashboard (issue 6 item 7) against a real ``simral serve``.

Requests, reading tasks and reports are written with known times (two sites, one reading group,
urgent and routine, an answered, a refused and a pending request, a report signed after its
deadline then completed by an addendum, a reading late now). The JSON and the page give exactly the
expected counts, medians and 90th percentiles, and each user sees only their scope: the reading
group everything routed to it, a site its own requests, an auditor nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import sync_playwright
from tests.simral_proc import SimralProcess
from tests.test_viewer_browser import CHROMIUM, CHROMIUM_ARGS

from simral.app import open_app
from simral.config import load_settings
from simral.db.base import utcnow
from simral.reading.models import (
    PRIORITY_ROUTINE,
    PRIORITY_URGENT,
    REPORT_SIGNED,
    REQUEST_PERFORMED,
    REQUEST_RECEIVED,
    REQUEST_REFUSED,
    REQUEST_REPORTED,
    TASK_READY,
    TASK_REPORTED,
    ImagingRequest,
    ReadingTask,
    Report,
)

PASSWORD = "Delais-Essai-2026!"
USERS = (
    ("radio_tlr", "TLR", "radiologist"),
    ("admin_site", "SITE", "site-admin"),
    ("tech_other", "OTHER", "technologist"),
    ("auditrice", "SITE", "auditor"),
)


@dataclass
class Dashboard:
    simral: SimralProcess
    tokens: dict[str, str]

    def get(self, login: str, path: str = "/api/reading/dashboard", **params: str) -> httpx.Response:
        return httpx.get(
            self.simral.http_url + path,
            params=params,
            headers={"Authorization": f"Bearer {self.tokens[login]}"},
            timeout=30,
        )

    def rows(self, login: str) -> dict[tuple[str, str, str], dict[str, Any]]:
        response = self.get(login)
        assert response.status_code == 200, response.text
        return {(r["site"], r["modality"], r["priority"]): r for r in response.json()["rows"]}


def _seed(data_dir: Any) -> None:
    now = utcnow()
    ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(data_dir)}))
    try:
        with ctx.db.unit_of_work() as session:

            def request(
                number: str, site: str, modality: str, priority: str, state: str, **times: Any
            ) -> int:
                item = ImagingRequest(
                    site_code=site,
                    group_code="TLR",
                    placer_number=number,
                    placer_authority="1.2.250.1.999.9",
                    modality=modality,
                    priority=priority,
                    state=state,
                    protocol="Protocole" if state != REQUEST_REFUSED else "",
                    created_at=now - times["age"],
                    updated_at=now,
                    answered_at=(now - times["age"] + times["answer"]) if "answer" in times else None,
                )
                session.add(item)
                session.flush()
                return item.id

            minutes, hours = (lambda n: timedelta(minutes=n)), (lambda n: timedelta(hours=n))
            urgent = request(
                "R1", "SITE", "CT", PRIORITY_URGENT, REQUEST_REPORTED, age=hours(3), answer=minutes(10)
            )
            routine = request(
                "R2", "SITE", "CT", PRIORITY_ROUTINE, REQUEST_PERFORMED, age=hours(5), answer=minutes(30)
            )
            request("R3", "SITE", "CT", PRIORITY_ROUTINE, REQUEST_REFUSED, age=hours(2), answer=minutes(20))
            request("R4", "OTHER", "MR", PRIORITY_ROUTINE, REQUEST_RECEIVED, age=hours(1))
            common = {"site_code": "SITE", "group_code": "TLR", "modality": "CT", "updated_at": now}
            read = ReadingTask(
                request_id=urgent,
                study_uid="1.2.826.0.1.3680043.8.498.901",
                priority=PRIORITY_URGENT,
                state=TASK_REPORTED,
                ready_at=now - hours(2),
                due_at=now - minutes(90),
                escalated_at=now - minutes(100),
                created_at=now - hours(2),
                **common,
            )
            waiting = ReadingTask(
                request_id=routine,
                study_uid="1.2.826.0.1.3680043.8.498.902",
                priority=PRIORITY_ROUTINE,
                state=TASK_READY,
                ready_at=now - hours(4),
                due_at=now - hours(1),
                created_at=now - hours(4),
                **common,
            )
            session.add_all([read, waiting])
            session.flush()
            for version, signed in ((1, now - timedelta(hours=1)), (2, now - timedelta(minutes=5))):
                session.add(
                    Report(
                        task_id=read.id,
                        request_id=urgent,
                        study_uid=read.study_uid,
                        set_id="1.2.826.0.1.3680043.8.498.950",
                        version=version,
                        document_uid=f"1.2.826.0.1.3680043.8.498.95{version}",
                        state=REPORT_SIGNED,
                        author="radio_tlr",
                        signed_at=signed,
                        created_at=signed,
                        updated_at=signed,
                    )
                )
    finally:
        ctx.db.dispose()


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    base = tmp_path_factory.mktemp("dashboard")
    simral = SimralProcess(base / "data")
    simral.cli("organisations", "add", "SITE", "--name", "CH de proximité")
    simral.cli("organisations", "add", "OTHER", "--name", "Clinique")
    simral.cli(
        "organisations", "add", "TLR", "--name", "Groupe de téléradiologie", "--kind", "teleradiology-group"
    )
    for number, (login, org, role) in enumerate(USERS):
        simral.cli(
            "users", "add", login, "--organisation", org, "--role", role, "--rpps", f"1000600000{number}",
            "--name", login.replace("_", " ").title(), "--password-stdin", input=PASSWORD + "\n",
        )  # fmt: skip
    _seed(simral.data_dir)
    tokens = {login: simral.token_for(login) for login, _, _ in USERS}
    with simral:
        yield Dashboard(simral, tokens)


def test_the_reading_group_sees_every_figure_it_is_accountable_for(dashboard: Dashboard) -> None:
    rows = dashboard.rows("radio_tlr")
    assert set(rows) == {("SITE", "CT", "urgent"), ("SITE", "CT", "routine"), ("OTHER", "MR", "routine")}
    urgent = rows[("SITE", "CT", "urgent")]
    assert (urgent["requests"], urgent["accepted"], urgent["refused"]) == (1, 1, 0)
    assert (urgent["answer_minutes_median"], urgent["answer_minutes_p90"]) == (10.0, 10.0)
    # One signed report (the addendum is not a second reading): 60 min after the images were
    # complete, 120 min after the request, after its deadline; escalated once; nothing waiting.
    assert urgent["reported"] == 1
    assert urgent["ready_to_report_minutes_median"] == 60.0
    assert urgent["request_to_report_minutes_median"] == 120.0
    assert (urgent["reported_late"], urgent["late_now"], urgent["escalated"], urgent["backlog"]) == (
        1,
        0,
        1,
        0,
    )
    routine = rows[("SITE", "CT", "routine")]
    assert (routine["requests"], routine["accepted"], routine["refused"]) == (2, 1, 1)
    # Answers after 30 and 20 minutes: median (nearest rank) 20, 90th percentile 30.
    assert (routine["answer_minutes_median"], routine["answer_minutes_p90"]) == (20.0, 30.0)
    assert (routine["reported"], routine["late_now"], routine["backlog"]) == (0, 1, 1)
    assert routine["ready_to_report_minutes_median"] is None
    pending = rows[("OTHER", "MR", "routine")]
    assert (pending["requests"], pending["accepted"], pending["answer_minutes_median"]) == (1, 0, None)


def test_each_user_sees_their_scope_only(dashboard: Dashboard) -> None:
    assert set(dashboard.rows("admin_site")) == {("SITE", "CT", "urgent"), ("SITE", "CT", "routine")}
    assert set(dashboard.rows("tech_other")) == {("OTHER", "MR", "routine")}
    assert dashboard.get("auditrice").status_code == 403
    assert dashboard.get("auditrice", "/reading/dashboard").status_code == 403


def test_the_page_in_french_and_english(dashboard: Dashboard, artifacts_dir: Path) -> None:
    french = dashboard.get("radio_tlr", "/reading/dashboard")
    assert french.status_code == 200
    assert "Délais de téléradiologie" in french.text and 'href="/reading/dashboard"' in french.text
    assert french.text.count("<tr data-site=") == 3
    assert "10 min / 10 min</span>" in french.text  # answer
    assert "60 min / 60 min</span>" in french.text  # images complete → report
    assert "2.0 h / 2.0 h" in french.text  # request → report
    assert '<span class="late">1 / 0</span>' in french.text
    english = dashboard.get("radio_tlr", "/reading/dashboard", days="7", lang="en")
    assert "Teleradiology turnaround" in english.text and "last 7 days" in english.text
    assert "urgent" in english.text and "routine" in english.text
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = chromium.new_context(
            locale="fr-FR",
            viewport={"width": 1400, "height": 700},
            extra_http_headers={"Authorization": f"Bearer {dashboard.tokens['radio_tlr']}"},
        )
        page = context.new_page()
        page.goto(dashboard.simral.http_url + "/reading/dashboard")
        assert page.locator("tr[data-site]").count() == 3
        page.screenshot(path=str(artifacts_dir / "turnaround-dashboard.png"), full_page=True)
        chromium.close()
