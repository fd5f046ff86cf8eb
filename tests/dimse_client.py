"""A C-GET client for tests (pynetdicom SCU, Study Root, CT Image Storage sub-operations)."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet


def c_get_study(port: int, called_ae: str, calling_ae: str, study_uid: str) -> list[Dataset]:
    """C-GET a study from ``127.0.0.1:port``; the datasets received on the association (with their
    file meta), in arrival order. Any final status other than success fails the caller's test."""
    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        received.append(dataset)
        return 0x0000

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title=called_ae,
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    try:
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            assert status is not None and status.Status in (0xFF00, 0x0000), status
    finally:
        assoc.release()
    return received
