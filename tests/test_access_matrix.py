"""The authorization matrix: role × action × protocol, with two organisations' data in the archive.

Organisation CHA (a hospital) and CLINB (a private practice) each have a modality node that stores a
study over DIMSE; the regional operator REGION has an administrator and an auditor. Every cell
below is exercised against a real ``simral serve``: allowed cells must work, denied cells must be
denied (and a denied study is indistinguishable from a missing one: 404, no match).

DIMSE principals are nodes (calling AE titles); HTTP principals are professionals with bearer tokens
(the session-cookie path is covered by the browser tests). DESIGN.md §2, §9.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)
from tests.corpus import ct_series
from tests.dimse_client import c_get_study
from tests.peers import free_port
from tests.simral_proc import SimralProcess

PASSWORD = "Matrice-Acces-2026!"

#: login → (organisation, role)
USERS = {
    "tech_a": ("CHA", "technologist"),
    "rad_a": ("CHA", "radiologist"),
    "tech_b": ("CLINB", "technologist"),
    "ref_b": ("CLINB", "referring-physician"),
    "siteadm_a": ("CHA", "site-admin"),
    "regadm": ("REGION", "regional-admin"),
    "auditor": ("REGION", "auditor"),
}
#: Which organisation's study each user sees without break-glass.
SEES = {
    "tech_a": {"A"},
    "rad_a": {"A"},
    "tech_b": {"B"},
    "ref_b": {"B"},
    "siteadm_a": set(),
    "regadm": set(),
    "auditor": set(),
}
MAY_STORE = {"tech_a", "rad_a", "tech_b"}
MAY_READ_AUDIT = {"auditor"}
MAY_ADMIN = {"siteadm_a", "regadm"}

NODES = {"MOD_A": "CHA", "MOD_B": "CLINB"}


@dataclass
class World:
    simral: SimralProcess
    studies: dict[str, str]  # "A"/"B" → Study Instance UID
    files: dict[str, list[Path]]
    tokens: dict[str, str]
    scp_ports: dict[str, int]
    base: Path
    received: dict[str, list[str]] = field(default_factory=dict)

    def http(self, login: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[login]}"} if login else {}
        return httpx.Client(base_url=self.simral.http_url, headers=headers, timeout=60, trust_env=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("matrix")
    simral = SimralProcess(base / "data")
    simral.cli("organisations", "add", "CHA", "--name", "CH A", "--finess", "990000011")
    simral.cli("organisations", "add", "CLINB", "--name", "Cabinet B", "--kind", "practice")
    simral.cli("organisations", "add", "REGION", "--name", "GRADeS", "--kind", "regional-operator")
    for login, (org, role) in USERS.items():
        simral.cli(
            "users",
            "add",
            login,
            "--organisation",
            org,
            "--role",
            role,
            "--password-stdin",
            input=PASSWORD + "\n",
        )
    scp_ports = {}
    for ae, org in NODES.items():
        scp_ports[ae] = free_port()
        simral.add_node(ae.lower(), ae, scp_ports[ae], organisation=org)
    tokens = {login: simral.token_for(login) for login in USERS}
    files = {
        "A": ct_series(
            base / "a", slices=3, rows=32, cols=32, patient_id="PAT-A", patient_name="ALPHA^ANNE", seed=41
        ),
        "B": ct_series(
            base / "b", slices=3, rows=32, cols=32, patient_id="PAT-B", patient_name="BETA^BRUNO", seed=42
        ),
    }
    studies = {
        key: str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID) for key, paths in files.items()
    }
    with simral:
        for key, ae in (("A", "MOD_A"), ("B", "MOD_B")):
            sent = subprocess.run(
                ["/usr/bin/dcmsend", "-aet", ae, "-aec", simral.ae_title, "127.0.0.1", str(simral.dicom_port)]
                + [str(p) for p in files[key]],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert sent.returncode == 0, sent.stderr
        yield World(simral, studies, files, tokens, scp_ports, base)


# --------------------------------------------------------------------------------------------- DIMSE


def _find(world: World, calling: str) -> set[str]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", world.simral.dicom_port, ae_title=world.simral.ae_title)
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


def _get(world: World, calling: str, study_uid: str) -> int:
    """C-GET a study; return how many instances arrived."""
    return len(c_get_study(world.simral.dicom_port, world.simral.ae_title, calling, study_uid))


def _move(world: World, calling: str, study_uid: str) -> int:
    """C-MOVE a study to the caller's own registered node (a storage SCP here); count arrivals."""
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    scp = AE(ae_title=calling)
    scp.add_supported_context(CTImageStorage)
    server = scp.start_server(
        ("127.0.0.1", world.scp_ports[calling]), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        ae = AE(ae_title=calling)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", world.simral.dicom_port, ae_title=world.simral.ae_title)
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        for _status, _ in assoc.send_c_move(query, calling, StudyRootQueryRetrieveInformationModelMove):
            pass
        assoc.release()
    finally:
        server.shutdown()
    return len(received)


@pytest.mark.parametrize(("node", "own", "other"), [("MOD_A", "A", "B"), ("MOD_B", "B", "A")])
def test_dimse_nodes_see_their_organisation_only(world: World, node: str, own: str, other: str) -> None:
    # C-FIND: only the node's organisation's study matches.
    assert _find(world, node) == {world.studies[own]}
    # C-GET and C-MOVE: the own study comes back whole, the other one not at all.
    assert _get(world, node, world.studies[own]) == 3
    assert _get(world, node, world.studies[other]) == 0
    assert _move(world, node, world.studies[own]) == 3
    assert _move(world, node, world.studies[other]) == 0


def test_dimse_store_attaches_to_the_node_organisation(world: World) -> None:
    # C-STORE by MOD_B of a new study: CLINB's users see it, CHA's do not.
    paths = ct_series(world.base / "b2", slices=1, rows=32, cols=32, patient_id="PAT-B2", seed=43)
    study = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    sent = subprocess.run(
        [
            "/usr/bin/storescu",
            *("-aet", "MOD_B", "-aec", world.simral.ae_title),
            *("127.0.0.1", str(world.simral.dicom_port), str(paths[0])),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert sent.returncode == 0, sent.stderr
    with world.http("tech_b") as http:
        assert http.get(f"/dicom-web/studies/{study}/metadata").status_code == 200
    with world.http("tech_a") as http:
        assert http.get(f"/dicom-web/studies/{study}/metadata").status_code == 404


def test_dimse_unknown_calling_ae_is_refused(world: World) -> None:
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", world.simral.dicom_port, ae_title=world.simral.ae_title)
    assert not assoc.is_established


# ---------------------------------------------------------------------------------------------- HTTP


@pytest.mark.parametrize("login", sorted(USERS))
def test_qido_and_wado_follow_the_policy(world: World, login: str) -> None:
    with world.http(login) as http:
        listed = http.get("/dicom-web/studies", params={"includefield": "0020000D"})
        assert listed.status_code == 200
        uids = {item["0020000D"]["Value"][0] for item in listed.json()}
        assert uids & set(world.studies.values()) == {world.studies[k] for k in SEES[login]}
        for key, uid in world.studies.items():
            expected = 200 if key in SEES[login] else 404
            assert http.get(f"/dicom-web/studies/{uid}/metadata").status_code == expected, (login, key)
            retrieve = http.get(
                f"/dicom-web/studies/{uid}", headers={"Accept": "multipart/related; type=application/dicom"}
            )
            assert retrieve.status_code == expected, (login, key)
            series = dcmread(world.files[key][0], stop_before_pixels=True)
            wado_uri = http.get(
                "/wado",
                params={
                    "requestType": "WADO",
                    "studyUID": uid,
                    "seriesUID": str(series.SeriesInstanceUID),
                    "objectUID": str(series.SOPInstanceUID),
                    "contentType": "application/dicom",
                },
            )
            assert wado_uri.status_code == expected, (login, key)


@pytest.mark.parametrize("login", sorted(USERS))
def test_stow_is_for_technologists_and_radiologists(world: World, login: str) -> None:
    paths = ct_series(
        world.base / f"stow-{login}", slices=1, rows=16, cols=16, patient_id=f"STOW-{login}", seed=len(login)
    )
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + paths[0].read_bytes() + b"\r\n--b--\r\n"
    with world.http(login) as http:
        response = http.post(
            "/dicom-web/studies",
            content=body,
            headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
        )
    assert response.status_code == (200 if login in MAY_STORE else 403), response.text


@pytest.mark.parametrize("login", sorted(USERS))
def test_portal_pages_follow_the_policy(world: World, login: str) -> None:
    with world.http(login) as http:
        for key, uid in world.studies.items():
            page = http.get(f"/studies/{uid}")
            assert page.status_code == (200 if key in SEES[login] else 404), (login, key)
            if key in SEES[login]:
                assert "viewer?StudyInstanceUIDs=" in page.text
        study_list = http.get("/")
        assert study_list.status_code == 200
        for key in world.studies:
            patient = "PAT-A" if key == "A" else "PAT-B"
            assert (patient in study_list.text) == (key in SEES[login]), (login, key)
        assert http.get("/audit").status_code == (200 if login in MAY_READ_AUDIT else 403)
        assert http.get("/admin").status_code == (200 if login in MAY_ADMIN else 403)
        # The viewer page opens for any logged-in user; what it can load is the DICOMweb policy above.
        viewer = http.get(
            "/viewer/viewer",
            params={"StudyInstanceUIDs": world.studies["A"]},
            headers={"Accept": "text/html"},
        )
        assert viewer.status_code in (200, 503)


def test_no_credentials_no_access(world: World) -> None:
    with world.http(None) as http:
        for path in (
            "/dicom-web/studies",
            f"/dicom-web/studies/{world.studies['A']}/metadata",
            "/api/status",
            "/wado",
        ):
            response = http.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"].startswith("Bearer")
        for path in ("/", f"/studies/{world.studies['A']}", "/audit", "/admin", "/viewer/viewer"):
            response = http.get(path, headers={"Accept": "text/html"})
            assert response.status_code == 303 and response.headers["location"].startswith("/login?next="), (
                path
            )
        assert http.post("/dicom-web/studies", content=b"").status_code == 401
    forged = httpx.get(
        f"{world.simral.http_url}/dicom-web/studies",
        headers={"Authorization": "Bearer " + world.tokens["tech_a"][:-4] + "AAAA"},
        timeout=30,
    )
    assert forged.status_code == 401


def test_revoked_token_stops_working(world: World) -> None:
    token = world.simral.token_for("tech_a", "10m")
    import base64
    import json

    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    headers = {"Authorization": f"Bearer {token}"}
    url = f"{world.simral.http_url}/dicom-web/studies"
    assert httpx.get(url, headers=headers, timeout=30).status_code == 200
    world.simral.cli("tokens", "revoke", payload["jti"])
    import time

    deadline = time.monotonic() + 30  # principals are cached for 15 s per process
    while httpx.get(url, headers=headers, timeout=30).status_code != 401:
        assert time.monotonic() < deadline, "revoked token still accepted"
        time.sleep(1)


def test_break_glass_opens_one_study_with_reason_alert_and_audit(world: World) -> None:
    uid = world.studies["A"]
    with world.http("regadm") as http:
        assert http.get(f"/dicom-web/studies/{uid}/metadata").status_code == 404
        denied = http.get(f"/studies/{uid}")
        assert denied.status_code == 404 and 'action="/studies/' in denied.text  # the break-glass form
        too_short = http.post(f"/studies/{uid}/break-glass", data={"reason": "urgent", "duration": "1h"})
        assert too_short.status_code == 400
        opened = http.post(
            f"/studies/{uid}/break-glass",
            data={"reason": "Appel du SAMU : patient inconscient, besoin des images", "duration": "30m"},
        )
        assert opened.status_code == 303
        assert http.get(f"/dicom-web/studies/{uid}/metadata").status_code == 200
        # Only that study: the other organisation's stays closed.
        assert http.get(f"/dicom-web/studies/{world.studies['B']}/metadata").status_code == 404
    with world.http("siteadm_a") as http:
        admin = http.get("/admin")
        assert "Appel du SAMU" in admin.text and uid in admin.text
    with world.http("auditor") as http:
        trail = http.get("/audit", params={"study": uid})
        assert "break-glass.open" in trail.text and "regadm" in trail.text and "Appel du SAMU" in trail.text
    assert world.simral.cli("audit", "verify").returncode == 0


def test_every_read_is_audited_with_who_and_which_patient(world: World) -> None:
    with world.http("rad_a") as http:
        assert http.get(f"/dicom-web/studies/{world.studies['A']}/metadata").status_code == 200
    with world.http("auditor") as http:
        page = http.get("/audit", params={"actor": "rad_a"})
    assert page.status_code == 200
    assert "study.read" in page.text and "PAT-A" in page.text and "CHA" in page.text
    out = world.simral.cli("audit", "search", "--patient-id", "PAT-B", "--limit", "200").stdout
    assert "instance.store" in out and "dicom-node:MOD_B" in out


def test_administration_forms_follow_the_policy(world: World) -> None:
    def post(actor: str, path: str, **form: str) -> httpx.Response:
        with world.http(actor) as http:
            return http.post(path, data=form)

    created = post("siteadm_a", "/admin/users", login="new_tech_a", organisation="CHA", role="technologist")
    assert created.status_code == 200 and 'id="one-time-password"' in created.text
    # A site administrator manages their own organisation only, and cannot mint regional administrators.
    assert (
        post("siteadm_a", "/admin/users", login="x1", organisation="CLINB", role="technologist").status_code
        == 403
    )
    assert (
        post("siteadm_a", "/admin/users", login="x2", organisation="CHA", role="regional-admin").status_code
        == 403
    )
    assert (
        post("siteadm_a", "/admin/organisations", code="NEWORG", name="N", kind="hospital").status_code == 403
    )
    assert post("regadm", "/admin/organisations", code="NEWORG", name="N", kind="hospital").status_code == 200
    node = {"name": "us_a", "ae": "US_A", "host": "127.0.0.1", "port": "104"}
    assert post("siteadm_a", "/admin/nodes", organisation="CLINB", **node).status_code == 403
    assert post("siteadm_a", "/admin/nodes", organisation="CHA", **node).status_code == 200
    for login in ("tech_a", "auditor", "ref_b"):
        assert (
            post(login, "/admin/users", login="x3", organisation="CHA", role="technologist").status_code
            == 403
        )
    listed = world.simral.cli("users", "list").stdout
    assert "new_tech_a" in listed and "x1" not in listed and "x2" not in listed and "x3" not in listed
