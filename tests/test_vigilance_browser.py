"""Identity vigilance in the portal, in headless Chromium (issue 5 item 6; DESIGN.md §6 "never
merge silently"; RNIV).

A real ``simral serve`` with two organisations (CHA, CLINB) and patient identities fed through the
patients service: one patient known at CHA under two IPPs with the same strict traits (a suspected
duplicate) and at CLINB under a third IPP linked by the same (ANS test) INS; a CHA identity
received again with another birth date (conflicting traits); a qualified identity downgraded to
provisional (change of INS status). Studies of the first patient are stored at CHA and CLINB.

- A technologist gets no navigation link and a 403 on every identity page.
- A site administrator (also a radiologist at CHA) sees the three cases side by side with what
  differs marked, merges the duplicate with a reason (refused first without a surviving
  identity), finds the merge under "changes", undoes it, and the database shows the two
  identities separate again; the identity page lists only the person's studies CHA may see.
- Received traits applied to the conflicting-traits case change the stored birth date; the status
  change is acknowledged.
- A regional administrator (no clinical role, no break-glass) sees the identity page with its
  linked identities and is told plainly that no study is accessible.
- axe-core finds no WCAG 2.1 A/AA violation on the three pages with content.

Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from pydicom import dcmread
from sqlalchemy import select
from tests.corpus import ct_series
from tests.portal_login import TotpDevice, browser_login
from tests.simral_proc import SimralProcess
from tests.test_portal_accessibility import AXE, assert_accessible
from tests.test_viewer_browser import CHROMIUM, CHROMIUM_ARGS

from simral.access.policy import Principal
from simral.app import open_app
from simral.audit.models import AuditEvent
from simral.config import load_settings
from simral.context import AppContext
from simral.patients import service as patients
from simral.patients.models import CASE_OPEN, INS_TEST_OID, STATUS_PROV, STATUS_QUAL, PatientIdentity
from simral.patients.service import AuthorityRef, Ins, Traits

PASSWORD = "Vigilance-Essai-2026!"
OID_CHA = "1.2.250.1.999.1.1"
OID_CLINB = "1.2.250.1.999.2.1"
CHA = AuthorityRef(namespace="CHA", oid=OID_CHA)
CLINB = AuthorityRef(namespace="CLINB", oid=OID_CLINB)
#: ANS test NIRs (valid keys), never real people.
NIR_1 = "279035121518989"
NIR_2 = "274075176079430"
OPERATOR = Principal(kind="system", name="test-vigilance", archive_wide=True)
CAMILLE = Traits(
    birth_name="PAT-DUPONT",
    birth_given_names="CAMILLE ANNE",
    sex="F",
    birth_date="19850412",
    birth_place_code="75056",
    used_name="PAT-DUPONT",
    used_given_name="CAMILLE",
)
LOUIS = Traits(
    birth_name="PAT-MARTIN",
    birth_given_names="LOUIS",
    sex="M",
    birth_date="19600101",
    birth_place_code="69123",
)
ROSE = Traits(
    birth_name="PAT-BERNARD",
    birth_given_names="ROSE",
    sex="F",
    birth_date="19790328",
    birth_place_code="63220",
)


@dataclass
class Site:
    simral: SimralProcess
    ctx: AppContext
    #: Study Instance UID by IPP.
    studies: dict[str, str]
    devices: dict[str, TotpDevice] = field(default_factory=dict)
    states: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.simral.http_url

    def identity(self, local_id: str, authority: AuthorityRef = CHA) -> PatientIdentity:
        with self.ctx.db.reading() as session:
            return patients.get_identity_or_raise(session, local_id=local_id, authority=authority)

    def open_cases(self, kind: str) -> list[int]:
        with self.ctx.db.reading() as session:
            return [c.id for c in patients.list_cases(session, state=CASE_OPEN, kind=kind)]

    def audit_actions(self) -> list[str]:
        with self.ctx.db.reading() as session:
            return list(session.scalars(select(AuditEvent.action).where(AuditEvent.action.like("patient.%"))))


def _feed_identities(ctx: AppContext) -> None:
    """The identities and the cases they open, as an HL7 feed would leave them."""

    def upsert(local_id: str, authority: AuthorityRef, traits: Traits, **kwargs: Any) -> None:
        patients.upsert_identity(
            session,
            local_id=local_id,
            authority=authority,
            traits=traits,
            principal=OPERATOR,
            source="hl7:GAM_TEST^CHA",
            allow_test_ins=True,
            **kwargs,
        )

    with ctx.db.unit_of_work() as session:
        upsert("IPP-100", CHA, CAMILLE, ins=Ins(NIR_1, INS_TEST_OID), status=STATUS_QUAL)
        upsert("IPP-B7", CLINB, CAMILLE, ins=Ins(NIR_1, INS_TEST_OID), status=STATUS_QUAL)  # linked by INS
        upsert("IPP-200", CHA, CAMILLE)  # suspected duplicate of IPP-100
        upsert("IPP-300", CHA, LOUIS)
        upsert("IPP-300", CHA, replace(LOUIS, birth_date="19600110"))  # conflicting
        upsert("IPP-400", CHA, ROSE, ins=Ins(NIR_2, INS_TEST_OID), status=STATUS_QUAL)
        upsert("IPP-400", CHA, Traits(), status=STATUS_PROV)  # status change


def _camille_study(out: Path, patient_id: str, seed: int) -> str:
    paths = ct_series(out, slices=1, rows=32, cols=32, patient_id=patient_id, seed=seed)
    for path in paths:
        ds = dcmread(path)
        ds.PatientName = "PAT-DUPONT^CAMILLE"
        ds.PatientBirthName = "PAT-DUPONT"
        ds.PatientBirthDate = "19850412"
        ds.PatientSex = "F"
        ds.save_as(path)
    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("vigilance")
    env = {"SIMRAL_INS_TEST_OIDS_ALLOWED": "true"}
    simral = SimralProcess(base / "data", extra_env=env)
    simral.cli("organisations", "add", "CHA", "--name", "CH A", "--patient-id-oid", OID_CHA)
    simral.cli(
        "organisations", "add", "CLINB", "--name", "Cabinet B", "--kind", "practice",
        "--patient-id-oid", OID_CLINB,
    )  # fmt: skip
    simral.cli("organisations", "add", "REGION", "--name", "GRADeS", "--kind", "regional-operator")
    for login, org, role, rpps in (
        ("admin_a", "CHA", "site-admin", "10005000001"),
        ("admin_r", "REGION", "regional-admin", "10005000002"),
        ("tech_a", "CHA", "technologist", "10005000003"),
    ):
        simral.cli(
            "users", "add", login, "--organisation", org, "--role", role, "--rpps", rpps,
            "--name", login.replace("_", " ").title(), "--password-stdin", input=PASSWORD + "\n",
        )  # fmt: skip
    # The CHA administrator is also one of its radiologists: CHA's studies are visible to them.
    simral.cli("users", "grant", "admin_a", "--organisation", "CHA", "--role", "radiologist")
    ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(simral.data_dir), **env}))
    _feed_identities(ctx)
    studies = {
        "IPP-100": _camille_study(base / "s100", "IPP-100", 81),
        "IPP-200": _camille_study(base / "s200", "IPP-200", 82),
        "IPP-B7": _camille_study(base / "sb7", "IPP-B7", 83),
    }
    simral.cli("import", str(base / "s100"), str(base / "s200"), "--organisation", "CHA")
    simral.cli("import", str(base / "sb7"), "--organisation", "CLINB")
    try:
        with simral:
            yield Site(
                simral, ctx, studies, {name: TotpDevice() for name in ("admin_a", "admin_r", "tech_a")}
            )
    finally:
        ctx.db.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _page(browser: Browser, site: Site, login: str, *, bypass_csp: bool = False) -> Page:
    """A page of a context logged in as ``login`` (one login per user and module)."""
    if login not in site.states:
        site.states[login] = browser_login(browser, site.url, login, PASSWORD, site.devices[login])
    context = browser.new_context(
        locale="fr-FR",
        viewport={"width": 1280, "height": 900},
        storage_state=site.states[login],
        bypass_csp=bypass_csp,
    )
    return context.new_page()


def _submit(page: Page, button: Any) -> None:
    with page.expect_navigation(wait_until="domcontentloaded"):
        button.click()


def test_technologist_has_no_identity_pages(browser: Browser, site: Site) -> None:
    page = _page(browser, site, "tech_a")
    page.goto(site.url + "/")
    assert page.locator("h1").inner_text() == "Examens"
    assert page.locator("nav a[href='/identities/vigilance']").count() == 0
    identity_id = site.identity("IPP-100").id
    for path in ("/identities/vigilance", "/identities/changes", f"/identities/{identity_id}"):
        response = page.goto(site.url + path)
        assert response is not None and response.status == 403, path
        assert "Réservé aux administrateurs" in page.locator("[role=alert]").inner_text()
        assert "PAT-DUPONT" not in page.content()
    # A decision posted with the session's CSRF token is refused all the same: not an administrator.
    token = page.locator("form[action='/logout'] input[name=csrf_token]").get_attribute("value")
    case_id = site.open_cases("suspected-duplicate")[0]
    form: dict[str, str | float | bool] = {
        "csrf_token": token or "",
        "action": "distinct",
        "reason": "Hors droits",
    }
    assert page.request.post(f"{site.url}/identities/vigilance/{case_id}", form=form).status == 403
    assert site.open_cases("suspected-duplicate") == [case_id]
    page.context.close()


def test_worklist_shows_each_case_side_by_side(browser: Browser, site: Site, artifacts_dir: Path) -> None:
    page = _page(browser, site, "admin_a")
    page.goto(site.url + "/")
    page.click("nav a[href='/identities/vigilance']")
    page.wait_for_load_state("domcontentloaded")
    assert page.locator("h1").inner_text() == "Identitovigilance"
    duplicate = page.locator("section[data-kind=suspected-duplicate]")
    assert duplicate.count() == 1
    assert "Doublon suspecté" in duplicate.locator("h2").inner_text()
    header = duplicate.locator("thead").inner_text()
    assert "IPP-200" in header and "IPP-100" in header
    # Same strict traits, one INS known on one side only: nothing disagrees.
    assert duplicate.locator("tr.differs").count() == 0
    assert "12/04/1985" in duplicate.inner_text() and "QUAL (qualifiée)" in duplicate.inner_text()

    conflict = page.locator("section[data-kind=conflicting-traits]")
    assert conflict.count() == 1
    row = conflict.locator("tr.differs")
    assert row.count() == 1 and "Date de naissance" in row.inner_text()
    assert row.locator("mark").all_inner_texts() == ["01/01/1960", "10/01/1960"]
    assert conflict.locator("button[value=apply]").count() == 1
    assert conflict.locator("button[value=merge]").count() == 0

    status = page.locator("section[data-kind=ins-status-change]")
    assert "QUAL (qualifiée) → PROV (provisoire)" in status.inner_text()
    assert status.locator("button").all_inner_texts() == ["Prendre acte"]
    page.screenshot(path=str(artifacts_dir / "vigilance-worklist.png"), full_page=True)
    # Without the form's CSRF token, the session cookie alone decides nothing.
    case_id = site.open_cases("suspected-duplicate")[0]
    forged: dict[str, str | float | bool] = {"action": "distinct", "reason": "Requête forgée sans jeton"}
    assert page.request.post(f"{site.url}/identities/vigilance/{case_id}", form=forged).status == 403
    assert site.open_cases("suspected-duplicate") == [case_id]

    # The filter by kind.
    page.select_option("select[name=kind]", "conflicting-traits")
    _submit(page, page.locator("form[role=search] button"))
    assert page.locator("section.case").count() == 1
    assert page.locator("section[data-kind=conflicting-traits]").count() == 1
    page.goto(site.url + "/identities/vigilance?lang=en")
    assert page.locator("h1").inner_text() == "Identity vigilance"
    assert "Suspected duplicate" in page.locator("section[data-kind=suspected-duplicate] h2").inner_text()
    page.context.close()


def test_merge_a_duplicate_then_undo_it(browser: Browser, site: Site, artifacts_dir: Path) -> None:
    ipp100, ipp200 = site.identity("IPP-100"), site.identity("IPP-200")
    assert ipp100.person_id != ipp200.person_id
    page = _page(browser, site, "admin_a")
    page.goto(site.url + "/identities/vigilance")
    case = page.locator("section[data-kind=suspected-duplicate]")
    # A merge needs the identity to keep: without it, nothing happens and the page says why.
    case.locator("textarea[name=reason]").fill("Même patiente, deux IPP créés aux admissions")
    _submit(page, case.locator("button[value=merge]"))
    assert "Choisissez l'identité conservée" in page.locator("[role=alert]").inner_text()
    assert site.identity("IPP-200").merged_into_id is None

    case = page.locator("section[data-kind=suspected-duplicate]")
    case.locator(f"input[name=survivor][value='{ipp100.id}']").check()
    case.locator("textarea[name=reason]").fill("Même patiente, deux IPP créés aux admissions")
    _submit(page, case.locator("button[value=merge]"))
    assert "done=merge" in page.url
    assert "Fusion effectuée" in page.locator("[role=status]").first.inner_text()
    assert page.locator("section[data-kind=suspected-duplicate]").count() == 0
    merged = site.identity("IPP-200")
    assert merged.merged_into_id == ipp100.id and not merged.active
    assert merged.person_id == ipp100.person_id
    assert site.open_cases("suspected-duplicate") == []
    page.screenshot(path=str(artifacts_dir / "vigilance-after-merge.png"), full_page=True)

    # The identity page: the person's identities (both organisations) and the studies CHA sees.
    page.goto(f"{site.url}/identities/{ipp100.id}")
    assert page.locator("h1").inner_text() == "Identité patient"
    linked = page.locator("tr[data-identity]")
    assert linked.count() == 3
    assert any("IPP-B7 — CLINB" in text for text in linked.all_inner_texts())
    assert "fusionnée dans IPP-100 — CHA" in page.locator(f"tr[data-identity='{ipp200.id}']").inner_text()
    shown = set(page.locator("tr[data-study]").evaluate_all("rows => rows.map(r => r.dataset.study)"))
    assert shown == {site.studies["IPP-100"], site.studies["IPP-200"]}
    assert site.studies["IPP-B7"] not in page.content()  # CLINB's study: not CHA's to see
    viewer = page.locator(f"tr[data-study='{site.studies['IPP-100']}'] a[href^='/viewer/viewer']")
    assert viewer.count() == 1
    page.screenshot(path=str(artifacts_dir / "vigilance-identity.png"), full_page=True)

    # The change, who made it, and its undo.
    page.goto(site.url + "/identities/changes")
    row = page.locator("tr[data-kind=merge]").first
    assert "user:admin_a" in row.inner_text() and "en vigueur" in row.inner_text()
    assert "IPP-100" in row.inner_text() and "IPP-200" in row.inner_text()
    row.locator("input[name=reason]").fill("Fusion erronée : homonymes, vérifié sur pièce d'identité")
    _submit(page, row.locator("button"))
    assert "done=undo" in page.url
    assert "Modification annulée" in page.locator("[role=status]").first.inner_text()
    row = page.locator("tr[data-kind=merge]").first
    assert "annulée le" in row.inner_text() and "user:admin_a" in row.inner_text()
    assert "homonymes, vérifié sur pièce d'identité" in row.inner_text()  # why it was undone
    assert row.locator("button").count() == 0
    page.screenshot(path=str(artifacts_dir / "vigilance-changes.png"), full_page=True)

    separate = site.identity("IPP-200")
    assert separate.merged_into_id is None and separate.active
    assert separate.person_id != site.identity("IPP-100").person_id
    with site.ctx.db.reading() as session:
        assert {i.local_id for i in patients.linked_identities(session, separate)} == {"IPP-200"}
        assert {i.local_id for i in patients.linked_identities(session, site.identity("IPP-100"))} == {
            "IPP-100",
            "IPP-B7",
        }
    actions = site.audit_actions()
    for action in ("patient.merge", "patient.vigilance-resolve", "patient.undo-merge"):
        assert action in actions, actions
    page.context.close()


def test_conflicting_traits_apply_received_and_acknowledge_status(browser: Browser, site: Site) -> None:
    assert site.identity("IPP-300").birth_date == "19600101"
    page = _page(browser, site, "admin_a")
    page.goto(site.url + "/identities/vigilance?kind=conflicting-traits")
    case = page.locator("section[data-kind=conflicting-traits]")
    case.locator("textarea[name=reason]").fill("Date de naissance vérifiée sur la carte d'identité")
    _submit(page, case.locator("button[value=apply]"))
    assert "done=apply" in page.url
    assert "Traits reçus appliqués" in page.locator("[role=status]").first.inner_text()
    assert site.identity("IPP-300").birth_date == "19600110"
    assert site.open_cases("conflicting-traits") == []

    page.goto(site.url + "/identities/vigilance")
    case = page.locator("section[data-kind=ins-status-change]")
    case.locator("textarea[name=reason]").fill("Identité à requalifier : appel INSi prévu")
    _submit(page, case.locator("button[value=acknowledge]"))
    assert "done=acknowledge" in page.url
    assert site.open_cases("ins-status-change") == []
    assert site.identity("IPP-400").status == STATUS_PROV
    page.context.close()


def test_administrator_without_break_glass_sees_no_study(browser: Browser, site: Site) -> None:
    page = _page(browser, site, "admin_r")
    page.goto(site.url + "/")
    assert page.locator("nav a[href='/identities/vigilance']").count() == 1
    identity_id = site.identity("IPP-100").id
    page.goto(f"{site.url}/identities/{identity_id}")
    assert "NIR" not in page.locator("h2").first.inner_text()
    assert page.locator("tr[data-identity]").count() == 2  # IPP-100 and CLINB's IPP-B7 (same INS)
    assert NIR_1 in page.locator("tr[data-identity]").last.inner_text()
    assert "Aucun examen de ce patient ne vous est accessible" in page.locator("#studies-none").inner_text()
    assert page.locator("tr[data-study]").count() == 0
    for uid in site.studies.values():
        assert uid not in page.content()
    page.goto(f"{site.url}/identities/{identity_id}?lang=en")
    assert page.locator("h1").inner_text() == "Patient identity"
    assert "None of this patient's studies is accessible" in page.locator("#studies-none").inner_text()
    page.context.close()


def test_pages_are_accessible(browser: Browser, site: Site) -> None:
    assert AXE.is_file(), f"{AXE} missing: run `make test` (npm ci in tests/axe)"
    with site.ctx.db.unit_of_work() as session:  # one more case, so the worklist has content
        patients.upsert_identity(
            session,
            local_id="IPP-201",
            authority=CHA,
            traits=CAMILLE,
            principal=OPERATOR,
            source="hl7:GAM_TEST^CHA",
        )
    page = _page(browser, site, "admin_a", bypass_csp=True)
    for path, what in (
        ("/identities/vigilance", "identity-vigilance worklist"),
        ("/identities/changes", "identity changes"),
        (f"/identities/{site.identity('IPP-100').id}", "identity page with studies"),
    ):
        page.goto(site.url + path)
        assert_accessible(page, what)
    page.context.close()
