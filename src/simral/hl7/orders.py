"""Imaging orders from a site's RIS (ANS "Volet Téléradiologie", HL7 v2.5.1, MSH-21
``1.0^CISIS_TLR_HL7_V2``) translated into :mod:`simral.reading.service` calls.

- flux 1, TransmissionDemandeIMG: ORM^O01 with ORC-1 ``NW`` (OBR-4 ``TRANSMISSION_DEMANDE``);
- flux 2, AnnulationDemandeIMG: ORM^O01 with ORC-1 ``CA`` (``DC`` read alike), ORC-16 the reason;
- flux 4, complément post-examen: OMI^O23 with ORC-1 ``SR`` / OBR-4 ``COMPLEMENT_POST_ACTE``, TQ1
  (exam time, image retention), IPC (accession number, Study Instance UID) and the OBX groups of
  the guide's table "TLR_OBSERVATION" (OBX-4 sub-ids ``n.m`` group an occurrence's segments);
- IHE RAD SWF OMI^O23 with ORC-1 ``NW`` / ``CA``, as RIS that schedule exams themselves send them
  (TQ1-7 start and TQ1-9 priority, IPC with the accession number and Study Instance UID).

A new order may carry its documents (the request letter, prior reports): each OBX of value type
``ED`` (HL7 v2.5.1 §2.A.24: ``source^type^subtype^encoding^data``, encoding ``Base64`` or ``Hex``)
other than the guide's own ED items (PROTOCOLE_IMAGERIE, URL_PARTIELLE_VIEWER), with OBX-3 the
document type (LOINC, JDV J07 XdsTypeCode, as in the CI-SIS volet "Transmission de documents CDA-R2
en HL7 v2"; 55115-0 is the request, an imaging report a prior), OBX-3.2 its title and OBX-14 its
date. The data is a PDF or a CDA R2 level 1 document carrying one
(:func:`simral.reading.documents.read_document`); a document that is not, or larger than
``request_document_max_bytes``, refuses the message (AE, ERR 102 at its OBX-5). The ANS guide
itself sends documents in separate CDA-R2 flows (specifications techniques, introduction): an
ORU^R01 with MSH-21 ``2.1^CISIS_CDA_HL7_V2`` (the only ORU accepted) naming the request's placer
number in ORC-2 / OBR-2 adds its ED documents to the request.

The desired delay is the date/time by which the requester wants the answer: TQ1-8 end date/time
(IHE SWF OMI), else the TQ end date/time of ORC-7.5 / OBR-27.5 (ORM^O01); it becomes the request's
``desired_delay`` (minutes from reception) and so bounds its deadline.

The sender must be a registered RIS (``simral ris add``; MSH-3/MSH-4); its site owns the requests.
Fields are read from the ER7 text of each segment (HL7 v2.5.1 §2.5–2.7,
:func:`simral.hl7.adt.segments`); errors become the acknowledgements the ANS guide ("acquittement")
describes: AE with ERR for a message that cannot be applied, AR for a circumstantial refusal (sender
not registered, no reading contract) that may succeed when sent again.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from simral.access.policy import AccessDenied, Principal
from simral.hl7.adt import (
    Encoding,
    Feed,
    Header,
    Rejected,
    Segment,
    first_segment,
    named_segments,
    read_pid,
)
from simral.reading import documents as request_documents
from simral.reading import service as reading
from simral.reading.models import PRIORITY_ROUTINE, PRIORITY_URGENT, ImagingRequest
from simral.reading.service import Complement, PatientRef, ReadingError, RequestDetails

#: OBR-4 codes of table TLR_OBR_PROCEDURE.
TRANSMISSION = "TRANSMISSION_DEMANDE"
CANCELLATION = "ANNULATION_DEMANDE"
COMPLEMENT = "COMPLEMENT_POST_ACTE"
#: OBX-3 codes of table TLR_OBSERVATION whose ED value is not a document.
ED_ITEMS = frozenset({"PROTOCOLE_IMAGERIE", "URL_PARTIELLE_VIEWER"})
#: Priorities (HL7 table 0485 in TQ1-9 / ORC-7.6 / OBR-5) read as urgent.
URGENT_CODES = frozenset({"S", "A", "STAT", "ASAP", "P", "C"})

try:
    _LOCAL = ZoneInfo("Europe/Paris")
except ZoneInfoNotFoundError:  # pragma: no cover - systems without tzdata
    _LOCAL = ZoneInfo("UTC")


def _timestamp(value: str) -> datetime | None:
    """An HL7 TS/DTM (``YYYY[MM[DD[HH[MM[SS]]]]][+/-ZZZZ]``); without an offset, French local time.

    None for a value that is no date/time (HL7 v2.5.1 §2.A.22): an offset that is not digits or not
    within a day, a date outside what datetime represents once moved to UTC.
    """
    text = value.split("^")[0].strip()
    if not text:
        return None
    offset = None
    for sign in ("+", "-"):
        if sign in text[8:]:
            text, _, zone = text.rpartition(sign)
            if not (zone.isascii() and zone.isdigit()) or len(zone) > 4:
                return None
            offset = (1 if sign == "+" else -1) * (int(zone[:2] or 0) * 60 + int(zone[2:4] or 0))
    digits = text.split(".")[0]
    try:
        parsed = datetime.strptime(digits.ljust(14, "0")[:14] if len(digits) >= 8 else "", "%Y%m%d%H%M%S")
        if offset is None:
            return parsed.replace(tzinfo=_LOCAL).astimezone(UTC)
        return parsed.replace(tzinfo=timezone(timedelta(minutes=offset))).astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def _number(value: str) -> float | None:
    try:
        return float(value.replace(",", "."))
    except ValueError:
        return None


# ------------------------------------------------------------------------------ one order


@dataclass
class Order:
    """The segments of one ORDER group: ORC and what follows it up to the next ORC."""

    orc: Segment
    segments: list[Segment]

    def first(self, name: str) -> Segment | None:
        return first_segment(self.segments, name)

    def all(self, name: str) -> list[Segment]:
        return named_segments(self.segments, name)

    @property
    def control(self) -> str:
        return self.orc.component(1, 1).upper()

    @property
    def procedure(self) -> str:
        obr = self.first("OBR")
        return obr.component(4, 1).upper() if obr is not None else ""

    def placer(self) -> tuple[str, str]:
        """ORC-2 (else OBR-2) EI: the number and its authority (EI.3 OID, else EI.2 namespace)."""
        for segment, n in ((self.orc, 2), (self.first("OBR"), 2)):
            if segment is None:
                continue
            number = segment.component(n, 1)
            if number:
                return number, segment.component(n, 3) or segment.component(n, 2)
        raise Rejected("AE", "101", "ORC-2 placer order number is missing", self.orc.where(2))


def _orders(segments: list[Segment]) -> list[Order]:
    orders: list[Order] = []
    for segment in segments:
        if segment.name == "ORC":
            orders.append(Order(segment, []))
        elif orders:
            orders[-1].segments.append(segment)
    return orders


def _coded(segment: Segment, n: int = 5) -> dict[str, str]:
    return {
        "code": segment.component(n, 1),
        "display": segment.component(n, 2),
        "system": segment.component(n, 3),
    }


def _sub_id(segment: Segment) -> tuple[str, str]:
    occurrence, _, item = segment.component(4, 1).partition(".")
    return occurrence or "1", item


# ------------------------------------------------------------------------ flux 1: the request


def _patient(segments: list[Segment], enc: Encoding) -> PatientRef:
    pids = [segment for segment in segments if segment.name == "PID"]
    if not pids:
        raise Rejected("AR", "100", "the message has no PID segment", "PID")
    pid = read_pid(pids[0], enc, require_identifier=False)
    ipp, authority = pid.identifiers[0] if pid.identifiers else ("", None)
    pv1 = next((s for s in segments if s.name == "PV1"), None)
    return PatientRef(
        traits=pid.traits,
        ipp=ipp,
        ipp_authority=authority,
        ins=pid.ins,
        status=pid.status,
        attributes=pid.attributes,
        visit_number=pv1.component(19, 1) if pv1 is not None else "",
    )


def _requester(order: Order) -> dict[str, str]:
    """ORC-12 (else OBR-16) XCN, ORC-14 call-back phone (XTN.12 or XTN.1), ORC-21 facility (XON)."""
    orc, obr = order.orc, order.first("OBR")
    source, n = (orc, 12) if orc.component(12, 1) or orc.component(12, 2) else (obr, 16)
    requester: dict[str, str] = {}
    if source is not None:
        authority = (
            source.components(n)[8].split(source.enc.subcomponent) if len(source.components(n)) > 8 else []
        )
        requester = {
            "id": source.component(n, 1),
            "family": source.component(n, 2),
            "given": source.component(n, 3),
            "prefix": source.component(n, 6),
            "authority": source.text(authority[1]) if len(authority) > 1 else "",
        }
    phone = orc.component(14, 12) or orc.component(14, 1)
    if phone:
        requester["phone"] = phone
    if orc.component(21, 1):
        requester["facility"] = orc.component(21, 1)
        requester["facility_id"] = orc.component(21, 10)
    return {key: value for key, value in requester.items() if value}


def _priority(order: Order) -> str:
    """TQ1-9 (IHE SWF), ORC-7.6 or OBR-5 (HL7 v2.5.1 table 0485 / 0027): S, A → urgent."""
    codes = []
    tq1 = order.first("TQ1")
    if tq1 is not None:
        codes.append(tq1.component(9, 1))
    codes.append(order.orc.component(7, 6))
    obr = order.first("OBR")
    if obr is not None:
        codes.append(obr.component(5, 1))
        codes.append(obr.component(27, 6))
    return (
        PRIORITY_URGENT if any(code.upper() in URGENT_CODES for code in codes if code) else PRIORITY_ROUTINE
    )


def _appointment(order: Order) -> datetime | None:
    """TQ1-7 (IHE SWF start date/time), ORC-7.4, OBR-27.4 or OBR-36 (scheduled date/time)."""
    tq1, obr = order.first("TQ1"), order.first("OBR")
    for value in (
        tq1.component(7, 1) if tq1 is not None else "",
        order.orc.component(7, 4),
        obr.component(27, 4) if obr is not None else "",
        obr.component(36, 1) if obr is not None else "",
    ):
        found = _timestamp(value)
        if found is not None:
            return found
    return None


def _desired_delay(order: Order, now: datetime) -> str:
    """TQ1-8 end date/time (IHE SWF), else ORC-7.5 / OBR-27.5 (TQ end date/time): the answer is
    wanted by then; as whole minutes from ``now`` (``"0 min"`` when already past), else empty."""
    tq1, obr = order.first("TQ1"), order.first("OBR")
    for value in (
        tq1.component(8, 1) if tq1 is not None else "",
        order.orc.component(7, 5),
        obr.component(27, 5) if obr is not None else "",
    ):
        wanted = _timestamp(value)
        if wanted is not None:
            return f"{max(0, math.ceil((wanted - now).total_seconds() / 60))} min"
    return ""


def decoded_ed(segment: Segment, max_bytes: int) -> bytes:
    """OBX-5 ED data (ED.5) decoded per ED.4 (HL7 table 0299: Base64, Hex); too large a value is
    refused before it is decoded."""
    encoding = segment.component(5, 4).upper()
    data = "".join(segment.component(5, 5).split())
    where = segment.where(5)
    limit = request_documents.decoded_size(len(data)) if encoding == "BASE64" else len(data) // 2
    if limit > max_bytes + 2:
        raise Rejected("AE", "102", f"attached document larger than the {max_bytes} bytes accepted", where)
    try:
        if encoding == "BASE64":
            return base64.b64decode(data, validate=True)
        if encoding == "HEX":
            return bytes.fromhex(data)
    except (binascii.Error, ValueError):
        text = f"attached document: ED data is not valid {encoding.lower()}"
        raise Rejected("AE", "102", text, where) from None
    raise Rejected(
        "AE", "102", f"attached document: ED encoding {encoding or 'none'!r} (Base64 or Hex expected)", where
    )


def documents(order: Order, *, max_bytes: int) -> list[request_documents.DocumentUpload]:
    """The documents an order carries: its OBX of type ED (but the TLR_OBSERVATION items), checked
    (:func:`simral.reading.documents.read_document`); :class:`Rejected` AE 102 otherwise."""
    found = []
    for segment in order.all("OBX"):
        code = segment.component(3, 1)
        if segment.component(2, 1).upper() != "ED" or code.upper() in ED_ITEMS:
            continue
        data = decoded_ed(segment, max_bytes)
        try:
            found.append(
                request_documents.read_document(
                    data,
                    max_bytes=max_bytes,
                    label=f"attached document {segment.where(5)}",
                    title=segment.component(3, 2),
                    document_date=_timestamp(segment.component(14, 1)),
                    type_code=code,
                )
            )
        except ReadingError as exc:
            raise Rejected("AE", exc.code, str(exc), segment.where(5)) from None
    return found


def request_details(order: Order) -> RequestDetails:
    """A flux 1 (or IHE OMI NW) order's content: ORC, OBR-13, NTE (finalité), OBX groups, IPC."""
    number, authority = order.placer()
    obr = order.first("OBR")
    modality = ""
    anatomy: list[dict[str, str]] = []
    history: list[str] = []
    purposes: list[str] = []
    height = weight = None
    pregnancy = ""
    for segment in order.segments:
        if segment.name == "NTE":
            comment = "\n".join(segment.text(rep) for rep in segment.repetitions(3))
            kind = segment.component(4, 1).upper()
            if comment and kind == "MODALITE_IMAGERIE":
                purposes.append(f"[{kind}] {comment}")
            elif comment:
                purposes.append(comment)
        if segment.name != "OBX":
            continue
        code = segment.component(3, 1).upper()
        if code == "MODALITE_IMAGERIE":
            modality = segment.component(5, 1)
        elif code == "REGION_ANATOMIQUE":
            anatomy.append({**_coded(segment), "sub_id": segment.component(4, 1)})
        elif code == "11322-5":
            text = "\n".join(segment.text(rep) for rep in segment.repetitions(5))
            relevance = segment.component(8, 1)
            history.append(f"[{relevance}] {text}" if relevance else text)
        elif code == "8302-2":
            value, unit = _number(segment.component(5, 1)), segment.component(6, 1).lower()
            height = value * 100 if value is not None and unit == "m" else value
        elif code == "29463-7":
            value, unit = _number(segment.component(5, 1)), segment.component(6, 1).lower()
            weight = value / 1000 if value is not None and unit == "g" else value
        elif code == "82810-3":
            pregnancy = segment.component(5, 1).upper()
    ipc = order.first("IPC")
    return RequestDetails(
        placer_number=number,
        placer_authority=authority,
        requested_at=_timestamp(order.orc.component(9, 1)),
        priority=_priority(order),
        desired_delay=_desired_delay(order, datetime.now(UTC)),
        justification=obr.component(13, 1) if obr is not None else "",
        clinical_history="\n".join(history),
        purpose="\n".join(purposes),
        modality=modality,
        anatomy=anatomy,
        pregnancy=pregnancy,
        height_cm=height,
        weight_kg=weight,
        appointment_at=_appointment(order),
        requester=_requester(order),
        accession_number=ipc.component(1, 1) if ipc is not None else "",
        accession_authority=(ipc.component(1, 3) or ipc.component(1, 2)) if ipc is not None else "",
        study_uid=ipc.component(3, 1) if ipc is not None else "",
    )


# ------------------------------------------------------------------------ flux 4: complement


def _retention_days(tq1: Segment | None) -> int | None:
    """TQ1-6 service duration (CQ quantity ^ unit): days, or months / years converted."""
    if tq1 is None:
        return None
    quantity = _number(tq1.component(6, 1))
    if quantity is None:
        return None
    unit = tq1.component(6, 2).lower()
    factor = 365 if unit.startswith(("a", "y")) else 30 if unit.startswith(("mo", "mois")) else 1
    return int(quantity * factor)


def _viewer_url(segment: Segment) -> str:
    """OBX-5 ED (``^TEXT^^Base64^data``): the decoded partial URL (the raw data if not base64 text)."""
    data, encoding = segment.component(5, 5), segment.component(5, 4)
    if encoding.lower() != "base64":
        return data
    try:
        return base64.b64decode(data, validate=True).decode("utf-8")
    except ValueError:  # binascii.Error, UnicodeDecodeError, or non-ASCII text given as base64
        return data


def complement(order: Order) -> Complement:
    """A flux 4 order's content: IPC, TQ1, the OBX groups (sub-ids ``n.m``)."""
    ipc = order.first("IPC")
    if ipc is None:
        raise Rejected("AE", "101", "the post-exam complement has no IPC segment", "IPC")
    tq1 = order.first("TQ1")
    codes: list[dict[str, str]] = []
    anatomy: list[dict[str, str]] = []
    products: dict[str, dict[str, str]] = {}
    equipment: dict[str, dict[str, str]] = {}
    modality = viewer = ""
    for segment in order.all("OBX"):
        code = segment.component(3, 1).upper()
        occurrence, item = _sub_id(segment)
        if code == "URL_PARTIELLE_VIEWER":
            viewer = _viewer_url(segment)
        elif code == "CODE_ACTE_IMAGERIE":
            codes.append(_coded(segment))
        elif code == "REGION_ANATOMIQUE":
            anatomy.append({**_coded(segment), "sub_id": segment.component(4, 1)})
        elif code == "MODALITE_IMAGERIE":
            modality = segment.component(5, 1)
        elif code == "PRODUIT_ADMINISTRE":
            product = products.setdefault(occurrence, {})
            if item == "1":
                product.update(type=segment.component(5, 1), system=segment.component(5, 3))
            elif item == "2":
                product["lot"] = segment.component(5, 1)
            elif item == "3":
                product.update(quantity=segment.component(5, 1), unit=segment.component(6, 1))
        elif code == "APPAREIL_IMAGERIE":
            device = equipment.setdefault(occurrence, {})
            device["udi" if item == "1" else "model" if item == "2" else f"item_{item}"] = segment.component(
                5, 1
            )
    return Complement(
        accession_number=ipc.component(1, 1),
        accession_authority=ipc.component(1, 3) or ipc.component(1, 2),
        study_uid=ipc.component(3, 1),
        requested_procedure=ipc.component(2, 1),
        performed_at=_timestamp(tq1.component(7, 1)) if tq1 is not None else None,
        retention_days=_retention_days(tq1),
        exam_codes=codes,
        modality=modality,
        anatomy=anatomy,
        products=[products[key] for key in sorted(products)],
        equipment=[equipment[key] for key in sorted(equipment)],
        viewer_url=viewer,
    )


# ------------------------------------------------------------------------------- applying


def _existing(feed: Feed, order: Order, site_code: str) -> ImagingRequest:
    number, authority = order.placer()
    request = reading.find_by_placer(
        feed.session, site_code=site_code, placer_number=number, placer_authority=authority
    )
    if request is None:
        raise Rejected(
            "AE",
            "204",
            f"no request {number} ({authority or 'no authority'}) from {site_code}",
            order.orc.where(2),
        )
    return request


def _store(
    feed: Feed,
    request: ImagingRequest,
    uploads: list[request_documents.DocumentUpload],
    principal: Principal,
) -> None:
    if not uploads:
        return
    if feed.store is None:  # pragma: no cover - the MLLP listener always passes its store
        raise Rejected("AE", "207", "no blob store to keep the attached documents")
    request_documents.attach_documents(
        feed.session, feed.store, request, uploads, principal=principal, source=feed.source
    )


def _attach(feed: Feed, request: ImagingRequest, order: Order, principal: Principal) -> None:
    """A CDA-R2 document flow (ORU^R01) for a known request: its ED documents are added to it."""
    uploads = documents(order, max_bytes=feed.document_max_bytes)
    if not uploads:
        raise Rejected("AE", "101", "the ORU^R01 carries no document (OBX of type ED)", "OBX")
    _store(feed, request, uploads, principal)


def _hl7_order(header: Header, order: Order) -> dict[str, Any]:
    """What the answer needs of the order message (:mod:`simral.hl7.answers`): its type (MSH-9),
    its control id (MSH-10, for MSA-2 of an ORL^O22) and the ordered service (OBR-4)."""
    obr = order.first("OBR")
    service = (
        {"code": obr.component(4, 1), "text": obr.component(4, 2), "system": obr.component(4, 3)}
        if obr is not None
        else {}
    )
    return {
        "message": f"{header.message_type}^{header.event}",
        "control_id": header.control_id,
        "service": {key: value for key, value in service.items() if value},
    }


def apply(feed: Feed, segments: list[Segment], header: Header) -> None:
    """Apply one ORM^O01 / OMI^O23 message (or an ORU^R01 carrying documents for a request) in the
    caller's transaction (one call per ORDER group)."""
    session = feed.session
    endpoint = reading.find_ris_endpoint(session, header.sending_application, header.sending_facility)
    if endpoint is None:
        raise Rejected(
            "AR",
            "207",
            f"{header.sending_application}^{header.sending_facility} is not a registered RIS "
            "(simral ris add)",
            "MSH^1^3",
        )
    site = endpoint.site_code
    principal = replace(feed.principal, organisation=site)
    source = f"hl7:{endpoint.name}"
    orders = _orders(segments)
    if not orders:
        raise Rejected("AR", "100", "the message has no ORC segment", "ORC")
    for order in orders:
        control = order.control
        try:
            if header.message_type == "OMI" and (control == "SR" or order.procedure == COMPLEMENT):
                reading.record_complement(
                    session, _existing(feed, order, site), complement(order), principal=principal
                )
            elif header.message_type == "ORU":
                _attach(feed, _existing(feed, order, site), order, principal)
            elif control == "NW":
                details = replace(request_details(order), hl7_order=_hl7_order(header, order))
                attached = documents(order, max_bytes=feed.document_max_bytes)
                created = reading.receive_request(
                    session,
                    site_code=site,
                    patient=_patient(segments, feed.encoding),
                    details=details,
                    principal=principal,
                    source=source,
                    allow_test_ins=feed.allow_test_ins,
                )
                _store(feed, created, attached, principal)
            elif control in ("CA", "DC"):
                reason = order.orc.component(16, 2) or order.orc.component(16, 1)
                reading.cancel_request(
                    session, _existing(feed, order, site), reason=reason, principal=principal
                )
            else:
                raise Rejected(
                    "AE",
                    "103",
                    f"order control {control!r} is not handled here (NW, CA, DC; SR in OMI^O23)",
                    order.orc.where(1),
                )
        except ReadingError as exc:
            if exc.circumstantial:
                raise Rejected("AR", "207", str(exc), order.orc.where(2)) from None
            raise Rejected("AE", exc.code, str(exc), order.orc.where(2)) from None
        except AccessDenied as exc:
            raise Rejected("AE", "207", str(exc), "MSH^1^3") from None
