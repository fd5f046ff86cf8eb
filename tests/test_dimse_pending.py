"""C-MOVE and C-GET Pending responses: at most one per interval (PS3.4 C.4.2.3.1, C.4.3.3.1).

The SCP *may* report progress with Pending responses while its C-STORE sub-operations run;
pynetdicom sent one after every sub-operation, a third of the CPU each moved instance cost.
simral sends the first at once, then one per ``PENDING_RESPONSE_INTERVAL`` (1 s); each carries
consistent counts and the final response the totals.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from tests.corpus import ct_series
from tests.peers import free_port
from tests.simral_proc import SimralProcess

SCU = "PENDSCU"
DEST = "PENDDEST"
SLICES = 8
#: How long the receiving side takes per instance: the retrieve lasts about 2 s.
STORE_DELAY = 0.25


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimralProcess, int, str]]:
    base = tmp_path_factory.mktemp("pending")
    dest_port = free_port()
    proc = SimralProcess(base / "data", extra_env={"SIMRAL_WORKERS": "1"})
    proc.add_node("scu", SCU, free_port())
    proc.add_node("dest", DEST, dest_port)
    files = ct_series(base / "ct", slices=SLICES, rows=32, cols=32, patient_id="PEND001")
    with proc:
        ae = AE(ae_title=SCU)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", proc.dicom_port, ae_title=proc.ae_title)
        assert assoc.is_established
        try:
            for path in files:
                assert assoc.send_c_store(dcmread(path)).Status == 0x0000
        finally:
            assoc.release()
        yield proc, dest_port, str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _slow_store(received: list[str]) -> object:
    def on_store(event: evt.Event) -> int:
        time.sleep(STORE_DELAY)
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    return on_store


def _query(study_uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    return query


def _check(responses: list[tuple[Dataset, float]], started: float) -> None:
    pending = [status for status, _ in responses if status.Status == 0xFF00]
    final = responses[-1][0]
    elapsed = responses[-1][1] - started
    assert final.Status == 0x0000
    assert final.NumberOfCompletedSuboperations == SLICES
    assert final.get("NumberOfFailedSuboperations", 0) == 0
    # One after every sub-operation before (8); now the first at once, then one a second.
    assert len(pending) < SLICES and len(pending) <= 2 + int(elapsed), (len(pending), elapsed)
    assert pending[0].NumberOfCompletedSuboperations == 1
    completed = [status.NumberOfCompletedSuboperations for status in pending]
    assert completed == sorted(set(completed)), completed
    for status in pending:
        assert status.NumberOfRemainingSuboperations + status.NumberOfCompletedSuboperations == SLICES


def test_move_reports_progress_once_a_second(archive: tuple[SimralProcess, int, str]) -> None:
    proc, dest_port, study_uid = archive
    received: list[str] = []
    dest = AE(ae_title=DEST)
    dest.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    scp = dest.start_server(
        ("127.0.0.1", dest_port), block=False, evt_handlers=[(evt.EVT_C_STORE, _slow_store(received))]
    )
    try:
        ae = AE(ae_title=SCU)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        ae.dimse_timeout = ae.network_timeout = 60
        assoc = ae.associate("127.0.0.1", proc.dicom_port, ae_title=proc.ae_title)
        assert assoc.is_established
        try:
            started = time.monotonic()
            responses = [
                (status, time.monotonic())
                for status, _ in assoc.send_c_move(
                    _query(study_uid), DEST, StudyRootQueryRetrieveInformationModelMove
                )
            ]
        finally:
            assoc.release()
    finally:
        scp.shutdown()
    assert len(received) == SLICES
    _check(responses, started)


def test_get_reports_progress_once_a_second(archive: tuple[SimralProcess, int, str], tmp_path: Path) -> None:
    proc, _, study_uid = archive
    received: list[str] = []
    ae = AE(ae_title=SCU)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate(
        "127.0.0.1",
        proc.dicom_port,
        ae_title=proc.ae_title,
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, _slow_store(received))],
    )
    assert assoc.is_established
    try:
        started = time.monotonic()
        responses = [
            (status, time.monotonic())
            for status, _ in assoc.send_c_get(_query(study_uid), StudyRootQueryRetrieveInformationModelGet)
        ]
    finally:
        assoc.release()
    assert len(received) == SLICES
    _check(responses, started)
