"""SOAP 1.2 transport of the DMP web services: envelopes with WS-Addressing 1.0 (Action, MessageID,
To, ReplyTo) and WS-Security 1.0 carrying the VIHF assertion (ITI TF-2x Appendix V "Web Services for
IHE Transactions"), MTOM/XOP packaging (W3C SOAP MTOM, XOP 1.0; ITI TF-2x §V.3.6), the ebRS
RegistryResponse (ITI TF-3 §4.2.4) and the TD0.2 HL7 v3 messages (DMP integration guide, "test
d'existence du DMP et vérification de l'autorisation d'accès": PRPA_IN201307UV02 / PRPA_IN201308UV02).
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from lxml import etree
from python_multipart.multipart import MultipartParser, parse_options_header

from simral.xds.metadata import RS

SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
WSA = "http://www.w3.org/2005/08/addressing"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
HL7 = "urn:hl7-org:v3"
ANONYMOUS = "http://www.w3.org/2005/08/addressing/anonymous"

ACTION_ITI41 = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
ACTION_ITI41_RESPONSE = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-bResponse"
ACTION_ITI57 = "urn:ihe:iti:2010:UpdateDocumentSet"
ACTION_ITI57_RESPONSE = "urn:ihe:iti:2010:UpdateDocumentSetResponse"
ACTION_TD02 = "urn:hl7-org:v3:PRPA_IN201307UV02"
ACTION_TD02_RESPONSE = "urn:hl7-org:v3:PRPA_IN201308UV02"

STATUS_SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
STATUS_FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"
STATUS_PARTIAL = "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"
SEVERITY_ERROR = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error"
SEVERITY_WARNING = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Warning"

#: TD0.2 reason code "test d'existence" and the OIDs of the DMP HL7 v3 messages.
TD02_REASON = ("TEST_EXST", "1.2.250.1.213.1.1.4.11")
HL7_INTERACTION_ROOT = "2.16.840.1.113883.1.6"
DMP_DEVICE_OID = "1.2.250.1.213.4.1.1.1"


class SoapFormatError(ValueError):
    """An answer that is not the SOAP 1.2 / MTOM message it should be."""


# --------------------------------------------------------------------------- envelope


def envelope(
    *,
    action: str,
    to: str,
    body: etree._Element,
    assertion: etree._Element | None,
    message_id: str | None = None,
) -> etree._Element:
    """A SOAP 1.2 envelope addressed with WS-Addressing, the VIHF in ``wsse:Security``."""
    env = etree.Element(f"{{{SOAP12}}}Envelope", nsmap={"soap": SOAP12, "wsa": WSA})
    header = etree.SubElement(env, f"{{{SOAP12}}}Header")
    action_el = etree.SubElement(header, f"{{{WSA}}}Action")
    action_el.set(f"{{{SOAP12}}}mustUnderstand", "true")
    action_el.text = action
    etree.SubElement(header, f"{{{WSA}}}MessageID").text = message_id or f"urn:uuid:{uuid.uuid4()}"
    reply_to = etree.SubElement(header, f"{{{WSA}}}ReplyTo")
    etree.SubElement(reply_to, f"{{{WSA}}}Address").text = ANONYMOUS
    to_el = etree.SubElement(header, f"{{{WSA}}}To")
    to_el.set(f"{{{SOAP12}}}mustUnderstand", "true")
    to_el.text = to
    if assertion is not None:
        security = etree.SubElement(header, f"{{{WSSE}}}Security", nsmap={"wsse": WSSE})
        security.set(f"{{{SOAP12}}}mustUnderstand", "true")
        security.append(assertion)
    etree.SubElement(env, f"{{{SOAP12}}}Body").append(body)
    return env


def body_of(env: etree._Element) -> etree._Element:
    """The first child of the SOAP Body."""
    body = env.find(f"{{{SOAP12}}}Body")
    if env.tag != f"{{{SOAP12}}}Envelope" or body is None or len(body) == 0:
        raise SoapFormatError("not a SOAP 1.2 envelope with a body")
    return body[0]


def header_text(env: etree._Element, tag: str) -> str | None:
    """A WS-Addressing header's text (``Action``, ``MessageID``, ``RelatesTo``, ``To``)."""
    return env.findtext(f"{{{SOAP12}}}Header/{{{WSA}}}{tag}")


# --------------------------------------------------------------------------- MTOM / XOP


@dataclass(frozen=True)
class MtomMessage:
    content_type: str
    body: bytes


def mtom_encode(env: etree._Element, attachments: dict[str, bytes], *, action: str) -> MtomMessage:
    """The envelope as the root part of a ``multipart/related`` XOP package, one binary part per
    attachment (XOP 1.0 §3; SOAP 1.2 MTOM §4.3: ``type="application/xop+xml"``, ``start-info``)."""
    boundary = f"MIMEBoundary_{uuid.uuid4().hex}"
    start = f"root.{uuid.uuid4().hex}@simral"
    parts = [
        (
            f"--{boundary}\r\n"
            "Content-Type: application/xop+xml; charset=UTF-8; "
            f'type="application/soap+xml"; action="{action}"\r\n'
            "Content-Transfer-Encoding: binary\r\n"
            f"Content-ID: <{start}>\r\n\r\n"
        ).encode()
        + etree.tostring(env, xml_declaration=True, encoding="UTF-8")
        + b"\r\n"
    ]
    for cid, content in attachments.items():
        parts.append(
            (
                f"--{boundary}\r\n"
                "Content-Type: application/octet-stream\r\n"
                "Content-Transfer-Encoding: binary\r\n"
                f"Content-ID: <{cid}>\r\n\r\n"
            ).encode()
            + content
            + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    content_type = (
        f'multipart/related; type="application/xop+xml"; boundary="{boundary}"; start="<{start}>"; '
        f'start-info="application/soap+xml; action=\\"{action}\\""'
    )
    return MtomMessage(content_type=content_type, body=b"".join(parts))


def _multipart_parts(boundary: bytes, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    parts: list[tuple[dict[str, str], bytes]] = []
    headers: dict[str, str] = {}
    field, value, data = bytearray(), bytearray(), bytearray()

    def on_part_begin() -> None:
        headers.clear()
        data.clear()

    def on_header_field(chunk: bytes, start: int, end: int) -> None:
        field.extend(chunk[start:end])

    def on_header_value(chunk: bytes, start: int, end: int) -> None:
        value.extend(chunk[start:end])

    def on_header_end() -> None:
        headers[field.decode("latin-1").lower()] = value.decode("latin-1").strip()
        field.clear()
        value.clear()

    def on_part_data(chunk: bytes, start: int, end: int) -> None:
        data.extend(chunk[start:end])

    def on_part_end() -> None:
        parts.append((dict(headers), bytes(data)))

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
        max_header_count=32,
    )
    parser.write(body)
    parser.finalize()
    return parts


def parse_message(content_type: str, body: bytes) -> tuple[etree._Element, dict[str, bytes]]:
    """A SOAP message, MTOM-packaged or plain: the envelope and the attachments by Content-ID (no
    brackets). ``xop:Include`` elements are left in place (callers resolve them by ``href``)."""
    media, params = parse_options_header(content_type)
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=True)
    if media != b"multipart/related":
        try:
            return etree.fromstring(body, parser), {}
        except etree.XMLSyntaxError as exc:
            raise SoapFormatError(f"not XML: {exc}") from None
    boundary = params.get(b"boundary")
    if not boundary:
        raise SoapFormatError("multipart/related without a boundary")
    parts = _multipart_parts(boundary, body)
    if not parts:
        raise SoapFormatError("empty multipart/related message")
    start = params.get(b"start", b"").decode("latin-1").strip("<>")
    root_index = next(
        (i for i, (h, _) in enumerate(parts) if h.get("content-id", "").strip("<>") == start), 0
    )
    _, root = parts[root_index]
    attachments = {
        h.get("content-id", "").strip("<>"): content
        for i, (h, content) in enumerate(parts)
        if i != root_index
    }
    try:
        return etree.fromstring(root, parser), attachments
    except etree.XMLSyntaxError as exc:
        raise SoapFormatError(f"MTOM root part is not XML: {exc}") from None


# --------------------------------------------------------------------------- RegistryResponse


@dataclass(frozen=True)
class RegistryError:
    """One ``rs:RegistryError`` (ITI TF-3 §4.2.4.2; codes in ITI TF-3 Table 4.2.4.1-2 or DMP-specific)."""

    code: str
    severity: str
    context: str
    location: str


@dataclass(frozen=True)
class RegistryResponse:
    status: str
    errors: tuple[RegistryError, ...]

    @property
    def success(self) -> bool:
        return self.status == STATUS_SUCCESS


def registry_response(element: etree._Element) -> RegistryResponse:
    """Read an ``rs:RegistryResponse``."""
    if element.tag != f"{{{RS}}}RegistryResponse":
        raise SoapFormatError(f"expected rs:RegistryResponse, got {element.tag}")
    errors = tuple(
        RegistryError(
            code=e.get("errorCode", ""),
            severity=e.get("severity", SEVERITY_ERROR),
            context=e.get("codeContext", ""),
            location=e.get("location", ""),
        )
        for e in element.iter(f"{{{RS}}}RegistryError")
    )
    return RegistryResponse(status=element.get("status", ""), errors=errors)


def registry_response_element(status: str, errors: tuple[RegistryError, ...] = ()) -> etree._Element:
    """Build an ``rs:RegistryResponse`` (used by registries and by tests' registries alike)."""
    response = etree.Element(f"{{{RS}}}RegistryResponse", nsmap={"rs": RS}, status=status)
    if errors:
        error_list = etree.SubElement(response, f"{{{RS}}}RegistryErrorList")
        for error in errors:
            etree.SubElement(
                error_list,
                f"{{{RS}}}RegistryError",
                errorCode=error.code,
                codeContext=error.context,
                location=error.location,
                severity=error.severity,
            )
    return response


@dataclass(frozen=True)
class SoapFault:
    code: str
    subcode: str
    reason: str


def soap_fault(env: etree._Element) -> SoapFault | None:
    """The SOAP 1.2 Fault of an answer, if it is one (SOAP 1.2 part 1 §5.4)."""
    fault = env.find(f"{{{SOAP12}}}Body/{{{SOAP12}}}Fault")
    if fault is None:
        return None
    return SoapFault(
        code=fault.findtext(f"{{{SOAP12}}}Code/{{{SOAP12}}}Value", ""),
        subcode=fault.findtext(f"{{{SOAP12}}}Code/{{{SOAP12}}}Subcode/{{{SOAP12}}}Value", ""),
        reason=fault.findtext(f"{{{SOAP12}}}Reason/{{{SOAP12}}}Text", ""),
    )


# --------------------------------------------------------------------------- TD0.2


def _hl7(parent: etree._Element, tag: str, **attrs: str) -> etree._Element:
    return etree.SubElement(parent, f"{{{HL7}}}{tag}", **attrs)


def td02_request(
    *, ins: str, ins_oid: str, sender_oid: str, sender_name: str, now: dt.datetime | None = None
) -> etree._Element:
    """TD0.2 request: HL7 v3 PRPA_IN201307UV02 (Patient Registry Get Demographics Query) with reason
    ``TEST_EXST`` and the patient's INS as the query parameter."""
    created = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).strftime("%Y%m%d%H%M%S")
    message = etree.Element(f"{{{HL7}}}PRPA_IN201307UV02", nsmap={None: HL7}, ITSVersion="XML_1.0")
    _hl7(message, "id", root=sender_oid, extension=str(uuid.uuid4()))
    _hl7(message, "creationTime", value=created)
    _hl7(message, "interactionId", root=HL7_INTERACTION_ROOT, extension="PRPA_IN201307UV02")
    _hl7(message, "processingCode", code="P")
    _hl7(message, "processingModeCode", code="T")
    _hl7(message, "acceptAckCode", code="AL")
    for role, oid, name, type_code in (
        ("receiver", DMP_DEVICE_OID, "DMP", "RCV"),
        ("sender", sender_oid, sender_name, "SND"),
    ):
        holder = _hl7(message, role, typeCode=type_code)
        device = _hl7(holder, "device", classCode="DEV", determinerCode="INSTANCE")
        _hl7(device, "id", root=oid)
        _hl7(device, "softwareName").text = name
    control = _hl7(message, "controlActProcess", classCode="CACT", moodCode="EVN")
    _hl7(control, "reasonCode", code=TD02_REASON[0], codeSystem=TD02_REASON[1])
    query = _hl7(control, "queryByParameter")
    _hl7(query, "queryId", root=sender_oid, extension=str(uuid.uuid4()))
    _hl7(query, "statusCode", code="new")
    parameters = _hl7(query, "parameterList")
    identifier = _hl7(parameters, "patientIdentifier")
    _hl7(identifier, "value", root=ins_oid, extension=ins)
    _hl7(identifier, "semanticsText").text = "Patient.id"
    return message


@dataclass(frozen=True)
class DmpPatientStatus:
    """TD0.2 answer: does the patient's DMP exist, may this professional feed it, and why not."""

    exists: bool
    authorised: bool
    authorisation: str | None  # VALIDE, EXPIREE, INTERDITE, NON_EXISTE… as the DMP says it
    reason: str | None


def td02_status(message: etree._Element) -> DmpPatientStatus:
    """Read a PRPA_IN201308UV02 answer: ``acknowledgement@typeCode`` (AA / AE / AR),
    ``queryAck/queryResponseCode`` (OK = the DMP exists, NF = it does not) and the ``attentionLine``
    keyword ``AUTORISATION`` (VALIDE when the professional is authorised)."""
    if message.tag != f"{{{HL7}}}PRPA_IN201308UV02":
        raise SoapFormatError(f"expected PRPA_IN201308UV02, got {message.tag}")
    ns = {"h": HL7}
    ack = message.find("h:acknowledgement", ns)
    ack_type = ack.get("typeCode", "") if ack is not None else ""
    response_code = message.find("h:controlActProcess/h:queryAck/h:queryResponseCode", ns)
    exists = response_code is not None and response_code.get("code") == "OK"
    authorisation: str | None = None
    for line in message.iterfind("h:attentionLine", ns):
        keyword = line.find("h:keyWordText", ns)
        if keyword is not None and keyword.get("code") == "AUTORISATION":
            value = line.find("h:value", ns)
            if value is not None:
                authorisation = value.get("code") or value.get("value")
    reason = message.findtext("h:acknowledgement/h:acknowledgementDetail/h:text", namespaces=ns)
    return DmpPatientStatus(
        exists=exists,
        authorised=ack_type == "AA" and exists and authorisation == "VALIDE",
        authorisation=authorisation,
        reason=reason,
    )
