"""Crash safety of the ingest path (DESIGN.md §3, "must"): SIGKILL during concurrent C-STOREs.

A multi-series study is sent over four concurrent associations while ``simral serve`` is SIGKILLed at a
random point. After each kill simral is restarted on the same data folder and environment; then every
instance the SCU saw acknowledged (C-STORE response Status 0x0000) must be retrievable with exactly the
data set bytes that were sent, and ``simral check`` must find the archive consistent. The next round
resends what is not acknowledged yet, then (as duplicates, which must be answered with success) what is.

The kill delays come from a seeded RNG; set ``SIMRAL_CRASH_SEED`` to replay a run (the seed is printed).
PS3.4 B.2.3 (C-STORE statuses), C.4.3 (C-GET).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)
from tests.conftest import BACKENDS, backend_env
from tests.corpus import multi_series_study
from tests.dicomcmp import dataset_bytes
from tests.simral_proc import SimralProcess

pytestmark = pytest.mark.slow

SCU = "CRASHSCU"
ROUNDS = 10
ASSOCIATIONS = 4
SERIES, PER_SERIES = 4, 40
KILL_DELAY = (0.2, 3.0)  # seconds after the sends start


@dataclass(frozen=True)
class Sent:
    path: Path
    sop_uid: str
    sha256: str  # of the data set bytes (after the file meta), as they go on the wire


@dataclass
class RoundResult:
    acked: set[str] = field(default_factory=set)
    responses: int = 0
    started: float = field(default_factory=time.monotonic)
    first_response: float | None = None  # seconds after the start
    #: responses received with a status other than Success: (SOP Instance UID, status)
    refused: list[tuple[str, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture(autouse=True)
def _chunked_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    # send_c_store(path) then streams the file's data set bytes as they are (no decode/re-encode).
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@dataclass
class Archive:
    backend: str
    simral: SimralProcess


@contextlib.contextmanager
def crash_archive(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Archive]:
    """A simral on backend ``request.param`` that knows the SCU (started by the test)."""
    server = SimralProcess(tmp_path / "data", env=backend_env(request.param, request))
    server.add_node("crash-scu", SCU, 104)
    try:
        yield Archive(request.param, server)
    finally:
        if server.proc is not None:
            server.stop()


#: This file runs the embedded backend; tests/test_crash_safety_postgres.py runs the same rounds on
#: PostgreSQL + S3, a file of its own so that the two pytest-xdist workers can run them side by side.
@pytest.fixture(params=[backend for backend in BACKENDS if backend != "postgres-s3"])
def archive(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Archive]:
    with crash_archive(request, tmp_path) as archive:
        yield archive


def _scu_ae() -> AE:
    ae = AE(ae_title=SCU)
    ae.acse_timeout = 10
    ae.dimse_timeout = 30
    ae.network_timeout = 30
    return ae


def _send_share(port: int, items: list[Sent], result: RoundResult) -> None:
    """One association sending ``items`` in order until the association dies."""
    ae = _scu_ae()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="SIMRAL")
    except Exception as exc:  # connection refused: the server is already gone
        with result.lock:
            result.errors.append(f"associate: {type(exc).__name__}: {exc}")
        return
    if not assoc.is_established:
        return
    try:
        for item in items:
            if not assoc.is_established:
                return
            try:
                status = assoc.send_c_store(item.path)
            except Exception as exc:  # the association went away under us
                with result.lock:
                    result.errors.append(f"send: {type(exc).__name__}: {exc}")
                return
            if "Status" not in status:  # no response: aborted, timed out or the connection dropped
                return
            with result.lock:
                result.responses += 1
                if result.first_response is None:
                    result.first_response = time.monotonic() - result.started
                if status.Status == 0x0000:
                    result.acked.add(item.sop_uid)
                else:
                    result.refused.append((item.sop_uid, int(status.Status)))
    finally:
        if assoc.is_established:
            assoc.release()


def _c_get_study(port: int, study_uid: str) -> tuple[dict[str, tuple[str, str]], int | None]:
    """C-GET a study; {SOP Instance UID: (transfer syntax, SHA-256 of the raw data set)}, final status."""
    received: dict[str, tuple[str, str]] = {}

    def on_store(event: evt.Event) -> int:
        raw = event.encoded_dataset(include_meta=False)  # the bytes as they arrived, not re-encoded
        uid = str(event.request.AffectedSOPInstanceUID)
        received[uid] = (str(event.context.transfer_syntax), hashlib.sha256(raw).hexdigest())
        return 0x0000

    ae = _scu_ae()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="SIMRAL",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established, "C-GET association refused"
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    final: int | None = None
    try:
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            if status and "Status" in status and status.Status != 0xFF00:
                final = int(status.Status)
    finally:
        assoc.release()
    return received, final


def _c_find_counts(port: int, study_uid: str) -> tuple[int, int]:
    """(IMAGE-level matches, NumberOfStudyRelatedInstances) of the study."""
    ae = _scu_ae()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="SIMRAL")
    assert assoc.is_established
    try:
        image = Dataset()
        image.QueryRetrieveLevel = "IMAGE"
        image.StudyInstanceUID = study_uid
        image.SOPInstanceUID = ""
        images = sum(
            1
            for status, _ in assoc.send_c_find(image, StudyRootQueryRetrieveInformationModelFind)
            if status and status.Status == 0xFF00
        )
        study = Dataset()
        study.QueryRetrieveLevel = "STUDY"
        study.StudyInstanceUID = study_uid
        study.NumberOfStudyRelatedInstances = ""
        related = [
            int(ident.NumberOfStudyRelatedInstances)
            for status, ident in assoc.send_c_find(study, StudyRootQueryRetrieveInformationModelFind)
            if status and status.Status == 0xFF00
        ]
    finally:
        assoc.release()
    assert len(related) == 1, related
    return images, related[0]


def _run_round(simral: SimralProcess, order: list[Sent], kill_after: float | None) -> RoundResult:
    result = RoundResult()
    shares = [order[i::ASSOCIATIONS] for i in range(ASSOCIATIONS)]
    threads = [
        threading.Thread(target=_send_share, args=(simral.dicom_port, share, result), name=f"scu-{i}")
        for i, share in enumerate(shares)
    ]
    for thread in threads:
        thread.start()
    if kill_after is not None:
        time.sleep(kill_after)
        simral.kill()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads), "an SCU thread hangs after the kill"
    return result


def _verify(simral: SimralProcess, study_uid: str, sent: dict[str, Sent], acked: set[str], label: str) -> int:
    """Every acknowledged instance retrievable with the sent bytes; ``simral check`` clean."""
    received, final = _c_get_study(simral.dicom_port, study_uid)
    context = f"{label}\n--- serve log ---\n{simral.log_tail(40)}"
    missing = acked - set(received)
    assert not missing, (
        f"{len(missing)} acknowledged instances not retrievable, e.g. {sorted(missing)[:3]}"
        + (f" (C-GET final status 0x{final:04X})" if final is not None else "")
        + context
    )
    foreign = set(received) - set(sent)
    assert not foreign, f"C-GET returned instances never sent: {sorted(foreign)[:3]}{context}"
    wrong = [
        uid
        for uid, (syntax, digest) in received.items()
        if syntax != ExplicitVRLittleEndian or digest != sent[uid].sha256
    ]
    assert not wrong, f"{len(wrong)} retrieved instances differ from what was sent: {wrong[:3]}{context}"
    assert final == 0x0000, f"C-GET final status 0x{final or 0:04X}{context}"
    check = simral.cli("check", check=False)
    assert check.returncode == 0 and "consistent" in check.stdout, (
        f"simral check after {label}: exit {check.returncode}\n{check.stdout}\n{check.stderr}{context}"
    )
    return len(received)


def test_sigkill_during_concurrent_stores_loses_no_acknowledged_instance(
    archive: Archive, tmp_path: Path
) -> None:
    run_crash_rounds(archive, tmp_path)


def run_crash_rounds(archive: Archive, tmp_path: Path) -> None:
    """ROUNDS rounds of concurrent sends killed at a random point, then one clean round."""
    seed = int(os.environ.get("SIMRAL_CRASH_SEED", str(random.SystemRandom().randrange(2**32))))
    simral, backend = archive.simral, archive.backend
    print(f"\n[{backend}] crash rounds: SIMRAL_CRASH_SEED={seed}")
    rng = random.Random(seed)
    paths = multi_series_study(tmp_path / "study", series=SERIES, per_series=PER_SERIES, seed=seed % 1000)
    sent: dict[str, Sent] = {}
    for path in paths:
        ts, raw = dataset_bytes(path)
        assert ts == ExplicitVRLittleEndian
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        sent[uid] = Sent(path, uid, hashlib.sha256(raw).hexdigest())
    study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    assert len(sent) == SERIES * PER_SERIES

    acked: set[str] = set()
    started = time.monotonic()
    simral.start()
    for number in range(1, ROUNDS + 2):
        final_round = number == ROUNDS + 1
        pending = [s for s in sent.values() if s.sop_uid not in acked]
        again = [s for s in sent.values() if s.sop_uid in acked]
        rng.shuffle(pending)
        rng.shuffle(again)
        kill_after = None if final_round else round(rng.uniform(*KILL_DELAY), 3)
        t0 = time.monotonic()
        result = _run_round(simral, pending + again, kill_after)
        sending = time.monotonic() - t0
        label = f"round {number} (kill after {kill_after} s)" if kill_after else f"round {number} (no kill)"
        assert not result.refused, (
            f"{label}: C-STORE answered with a non-success status (duplicates must succeed): "
            f"{[(uid, f'0x{status:04X}') for uid, status in result.refused[:5]]}\n{simral.log_tail(40)}"
        )
        new = result.acked - acked
        acked |= result.acked
        t1 = time.monotonic()
        if simral.proc is None:
            simral.start()
        restart = time.monotonic() - t1
        t2 = time.monotonic()
        retrievable = _verify(simral, study_uid, sent, acked, f"{backend} {label}")
        verify = time.monotonic() - t2
        first = f"{result.first_response:.2f} s" if result.first_response is not None else "-"
        print(
            f"[{backend}] {label}: {len(pending)} pending + {len(again)} resent; {result.responses} responses"
            f" (first after {first}), {len(new)} newly acknowledged, {len(acked)}/{len(sent)} acknowledged,"
            f" {retrievable} retrievable; send {sending:.2f} s, restart {restart:.2f} s,"
            f" verify {verify:.2f} s"
        )

    assert acked == set(sent), f"{len(sent) - len(acked)} instances never acknowledged without a kill"
    images, related = _c_find_counts(simral.dicom_port, study_uid)
    assert (images, related) == (len(sent), len(sent)), "duplicates were counted or instances lost"
    print(f"[{backend}] {ROUNDS} kill rounds + 1 clean round in {time.monotonic() - started:.1f} s")
