"""DIMSE services beyond the dcmtk matrix: character sets, storage commitment, duplicates, shutdown.

PS3.5 §6.1 (Specific Character Set), PS3.4 Annex J (Storage Commitment), PS3.4 B.2.3 (C-STORE
statuses), DESIGN.md §3 (duplicates).
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    SecondaryCaptureImageStorage,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
)
from tests.conftest import BACKENDS, backend_env
from tests.corpus import CharsetInstance, charset_instances, ct_series
from tests.peers import free_port
from tests.simral_proc import SimralProcess

SCU = "SERVICES"


@dataclass
class Setup:
    simral: SimralProcess
    charset: list[CharsetInstance]
    scu_port: int


@pytest.fixture(scope="module", params=BACKENDS)
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp(f"services-{request.param}")
    (base / "charset").mkdir()
    samples = charset_instances(base / "charset")
    scu_port = free_port()
    server = SimralProcess(base / "data", env=backend_env(request.param, request))
    server.add_node("services", SCU, scu_port)
    with server:
        result = subprocess.run(
            [
                "/usr/bin/dcmsend",
                "-aet",
                SCU,
                "-aec",
                server.ae_title,
                "127.0.0.1",
                str(server.dicom_port),
                *(str(s.path) for s in samples),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        yield Setup(server, samples, scu_port)


def _associate(simral: SimralProcess, *contexts: str, **kwargs: object) -> object:
    ae = AE(ae_title=SCU)
    for cx in contexts:
        ae.add_requested_context(cx)
    assoc = ae.associate("127.0.0.1", simral.dicom_port, ae_title=simral.ae_title, **kwargs)
    assert assoc.is_established
    return assoc


def _find_names(simral: SimralProcess, name: str) -> list[Dataset]:
    assoc = _associate(simral, StudyRootQueryRetrieveInformationModelFind)
    query = Dataset()
    query.SpecificCharacterSet = "ISO_IR 192"
    query.QueryRetrieveLevel = "STUDY"
    query.PatientName = name
    query.PatientID = ""
    query.StudyInstanceUID = ""
    try:
        return [
            ident
            for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
            if status and status.Status == 0xFF00
        ]
    finally:
        assoc.release()


def test_person_names_in_every_character_set_match(setup: Setup) -> None:
    for sample in setup.charset:
        expected_id = dcmread(sample.path).PatientID
        for query in {sample.patient_name, sample.patient_name.split("=")[0]}:
            found = _find_names(setup.simral, query)
            ids = {str(r.PatientID) for r in found}
            assert expected_id in ids, (sample.specific_character_set, query)
            match = next(r for r in found if r.PatientID == expected_id)
            assert str(match.PatientName) == sample.patient_name, sample.specific_character_set


def test_person_name_matching_is_case_insensitive_beyond_ascii(setup: Setup) -> None:
    sample = next(s for s in setup.charset if "Jérôme" in s.patient_name)
    found = _find_names(setup.simral, "buc^jÉrÔme")
    assert dcmread(sample.path).PatientID in {str(r.PatientID) for r in found}
    assert _find_names(setup.simral, "BUC^J*")


def test_storage_commitment_same_association(setup: Setup, tmp_path: Path) -> None:
    stored = setup.charset[0].path
    ds = dcmread(stored)
    reports: list[tuple[int, Dataset]] = []
    done = threading.Event()

    def on_report(event: evt.Event) -> tuple[int, None]:
        reports.append((event.event_type, event.event_information))
        done.set()
        return 0x0000, None

    ae = AE(ae_title=SCU)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(
        "127.0.0.1",
        setup.simral.dicom_port,
        ae_title=setup.simral.ae_title,
        ext_neg=[build_role(StorageCommitmentPushModel, scu_role=True, scp_role=True)],
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
    )
    assert assoc.is_established
    request = Dataset()
    request.TransactionUID = generate_uid()
    good = Dataset()
    good.ReferencedSOPClassUID = ds.SOPClassUID
    good.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    missing = Dataset()
    missing.ReferencedSOPClassUID = CTImageStorage
    missing.ReferencedSOPInstanceUID = generate_uid()
    request.ReferencedSOPSequence = [good, missing]
    status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
    assert status.Status == 0x0000
    # The report arrives on this association while it stays open (PS3.4 J.3.3).
    done.wait(10)
    assoc.release()
    assert done.is_set(), "no N-EVENT-REPORT received"
    event_type, info = reports[0]
    assert event_type == 2  # some failures
    assert str(info.TransactionUID) == str(request.TransactionUID)
    assert [str(i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence] == [str(ds.SOPInstanceUID)]
    assert [str(i.ReferencedSOPInstanceUID) for i in info.FailedSOPSequence] == [
        str(missing.ReferencedSOPInstanceUID)
    ]
    assert info.FailedSOPSequence[0].FailureReason == 0x0112


def test_storage_commitment_new_association(setup: Setup) -> None:
    """The requestor releases at once; the report comes on an association simral opens."""
    ds = dcmread(setup.charset[1].path)
    received: list[Dataset] = []
    got = threading.Event()

    def on_report(event: evt.Event) -> tuple[int, None]:
        received.append(event.event_information)
        got.set()
        return 0x0000, None

    listener = AE(ae_title=SCU)
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = listener.start_server(
        ("127.0.0.1", setup.scu_port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)]
    )
    try:
        assoc = _associate(setup.simral, StorageCommitmentPushModel)
        request = Dataset()
        request.TransactionUID = generate_uid()
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        request.ReferencedSOPSequence = [item]
        status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
        assert status.Status == 0x0000
        assoc.release()
        assert got.wait(30), "no N-EVENT-REPORT on a new association"
    finally:
        server.shutdown()
    assert str(received[0].TransactionUID) == str(request.TransactionUID)
    assert [str(i.ReferencedSOPInstanceUID) for i in received[0].ReferencedSOPSequence] == [
        str(ds.SOPInstanceUID)
    ]
    assert "FailedSOPSequence" not in received[0]


def test_duplicates_identical_and_conflicting(setup: Setup, tmp_path: Path) -> None:
    path = ct_series(tmp_path / "dup", slices=1, rows=64, cols=64, patient_id="DUP1", seed=7)[0]
    assoc = _associate(setup.simral, CTImageStorage)
    try:
        first = assoc.send_c_store(dcmread(path))
        again = assoc.send_c_store(dcmread(path))
        changed = dcmread(path)
        changed.SeriesDescription = "changed content, same SOP Instance UID"
        conflict = assoc.send_c_store(changed)
    finally:
        assoc.release()
    assert first.Status == 0x0000
    assert again.Status == 0x0000  # identical bytes: success, nothing new
    assert conflict.Status == 0xB006  # keep first, warn (Elements Discarded)
    found = _find_by_patient(setup.simral, "DUP1")
    assert found == 1
    check = setup.simral.cli("check", check=False)
    assert check.returncode == 0, check.stdout


def _find_by_patient(simral: SimralProcess, patient_id: str) -> int:
    assoc = _associate(simral, StudyRootQueryRetrieveInformationModelFind)
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.PatientID = patient_id
    query.SOPInstanceUID = ""
    try:
        return sum(
            1
            for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
            if status and status.Status == 0xFF00
        )
    finally:
        assoc.release()


def test_mismatched_affected_sop_instance_is_refused(setup: Setup, tmp_path: Path) -> None:
    """A data set whose SOP Instance UID differs from the request's is refused (A900)."""
    path = ct_series(tmp_path / "mm", slices=1, rows=32, cols=32, patient_id="MISMATCH", seed=9)[0]
    ae = AE(ae_title=SCU)
    ae.add_requested_context(SecondaryCaptureImageStorage)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", setup.simral.dicom_port, ae_title=setup.simral.ae_title)
    ds = dcmread(path)

    # Send the bytes under another Affected SOP Instance UID by editing the command primitive.
    from pynetdicom.dimse_primitives import C_STORE

    original = assoc.dimse.send_msg

    def rewrite(primitive: object, context_id: int) -> None:
        if isinstance(primitive, C_STORE):
            primitive.AffectedSOPInstanceUID = generate_uid()
        original(primitive, context_id)

    assoc.dimse.send_msg = rewrite
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == 0xA900
    assert _find_by_patient(setup.simral, "MISMATCH") == 0


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    server = SimralProcess(tmp_path / "data")
    server.start()
    assert server.stop() == 0
    assert "simral serving" in server.log_tail()
