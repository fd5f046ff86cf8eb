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
