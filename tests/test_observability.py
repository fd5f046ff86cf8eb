"""Observability of a real ``simral serve`` with two worker processes: Prometheus ``/metrics`` after
C-STORE (dcmtk storescu), QIDO-RS, WADO-RS and an HL7 message; ``/healthz`` and ``/readyz`` (the
blob store taken away and given back); JSON log lines without the patient's data; who may scrape;
the administration's figures page (French, screenshot).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from tests.corpus import small_instances
from tests.peers import free_port
from tests.simral_proc import TEST_ORGANISATION, SimralProcess

from simral.access.policy import Principal
from simral.app import open_app
from simral.config import load_settings
from simral.identity import service as identity
from simral.nodes import service as nodes
from simral.observability.logs import JsonFormatter, PhiGuard
from simral.sharing import service as sharing

SENDER = "MODALITE"
#: The patient whose data must appear in no log line.
FAMILY, GIVEN, PATIENT_ID = "VIGIELOG", "BERENICE", "IPP-OBS-4242"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Node:
    simral: SimralProcess
    files: list[Path]
    study_uid: str
    technologist_token: str
    admin_token: str

    @property
    def technologist(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.technologist_token}"}

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        # A new connection per request: SO_REUSEPORT spreads them over both workers.
        return httpx.get(self.simral.http_url + path, timeout=30, trust_env=False, **kwargs)  # type: ignore[arg-type]

    def scrape(self) -> Samples:
        response = self.get("/metrics")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain; version=")
        samples: Samples = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


#: The operator setting the platform up (what ``simral organisations/users/nodes/routes add`` do),
#: in-process: nine CLI start-ups would cost more than the rest of this file.
OPERATOR = Principal(kind="system", name="cli:test", archive_wide=True, via="cli")


def _directory(data_dir: Path) -> tuple[str, str]:
    """Organisations, accounts, nodes and a route to a PACS that is down; the bearer tokens of a
    technologist and of a regional administrator."""
    ctx = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(data_dir)}))
    try:
        with ctx.db.unit_of_work() as session:
            identity.create_organisation(
                session,
                code=TEST_ORGANISATION,
                name="Test organisation",
                finess="990000001",
                principal=OPERATOR,
            )
            identity.create_organisation(
                session, code="REGION", name="GRADeS", kind="regional-operator", principal=OPERATOR
            )
            for login, organisation, role in (
                ("tech", TEST_ORGANISATION, "technologist"),
                ("admin_r", "REGION", "regional-admin"),
            ):
                identity.create_professional(
                    session, login=login, organisation=organisation, role=role, principal=OPERATOR
                )
            nodes.create(
                session, name="modalite", ae_title=SENDER, host="127.0.0.1", port=104,
                organisation=TEST_ORGANISATION, principal=OPERATOR,
            )  # fmt: skip
            # Down: each new instance becomes a forwarding job that waits for a retry.
            nodes.create(
                session, name="pacs-down", ae_title="PACSDOWN", host="127.0.0.1", port=free_port(),
                archive_wide=True, principal=OPERATOR,
            )  # fmt: skip
            sharing.create_rule(
                session, name="to-pacs-down", destination_node="pacs-down", source=SENDER, principal=OPERATOR
            )
        tokens = []
        with ctx.db.unit_of_work() as session:
            for login, organisation in (("tech", TEST_ORGANISATION), ("admin_r", "REGION")):
                professional = identity.get_professional(session, login)
                assert professional is not None
                tokens.append(
                    identity.issue_token(
                        session,
                        professional=professional,
                        organisation=organisation,
                        lifetime=timedelta(hours=2),
                        principal=OPERATOR,
                    )
                )
        return tokens[0], tokens[1]
    finally:
        ctx.db.dispose()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    base = tmp_path_factory.mktemp("observability")
    files = small_instances(base / "images", count=3, per_series=3, seed=97)
    for path in files:
        ds = dcmread(path)
        ds.PatientName = f"{FAMILY}^{GIVEN}"
        ds.PatientID = PATIENT_ID
        ds.save_as(path)
    simral = SimralProcess(
        base / "data",
        hl7=True,
        extra_env={
            "SIMRAL_WORKERS": "2",
            "SIMRAL_LOG_FORMAT": "json",
            "SIMRAL_METRICS_CACHE_SECONDS": "0",
            "SIMRAL_STORES": json.dumps({"cold": {"kind": "filesystem"}}),  # a tier for the rules page
        },
    )
    technologist, admin = _directory(simral.data_dir)
    with simral:
        study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        yield Node(simral, files, study_uid, technologist, admin)


def _storescu(node: Node) -> None:
    simral = node.simral
    result = subprocess.run(
        ["/usr/bin/storescu", "--required", "-aet", SENDER, "-aec", simral.ae_title, "127.0.0.1",
         str(simral.dicom_port), *map(str, node.files)],
        capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "TCP_NODELAY": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr + simral.log_tail()


def _dcmtk(node: Node, tool: str, *args: str) -> None:
    simral = node.simral
    result = subprocess.run(
        [f"/usr/bin/{tool}", "-S", "-aet", SENDER, "-aec", simral.ae_title, *args, "127.0.0.1",
         str(simral.dicom_port)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr + simral.log_tail()


def _hl7_a28(simral: SimralProcess) -> bytes:
    """An ADT^A28 carrying the same patient; returns the acknowledgement's MSA segment."""
    message = (
        "MSH|^~\\&|GAM_CHA|CHA|SIMRAL|GRADES|20260106134418||ADT^A28^ADT_A05|OBS-1|P|2.5"
        "|||||FRA|UNICODE UTF-8\r"
        "EVN||20260106134418\r"
        f"PID|||{PATIENT_ID}^^^CHA&1.2.250.1.999.1.1&ISO^PI||{FAMILY}^{GIVEN}^^^^^L||19790328|F\r"
    ).encode()
    import socket

    with socket.create_connection(("127.0.0.1", simral.hl7_port), timeout=30) as sock:
        sock.sendall(b"\x0b" + message + b"\x1c\r")
        answer = b""
        while b"\x1c\r" not in answer:
            chunk = sock.recv(65536)
            assert chunk, "no acknowledgement"
            answer += chunk
    return next(s for s in answer.strip(b"\x0b\x1c\r").split(b"\r") if s.startswith(b"MSA"))


def _blob_bytes(data_dir: Path) -> tuple[int, int]:
    """Files and bytes under the filesystem store, scratch folder excluded."""
    files = [
        p
        for p in (data_dir / "blobs").rglob("*")
        if p.is_file() and ".scratch" not in p.relative_to(data_dir).parts
    ]
    return len(files), sum(p.stat().st_size for p in files)


def _queue_depth_in_index(data_dir: Path) -> int:
    with sqlite3.connect(f"file:{data_dir / 'index.sqlite'}?mode=ro", uri=True) as db:
        (depth,) = db.execute("SELECT count(*) FROM job WHERE state IN ('queued', 'running')").fetchone()
    return int(depth)


def test_metrics_after_store_query_retrieve_and_hl7(node: Node) -> None:
    before = node.scrape()
    _storescu(node)
    headers = node.technologist
    for _ in range(4):  # several connections: both workers answer some
        found = node.get("/dicom-web/studies", params={"PatientID": PATIENT_ID}, headers=headers)
        assert found.status_code == 200 and len(found.json()) == 1, found.text
    study = node.get(f"/dicom-web/studies/{node.study_uid}", headers=headers)
    assert study.status_code == 200 and study.content.count(b"DICM") == 3
    assert node.get(f"/dicom-web/studies/{node.study_uid}/metadata", headers=headers).status_code == 200
    assert node.get("/dicom-web/studies/1.2.3.4.999", headers=headers).status_code == 404
    study_key = f"StudyInstanceUID={node.study_uid}"
    _dcmtk(
        node, "findscu", "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={PATIENT_ID}", "-k", study_key
    )
    received = node.simral.data_dir.parent / "getscu"
    received.mkdir()
    _dcmtk(node, "getscu", "-k", "QueryRetrieveLevel=STUDY", "-k", study_key, "-od", str(received))
    assert len(list(received.iterdir())) == 3
    ack = _hl7_a28(node.simral)
    ack_code = ack.split(b"|")[1].decode()
    assert ack_code in ("AA", "AE", "AR")

    _wait(lambda: value(node.scrape(), "simral_job_queue_depth") == 3, "three forwarding jobs in the queue")
    # Every scrape, whichever worker answers it, sees the counts of both.
    scrapes = [node.scrape() for _ in range(4)]
    for after in scrapes:
        assert value(after, "simral_ingest_instances_total", entry="dimse", outcome="stored") == 3
        assert value(after, "simral_ingest_seconds_count", entry="dimse") == 3
        assert value(after, "simral_ingest_seconds_bucket", entry="dimse", le="+Inf") == 3
        assert value(after, "simral_ingest_seconds_sum", entry="dimse") > 0
        qido = value(after, "simral_query_requests_total", protocol="qido", outcome="success")
        assert qido - value(before, "simral_query_requests_total", protocol="qido", outcome="success") == 4
        assert value(after, "simral_query_seconds_bucket", protocol="qido", le="+Inf") >= 4
        assert value(after, "simral_retrieve_requests_total", protocol="wado-rs", outcome="success") == 1
        assert value(after, "simral_retrieve_requests_total", protocol="wado-rs", outcome="client-error") == 1
        assert (
            value(after, "simral_retrieve_requests_total", protocol="wado-rs-metadata", outcome="success")
            == 1
        )
        buckets = {
            labels: v for (name, labels), v in after.items() if name == "simral_retrieve_seconds_bucket"
        }
        wado = [v for labels, v in buckets.items() if ("protocol", "wado-rs") in labels]
        assert len(wado) == 15 and max(wado) == 2  # 14 bounds and +Inf, cumulative
        assert value(after, "simral_query_requests_total", protocol="c-find", outcome="success") == 1
        assert value(after, "simral_retrieve_requests_total", protocol="c-get", outcome="success") == 1
        assert value(after, "simral_retrieve_instances_total", protocol="c-get") == 3
        assert value(after, "simral_hl7_messages_total", message_type="ADT^A28", ack_code=ack_code) == 1
        assert value(after, "simral_hl7_seconds_count", message_type="ADT^A28") == 1
    last = scrapes[-1]
    # Gauges read from the index: the queue, storage per tier and organisation, fixity.
    depth = value(last, "simral_job_queue_depth")
    assert depth == _queue_depth_in_index(node.simral.data_dir) == 3
    by_state = sum(
        value(last, "simral_jobs", kind="forward.dimse", state=state) for state in ("queued", "running")
    )
    assert by_state == 3
    assert value(last, "simral_jobs_dead") == 0
    files, size = _blob_bytes(node.simral.data_dir)
    assert files == 3
    assert value(last, "simral_storage_instances", tier="hot", organisation=TEST_ORGANISATION) == 3
    assert value(last, "simral_storage_bytes", tier="hot", organisation=TEST_ORGANISATION) == size
    assert value(last, "simral_fixity_blobs") == 3
    assert value(last, "simral_fixity_mismatches") == 0
    # No label carries a UID, a patient identifier or a name.
    text = node.get("/metrics").text
    for secret in (node.study_uid, PATIENT_ID, FAMILY, GIVEN):
        assert secret not in text
    _wait(
        lambda: value(node.scrape(), "simral_jobs_retrying", kind="forward.dimse") >= 1,
        "a forwarding failure waiting for its retry",
    )


def test_each_worker_publishes_its_native_memory(node: Node) -> None:
    """``simral_native_memory_bytes``: malloc in use and free, SQLite's memory, one series per live
    worker process (what RSS growth is made of, bench/README.md "mixed load")."""
    assert node.simral.proc is not None
    parent = node.simral.proc.pid
    children = subprocess.run(
        ["pgrep", "-P", str(parent)], capture_output=True, text=True, check=False
    ).stdout.split()
    native: dict[tuple[str, str], float] = {}
    for (name, labels), figure in node.scrape().items():
        if name == "simral_native_memory_bytes":
            found = dict(labels)
            native[(found["pid"], found["kind"])] = figure
    assert {pid for pid, _ in native} == {str(parent), *children} and len(children) == 1, native
    for pid in {pid for pid, _ in native}:
        assert native[(pid, "malloc_in_use")] > 10 * 2**20
        assert native[(pid, "malloc_free")] >= 0
        assert native[(pid, "sqlite")] > 0
        assert native[(pid, "rss_anon")] > native[(pid, "malloc_in_use")] + native[(pid, "malloc_free")]


def test_healthz_and_readyz_follow_the_blob_store(node: Node) -> None:
    assert node.get("/healthz").json() == {"status": "ok"}
    ready = node.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"
    # one blob-store check per configured store (the default one, and the "cold" tier here)
    assert set(ready.json()["checks"]) == {
        "database",
        "migrations",
        "blob_store",
        "blob_store_cold",
        "shutting_down",
    }
    blobs = node.simral.data_dir / "blobs"
    away = node.simral.data_dir / "blobs-away"
    blobs.rename(away)
    try:
        for _ in range(3):  # whichever worker answers
            gone = node.get("/readyz")
            assert gone.status_code == 503, gone.text
            assert gone.json()["checks"]["blob_store"]["ok"] is False
            assert gone.json()["checks"]["database"]["ok"] is True
        assert node.get("/healthz").status_code == 200  # alive, just not ready
    finally:
        away.rename(blobs)
    for _ in range(3):
        assert node.get("/readyz").status_code == 200


def test_who_may_scrape(node: Node) -> None:
    proxied = {"X-Forwarded-For": "192.0.2.10"}  # a reverse proxy on the host: loopback is not trusted
    refused = node.get("/metrics", headers=proxied)
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
    technologist = node.get("/metrics", headers={**proxied, **node.technologist})
    assert technologist.status_code == 403
    admin = node.get("/metrics", headers={**proxied, "Authorization": f"Bearer {node.admin_token}"})
    assert admin.status_code == 200 and "simral_job_queue_depth" in admin.text
    assert node.get("/metrics").status_code == 200  # the host's own scraper
    page = node.get("/admin/metrics", headers=node.technologist)
    assert page.status_code == 403 and "Réservé aux administrateurs régionaux" in page.text


def test_admin_figures_page(node: Node, artifacts_dir: Path) -> None:
    from playwright.sync_api import sync_playwright
    from tests.test_portal_accessibility import assert_accessible
    from tests.test_viewer_browser import CHROMIUM, CHROMIUM_ARGS

    # Rules too far in the past to act on anything here: the page lists them.
    data_dir = ("--data-dir", str(node.simral.data_dir))
    node.simral.cli(
        "tiers", "rule", "add", "--to", "cold", "--older-than-days", "3650", "--modality", "CT", *data_dir
    )
    node.simral.cli(
        "compression", "rule", "add", "--syntax", "jpeg-ls", "--older-than-days", "4000", "--organisation",
        TEST_ORGANISATION,
    )  # fmt: skip

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(
            locale="fr-FR",
            viewport={"width": 1300, "height": 900},
            bypass_csp=True,  # axe-core is injected as an inline script
            extra_http_headers={"Authorization": f"Bearer {node.admin_token}"},
        )
        page = context.new_page()
        response = page.goto(node.simral.http_url + "/admin/metrics")
        assert response is not None and response.status == 200
        main = page.locator("main").inner_text()
        for heading in (
            "État du service",
            "Activité depuis le démarrage",
            "File des tâches",
            "Stockage",
            "fixité",
        ):
            assert heading in main, heading
        assert "forward.dimse" in main and TEST_ORGANISATION in main and "qido" in main
        assert "disponible" in main and "indisponible" not in main and "Stockage des images (cold)" in main
        tier_rules = page.locator("h2:has-text('hiérarchisation') + table").inner_text()
        assert "plus de 3650 jours, modalité CT" in tier_rules and "cold" in tier_rules, tier_rules
        compression_rules = page.locator("h2:has-text('compression') + table").inner_text()
        assert f"plus de 4000 jours, structure {TEST_ORGANISATION}" in compression_rules, compression_rules
        assert "jpeg-ls" in compression_rules.lower(), compression_rules
        page.screenshot(path=str(artifacts_dir / "admin-metrics.png"), full_page=True)
        assert_accessible(page, "monitoring page")
        browser.close()


def test_json_logs_carry_no_patient_data(node: Node) -> None:
    # Something patient-related was logged by now (the HL7 feed, C-STORE, queries): read every line.
    text = node.simral.log_path.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.startswith("{")]
    assert len(lines) >= 4
    workers = set()
    for line in lines:
        record = json.loads(line)
        assert {"time", "level", "logger", "message", "worker", "pid"} <= set(record), record
        workers.add(record["worker"])
    assert {0, 1} <= workers
    for secret in (FAMILY, GIVEN, PATIENT_ID, FAMILY.lower()):
        assert secret not in text, f"{secret!r} appears in the log"


def test_phi_guard_redacts_and_drops_extra_fields() -> None:
    """The guard behind the rule: a careless call still writes no patient data."""
    record = logging.LogRecord(
        "simral.test", logging.WARNING, __file__, 1,
        "refused PatientName=%s PatientID: %s for DUPONT^JEAN (NIR 279035121518989), ADT^A28 kept",
        ("VIGIELOG^BERENICE", "IPP-OBS-4242"), None,
    )  # fmt: skip
    record.patient = {"name": "VIGIELOG"}
    assert PhiGuard().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert "patient" not in line and not hasattr(record, "patient")
    for secret in ("VIGIELOG", "BERENICE", "IPP-OBS-4242", "DUPONT", "JEAN", "279035121518989"):
        assert secret not in line["message"], line["message"]
    assert "ADT^A28 kept" in line["message"] and line["level"] == "WARNING"


def test_metrics_values_live_in_ram_with_their_blocks_reserved(tmp_path: Path) -> None:
    """The per-run metrics folder is off the archive's disk (/dev/shm), its memory-mapped files
    have every block allocated (a full filesystem cannot end the server with SIGBUS: see
    test_fault_injection), and it is removed when the server stops."""
    simral = SimralProcess(tmp_path / "data", extra_env={"SIMRAL_WORKERS": "2"})
    with simral:
        assert simral.proc is not None
        folders = list(Path("/dev/shm").glob(f"simral-metrics-{simral.proc.pid}-*"))
        assert len(folders) == 1, folders
        assert not any(p.name.startswith("simral-metrics") for p in simral.data_dir.iterdir())
        for _ in range(3):  # both workers count some requests
            httpx.get(f"{simral.http_url}/healthz", timeout=10)
            httpx.get(f"{simral.dicomweb_url}/studies", headers=simral.auth_headers, timeout=10)
        files = list(folders[0].glob("*.db"))
        assert files, "no values written"
        for path in files:
            info = path.stat()
            assert info.st_blocks * 512 >= info.st_size, (path.name, info.st_blocks, info.st_size)
    assert not folders[0].exists()
