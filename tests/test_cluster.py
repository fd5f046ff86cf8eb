"""Cluster mode (issue 9 item 1): two ``simral serve`` nodes share PostgreSQL and an S3 store
(SeaweedFS) behind HAProxy (Debian), which balances DICOM (TCP) and HTTP round robin.

Modalities send through the load balancer from four threads (one association per few instances,
a failed association retried, as modalities do). Instances of one sender are routed to a PACS
(dcmtk ``storescp`` slow on purpose, so forwarding jobs are in flight). When a forwarding job is
claimed, the node holding it is SIGKILLed while the load goes on. Then:

- every acknowledged instance is found (QIDO-RS) and retrieved (WADO-RS) through the load balancer,
  byte for byte as sent;
- the jobs the dead node had claimed are completed by the survivor once their lease expired, and
  the PACS received every routed instance;
- a token made on the command line and the database-held sessions and keys work on both nodes.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import create_engine, text
from tests.conftest import backend_env
from tests.corpus import ct_series
from tests.haproxy_peer import HAPROXY, HaproxyPeer
from tests.peers import StoreSCP
from tests.simral_proc import TEST_USER, SimralProcess

SENDER = "CLUSTERCT"
ROUTED_SENDER = "CLUSTERMR"
#: The forwarding lease: a dead node's jobs go to the survivor after this many seconds.
LEASE_SECONDS = 4


@dataclass
class Cluster:
    nodes: dict[str, SimralProcess]
    balancer: HaproxyPeer
    pacs: StoreSCP
    database_url: str
    base: Path
    token: str = ""
    killed: list[str] = field(default_factory=list)


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("cluster")
    env = {
        **backend_env("postgres-s3", request),
        "SIMRAL_JOB_LEASE_SECONDS": str(LEASE_SECONDS),
    }
    nodes = {name: SimralProcess(base / name, env=env) for name in ("node-a", "node-b")}
    first = nodes["node-a"]
    pacs = StoreSCP(aet="CLUSTERPACS", fork=True, extra_args=["--sleep-during", "1"])
    pacs.start()
    first.add_node("ct-site", SENDER, 104)
    first.add_node("mr-site", ROUTED_SENDER, 104)
    first.add_node("pacs", pacs.aet, pacs.port, organisation="")
    first.cli("routes", "add", "to-pacs", "--to", "pacs", "--from-ae", ROUTED_SENDER)
    token = first.token_for(TEST_USER)
    first.start()  # migrates the shared database
    nodes["node-b"].start()
    balancer = HaproxyPeer([(name, node.dicom_port, node.http_port) for name, node in nodes.items()])
    balancer.start()
    cluster = Cluster(nodes, balancer, pacs, env["SIMRAL_DATABASE_URL"], base, token)
    try:
        yield cluster
    finally:
        balancer.close()
        for node in nodes.values():
            node.stop()
        pacs.close()


@dataclass
class Load:
    acked: dict[str, Path] = field(default_factory=dict)
    failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _send(port: int, calling: str, paths: list[Path], load: Load, *, deadline: float) -> None:
    """Send ``paths`` in associations of three through the balancer; retry what was not acknowledged."""
    pending = list(paths)
    while pending and time.monotonic() < deadline:
        batch, pending = pending[:3], pending[3:]
        ae = AE(ae_title=calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        unacked = list(batch)
        try:
            assoc = ae.associate("127.0.0.1", port, ae_title="SIMRAL")
            if assoc.is_established:
                for path in batch:
                    status = assoc.send_c_store(path)
                    if "Status" in status and status.Status == 0x0000:
                        with load.lock:
                            load.acked[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
                        unacked.remove(path)
                assoc.release()
        except Exception:  # the node died under the association: not acknowledged, sent again
            pass
        if unacked:
            with load.lock:
                load.failures += 1
            pending = unacked + pending
            time.sleep(0.2)


def _claimed_forwarding(database_url: str) -> list[tuple[int, str, str]]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT id, state, claimed_by FROM job WHERE kind LIKE 'forward.%' ORDER BY id")
            ).all()
    finally:
        engine.dispose()
    return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]


def test_node_killed_under_load_loses_nothing_and_its_jobs_finish(cluster: Cluster, tmp_path: Path) -> None:
    ct = ct_series(tmp_path / "ct", slices=36, rows=64, cols=64, patient_id="CLUSTER1", seed=501)
    mr = ct_series(tmp_path / "mr", slices=4, rows=64, cols=64, patient_id="CLUSTER2", seed=502)
    load = Load()
    deadline = time.monotonic() + 120
    port = cluster.balancer.dicom_port
    threads = [
        threading.Thread(target=_send, args=(port, SENDER, ct[i::4], load), kwargs={"deadline": deadline})
        for i in range(4)
    ] + [threading.Thread(target=_send, args=(port, ROUTED_SENDER, mr, load), kwargs={"deadline": deadline})]
    for thread in threads:
        thread.start()

    # The node holding a forwarding job (in flight: the PACS takes a second per instance) dies.
    pids = {name: node.proc.pid for name, node in cluster.nodes.items() if node.proc is not None}
    holder: list[str] = []

    def claimed_by_a_node() -> bool:
        for _, state, worker in _claimed_forwarding(cluster.database_url):
            if state == "running":
                holder.extend(name for name, pid in pids.items() if f":{pid}:" in worker)
        return bool(holder)

    _wait(claimed_by_a_node, 60, "a forwarding job in flight")
    victim = holder[0]
    survivor = next(name for name in cluster.nodes if name != victim)
    held = {
        job
        for job, state, worker in _claimed_forwarding(cluster.database_url)
        if f":{pids[victim]}:" in worker
    }
    cluster.nodes[victim].kill()
    cluster.killed.append(victim)
    for thread in threads:
        thread.join(timeout=150)
    sent = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in ct + mr}
    assert set(load.acked) == set(sent), "every instance is acknowledged in the end (retries included)"

    # The survivor completes what the dead node had claimed, after the lease.
    def forwarding_done() -> bool:
        rows = _claimed_forwarding(cluster.database_url)
        return bool(rows) and all(state == "done" for _, state, _ in rows)

    _wait(forwarding_done, 90, "every forwarding job done")
    finished = {job: worker for job, _, worker in _claimed_forwarding(cluster.database_url)}
    assert held and all(f":{pids[survivor]}:" in finished[job] for job in held)
    received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in cluster.pacs.files()}
    routed = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in mr}
    assert routed <= received

    # Every acknowledged instance, through the balancer (the survivor only now), as sent.
    client = DICOMwebClient(
        f"{cluster.balancer.http_url}/dicom-web", headers={"Authorization": f"Bearer {cluster.token}"}
    )
    found = {
        item["00080018"]["Value"][0]
        for study in {str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in ct + mr}
        for item in client.search_for_instances(study_instance_uid=study)
    }
    assert found == set(load.acked)
    for sop_uid, path in list(load.acked.items())[:: max(1, len(load.acked) // 10)]:
        original = dcmread(path)
        retrieved = client.retrieve_instance(
            original.StudyInstanceUID,
            original.SeriesInstanceUID,
            sop_uid,
            media_types=(("application/dicom", "*"),),
        )
        assert retrieved.PixelData == original.PixelData
        assert retrieved.PatientID == original.PatientID


def test_both_nodes_share_tokens_and_state(cluster: Cluster) -> None:
    """The dead node comes back and joins again: the same token (signing keys in the database) is
    accepted by both, and both see the same archive."""
    for name in cluster.killed:
        cluster.nodes[name].start()
    headers = {"Authorization": f"Bearer {cluster.token}"}
    answers = [
        httpx.get(f"{node.http_url}/dicom-web/studies", headers=headers, timeout=30)
        for node in cluster.nodes.values()
    ]
    assert [a.status_code for a in answers] == [200, 200]
    assert [len(a.json()) for a in answers] == [2, 2]
    through = httpx.get(f"{cluster.balancer.http_url}/dicom-web/studies", headers=headers, timeout=30)
    assert through.status_code == 200 and len(through.json()) == 2


def test_documented_deployment_files_are_valid(tmp_path: Path) -> None:
    """deploy/haproxy.cfg passes ``haproxy -c`` (with a certificate in place of the site's), and
    deploy/simral.toml loads as the settings of a PostgreSQL + S3 cluster node."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from simral.config import load_settings

    deploy = Path(__file__).resolve().parent.parent / "deploy"
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pacs.example-region.fr")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = tmp_path / "simral.pem"
    pem.write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    config = tmp_path / "haproxy.cfg"
    config.write_text((deploy / "haproxy.cfg").read_text().replace("/etc/haproxy/simral.pem", str(pem)))
    checked = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    settings = load_settings(config_file=deploy / "simral.toml", environ={})
    assert (settings.storage, settings.workers, settings.behind_tls_proxy) == ("s3", 0, True)
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert "ExecStart=/opt/simral/.venv/bin/simral serve" in (deploy / "simral.service").read_text()
