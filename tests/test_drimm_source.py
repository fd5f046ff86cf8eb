"""The DRIM-M image source end to end (DESIGN.md §8): WADO-RS for DRIM-M consumers and the
contextual call, against a running ``simral serve``.

A loopback RFC 7662 introspection endpoint written here plays Pro Santé Connect: it checks the
platform's client credentials (HTTP Basic), answers ``active`` with PSC-style claims
(``SubjectNameID``, names) for one token and ``{"active": false}`` for another, and counts calls.
The archive holds a two-series CT study of the ANS test patient (INS on the test OID
1.2.250.1.213.1.4.10, qualified) and manifests (KOS, made with highdicom) referencing its first
series only: the current one, which simral published to the DMP (its ``DmpDocument`` in the
published state, as the publication job leaves it), and others that must grant nothing — its
previous version (replaced), one deleted and one masked through ITI-57, and a KOS simral never
published (imported like a modality's).
"""

from __future__ import annotations

import base64
import html
import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

import highdicom as hd
import httpx
import pydicom
import pyotp
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session
from tests.corpus import multi_series_study
from tests.peers import free_port
from tests.portal_login import TotpDevice
from tests.report_setup import enrol_totp
from tests.simral_proc import TEST_ORGANISATION, SimralProcess

from simral.access.policy import SYSTEM
from simral.app import open_app
from simral.archive import service as archive
from simral.audit.models import AuditEvent
from simral.config import load_settings
from simral.context import AppContext
from simral.db.base import utcnow
from simral.dmp import drimm
from simral.dmp.models import DmpDocument
from simral.patients import service as patients
from simral.patients.models import STATUS_QUAL

CLIENT_ID = "simral-drimm-test"
CLIENT_SECRET = "introspection-secret-for-tests"
ACTIVE_TOKEN = "psc-access-token-active-0001"
INACTIVE_TOKEN = "psc-access-token-revoked-0002"
CONSUMER_ID = "810100000001"
#: The ANS test patient of the DRIM-M fixtures (test NIR, INS test OID).
INS = "248039263001064"
INS_TEST_OID = "1.2.250.1.213.1.4.10"
IPP, IPP_OID, IPP_ISSUER = "IPP-DRIMM-1", "1.2.250.1.999.7.1", "CHTEST"
PASSWORD = "Appel-Contextuel-2026!"
RADIOLOGIST, OUTSIDER = "dr_contexte", "dr_ailleurs"


class _Introspection(BaseHTTPRequestHandler):
    """RFC 7662 §2: POST form ``token``, client authenticated with HTTP Basic."""

    calls: ClassVar[Counter[str]] = Counter()

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_POST(self) -> None:
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        length = int(self.headers.get("Content-Length", "0"))
        form = parse_qs(self.rfile.read(length).decode())
        if self.headers.get("Authorization") != expected:
            self._answer(401, {"error": "invalid_client"})
            return
        token = form.get("token", [""])[0]
        self.calls[token] += 1
        if token == ACTIVE_TOKEN:
            self._answer(
                200,
                {
                    "active": True,
                    "sub": "f:psc:consumer-0001",
                    "SubjectNameID": CONSUMER_ID,
                    "preferred_username": CONSUMER_ID,
                    "given_name": "Jeanne",
                    "family_name": "MARTIN",
                    "client_id": "drimbox-conso-test",
                    "token_type": "Bearer",
                    "exp": int(time.time()) + 3600,
                },
            )
        else:
            self._answer(200, {"active": False})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@dataclass
class Source:
    simral: SimralProcess
    study_uid: str
    #: SOP Instance UIDs by Series Instance UID (the two image series, in order).
    series: dict[str, list[str]]
    kos_uid: str
    #: KOS SOP Instance UIDs referencing the first series that grant nothing, by why (see above).
    refused: dict[str, str] = field(default_factory=dict)
    devices: dict[str, TotpDevice] = field(default_factory=dict)

    @property
    def referenced(self) -> str:
        return next(iter(self.series))

    @property
    def other(self) -> str:
        return list(self.series)[1]

    def url(self, series: str, sop: str | None = None, *, study: str | None = None) -> str:
        path = f"{self.simral.dicomweb_url}/studies/{study or self.study_uid}/series/{series}"
        return path + (f"/instances/{sop}" if sop else "")

    def context(self) -> AppContext:
        return open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(self.simral.data_dir)}))


def _patient(ds: Dataset) -> None:
    """The ANS test patient: IPP in the hospital's domain, INS in Other Patient IDs (DESIGN.md §6)."""
    ds.PatientID = IPP
    ds.IssuerOfPatientID = IPP_ISSUER
    qualifiers = Dataset()
    qualifiers.UniversalEntityID = IPP_OID
    qualifiers.UniversalEntityIDType = "ISO"
    ds.IssuerOfPatientIDQualifiersSequence = [qualifiers]
    ins = Dataset()
    ins.PatientID = INS
    ins.IssuerOfPatientID = "ASIP-SANTE-INS-NIR"
    ins.TypeOfPatientID = "TEXT"
    ins_qualifiers = Dataset()
    ins_qualifiers.UniversalEntityID = INS_TEST_OID
    ins_qualifiers.UniversalEntityIDType = "ISO"
    ins.IssuerOfPatientIDQualifiersSequence = [ins_qualifiers]
    ds.OtherPatientIDsSequence = [ins]
    ds.PatientName = "PAT-TROIS^DOMINIQUE"
    ds.PatientBirthName = "PAT-TROIS"
    ds.PatientSex = "F"
    ds.PatientBirthDate = "19790328"


#: The manifests besides the current one (all reference the first series).
OTHER_MANIFESTS = ("replaced", "deleted", "masked", "foreign")


def _study(folder: Path) -> tuple[str, dict[str, list[str]], dict[str, str]]:
    """Write the study and its manifests; return (study UID, SOP UIDs by series, KOS UIDs by name:
    ``current`` and :data:`OTHER_MANIFESTS`)."""
    images: list[Dataset] = []
    for path in multi_series_study(folder, series=2, per_series=2, rows=32, cols=32, seed=808):
        ds = pydicom.dcmread(path)
        _patient(ds)
        ds.save_as(path, enforce_file_format=True)
        images.append(ds)
    series: dict[str, list[str]] = {}
    for ds in images:
        series.setdefault(str(ds.SeriesInstanceUID), []).append(str(ds.SOPInstanceUID))
    first = [ds for ds in images if ds.SeriesInstanceUID == images[0].SeriesInstanceUID]
    manifests: dict[str, str] = {}
    for number, name in enumerate(("current", *OTHER_MANIFESTS), start=1):
        kos = hd.ko.KeyObjectSelectionDocument(
            evidence=first,
            content=hd.ko.KeyObjectSelection(
                document_title=codes.DCM.Manifest,
                referenced_objects=first,
            ),
            series_instance_uid=generate_uid(),
            series_number=98 + number,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer="simral tests",
        )
        kos.save_as(folder / f"kos-{name}.dcm", enforce_file_format=True)
        manifests[name] = str(kos.SOPInstanceUID)
    return str(images[0].StudyInstanceUID), series, manifests


def _dmp_entries(session: Session, study_uid: str, manifests: dict[str, str]) -> None:
    """The DMP entries of the manifests simral published (as :mod:`simral.dmp.publication` leaves
    them): version 1 replaced by the current version 2, one deleted and one masked (ITI-57); the
    ``foreign`` KOS has none."""
    rows: dict[str, DmpDocument] = {}
    for version, (name, state) in enumerate(
        (("replaced", "replaced"), ("current", "published"), ("deleted", "deleted"), ("masked", "masked")),
        start=1,
    ):
        rows[name] = DmpDocument(
            organisation_code=TEST_ORGANISATION,
            kind="manifest",
            study_uid=study_uid,
            version=version,
            unique_id=manifests[name],
            entry_uuid=f"urn:uuid:{uuid.uuid4()}",
            state=state,
            published_at=utcnow(),
        )
        session.add(rows[name])
        session.flush()
    rows["current"].replaces_id = rows["replaced"].id


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    base = tmp_path_factory.mktemp("drimm")
    _Introspection.calls.clear()
    endpoint = ThreadingHTTPServer(("127.0.0.1", free_port()), _Introspection)
    threading.Thread(target=endpoint.serve_forever, daemon=True).start()
    simral = SimralProcess(
        base / "data",
        extra_env={
            "SIMRAL_DRIMM_INTROSPECTION_URL": f"http://127.0.0.1:{endpoint.server_port}/introspect",
            "SIMRAL_DRIMM_CLIENT_ID": CLIENT_ID,
            "SIMRAL_DRIMM_CLIENT_SECRET": CLIENT_SECRET,
            "SIMRAL_DRIMM_CACHE_SECONDS": "30",
            "SIMRAL_INS_TEST_OIDS_ALLOWED": "true",
        },
    )
    simral.ensure_directory()
    simral.cli("organisations", "add", "AILLEURS", "--name", "Clinique ailleurs")
    for login, organisation, rpps in (
        (RADIOLOGIST, TEST_ORGANISATION, "10100000011"),
        (OUTSIDER, "AILLEURS", "10100000012"),
    ):
        simral.cli(
            "users", "add", login, "--organisation", organisation, "--role", "radiologist", "--rpps", rpps,
            "--password-stdin", input=PASSWORD + "\n",
        )  # fmt: skip
    files = base / "files"
    files.mkdir()
    study_uid, series, manifests = _study(files)
    simral.cli("import", str(files))
    made = Source(
        simral, study_uid, series, manifests["current"], {name: manifests[name] for name in OTHER_MANIFESTS}
    )
    made.devices = {login: TotpDevice(secret=pyotp.random_base32()) for login in (RADIOLOGIST, OUTSIDER)}
    ctx = made.context()
    try:
        with ctx.db.unit_of_work() as session:
            enrol_totp(session, made.devices)
            (identity,) = patients.identities_by_ins(session, patients.Ins(INS, INS_TEST_OID))
            patients.set_status(session, identity, status=STATUS_QUAL, principal=SYSTEM, source="test:insi")
            _dmp_entries(session, study_uid, manifests)
    finally:
        ctx.db.dispose()
    simral.start()
    try:
        yield made
    finally:
        simral.stop()
        endpoint.shutdown()
        endpoint.server_close()


def _consumer(token: str | None, kos_uid: str | None) -> dict[str, str]:
    headers = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if kos_uid is not None:
        headers["KOS-SOPInstanceUID"] = kos_uid
    return headers


def _audit(source: Source, action: str) -> list[AuditEvent]:
    ctx = source.context()
    try:
        with ctx.db.reading() as session:
            rows = list(
                session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id))
            )
            session.expunge_all()
            return rows
    finally:
        ctx.db.dispose()


def test_consumer_refusals(source: Source) -> None:
    """No token, an inactive token, a manifest that does not reference the series, an unknown or
    non-KOS manifest: refused (401 with the RFC 6750 challenge, or 403), each refusal audited."""
    no_token = httpx.get(source.url(source.referenced), headers=_consumer(None, source.kos_uid), timeout=30)
    assert no_token.status_code == 401
    assert no_token.headers["WWW-Authenticate"] == 'Bearer realm="simral"'

    inactive = httpx.get(
        source.url(source.referenced), headers=_consumer(INACTIVE_TOKEN, source.kos_uid), timeout=30
    )
    assert inactive.status_code == 401
    assert 'error="invalid_token"' in inactive.headers["WWW-Authenticate"]

    other_series = httpx.get(
        source.url(source.other), headers=_consumer(ACTIVE_TOKEN, source.kos_uid), timeout=30
    )
    assert other_series.status_code == 403
    assert other_series.json()["error"] == "series not referenced by the manifest"

    unknown = httpx.get(
        source.url(source.referenced), headers=_consumer(ACTIVE_TOKEN, str(generate_uid())), timeout=30
    )
    assert unknown.status_code == 403 and unknown.json()["error"] == "unknown manifest"

    image_uid = source.series[source.referenced][0]
    not_kos = httpx.get(source.url(source.referenced), headers=_consumer(ACTIVE_TOKEN, image_uid), timeout=30)
    assert not_kos.status_code == 403 and not_kos.json()["error"] == "not a Key Object Selection document"

    refused = [row for row in _audit(source, "drimm.retrieve") if row.outcome == "failure"]
    reasons = {row.detail["reason"]: row for row in refused}
    assert set(reasons) >= {
        "no bearer token",
        "inactive token",
        "series not referenced by the manifest",
        "unknown manifest",
        "not a Key Object Selection document",
    }
    assert reasons["no bearer token"].actor_national_id == ""
    assert reasons["no bearer token"].detail["kos_sop_instance_uid"] == source.kos_uid
    assert reasons["inactive token"].actor_national_id == ""
    denied = reasons["series not referenced by the manifest"]
    assert denied.actor_national_id == CONSUMER_ID
    assert denied.detail["consumer"]["name"] == "Jeanne MARTIN"
    assert denied.detail["kos_sop_instance_uid"] == source.kos_uid
    assert denied.detail["series_uid"] == source.other
    assert denied.study_uid == source.study_uid and denied.patient_id == IPP
    for row in refused:
        assert ACTIVE_TOKEN not in json.dumps(row.detail) and INACTIVE_TOKEN not in json.dumps(row.detail)


def test_only_a_current_manifest_simral_published_grants_access(source: Source) -> None:
    """Manifests in the archive that reference the series but are not simral's current DMP entry —
    its previous version (replaced), one deleted or masked through ITI-57, a KOS simral never
    published — are refused (403), each refusal audited with the consumer and the manifest."""
    reasons = {
        "replaced": "manifest replaced by a newer version",
        "deleted": "manifest deleted from the DMP",
        "masked": "manifest masked to professionals in the DMP",
        "foreign": "manifest not published by this platform",
    }
    for name, reason in reasons.items():
        kos_uid = source.refused[name]
        series = httpx.get(
            source.url(source.referenced), headers=_consumer(ACTIVE_TOKEN, kos_uid), timeout=30
        )
        assert series.status_code == 403 and series.json()["error"] == reason, name
        sop = source.series[source.referenced][0]
        instance = httpx.get(
            source.url(source.referenced, sop), headers=_consumer(ACTIVE_TOKEN, kos_uid), timeout=30
        )
        assert instance.status_code == 403 and instance.json()["error"] == reason, name
    refused = {
        row.detail["kos_sop_instance_uid"]: row
        for row in _audit(source, "drimm.retrieve")
        if row.outcome == "failure" and row.detail["reason"] in reasons.values()
    }
    assert set(refused) == set(source.refused.values())
    for name, kos_uid in source.refused.items():
        row = refused[kos_uid]
        assert row.detail["reason"] == reasons[name]
        assert row.actor_national_id == CONSUMER_ID and row.detail["series_uid"] == source.referenced
        assert row.study_uid == source.study_uid and row.patient_id == IPP


def test_consumer_reads_the_manifest_series(source: Source) -> None:
    """A valid token and a manifest referencing the series: the series' instances, its metadata and
    one referenced instance are served; the study-level resource is not a DRIM-M one; the token
    is introspected once for several requests; successes are audited with the consumer."""
    client = DICOMwebClient(
        url=source.simral.dicomweb_url,
        headers={"Authorization": f"Bearer {ACTIVE_TOKEN}", "KOS-SOPInstanceUID": source.kos_uid},
    )
    instances = client.retrieve_series(source.study_uid, source.referenced)
    assert sorted(str(ds.SOPInstanceUID) for ds in instances) == sorted(source.series[source.referenced])
    assert {str(ds.SeriesInstanceUID) for ds in instances} == {source.referenced}
    assert all(ds.PatientID == IPP and ds.pixel_array.shape == (32, 32) for ds in instances)

    metadata = client.retrieve_series_metadata(source.study_uid, source.referenced)
    assert sorted(item["00080018"]["Value"][0] for item in metadata) == sorted(
        source.series[source.referenced]
    )

    sop = source.series[source.referenced][1]
    one = client.retrieve_instance(source.study_uid, source.referenced, sop)
    assert str(one.SOPInstanceUID) == sop
    assert _Introspection.calls[ACTIVE_TOKEN] == 1  # one introspection, then the cache (this module)

    study_level = httpx.get(
        f"{source.simral.dicomweb_url}/studies/{source.study_uid}",
        headers=_consumer(ACTIVE_TOKEN, source.kos_uid),
        timeout=30,
    )
    assert study_level.status_code == 401

    granted = [row for row in _audit(source, "drimm.retrieve") if row.outcome == "success"]
    assert {row.detail["resource"] for row in granted} >= {"series", "series-metadata", "instance"}
    for row in granted:
        assert row.actor == f"drimm:{CONSUMER_ID}" and row.actor_national_id == CONSUMER_ID
        assert row.detail["consumer"] == {
            "national_id": CONSUMER_ID,
            "name": "Jeanne MARTIN",
            "client_id": "drimbox-conso-test",
        }
        assert row.detail["kos_sop_instance_uid"] == source.kos_uid
        assert row.study_uid == source.study_uid and row.patient_id == IPP


def test_consumer_principal_sees_only_the_manifest_series(source: Source) -> None:
    """The access policy (``visible_studies`` + ``visible_series``) limits a consumer to the series
    its manifest references, whatever the query asks: the whole study, or another series."""
    ctx = source.context()
    try:
        with ctx.db.reading() as session:
            grant = drimm.check_manifest(
                ctx, session, kos_uid=source.kos_uid, study_uid=source.study_uid, series_uid=source.referenced
            )
            consumer = drimm.Consumer(national_id=CONSUMER_ID)
            principal = drimm.consumer_principal(consumer, grant, address="127.0.0.1")
            whole = archive.find_instances(session, principal=principal, study_uid=source.study_uid)
            other = archive.find_instances(
                session, principal=principal, study_uid=source.study_uid, series_uid=source.other
            )
            headers = archive.instances_metadata(session, principal=principal, study_uid=source.study_uid)
    finally:
        ctx.db.dispose()
    assert grant.series == frozenset({source.referenced})
    assert sorted(i.sop_uid for i in whole) == sorted(source.series[source.referenced])
    assert other == []
    assert {item.series_uid for item in headers} == {source.referenced}


def test_local_token_with_manifest_header_keeps_local_rights(source: Source) -> None:
    """A simral token sent with the header is not a DRIM-M consumer: its own rights apply (the
    technologist of the storing organisation reads the other series too)."""
    response = httpx.get(
        source.url(source.other), headers={**source.simral.auth_headers, "KOS-SOPInstanceUID": source.kos_uid}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("multipart/related")


# --------------------------------------------------------------------------------- contextual call


def _call(**changes: str) -> dict[str, str]:
    params = {
        "Patient.identifier.value": INS,
        "Patient.identifier.system": f"urn:oid:{INS_TEST_OID}",
        "Patient.name.family": "PAT-TROIS",
        "Patient.name.given": "DOMINIQUE",
        "Patient.gender": "female",
        "Patient.birthDate": "1979-03-28",
        "Address.district": "75107",
        "InformationEtConsentement": "true",
        "PatientID": IPP,
        "PatientIDIssuer": IPP_OID,
    }
    params.update(changes)
    return params


def _form_value(page: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert found, f"no {name} in the page"
    return html.unescape(found.group(1))


def _log_in(source: Source, client: httpx.Client, login: str, target: str) -> httpx.Response:
    """Call ``target`` without a session, log in with password and TOTP as the login page asks,
    and return the answer the login brings back to (the call itself)."""
    first = client.get(target)
    assert first.status_code == 303 and first.headers["location"].startswith("/login?next=")
    form = client.get(first.headers["location"])
    posted = client.post(
        first.headers["location"],
        data={
            "csrf_token": _form_value(form.text, "csrf_token"),
            "next": _form_value(form.text, "next"),
            "login": login,
            "password": PASSWORD,
        },
    )
    assert posted.status_code == 303 and posted.headers["location"].startswith("/login/totp"), posted.text
    totp = client.get(posted.headers["location"])
    done = client.post(
        "/login/totp",
        data={"csrf_token": _form_value(totp.text, "csrf_token"), "code": source.devices[login].code()},
    )
    assert done.status_code == 303, done.text
    return client.get(done.headers["location"])


def test_contextual_call_opens_the_viewer(source: Source) -> None:
    """A logged-in radiologist of the organisation holding the study, matching INS and traits: the
    viewer on the patient's study; wrong birth date or no consent: a refusal page; all audited."""
    target = "/drimm/appel-contextuel?" + urlencode(_call())
    with httpx.Client(base_url=source.simral.http_url, timeout=30) as client:
        opened = _log_in(source, client, RADIOLOGIST, target)
        assert opened.status_code == 303, opened.text
        viewer = urlsplit(opened.headers["location"])
        assert viewer.path == "/viewer/viewer"
        assert dict(parse_qsl(viewer.query))["StudyInstanceUIDs"] == source.study_uid

        wrong_birth = client.get(
            "/drimm/appel-contextuel", params=_call(**{"Patient.birthDate": "1979-03-29"})
        )
        assert wrong_birth.status_code == 403
        assert "date de naissance" in wrong_birth.text and "identitovigilance" in wrong_birth.text
        assert source.study_uid not in wrong_birth.text

        no_consent = client.get("/drimm/appel-contextuel", params=_call(InformationEtConsentement="false"))
        assert no_consent.status_code == 403 and "consentement" in no_consent.text

        missing = client.get(
            "/drimm/appel-contextuel", params={k: v for k, v in _call().items() if k != "PatientID"}
        )
        assert missing.status_code == 400 and "patientid" in missing.text

        posted = client.post("/drimm/appel-contextuel", data=_call())
        assert posted.status_code == 303
        again = client.get(posted.headers["location"])
        assert again.status_code == 303 and again.headers["location"].startswith("/viewer/viewer?")

    calls = _audit(source, "drimm.contextual-call")
    successes = [row for row in calls if row.outcome == "success"]
    assert successes and all(row.actor == f"user:{RADIOLOGIST}" for row in successes)
    assert successes[0].study_uid == source.study_uid and successes[0].patient_id == IPP
    assert successes[0].detail["found_by"] == "ins"
    reasons = {row.detail["reason"]: row for row in calls if row.outcome == "failure"}
    assert reasons["traits"].detail["mismatched"] == ["birth_date"]
    assert reasons["traits"].patient_id == IPP
    assert {"no-consent", "missing"} <= set(reasons)


def test_contextual_call_respects_the_access_policy(source: Source) -> None:
    """A radiologist of another organisation, with the right patient: none of the studies is theirs."""
    target = "/drimm/appel-contextuel?" + urlencode(_call())
    with httpx.Client(base_url=source.simral.http_url, timeout=30) as client:
        answer = _log_in(source, client, OUTSIDER, target)
    assert answer.status_code == 403
    assert "Aucun examen de ce patient ne vous est accessible" in answer.text
    refused = [row for row in _audit(source, "drimm.contextual-call") if row.actor == f"user:{OUTSIDER}"]
    assert refused and refused[-1].outcome == "failure" and refused[-1].detail["reason"] == "no-study"
