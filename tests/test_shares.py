"""Shares and viewer-only links, enforced by the access policy on every protocol.

Organisation CHA holds PAT-A's two studies, CLINB holds PAT-B's. A CHA technologist shares one of
PAT-A's studies with a CLINB radiologist: QIDO-RS, WADO-RS and the study page answer for it (and
only it) until the share is revoked; a share with the CLINB organisation reaches CLINB's DICOM node
(C-FIND); a whole-patient share covers both studies; an expired share grants nothing. A viewer-only
link asks the patient's birth date, locks after five wrong dates, opens read-only DICOMweb on its
study only (other UIDs, STOW-RS and portal pages refused), and stops working once revoked. Then the
same in Chromium: share from the study page, the colleague finds it under "Partagés avec moi",
revocation; the link's visitor sees the image in OHIF.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from sqlalchemy import update
from tests.corpus import ct_series
from tests.simral_proc import SimralProcess

from simral.access.policy import Principal
from simral.app import open_app
from simral.config import load_settings
from simral.db.base import utcnow
from simral.identity import service as identity
from simral.sharing import service as sharing
from simral.sharing.models import Share

PASSWORD = "Partage-Essai-2026!"
NODE_B = "PACSB"


@dataclass
class Region:
    simral: SimralProcess
    a1: str
    a2: str
    b: str
    birth_date_a: str
    tokens: dict[str, str]
    #: Each user's authenticator, shared by the browser tests (TOTP is enrolled once).
    devices: dict[str, Any] = field(default_factory=dict)

    def device(self, login: str) -> Any:
        from tests.portal_login import TotpDevice

        return self.devices.setdefault(login, TotpDevice())

    @property
    def url(self) -> str:
        return self.simral.http_url

    def as_(self, login: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[login]}"}

    def qido(self, login: str) -> set[str]:
        response = httpx.get(f"{self.url}/dicom-web/studies", headers=self.as_(login), timeout=30)
        assert response.status_code in (200, 204), response.text
        return {item["0020000D"]["Value"][0] for item in (response.json() if response.content else [])}


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    base = tmp_path_factory.mktemp("shares")
    simral = SimralProcess(base / "data")
    simral.cli("organisations", "add", "CHA", "--name", "CH A")
    simral.cli("organisations", "add", "CLINB", "--name", "Cabinet B", "--kind", "practice")
    for login, org, role, rpps in (
        ("tech_a", "CHA", "technologist", "10004000001"),
        ("radio_b", "CLINB", "radiologist", "10004000002"),
        ("tech_b", "CLINB", "technologist", "10004000003"),
    ):
        simral.cli(
            "users",
            "add",
            login,
            "--organisation",
            org,
            "--role",
            role,
            "--rpps",
            rpps,
            "--name",
            login.replace("_", " ").title(),
            "--password-stdin",
            input=PASSWORD + "\n",
        )
    simral.add_node("pacs_b", NODE_B, 104, organisation="CLINB")
    a1 = ct_series(
        base / "a1", slices=2, rows=64, cols=64, patient_id="PAT-A", patient_name="ALPHA^ANNE", seed=61
    )
    a2 = ct_series(
        base / "a2", slices=2, rows=64, cols=64, patient_id="PAT-A", patient_name="ALPHA^ANNE", seed=62
    )
    b = ct_series(
        base / "b", slices=2, rows=64, cols=64, patient_id="PAT-B", patient_name="BETA^BRUNO", seed=63
    )
    simral.cli("import", str(base / "a1"), str(base / "a2"), "--organisation", "CHA")
    simral.cli("import", str(base / "b"), "--organisation", "CLINB")
    uid = {
        k: str(dcmread(v[0], stop_before_pixels=True).StudyInstanceUID)
        for k, v in {"a1": a1, "a2": a2, "b": b}.items()
    }
    birth = str(dcmread(a1[0], stop_before_pixels=True).PatientBirthDate)
    tokens = {login: simral.token_for(login) for login in ("tech_a", "radio_b", "tech_b")}
    with simral:
        yield Region(simral, uid["a1"], uid["a2"], uid["b"], birth, tokens)


def _c_find(region: Region) -> set[str]:
    ae = AE(ae_title=NODE_B)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", region.simral.dicom_port, ae_title=region.simral.ae_title)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    found = set()
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
            found.add(str(identifier.StudyInstanceUID))
    assoc.release()
    return found


def _share(
    region: Region, study_uid: str, grantee_kind: str, grantee: str, *, whole_patient: bool = False
) -> int:
    form = {
        "grantee_kind": grantee_kind,
        "grantee": grantee,
        "purpose": "Avis sur une image douteuse",
        "duration": "7d",
    } | ({"whole_patient": "1"} if whole_patient else {})
    response = httpx.post(f"{region.url}/studies/{study_uid}/shares", data=form, headers=region.as_("tech_a"))
    assert response.status_code == 303, response.text
    page = httpx.get(f"{region.url}/shares", headers=region.as_("tech_a")).text
    return max(int(n) for n in re.findall(r'data-share="(\d+)"', page))


def _revoke(region: Region, what: str, ident: int) -> None:
    response = httpx.post(f"{region.url}/{what}/{ident}/revoke", headers=region.as_("tech_a"))
    assert response.status_code == 303, response.text


def test_share_with_a_professional_on_every_protocol(region: Region) -> None:
    assert region.qido("radio_b") == {region.b}
    metadata = f"{region.url}/dicom-web/studies/{region.a1}/metadata"
    assert httpx.get(metadata, headers=region.as_("radio_b")).status_code == 404
    share = _share(region, region.a1, "user", "radio_b")
    assert region.qido("radio_b") == {region.b, region.a1}
    assert httpx.get(metadata, headers=region.as_("radio_b")).status_code == 200
    received = httpx.get(f"{region.url}/shares", headers=region.as_("radio_b")).text
    assert region.a1 in received and "Avis sur une image douteuse" in received
    assert httpx.get(f"{region.url}/studies/{region.a1}", headers=region.as_("radio_b")).status_code == 200
    # Another CLINB member got nothing: the share names one professional.
    assert region.qido("tech_b") == {region.b}
    # The recipient cannot revoke it; its author can.
    assert httpx.post(f"{region.url}/shares/{share}/revoke", headers=region.as_("radio_b")).status_code == 403
    _revoke(region, "shares", share)
    assert region.qido("radio_b") == {region.b}
    assert httpx.get(metadata, headers=region.as_("radio_b")).status_code == 404
    trail = region.simral.cli("audit", "search", "--study", region.a1, "--limit", "50").stdout
    assert "share.create" in trail and "share.revoke" in trail


def test_share_with_an_organisation_reaches_its_dicom_node(region: Region) -> None:
    assert region.a1 not in _c_find(region)
    share = _share(region, region.a1, "organisation", "CLINB")
    assert _c_find(region) == {region.b, region.a1}
    assert region.qido("tech_b") == {region.b, region.a1}
    _revoke(region, "shares", share)
    assert _c_find(region) == {region.b}


def test_whole_patient_share(region: Region) -> None:
    share = _share(region, region.a1, "user", "radio_b", whole_patient=True)
    assert region.qido("radio_b") == {region.b, region.a1, region.a2}
    _revoke(region, "shares", share)
    assert region.qido("radio_b") == {region.b}


def test_expired_share_grants_nothing(region: Region) -> None:
    ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(region.simral.data_dir)}))
    try:
        with ctx.db.unit_of_work() as session:
            tech = identity.get_professional(session, "tech_a")
            assert tech is not None
            acting = identity.principal_for(session, tech)
            share = sharing.create_share(
                session,
                principal=acting,
                study_uid=region.a1,
                grantee_kind="user",
                grantee="radio_b",
                purpose="test",
                lifetime=timedelta(days=1),
            )
            share_id = share.id
        with ctx.db.reading() as session:
            assert region.a1 in sharing.shared_study_uids(session, login="radio_b")
        with ctx.db.unit_of_work() as session:
            session.execute(
                update(Share).where(Share.id == share_id).values(expires_at=utcnow() - timedelta(seconds=1))
            )
        with ctx.db.reading() as session:
            assert region.a1 not in sharing.shared_study_uids(session, login="radio_b")
            assert region.a1 not in sharing.shared_study_uids(session, organisation="CLINB")
        outsider = Principal(
            kind="user",
            name="tech_b",
            organisation="CLINB",
            memberships=frozenset({("CLINB", "technologist")}),
        )
        with pytest.raises(sharing.ShareError), ctx.db.unit_of_work() as session:
            sharing.create_share(
                session,
                principal=outsider,
                study_uid=region.a1,
                grantee_kind="user",
                grantee="tech_b",
                purpose="not mine",
                lifetime=timedelta(days=1),
            )
    finally:
        ctx.db.dispose()


def _make_link(region: Region, *, ask_birth_date: bool) -> tuple[str, int]:
    form = {"purpose": "Second avis", "duration": "1d"} | ({"ask_birth_date": "1"} if ask_birth_date else {})
    response = httpx.post(f"{region.url}/studies/{region.a1}/links", data=form, headers=region.as_("tech_a"))
    assert response.status_code == 200, response.text
    url = re.search(r'id="share-link" readonly size="90" value="([^"]+)"', response.text)
    assert url is not None
    page = httpx.get(f"{region.url}/shares", headers=region.as_("tech_a")).text
    return url.group(1), max(int(n) for n in re.findall(r'data-link="(\d+)"', page))


def test_viewer_link(region: Region) -> None:
    link, link_id = _make_link(region, ask_birth_date=True)
    assert link.startswith(region.url + "/s/") and len(link.rsplit("/", 1)[1]) >= 43
    visitor = httpx.Client(base_url=region.url, timeout=30)
    assert "birth_date" in visitor.get(link).text
    wrong = visitor.post(link, data={"birth_date": "1901-01-01"})
    assert wrong.status_code == 400 and 'role="alert"' in wrong.text
    assert visitor.get("/dicom-web/studies").status_code == 401
    day = region.birth_date_a
    opened = visitor.post(link, data={"birth_date": f"{day[:4]}-{day[4:6]}-{day[6:]}"})
    assert opened.status_code == 303 and opened.headers["location"].endswith(f"StudyInstanceUIDs={region.a1}")
    studies = visitor.get("/dicom-web/studies").json()
    assert [s["0020000D"]["Value"][0] for s in studies] == [region.a1]
    assert visitor.get(f"/dicom-web/studies/{region.a1}/metadata").status_code == 200
    for other in (region.a2, region.b):
        assert visitor.get(f"/dicom-web/studies/{other}/metadata").status_code == 404
        assert visitor.get(f"/dicom-web/studies/{other}/series").status_code in (200, 204)
        assert not visitor.get(f"/dicom-web/studies/{other}/series").content.strip(b"[] \n")
    stow = visitor.post(
        "/dicom-web/studies",
        content=b"--x--\r\n",
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'},
    )
    assert stow.status_code in (401, 403)
    assert visitor.get("/", follow_redirects=False).status_code == 303  # no portal for visitors
    # The cookie is sealed: the bare token is not enough.
    forged = httpx.get(
        f"{region.url}/dicom-web/studies", cookies={"simral_link": link.rsplit("/", 1)[1] + ":00"}
    )
    assert forged.status_code == 401
    _revoke(region, "links", link_id)
    assert visitor.get("/dicom-web/studies").status_code == 401
    assert visitor.get(link).status_code == 404


def test_link_locks_after_wrong_birth_dates(region: Region) -> None:
    link, _ = _make_link(region, ask_birth_date=True)
    visitor = httpx.Client(timeout=30)
    for _ in range(sharing.MAX_LINK_FAILURES):
        assert visitor.post(link, data={"birth_date": "1901-01-01"}).status_code == 400
    day = region.birth_date_a
    assert visitor.post(link, data={"birth_date": f"{day[:4]}-{day[4:6]}-{day[6:]}"}).status_code == 404
    trail = region.simral.cli("audit", "search", "--action", "share-link.open", "--limit", "50").stdout
    assert "failure" in trail


def test_share_and_link_in_the_browser(region: Region, artifacts_dir: Path) -> None:
    from playwright.sync_api import sync_playwright
    from tests.portal_login import login_page
    from tests.test_viewer_browser import CHROMIUM, CHROMIUM_ARGS, wait_for_image

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        tech = browser.new_context(locale="fr-FR", viewport={"width": 1280, "height": 1000}).new_page()
        login_page(tech, region.url, "tech_a", PASSWORD, region.device("tech_a"))
        tech.goto(f"{region.url}/studies/{region.a2}")
        form = tech.locator(f"form[action='/studies/{region.a2}/shares']")
        form.locator("input[name=grantee]").fill("radio_b")
        form.locator("input[name=purpose]").fill("Relecture")
        tech.screenshot(path=str(artifacts_dir / "share-form.png"), full_page=True)
        form.locator("button[type=submit]").click()
        tech.wait_for_load_state("domcontentloaded")
        assert tech.url.endswith("/shares") and region.a2 in tech.locator("main").inner_text()

        radio = browser.new_context(locale="fr-FR", viewport={"width": 1280, "height": 900}).new_page()
        login_page(radio, region.url, "radio_b", PASSWORD, region.device("radio_b"))
        radio.click("a[href='/shares']")
        radio.wait_for_load_state("domcontentloaded")
        assert "Partagés avec moi" in radio.content() and "Relecture" in radio.content()
        radio.screenshot(path=str(artifacts_dir / "shared-with-me.png"), full_page=True)
        radio.click(f"a[href='/studies/{region.a2}']")
        radio.wait_for_load_state("domcontentloaded")
        assert "ALPHA ANNE" in radio.content()

        tech.click("form[action$='/revoke'] button")
        tech.wait_for_load_state("domcontentloaded")
        radio.goto(f"{region.url}/studies/{region.a2}")
        assert radio.locator("[role=alert]").count() == 1  # behind the wall again

        # The viewer-only link, without the birth-date check, opened by someone outside.
        tech.goto(f"{region.url}/studies/{region.a1}")
        links = tech.locator("form#link-form")
        links.locator("input[name=purpose]").fill("Avis externe")
        links.locator("input[name=ask_birth_date]").uncheck()
        links.locator("button[type=submit]").click()
        tech.wait_for_load_state("domcontentloaded")
        url = tech.locator("#share-link").input_value()
        outsider = browser.new_context(locale="fr-FR", viewport={"width": 1280, "height": 900}).new_page()
        outsider.goto(url)
        png = wait_for_image(outsider)
        (artifacts_dir / "share-link-viewer.png").write_bytes(png)
        assert "StudyInstanceUIDs=" in outsider.url
        browser.close()


def test_patient_access(region: Region, tmp_path: Path, artifacts_dir: Path) -> None:
    """The patient's link: birth date, their study, the media download, and who accessed the images."""
    from playwright.sync_api import sync_playwright
    from tests.portal_login import login_page
    from tests.test_portal_accessibility import assert_accessible
    from tests.test_viewer_browser import CHROMIUM, CHROMIUM_ARGS

    # A professional read the study: the patient will see it.
    assert (
        httpx.get(
            f"{region.url}/dicom-web/studies/{region.a1}/metadata", headers=region.as_("tech_a")
        ).status_code
        == 200
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        tech = browser.new_context(locale="fr-FR").new_page()
        login_page(tech, region.url, "tech_a", PASSWORD, region.device("tech_a"))
        tech.goto(f"{region.url}/studies/{region.a1}")
        tech.click("form#patient-link-form button[type=submit]")
        tech.wait_for_load_state("domcontentloaded")
        url = tech.locator("#share-link").input_value()

        patient = browser.new_context(locale="fr-FR", accept_downloads=True, bypass_csp=True).new_page()
        patient.goto(url)
        assert patient.locator("input[name=birth_date]").count() == 1
        day = region.birth_date_a
        patient.fill("input[name=birth_date]", f"{day[:4]}-{day[4:6]}-{day[6:]}")
        patient.click("button[type=submit]")
        patient.wait_for_load_state("domcontentloaded")
        assert patient.url.endswith("/patient")
        assert patient.locator("h1").inner_text() == "Mes examens d'imagerie"
        accesses = patient.locator("main table").nth(1).inner_text()
        assert "Tech A" in accesses and "CHA" in accesses and "Consultation d'examen" in accesses
        patient.screenshot(path=str(artifacts_dir / "patient-page.png"), full_page=True)
        assert_accessible(patient, "patient page")
        with patient.expect_download() as download_info:
            patient.click(f"a[href='/patient/studies/{region.a1}/export.zip']")
        saved = tmp_path / "patient.zip"
        download_info.value.save_as(saved)
        import zipfile

        with zipfile.ZipFile(saved) as archive:
            assert archive.namelist()[0] == "DICOMDIR"
        # The patient's link opens nothing else: another study, the portal, a colleague's pages.
        other = patient.request.get(f"{region.url}/patient/studies/{region.b}/export.zip")
        assert other.status == 404
        assert patient.request.get(f"{region.url}/shares", max_redirects=0).status == 303
        browser.close()
