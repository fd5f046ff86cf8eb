"""Fault injection (issue 10, item 3): a component fails under load, the sender is never told
"stored" for something lost, nothing is left half-stored, and simral recovers without a restart.

Two ``simral serve`` processes for the whole module:

* PostgreSQL + S3 (their own PostgreSQL and SeaweedFS, stopped and started by the tests): the
  index stopped in the middle of a C-STORE burst; the object store stopped during a burst and
  during a WADO-RS and a C-GET retrieve.
* embedded (SQLite + filesystem store) with its data folder on a tmpfs of a few MiB, filled by a
  filler file: disk full during C-STOREs and a STOW-RS. A tmpfs (``mount -t tmpfs -o size=...``,
  root only) gives the kernel's own ENOSPC at a size we choose, with no LD_PRELOAD and no image
  file; it is unmounted at the end. Without root the disk-full test is skipped.

The syslog collector and the MLLP peer going down are shown by test_audit_export.py
(``test_collector_receives_the_trail_and_the_backlog``) and test_teleradiology_requests.py
(``test_a_ris_down_at_first_gets_the_answer_when_it_comes_up``).

PS3.4 B.2.3 (C-STORE statuses: A700 Out of Resources), C.4.3.3 (C-GET sub-operations), PS3.18
10.4 / 10.5 (WADO-RS, STOW-RS), DESIGN.md §3 (acknowledge only what is durable).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage
from tests.corpus import multi_series_study
from tests.peers import PostgresServer, SeaweedS3
from tests.simral_proc import SimralProcess
from tests.test_bad_input import _check_clean, _is_failure
from tests.test_crash_safety import _c_get_study

SCU = "CRASHSCU"  # the calling AE of test_crash_safety._c_get_study, reused here
OUT_OF_RESOURCES = 0xA700
#: Seconds between staging sweeps and before an unindexed staged copy is dropped (defaults 5, 30).
FAST_SWEEP = {"SIMRAL_STAGING_SWEEP_SECONDS": "0.5", "SIMRAL_STAGING_ORPHAN_SECONDS": "3"}


@pytest.fixture(autouse=True)
def _chunked_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@dataclass
class Cluster:
    simral: SimralProcess
    pg: PostgresServer
    s3: SeaweedS3
    bucket: str

    def objects(self) -> int:
        listing = self.s3.client().list_objects_v2(Bucket=self.bucket)
        return int(listing.get("KeyCount", 0))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("faults-pg-s3")
    with PostgresServer() as pg, SeaweedS3() as s3:
        bucket = "simral-faults"
        s3.create_bucket(bucket)
        env = {
            "SIMRAL_DATABASE_URL": pg.create_database("simral_faults"),
            "SIMRAL_STORAGE": "s3",
            "SIMRAL_S3_ENDPOINT_URL": s3.endpoint_url,
            "SIMRAL_S3_BUCKET": bucket,
            "SIMRAL_S3_ACCESS_KEY": s3.access_key,
            "SIMRAL_S3_SECRET_KEY": s3.secret_key,
            "SIMRAL_S3_REGION": s3.region,
            "SIMRAL_WORKERS": "1",
            **FAST_SWEEP,
        }
        simral = SimralProcess(work / "data", env=env)
        simral.add_node("fault-scu", SCU, 104)
        with simral:
            yield Cluster(simral, pg, s3, bucket)


def _scu() -> AE:
    ae = AE(ae_title=SCU)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae


@dataclass
class Burst:
    #: SOP Instance UID → final C-STORE status (None: no response)
    statuses: dict[str, int | None]
    #: seconds each C-STORE took
    seconds: list[float]

    @property
    def acked(self) -> set[str]:
        return {uid for uid, status in self.statuses.items() if status == 0x0000}

    @property
    def refused(self) -> dict[str, int]:
        return {uid: s for uid, s in self.statuses.items() if s is not None and s != 0x0000}


def _burst(
    simral: SimralProcess, paths: list[Path], faults: dict[int, Callable[[], None]] | None = None
) -> Burst:
    """C-STORE ``paths`` on one association, running ``faults[i]`` before the i-th store."""
    assoc = _scu().associate("127.0.0.1", simral.dicom_port, ae_title="SIMRAL")
    assert assoc.is_established
    burst = Burst({}, [])
    try:
        for index, path in enumerate(paths):
            if faults and index in faults:
                faults[index]()
            uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            started = time.monotonic()
            status = assoc.send_c_store(path)
            burst.seconds.append(time.monotonic() - started)
            burst.statuses[uid] = int(status.Status) if "Status" in status else None
            assert assoc.is_established, f"association lost after instance {index}\n{simral.log_tail(30)}"
    finally:
        if assoc.is_established:
            assoc.release()
    return burst


def _study(tmp: Path, name: str, count: int, seed: int, size: int = 64) -> tuple[str, list[Path]]:
    paths = multi_series_study(tmp / name, series=1, per_series=count, seed=seed, rows=size, cols=size)
    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID), paths


def _pending(simral: SimralProcess, folder: str = "tmp") -> list[Path]:
    """Staged copies not yet published or dropped (``folder``: the store's scratch folder)."""
    return list((simral.data_dir / folder).glob("*.pending"))


def _wait_clean(simral: SimralProcess, folder: str = "tmp", timeout: float = 30) -> float:
    """Seconds until the staging folder is empty (published or dropped), then ``simral check``."""
    started = time.monotonic()
    while _pending(simral, folder) and time.monotonic() - started < timeout:
        time.sleep(0.2)
    drained = time.monotonic() - started
    assert not _pending(simral, folder), f"staging never drained\n{simral.log_tail(20)}"
    _check_clean(simral)
    return drained


def _report(label: str, **facts: object) -> None:
    print(f"\n[fault] {label}: " + ", ".join(f"{k}={v}" for k, v in facts.items()))


# ---------------------------------------------------------------------------------------------------------
# PostgreSQL stopped during a C-STORE burst


def test_index_down_during_c_store_burst(cluster: Cluster, tmp_path: Path) -> None:
    simral, pg = cluster.simral, cluster.pg
    study_uid, paths = _study(tmp_path, "pg", 24, seed=301)
    down: dict[str, float] = {}

    def stop() -> None:
        pg.stop()
        down["at"] = time.monotonic()

    def start() -> None:
        pg.start()
        down["back"] = time.monotonic()

    burst = _burst(simral, paths, {6: stop, 14: start})
    refused = burst.refused
    assert refused, "no C-STORE failed while PostgreSQL was down"
    assert all(_is_failure(s) for s in refused.values()), refused
    assert set(refused.values()) == {OUT_OF_RESOURCES}, {f"0x{s:04X}" for s in refused.values()}
    assert None not in burst.statuses.values()
    assert burst.acked, "nothing stored around the outage"
    # Stores right after PostgreSQL is back succeed, with no simral restart.
    assert all(
        burst.statuses[str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)] == 0 for p in paths[15:]
    )

    # The sender retries what was refused: everything is stored.
    retry = [p for p in paths if str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) in refused]
    again = _burst(simral, retry)
    assert not again.refused, again.refused
    received, final = _c_get_study(simral.dicom_port, study_uid)
    assert final == 0x0000 and set(received) == set(burst.statuses)
    drain = _wait_clean(simral)
    _report(
        "PostgreSQL stopped",
        instances=len(paths),
        refused_A700=len(refused),
        acknowledged=len(burst.acked),
        slowest_store_s=round(max(burst.seconds), 2),
        outage_s=round(down["back"] - down["at"], 1),
        retried_ok=len(retry),
        staging_drained_s=round(drain, 1),
    )


# ---------------------------------------------------------------------------------------------------------
# S3 stopped during ingest, then during retrieve


def test_store_down_during_ingest_keeps_acknowledged_instances(cluster: Cluster, tmp_path: Path) -> None:
    simral, s3 = cluster.simral, cluster.s3
    study_uid, paths = _study(tmp_path, "s3-ingest", 12, seed=302)
    objects_before = cluster.objects()
    burst = _burst(simral, paths, {4: s3.stop})
    # Every instance is durable in the staging folder and indexed: acknowledged, none refused.
    assert burst.acked == set(burst.statuses), {f"0x{s:04X}" for s in burst.refused.values()}
    staged = len(_pending(simral))
    assert staged >= len(paths) - 4 - 1, f"only {staged} instances staged while S3 was down"
    # The instances stored during the outage are read from their staged copies meanwhile; those
    # published before it are failed sub-operations (C-GET warning B000), not silently skipped.
    received, final = _c_get_study(simral.dicom_port, study_uid)
    during = set(list(burst.statuses)[4:])
    assert during <= set(received), len(during - set(received))
    assert final == 0xB000, f"C-GET final status {final}"

    s3.start()
    back = time.monotonic()
    while _pending(simral) and time.monotonic() - back < 30:
        time.sleep(0.2)
    drained = time.monotonic() - back
    assert not _pending(simral), (
        f"{len(_pending(simral))} staged blobs never published\n{simral.log_tail(20)}"
    )
    assert cluster.objects() == objects_before + len(paths)
    _check_clean(simral)
    _report(
        "S3 stopped during ingest",
        instances=len(paths),
        acknowledged=len(burst.acked),
        staged_while_down=staged,
        slowest_store_s=round(max(burst.seconds), 2),
        published_after_s=round(drained, 1),
    )


def test_store_down_during_retrieve_fails_cleanly(cluster: Cluster, tmp_path: Path) -> None:
    simral, s3 = cluster.simral, cluster.s3
    study_uid, paths = _study(tmp_path, "s3-retrieve", 6, seed=303)
    assert not _burst(simral, paths).refused
    deadline = time.monotonic() + 30
    while _pending(simral) and time.monotonic() < deadline:
        time.sleep(0.2)
    url = f"{simral.dicomweb_url}/studies/{study_uid}"
    headers = {**simral.auth_headers, "Accept": 'multipart/related; type="application/dicom"'}

    s3.stop()
    try:
        started = time.monotonic()
        response = httpx.get(url, headers=headers, timeout=60)
        wado_seconds = time.monotonic() - started
        assert response.status_code == 503, (response.status_code, response.text[:200])
        started = time.monotonic()
        received, outage_final = _c_get_study(simral.dicom_port, study_uid)
        c_get_seconds = time.monotonic() - started
        assert outage_final is not None and _is_failure(outage_final), f"C-GET final status {outage_final}"
        assert len(received) < len(paths)
        assert wado_seconds < 20 and c_get_seconds < 30, (wado_seconds, c_get_seconds)
    finally:
        s3.start()
    back = time.monotonic()
    while True:
        response = httpx.get(url, headers=headers, timeout=60)
        if response.status_code == 200 or time.monotonic() - back > 30:
            break
        time.sleep(0.5)
    recovered = time.monotonic() - back
    assert response.status_code == 200
    assert response.content.count(b"application/dicom") == len(paths)
    received, final = _c_get_study(simral.dicom_port, study_uid)
    assert final == 0x0000 and len(received) == len(paths)
    _report(
        "S3 stopped during retrieve",
        wado_rs="503",
        wado_rs_s=round(wado_seconds, 2),
        c_get_final=f"0x{outage_final:04X}",
        c_get_s=round(c_get_seconds, 2),
        works_again_after_s=round(recovered, 1),
    )


# ---------------------------------------------------------------------------------------------------------
# Disk full on the filesystem store


@dataclass
class SmallDisk:
    simral: SimralProcess
    mount: Path

    def free(self) -> int:
        return shutil.disk_usage(self.mount).free

    def fill(self, leave: int = 0) -> Path:
        """Fill the filesystem up to ``leave`` free bytes with a filler file."""
        filler = self.mount / "filler"
        with open(filler, "ab") as out:
            while self.free() > leave:
                try:
                    out.write(b"\0" * min(256 * 1024, max(self.free() - leave, 4096)))
                    out.flush()
                except OSError:
                    break
        return filler

    def temporaries(self) -> list[Path]:
        """Spool, staging and temporary files left in the store (none may outlive a request)."""
        store = self.simral.data_dir / "blobs"
        return [
            p
            for p in store.rglob("*")
            if p.is_file() and (p.name.startswith(".tmp") or p.parent.name == ".scratch")
        ]


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallDisk]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path_factory.mktemp("faults-tmpfs")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        simral = SimralProcess(mount / "data", extra_env={**FAST_SWEEP, "SIMRAL_WORKERS": "1"})
        simral.log_path = mount.parent / "faults-tmpfs-serve.log"
        simral.add_node("fault-scu", SCU, 104)
        with simral:
            yield SmallDisk(simral, mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("room_kib", [0, 300], ids=["no-room", "room-for-two"])
def test_disk_full_refuses_with_out_of_resources(
    small_disk: SmallDisk, tmp_path: Path, room_kib: int
) -> None:
    simral = small_disk.simral
    study_uid, paths = _study(tmp_path, "full", 10, seed=304 + room_kib, size=256)  # ~130 KiB each
    first = _burst(simral, paths[:2])
    assert not first.refused
    auth_headers = simral.auth_headers  # the token is made by the CLI, which needs room for it
    filler = small_disk.fill(leave=room_kib * 1024)

    burst = _burst(simral, paths[2:])
    # A full disk must not kill the server: sparse memory-mapped files written on it (metrics
    # values) once ended it with SIGBUS, leaving senders waiting until their timeout.
    assert simral.proc is not None and simral.proc.poll() is None, simral.log_tail(30)
    refused = burst.refused
    assert refused, "no C-STORE failed on a full disk"
    assert set(refused.values()) == {OUT_OF_RESOURCES}, {f"0x{s:04X}" for s in refused.values()}
    # STOW-RS on the full disk: the failed part is reported, nothing is stored.
    stow_paths = paths[-2:]
    boundary = "faultboundary"
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p.read_bytes() + b"\r\n"
            for p in stow_paths
        )
        + f"--{boundary}--\r\n".encode()
    )
    stow_headers = {
        **auth_headers,
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    stow = httpx.post(f"{simral.dicomweb_url}/studies", content=body, headers=stow_headers, timeout=60)
    assert stow.status_code in (409, 202), (stow.status_code, stow.text[:300])
    failed = stow.json().get("00081198", {}).get("Value", [])
    assert any(item.get("00081197", {}).get("Value") == [OUT_OF_RESOURCES] for item in failed), stow.text[
        :300
    ]
    # A retrieve on the full disk gets an answer (its audit record may not fit: then it is refused)
    # and the server lives on.
    _, full_disk_status = _c_get_study(simral.dicom_port, study_uid)
    assert full_disk_status is not None and simral.proc.poll() is None, simral.log_tail(30)
    # Nothing half-written stays behind.
    deadline = time.monotonic() + 15
    while small_disk.temporaries() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not small_disk.temporaries(), small_disk.temporaries()

    # Space freed: the same instances are accepted, by C-STORE and STOW-RS, without a restart.
    filler.unlink()
    freed = time.monotonic()
    # Everything acknowledged is there.
    received, _ = _c_get_study(simral.dicom_port, study_uid)
    assert first.acked | burst.acked <= set(received)
    retry = [p for p in paths[2:-2] if str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) in refused]
    again = _burst(simral, retry)
    assert not again.refused, again.refused
    stow = httpx.post(f"{simral.dicomweb_url}/studies", content=body, headers=stow_headers, timeout=60)
    assert stow.status_code == 200, (stow.status_code, stow.text[:300])
    received, final = _c_get_study(simral.dicom_port, study_uid)
    assert final == 0x0000 and len(received) == len(paths)
    _check_clean(simral)
    _report(
        f"disk full (tmpfs 24 MiB, {room_kib} KiB left)",
        instances=len(paths),
        acknowledged_while_filling=len(burst.acked),
        refused_A700=len(refused),
        stow_http=stow.status_code,
        accepted_again_after_s=round(time.monotonic() - freed, 1),
    )
