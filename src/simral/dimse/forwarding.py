"""Forwarding jobs over DIMSE: C-STORE of archived instances to a registered node (PS3.4 B.2.2).

One association per batch of jobs bound for the same node; each instance is sent from its stored
bytes (or transcoded when the node did not accept the stored syntax, see :mod:`.sending`). A job
is done when the node answered Success or a Warning (PS3.4 B.2.3); a refused association or a lost
connection fails the whole batch, which the job runner retries with backoff. A node that receives
an instance twice (a retry after a crash) treats it as a duplicate, which C-STORE allows.
"""

from __future__ import annotations

import logging

from pynetdicom import AE, evt

from simral import tls
from simral.context import AppContext
from simral.dimse import sending
from simral.jobs.runner import Outcomes, PermanentFailure
from simral.jobs.service import ClaimedJob
from simral.nodes import service as nodes
from simral.sharing import service as sharing

log = logging.getLogger(__name__)

#: C-STORE statuses that mean the instance is stored (PS3.4 Table B.2-1: success and warnings).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


def forward_dimse(ctx: AppContext, batch: list[ClaimedJob]) -> Outcomes:
    """Send the batch's instances to the node named in the jobs' ``destination``."""
    destination = batch[0].payload["destination"]
    with ctx.db.reading() as session:
        node = nodes.get_by_name(session, destination)
        if node is None:
            raise PermanentFailure(f"no DICOM node named {destination!r} any more")
        host, port, called, use_tls = node.host, node.port, node.ae_title, node.tls
        instances, outcomes = sharing.forwarded_instances(session, batch)
    if not instances:
        return outcomes
    sending.install()
    ae = AE(ae_title=ctx.settings.ae_title)
    ae.network_timeout = ctx.settings.network_timeout
    ae.acse_timeout = ae.dimse_timeout = 30
    assoc = ae.associate(
        host,
        port,
        ae_title=called,
        contexts=sending.contexts_for(instances.values()),
        max_pdu=ctx.settings.max_pdu,
        evt_handlers=[(evt.EVT_CONN_OPEN, sending.set_nodelay)],
        tls_args=tls.tls_args(ctx.settings, tls=use_tls, host=host),
    )
    if not assoc.is_established:
        raise ConnectionError(f"association with {destination} ({called}) not established")
    sent: dict[str, int] = {}
    try:
        for job_id, instance in instances.items():
            try:
                status = assoc.send_c_store(sending.StoredInstanceDataset(instance, ctx))
            except ValueError as exc:  # no usable presentation context: retrying will not help
                outcomes[job_id] = PermanentFailure(str(exc))
                continue
            code = int(getattr(status, "Status", -1)) if status is not None else -1
            if code in STORED_STATUSES:
                outcomes[job_id] = None
                sent[instance.study_uid] = sent.get(instance.study_uid, 0) + 1
            elif not assoc.is_established:
                break  # the jobs left without an outcome fail and are retried
            else:
                outcomes[job_id] = (
                    f"C-STORE status 0x{code & 0xFFFF:04X}" if code >= 0 else "no C-STORE response"
                )
    finally:
        if assoc.is_established:
            assoc.release()
        sharing.audit_forwarded(ctx, destination=destination, protocol="DIMSE C-STORE", studies=sent)
    return outcomes
