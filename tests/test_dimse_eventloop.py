"""The association reactors wait for events, not in polling loops (simral.dimse.eventloop).

An open association that sends nothing costs the server next to no CPU (pynetdicom's reactors
woke every 0.2 ms, simral's former setting, some 7% of a core per association); a request after a
long quiet spell is answered at once (the wake-ups reach both reactors); the requestor side
(associations simral opens: C-MOVE sub-operations) runs on the same reactors.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from tests.conftest import run_python
from tests.corpus import ct_series
from tests.peers import free_port
from tests.simral_proc import SimralProcess

SCU = "LOOPSCU"
DEST = "LOOPDEST"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its threads (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _cpu_share(pid: int, seconds: float) -> float:
    before = _cpu_seconds(pid)
    time.sleep(seconds)
    return (_cpu_seconds(pid) - before) / seconds


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimralProcess, int]]:
    base = tmp_path_factory.mktemp("eventloop")
    dest_port = free_port()
    proc = SimralProcess(base / "data", extra_env={"SIMRAL_WORKERS": "1"})
    proc.add_node("loop", SCU, free_port())
    proc.add_node("dest", DEST, dest_port)
    with proc:
        yield proc, dest_port


def _associate(proc: SimralProcess, *contexts: str) -> object:
    ae = AE(ae_title=SCU)
    for cx in contexts:
        ae.add_requested_context(cx)
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
    assoc = ae.associate("127.0.0.1", proc.dicom_port, ae_title=proc.ae_title)
    assert assoc.is_established
    return assoc


def test_idle_associations_cost_no_cpu(server: tuple[SimralProcess, int]) -> None:
    proc, _ = server
    assert proc.proc is not None
    pid = proc.proc.pid
    time.sleep(1.0)
    quiet = _cpu_share(pid, 2.0)  # the server's own background work, no association open
    opened = [_associate(proc, Verification) for _ in range(4)]
    try:
        time.sleep(0.5)
        idle = _cpu_share(pid, 2.0)
        for assoc in opened:
            assert assoc.send_c_echo().Status == 0x0000  # type: ignore[attr-defined]
    finally:
        for assoc in opened:
            assoc.release()  # type: ignore[attr-defined]
    # Four associations polling every 0.2 ms took about 30% of a core; waiting, next to nothing.
    assert idle - quiet < 0.05, f"4 idle associations: {idle:.1%} of a core (without: {quiet:.1%})"


def test_request_after_quiet_spell_answered_at_once(server: tuple[SimralProcess, int]) -> None:
    proc, _ = server
    assoc = _associate(proc, Verification)
    try:
        assert assoc.send_c_echo().Status == 0x0000  # type: ignore[attr-defined]
        # Longer than the reactors' longest wait without an event (eventloop.MAX_WAIT, 1 s).
        time.sleep(2.5)
        started = time.perf_counter()
        assert assoc.send_c_echo().Status == 0x0000  # type: ignore[attr-defined]
        assert time.perf_counter() - started < 0.5
    finally:
        assoc.release()  # type: ignore[attr-defined]


def test_move_sub_operations_over_requested_association(
    server: tuple[SimralProcess, int], tmp_path: Path
) -> None:
    """C-MOVE: simral requests an association to the destination (PS3.4 C.4.2) and sends on it."""
    proc, dest_port = server
    files = ct_series(tmp_path / "ct", slices=3, rows=64, cols=64, patient_id="LOOP001")
    store = _associate(proc, CTImageStorage)
    try:
        for path in files:
            assert store.send_c_store(dcmread(path)).Status == 0x0000  # type: ignore[attr-defined]
    finally:
        store.release()  # type: ignore[attr-defined]

    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    dest = AE(ae_title=DEST)
    dest.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    scp = dest.start_server(("127.0.0.1", dest_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        assoc = _associate(proc, StudyRootQueryRetrieveInformationModelMove)
        try:
            started = time.perf_counter()
            responses = list(
                assoc.send_c_move(query, DEST, StudyRootQueryRetrieveInformationModelMove)  # type: ignore[attr-defined]
            )
            elapsed = time.perf_counter() - started
        finally:
            assoc.release()  # type: ignore[attr-defined]
    finally:
        scp.shutdown()
    assert responses[-1][0].Status == 0x0000
    assert len(received) == 3
    # A sub-association's set-up, three stores and its release: no reactor waits for a poll or a
    # timeout (the 1 s bound would show as seconds here).
    assert elapsed < 3.0, f"C-MOVE of 3 instances took {elapsed:.2f} s"


@pytest.mark.parametrize("race", ["double-close", "paused-reactor", "primitive-after-abort"])
def test_reactor_races_in_a_process_of_their_own(race: str) -> None:
    """See tests/eventloop_races.py: a second "connection closed" in Sta1 does not kill the DUL
    thread (it did, in test_cluster's server log), a paused reactor leaves a sender's response, and
    ``sending.install()`` alone (forwarding workers) brings the event-driven reactors."""
    done = run_python("-m", "tests.eventloop_races", race, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
