"""Routing to real peers that go down mid-transfer: every instance arrives once, unchanged.

simral forwards what the modality CT1 sends to two Debian Orthancs: one over DIMSE C-STORE, one over
DICOMweb STOW-RS (its DICOMweb plugin). Both are stopped while the first half of a study is being
forwarded; the second half arrives at simral while they are down (its jobs fail and wait, with
backoff); the peers come back and the queue drains. Each Orthanc then holds every instance exactly
once (one NewInstance change per instance in its change log) and each received data set equals
what the modality sent; ``simral jobs list`` shows every job done and the failures it went through.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from tests.corpus import ct_series
from tests.dicomcmp import same_instance
from tests.peers import DICOMWEB_PLUGIN, OrthancServer
from tests.simral_proc import SimralProcess

SLICES = 40
SENDER = "CT1"


def _storescu(simral: SimralProcess, files: list[Path]) -> None:
    result = subprocess.run(
        ["/usr/bin/storescu", "--required", "-aet", SENDER, "-aec", simral.ae_title, "127.0.0.1",
         str(simral.dicom_port), *map(str, files)],
        capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "TCP_NODELAY": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr + simral.log_tail()


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _new_instance_changes(peer: OrthancServer) -> int:
    changes = peer.rest_get("/changes?limit=10000")
    return sum(1 for change in changes["Changes"] if change["ChangeType"] == "NewInstance")


def test_forwarding_survives_peers_restarting(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "ct", slices=SLICES, rows=128, cols=128, patient_id="ROUTE001", seed=21)
    by_uid = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    dimse_peer = OrthancServer(aet="ORTHPACS")
    web_peer = OrthancServer(
        aet="ORTHWEB", plugins=[DICOMWEB_PLUGIN], extra_config={"DicomWeb": {"Enable": True}}
    )
    simral = SimralProcess(tmp_path / "data")
    simral.add_node("ct1", SENDER, 104)
    with dimse_peer, web_peer:
        simral.add_node("pacs", dimse_peer.aet, dimse_peer.dicom_port, organisation="")
        simral.cli("dicomweb-peers", "add", "chu-web", "--url", f"{web_peer.http_url}/dicom-web")
        simral.cli("routes", "add", "to-pacs", "--to", "pacs", "--from-ae", SENDER)
        simral.cli(
            "routes", "add", "to-web", "--to-dicomweb", "chu-web", "--from-ae", SENDER, "--modality", "CT"
        )
        assert "to-pacs" in simral.cli("routes", "list").stdout
        with simral:
            _storescu(simral, files[: SLICES // 2])
            # Both peers go down while the first half is on its way.
            _wait(lambda: len(dimse_peer.instances()) >= 3, 60, "the first forwarded instances")
            dimse_peer.stop()
            web_peer.stop()
            _storescu(simral, files[SLICES // 2 :])

            def failures_seen() -> bool:
                listing = simral.cli("jobs", "list", "--state", "queued", "--limit", "200").stdout
                return "forward.dimse" in listing and "forward.stow" in listing and "/10" in listing

            _wait(failures_seen, 60, "failed forwarding jobs waiting for a retry")
            queued = simral.cli("jobs", "list", "--state", "queued", "--limit", "200").stdout
            assert "2/10" in queued or "1/10" in queued, queued
            dimse_peer.start()
            web_peer.start()

            def drained() -> bool:
                totals = simral.cli("jobs", "list", "--limit", "1").stdout.strip().splitlines()[-1]
                return totals.startswith("queued: 0, running: 0") and f"done: {2 * SLICES}" in totals

            _wait(drained, 120, "the queue to drain after the peers came back")
            assert "dead: 0" in simral.cli("jobs", "list", "--limit", "1").stdout
            forwards = simral.cli("audit", "search", "--action", "study.forward", "--limit", "200").stdout
            assert "study.forward" in forwards
        for peer in (dimse_peer, web_peer):
            ids = peer.instances()
            assert len(ids) == SLICES, f"{peer.aet}: {len(ids)} instances"
            assert _new_instance_changes(peer) == SLICES, f"{peer.aet}: an instance was stored twice"
            for orthanc_id in ids:
                received = tmp_path / f"{peer.aet}-{orthanc_id}.dcm"
                received.write_bytes(peer.rest_get(f"/instances/{orthanc_id}/file"))
                uid = str(dcmread(received, stop_before_pixels=True).SOPInstanceUID)
                assert uid in by_uid
                assert same_instance(by_uid[uid], received) is None, f"{peer.aet}: {uid} differs"


def test_jobs_page_retry_and_cancel(tmp_path: Path, artifacts_dir: Path) -> None:
    """A destination that refuses (HTTP 404) dead-letters the jobs at once; a regional administrator
    sees them in the portal, cancels one and retries the other; a technologist may not."""
    from playwright.sync_api import sync_playwright
    from tests.portal_login import TotpDevice, login_page
    from tests.simral_proc import TEST_PASSWORD, TEST_USER
    from tests.test_portal_accessibility import assert_accessible
    from tests.test_viewer_browser import CHROMIUM, CHROMIUM_ARGS

    files = ct_series(tmp_path / "ct", slices=2, rows=32, cols=32, patient_id="ROUTE002", seed=22)
    simral = SimralProcess(tmp_path / "data")
    simral.add_node("ct1", SENDER, 104)
    simral.cli("organisations", "add", "REGION", "--name", "GRADeS", "--kind", "regional-operator")
    simral.cli(
        "users", "add", "admin_r", "--organisation", "REGION", "--role", "regional-admin",
        "--rpps", "10003000010", "--name", "Admin R", "--password-stdin", input=TEST_PASSWORD + "\n",
    )  # fmt: skip
    with simral:
        simral.cli("dicomweb-peers", "add", "broken", "--url", f"{simral.http_url}/nowhere")
        simral.cli("routes", "add", "to-broken", "--to-dicomweb", "broken", "--from-ae", SENDER)
        _storescu(simral, files)
        _wait(lambda: "dead: 2" in simral.cli("jobs", "list", "--limit", "1").stdout, 60, "two dead jobs")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            context = browser.new_context(
                locale="fr-FR", viewport={"width": 1400, "height": 900}, bypass_csp=True
            )
            page = context.new_page()
            login_page(page, simral.http_url, "admin_r", TEST_PASSWORD, TotpDevice())
            page.goto(simral.http_url + "/admin")
            page.click("a[href='/admin/jobs']")
            page.wait_for_load_state("domcontentloaded")
            rows = page.locator("tbody tr[data-job]")
            assert rows.count() == 2
            assert "HTTP 404" in rows.first.inner_text() and "en échec définitif" in rows.first.inner_text()
            assert "to-broken" in page.locator("main").inner_text()
            first, second = (rows.nth(i).get_attribute("data-job") for i in range(2))
            page.screenshot(path=str(artifacts_dir / "admin-jobs.png"), full_page=True)
            assert_accessible(page, "exchange page")
            page.click(f"tr[data-job='{first}'] form[action$='/cancel'] button")
            page.wait_for_load_state("domcontentloaded")
            assert "annulé" in page.locator(f"tr[data-job='{first}']").inner_text()
            page.click(f"tr[data-job='{second}'] form[action$='/retry'] button")
            page.wait_for_load_state("domcontentloaded")
            # Without the CSRF token the same request is refused.
            assert page.request.post(f"{simral.http_url}/admin/jobs/{first}/retry").status == 403
            technologist = browser.new_context(locale="fr-FR").new_page()
            login_page(technologist, simral.http_url, TEST_USER, TEST_PASSWORD, TotpDevice())
            assert technologist.goto(simral.http_url + "/admin/jobs").status == 403  # type: ignore[union-attr]
            browser.close()
        trail = simral.cli("audit", "search", "--actor", "admin_r", "--limit", "20").stdout
        assert "job.cancel" in trail and "job.retry" in trail
        listing = simral.cli("jobs", "list", "--state", "cancelled").stdout
        assert f"\n{first} " in listing or f"│ {first} " in listing
