"""Forwarding jobs over DICOMweb: STOW-RS of archived instances to a registered peer (PS3.18 §10.5).

One ``POST {root}/studies`` per batch of jobs bound for the same peer, the stored Part 10 bytes
streamed as ``multipart/related; type="application/dicom"`` parts. The answer's Store Instances
Response Module (PS3.18 §10.5.3, Table 10.5.3-1) says which instances were stored: those in the
ReferencedSOPSequence are done, those in the FailedSOPSequence (or absent) are retried with
backoff; a connection error or a 5xx fails the batch, a 4xx other than 409 dead-letters it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx

from simral.archive import service as archive
from simral.archive.service import StoredInstance
from simral.context import AppContext
from simral.dicomweb.multipart import content_type_header, iter_parts, new_boundary
from simral.jobs.runner import Outcomes, PermanentFailure
from simral.jobs.service import ClaimedJob
from simral.nodes import service as nodes
from simral.sharing import service as sharing

CHUNK = 1024 * 1024
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"


def _chunks(ctx: AppContext, instance: StoredInstance) -> Iterator[bytes]:
    with archive.open_blob(ctx, instance.blob_key) as stream:
        while chunk := stream.read(CHUNK):
            yield chunk


def _uids(answer: dict[str, Any], tag: str) -> dict[str, str]:
    """SOP Instance UID → failure reason (or "") of the items of one sequence of the answer."""
    found: dict[str, str] = {}
    for item in (answer.get(tag) or {}).get("Value", []):
        uid = ((item.get(REFERENCED_SOP_INSTANCE_UID) or {}).get("Value") or [""])[0]
        reason = ((item.get(FAILURE_REASON) or {}).get("Value") or [""])[0]
        if uid:
            found[str(uid)] = f"0x{int(reason):04X}" if reason != "" else ""
    return found


def forward_stow(ctx: AppContext, batch: list[ClaimedJob]) -> Outcomes:
    """STOW-RS the batch's instances to the DICOMweb peer named in the jobs' ``destination``."""
    destination = batch[0].payload["destination"]
    with ctx.db.reading() as session:
        peer = nodes.get_dicomweb_peer(session, destination)
        if peer is None:
            raise PermanentFailure(f"no DICOMweb peer named {destination!r} any more")
        url, token = peer.url, peer.bearer_token
        instances, outcomes = sharing.forwarded_instances(session, batch)
    if not instances:
        return outcomes
    boundary = new_boundary()
    headers = {
        "Content-Type": content_type_header("application/dicom", boundary),
        "Accept": "application/dicom+json",
    }
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = iter_parts(boundary, (("application/dicom", _chunks(ctx, item)) for item in instances.values()))
    response = httpx.post(f"{url}/studies", content=body, headers=headers, timeout=httpx.Timeout(60.0))
    if response.status_code >= 500:
        raise ConnectionError(f"STOW-RS to {destination}: HTTP {response.status_code}")
    if response.status_code >= 400 and response.status_code != 409:
        raise PermanentFailure(f"STOW-RS to {destination} refused: HTTP {response.status_code}")
    try:
        answer: dict[str, Any] = response.json() if response.content else {}
    except ValueError:
        answer = {}
    stored = _uids(answer, REFERENCED_SOP_SEQUENCE)
    failed = _uids(answer, FAILED_SOP_SEQUENCE)
    if response.status_code == 200 and not stored and not failed:
        stored = {item.sop_uid: "" for item in instances.values()}  # a 200 without a body: all stored
    sent: dict[str, int] = {}
    for job_id, instance in instances.items():
        if instance.sop_uid in stored:
            outcomes[job_id] = None
            sent[instance.study_uid] = sent.get(instance.study_uid, 0) + 1
        elif instance.sop_uid in failed:
            outcomes[job_id] = f"STOW-RS failure reason {failed[instance.sop_uid] or 'unknown'}"
        else:
            outcomes[job_id] = f"not in the STOW-RS answer (HTTP {response.status_code})"
    sharing.audit_forwarded(ctx, destination=destination, protocol="STOW-RS", studies=sent)
    return outcomes
