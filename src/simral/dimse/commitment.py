"""Storage Commitment Push Model SCP (PS3.4 Annex J).

The N-ACTION request lists SOP instances; simral checks each against the index and blob store and
sends an N-EVENT-REPORT (Event Type 1: all committed, 2: some failed) on the same association when
it is still open, otherwise on a new association to the requestor's registered node (J.3.3).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from simral import tls
from simral.access.policy import Principal
from simral.archive import service as archive
from simral.context import AppContext
from simral.dimse.sending import set_nodelay
from simral.nodes import service as nodes

log = logging.getLogger(__name__)

STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119


@dataclass
class CommitmentReport:
    """The outcome of one commitment request."""

    transaction_uid: str
    committed: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str, int]] = field(default_factory=list)

    def event_information(self, retrieve_ae_title: str) -> Dataset:
        """The Event Information of the N-EVENT-REPORT (PS3.4 J.3.3.1, Table J.3-2)."""
        info = Dataset()
        info.TransactionUID = self.transaction_uid
        info.RetrieveAETitle = retrieve_ae_title
        items = []
        for sop_class, sop_uid in self.committed:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_uid
            items.append(item)
        if items:
            info.ReferencedSOPSequence = items
        failures = []
        for sop_class, sop_uid, reason in self.failed:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_uid
            item.FailureReason = reason
            failures.append(item)
        if failures:
            info.FailedSOPSequence = failures
        return info

    @property
    def event_type(self) -> int:
        return 2 if self.failed else 1


def evaluate(ctx: AppContext, action: Dataset, *, principal: Principal) -> CommitmentReport | None:
    """Check every referenced instance is stored, intact in size, with the SOP class claimed."""
    if "TransactionUID" not in action or "ReferencedSOPSequence" not in action:
        return None
    report = CommitmentReport(transaction_uid=str(action.TransactionUID))
    with ctx.db.reading() as session:
        for item in action.ReferencedSOPSequence:
            sop_class = str(item.get("ReferencedSOPClassUID", ""))
            sop_uid = str(item.get("ReferencedSOPInstanceUID", ""))
            stored = archive.get_instance(session, principal=principal, sop_uid=sop_uid)
            if stored is None or not archive.blob_exists(ctx, stored.blob_key):
                report.failed.append((sop_class, sop_uid, NO_SUCH_OBJECT_INSTANCE))
            elif stored.sop_class_uid != sop_class:
                report.failed.append((sop_class, sop_uid, CLASS_INSTANCE_CONFLICT))
            else:
                report.committed.append((sop_class, sop_uid))
    return report


def deliver(ae: Any, ctx: AppContext, assoc: Any, calling_ae: str, report: CommitmentReport) -> None:
    """Send the N-EVENT-REPORT, on ``assoc`` if still open, else on a new association."""
    info = report.event_information(ctx.settings.ae_title)
    # Let pynetdicom send the N-ACTION response first.
    time.sleep(0.05)
    if assoc.is_established:
        try:
            status = assoc.send_n_event_report(
                info, report.event_type, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
            )[0]
            if status and status.get("Status", 0xFFFF) == 0:
                return
        except Exception as exc:  # the peer may release concurrently
            log.info("N-EVENT-REPORT on the request association failed: %s", exc)
    with ctx.db.reading() as session:
        node = nodes.get_by_ae(session, ae_title=calling_ae)
    if node is None:
        log.warning("storage commitment report undeliverable: requestor AE is not registered")
        return
    # The SCP of Storage Commitment sends the report as association requestor, in the SCP role.
    role = build_role(StorageCommitmentPushModel, scp_role=True)
    for attempt in range(5):
        outgoing = ae.associate(
            node.host,
            node.port,
            ae_title=node.ae_title,
            ext_neg=[role],
            max_pdu=ctx.settings.max_pdu,
            evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)],
            tls_args=tls.tls_args(ctx.settings, tls=node.tls, host=node.host),
        )
        if outgoing.is_established:
            try:
                outgoing.send_n_event_report(
                    info, report.event_type, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
                )
            finally:
                outgoing.release()
            return
        time.sleep(min(2**attempt, 10))
    log.warning("storage commitment report to %s not delivered after retries", node.name)
