"""Imaging reports from a site's RIS, to publish to the DMP on the site's behalf (DESIGN.md §7 flux 5,
§8; the DRIMbox "source" trigger), translated into :func:`simral.dmp.received.receive_report`.

The messages are those of the CI-SIS volet "Transmission de documents CDA-R2 en HL7 v2" (MSH-21
``2.1^CISIS_CDA_HL7_V2``): ORU^R01 with the document in an OBX of value type ED (OBX-11 ``F`` a first
transmission, ``C`` a replacement), or MDM^T02 (original) / MDM^T10 (replacement). OBX-5 is an ED
``^TEXT^XML^Base64^<data>``; a bare base64 value (the DRIMbox test messages) is read alike.

A message is a report to publish when its sender is a registered RIS (``simral ris add``) whose site
lets simral publish (``simral dmp enable``) and its document is an imaging report CDA (LOINC
18748-4, CR-IMG templateId 1.2.250.1.213.1.1.1.45). Otherwise the ORU^R01 goes on to the request
document flow (:mod:`simral.hl7.orders`: a CDA R2 level 1 PDF for a known request is kept as a prior
document), as does a report that names a request (ORC-2 / OBR-2) but is not about its exam (a
prior). An MDM that is not such a report is refused (AE).

The exam: the Study Instance UID of IPC-3 (else ZDS-1, else the CDA's documentationOf), the
accession number of IPC-1 (else the CDA's inFulfillmentOf); the patient: PID as the ADT feed reads
it (IPP + INS, PAM France), which must be the CDA's recordTarget INS. A CDA that is not well-formed
or lacks what the DMP needs is refused with AE and ERR at the OBX-5.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import replace

from simral.dmp import received
from simral.dmp import service as dmp
from simral.hl7.adt import Feed, Header, Rejected, Segment, first_segment, read_pid
from simral.hl7.orders import decoded_ed
from simral.patients import service as patients
from simral.patients.models import PatientIdentity
from simral.reading import service as reading
from simral.reading.documents import decoded_size
from simral.reading.models import ImagingRequest
from simral.reading.service import ReadingError
from simral.storage.base import BlobStore

#: Message types this flow reads (the listener accepts MDM^T02 original and MDM^T10 replacement).
REPORT_MESSAGES = frozenset({"ORU", "MDM"})


def _document(segment: Segment, max_bytes: int) -> bytes:
    """OBX-5: an ED (``source^type^subtype^encoding^data``), or a bare base64 value."""
    if segment.component(5, 4):
        return decoded_ed(segment, max_bytes)
    data = "".join(segment.field(5).split())
    if decoded_size(len(data)) > max_bytes + 2:
        raise Rejected("AE", "102", f"document larger than the {max_bytes} bytes accepted", segment.where(5))
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise Rejected("AE", "102", "document: OBX-5 is neither an ED nor base64", segment.where(5)) from None


def _placer(segments: list[Segment]) -> tuple[str, str]:
    """ORC-2, else OBR-2 (EI: number, authority OID else namespace)."""
    for name in ("ORC", "OBR"):
        segment = first_segment(segments, name)
        if segment is not None and segment.component(2, 1):
            return segment.component(2, 1), segment.component(2, 3) or segment.component(2, 2)
    return "", ""


def _request(
    feed: Feed, site: str, segments: list[Segment], cda: received.ReportCda
) -> ImagingRequest | None:
    """The site's request the message (ORC-2 / OBR-2) or the CDA (inFulfillmentOf) names."""
    candidates = [_placer(segments)] + [(o.placer_number, o.placer_authority) for o in cda.orders]
    for number, authority in candidates:
        if number:
            found = reading.find_by_placer(
                feed.session, site_code=site, placer_number=number, placer_authority=authority
            )
            if found is not None:
                return found
    return None


def _about(request: ImagingRequest, cda: received.ReportCda, exam: received.Exam) -> bool:
    """Whether the report is about the request's exam (else it is a prior document for it)."""
    placers = {o.placer_number for o in cda.orders}
    accessions = {o.accession_number for o in cda.orders if o.accession_number} | {exam.accession_number}
    studies = set(cda.study_uids) | {exam.study_uid}
    return (
        request.placer_number in placers
        or bool(request.accession_number and request.accession_number in accessions)
        or bool(request.study_uid and request.study_uid in studies)
    )


def _exam(segments: list[Segment], cda: received.ReportCda, where: str) -> received.Exam:
    ipc, zds = first_segment(segments, "IPC"), first_segment(segments, "ZDS")
    study_uid = (ipc.component(3, 1) if ipc is not None else "") or (
        zds.component(1, 1) if zds is not None else ""
    )
    if study_uid and cda.study_uids and study_uid not in cda.study_uids:
        raise Rejected("AE", "102", f"the CDA does not document the study {study_uid} of the message", where)
    study_uid = study_uid or next(iter(cda.study_uids), "")
    if not study_uid:
        raise Rejected(
            "AE", "101", "no Study Instance UID (IPC-3, or the CDA documentationOf/serviceEvent/id)", where
        )
    accession, authority = "", ""
    if ipc is not None and ipc.component(1, 1):
        accession, authority = ipc.component(1, 1), ipc.component(1, 3) or ipc.component(1, 2)
    else:
        order = next((o for o in cda.orders if o.accession_number), None)
        if order is not None:
            accession, authority = order.accession_number, order.accession_authority
    return received.Exam(study_uid=study_uid, accession_number=accession, accession_authority=authority)


def _identity(feed: Feed, segments: list[Segment], site: str) -> PatientIdentity:
    """The patient of PID (PAM France, as the ADT feed reads it): the IPP's identity created or
    updated, else the site's identity with this INS."""
    pids = [segment for segment in segments if segment.name == "PID"]
    if not pids:
        raise Rejected("AE", "101", "the message has no PID segment", "PID")
    pid = read_pid(pids[0], feed.encoding, require_identifier=False)
    if pid.identifiers:
        return feed.upsert(pid)
    assert pid.ins is not None  # read_pid refuses a PID-3 with neither
    ins = patients.check_ins(pid.ins, allow_test=feed.allow_test_ins)
    known = patients.identities_by_ins(feed.session, ins)
    site_authority = patients.organisation_authority_id(feed.session, site)
    for identity in known:
        if identity.authority_id == site_authority:
            return identity
    if not known:
        raise Rejected("AE", "204", "unknown patient: PID-3 carries only an INS no identity has", "PID^1^3")
    return known[0]


def apply(feed: Feed, segments: list[Segment], header: Header) -> bool:
    """Receive the report an ORU^R01 / MDM carries for DMP publication (the module docstring) in the
    caller's transaction; ``False`` when the message is not one (the request document flow applies)."""
    if header.message_type not in REPORT_MESSAGES:
        return False
    mdm = header.message_type == "MDM"
    session = feed.session
    endpoint = reading.find_ris_endpoint(session, header.sending_application, header.sending_facility)
    if endpoint is None:
        if not mdm:
            return False  # refused by the request document flow, with the same reason
        raise Rejected(
            "AR",
            "207",
            f"{header.sending_application}^{header.sending_facility} is not a registered RIS "
            "(simral ris add)",
            "MSH^1^3",
        )
    site = endpoint.site_code
    publishing = dmp.publishing_organisation(session, site) is not None
    if not publishing and mdm:
        raise Rejected("AE", "207", f"simral does not publish reports to the DMP for {site}", "MSH^1^3")
    if not publishing:
        return False
    documents = [s for s in segments if s.name == "OBX" and s.component(2, 1).upper() == "ED"]
    if not documents:
        if mdm:
            raise Rejected("AE", "101", "the MDM carries no document (OBX of type ED)", "OBX")
        return False
    segment = documents[0]
    where = segment.where(5)
    content = _document(segment, feed.document_max_bytes)
    try:
        if not received.is_imaging_report(content):
            if mdm:
                raise Rejected(
                    "AE", "103", "the document is not an imaging report CDA (LOINC 18748-4)", where
                )
            return False
        cda = received.read_report(content)
    except received.ReceivedReportError as exc:
        raise Rejected("AE", exc.code, f"report CDA: {exc}", where) from None
    if segment.component(11, 1).upper() == "D":
        raise Rejected(
            "AE", "207", "deleting a document from the DMP (OBX-11 D) is not done through simral", where
        )
    exam = _exam(segments, cda, where)
    request = _request(feed, site, segments, cda)
    if request is not None:
        if not mdm and not _about(request, cda, exam):
            return False  # a prior report for the request: kept with its documents
        exam = replace(exam, request_id=request.id)
    principal = replace(feed.principal, organisation=site)
    try:
        identity = _identity(feed, segments, site)
        received.receive_report(
            session,
            _store(feed),
            site_code=site,
            content=content,
            cda=cda,
            identity=identity,
            exam=exam,
            principal=principal,
            source=f"ris:{endpoint.name}",
        )
    except received.ReceivedReportError as exc:
        raise Rejected("AE", exc.code, f"report CDA: {exc}", where) from None
    except ReadingError as exc:
        raise Rejected("AE", exc.code, str(exc), where) from None
    return True


def _store(feed: Feed) -> BlobStore:
    if feed.store is None:  # pragma: no cover - the MLLP listener always passes its store
        raise Rejected("AE", "207", "no blob store to keep the report")
    return feed.store
