"""Audit records as DICOM audit messages (PS3.15 A.5, the RFC 3881 schema with DICOM extensions)
in RFC 5424 syslog messages, framed for TLS transport per RFC 5425 (IHE ITI TF-2 3.20, ATNA).

One :class:`~simral.audit.models.AuditEvent` row gives one ``AuditMessage``: its event (PS3.15
A.5.3 event IDs and types), the requesting participant (the professional, node or link visitor,
with national id and network address) and simral as the application participant, the audit
source, and the patient and study as participant objects (PS3.15 A.5.2).
"""

from __future__ import annotations

import base64
import os
import socket
from datetime import UTC
from typing import Any

import orjson
from lxml import etree

from simral.audit.models import AuditEvent

#: (event ID code, meaning, EventActionCode, optional event type (code, meaning)) per action.
_EVENTS: dict[str, tuple[str, str, str, tuple[str, str] | None]] = {
    "login": ("110114", "User Authentication", "E", ("110122", "Login")),
    "logout": ("110114", "User Authentication", "E", ("110123", "Logout")),
    "session.switch-organisation": ("110114", "User Authentication", "E", None),
    "study.read": ("110103", "DICOM Instances Accessed", "R", None),
    "share-link.open": ("110103", "DICOM Instances Accessed", "R", None),
    "study.retrieve": ("110104", "DICOM Instances Transferred", "R", None),
    "study.forward": ("110104", "DICOM Instances Transferred", "R", None),
    "instance.store": ("110104", "DICOM Instances Transferred", "C", None),
    "query": ("110112", "Query", "E", None),
    "patient.query": ("110112", "Query", "E", None),
    "study.export": ("110106", "Export", "R", None),
    "study.export-deidentified": ("110106", "Export", "R", None),
    "deidentified-export.read": ("110110", "Patient Record", "R", None),
    "share.create": ("110106", "Export", "R", None),
    "share-link.create": ("110106", "Export", "R", None),
    "audit.search": ("110101", "Audit Log Used", "R", None),
    "break-glass.open": ("110113", "Security Alert", "E", ("110127", "Emergency Override Started")),
    "association.refused": ("110113", "Security Alert", "E", ("110126", "Node Authentication")),
    "user.create": ("110113", "Security Alert", "E", ("110136", "Security Roles Changed")),
    "user.role-add": ("110113", "Security Alert", "E", ("110136", "Security Roles Changed")),
    "user.password-set": ("110113", "Security Alert", "E", ("110137", "User security Attributes Changed")),
    "node.create": ("110113", "Security Alert", "E", ("110128", "Network Configuration")),
    "node.delete": ("110113", "Security Alert", "E", ("110128", "Network Configuration")),
    "route.create": ("110113", "Security Alert", "E", ("110128", "Network Configuration")),
    "route.delete": ("110113", "Security Alert", "E", ("110128", "Network Configuration")),
    "dicomweb-peer.create": ("110113", "Security Alert", "E", ("110128", "Network Configuration")),
    "ris-endpoint.create": ("110113", "Security Alert", "E", ("110128", "Network Configuration")),
    "ris-endpoint.delete": ("110113", "Security Alert", "E", ("110128", "Network Configuration")),
    "imaging-request.receive": ("110111", "Procedure Record", "C", None),
    "imaging-request.read": ("110111", "Procedure Record", "R", None),
    "imaging-request.document-add": ("110111", "Procedure Record", "C", None),
    "imaging-request.document-read": ("110111", "Procedure Record", "R", None),
}
#: IHE transactions a query record can name (``detail["transaction"]``): ITI TF-2 3.21.5.1,
#: 3.78.5, 3.83.5 give them as EventTypeCode and as the query object's ParticipantObjectIDTypeCode.
IHE_TRANSACTIONS = {
    "ITI-21": "Patient Demographics Query",
    "ITI-78": "Mobile Patient Demographics Query",
    "ITI-83": "Mobile Patient Identifier Cross-reference Query",
}
_QUERY_ACTIONS = frozenset({"query", "patient.query"})
_SECURITY_CONFIGURATION = ("110113", "Security Alert", "E", ("110129", "Security Configuration"))
_APPLICATION_ACTIVITY = ("110100", "Application Activity", "E", None)
#: EventOutcomeIndicator (PS3.15 A.5.1.1): success 0, minor failure 4, serious failure 8.
_OUTCOMES = {"success": "0", "warning": "4", "failure": "4"}


def event_for(action: str) -> tuple[str, str, str, tuple[str, str] | None]:
    """The PS3.15 A.5.3 event of a simral action."""
    if action in _EVENTS:
        return _EVENTS[action]
    if action.startswith("imaging-request."):
        return ("110111", "Procedure Record", "U", None)
    if action.startswith(("report.", "second-opinion.")):  # the report is part of the procedure record
        created = action in ("report.create", "report.addendum", "second-opinion.ask")
        return ("110111", "Procedure Record", "C" if created else "U", None)
    if action.startswith("patient.") or action == "hl7.message":
        return ("110110", "Patient Record", "C" if action.endswith("-create") else "U", None)
    if action.split(".", 1)[0] in ("token", "organisation", "job", "share", "share-link"):
        return _SECURITY_CONFIGURATION
    return _APPLICATION_ACTIVITY


def _code(parent: etree._Element, tag: str, code: str, system: str, meaning: str) -> etree._Element:
    return etree.SubElement(
        parent, tag, {"csd-code": code, "codeSystemName": system, "originalText": meaning}
    )


def audit_message(record: AuditEvent, *, source_id: str) -> bytes:
    """The ``AuditMessage`` XML of ``record`` (UTF-8, no declaration, one line)."""
    event_id, meaning, action_code, event_type = event_for(record.action)
    at = record.at if record.at.tzinfo else record.at.replace(tzinfo=UTC)
    root = etree.Element("AuditMessage")
    event = etree.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": action_code,
            "EventDateTime": at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "EventOutcomeIndicator": _OUTCOMES.get(record.outcome, "4"),
        },
    )
    _code(event, "EventID", event_id, "DCM", meaning)
    if event_type is not None:
        _code(event, "EventTypeCode", event_type[0], "DCM", event_type[1])
    transaction = str(record.detail.get("transaction", "")) if record.detail else ""
    if transaction in IHE_TRANSACTIONS:
        _code(event, "EventTypeCode", transaction, "IHE Transactions", IHE_TRANSACTIONS[transaction])
    etree.SubElement(
        event,
        "EventTypeCode",
        {"csd-code": record.action, "codeSystemName": "simral", "originalText": record.action},
    )
    if record.outcome != "success":
        etree.SubElement(event, "EventOutcomeDescription").text = str(
            record.detail.get("reason", record.outcome)
        )
    kind, _, name = record.actor.partition(":")
    requestor = {"UserID": name or record.actor, "UserIsRequestor": "true"}
    if record.actor_national_id:
        requestor["AlternativeUserID"] = record.actor_national_id
    if record.actor_organisation:
        requestor["UserName"] = f"{name} ({record.actor_organisation})"
    if record.source_address:
        requestor["NetworkAccessPointID"] = record.source_address
        requestor["NetworkAccessPointTypeCode"] = "2"
    participant = etree.SubElement(root, "ActiveParticipant", requestor)
    if kind == "dicom-node":
        _code(participant, "RoleIDCode", "110153", "DCM", "Source Role ID")
    application = etree.SubElement(
        root,
        "ActiveParticipant",
        {"UserID": source_id, "UserIsRequestor": "false", "AlternativeUserID": str(os.getpid())},
    )
    _code(application, "RoleIDCode", "110150", "DCM", "Application")
    source = etree.SubElement(
        root, "AuditSourceIdentification", {"AuditEnterpriseSiteID": "simral", "AuditSourceID": source_id}
    )
    etree.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})
    if record.patient_id:
        patient_id = record.patient_id + (f"^^^&{record.patient_issuer}&ISO" if record.patient_issuer else "")
        patient = etree.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": patient_id,
                "ParticipantObjectTypeCode": "1",
                "ParticipantObjectTypeCodeRole": "1",
            },
        )
        _code(patient, "ParticipantObjectIDTypeCode", "2", "RFC-3881", "Patient Number")
        etree.SubElement(patient, "ParticipantObjectName").text = record.patient_id
    if record.study_uid:
        study = etree.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": record.study_uid,
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "3",
            },
        )
        _code(study, "ParticipantObjectIDTypeCode", "110180", "DCM", "Study Instance UID")
        etree.SubElement(study, "ParticipantObjectName").text = record.study_uid
        _detail(study, record)
    elif record.detail:
        other = etree.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": f"simral-audit-{record.id}",
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "24" if record.action in _QUERY_ACTIONS else "13",
            },
        )
        if record.action in _QUERY_ACTIONS:
            if transaction in IHE_TRANSACTIONS:
                meaning = IHE_TRANSACTIONS[transaction]
                _code(other, "ParticipantObjectIDTypeCode", transaction, "IHE Transactions", meaning)
            else:
                _code(other, "ParticipantObjectIDTypeCode", "110112", "DCM", "Query")
            query = orjson.dumps(record.detail.get("keys", {}), option=orjson.OPT_SORT_KEYS)
            etree.SubElement(other, "ParticipantObjectQuery").text = base64.b64encode(query).decode()
        else:
            _code(other, "ParticipantObjectIDTypeCode", record.action, "simral", record.action)
            etree.SubElement(other, "ParticipantObjectName").text = record.action
        _detail(other, record)
    return bytes(etree.tostring(root, encoding="utf-8"))


def _detail(parent: etree._Element, record: AuditEvent) -> None:
    """Record id, chain hash and the record's own details as ValuePairs (base64, PS3.15 A.5.1)."""
    pairs: dict[str, Any] = {"simral-record": str(record.id), "simral-hash": record.hash}
    if record.detail:
        pairs["simral-detail"] = orjson.dumps(record.detail, option=orjson.OPT_SORT_KEYS).decode()
    for key, value in pairs.items():
        etree.SubElement(
            parent,
            "ParticipantObjectDetail",
            {"type": key, "value": base64.b64encode(str(value).encode()).decode()},
        )


#: RFC 5424 §6.2.1: facility 10 (security/authorization, "authpriv").
FACILITY_AUTHPRIV = 10
SEVERITY_WARNING, SEVERITY_NOTICE = 4, 5
BOM = b"\xef\xbb\xbf"


def syslog_message(record: AuditEvent, xml: bytes, *, hostname: str | None = None) -> bytes:
    """RFC 5424 §6 message: ``<PRI>1 TIMESTAMP HOST simral PROCID IHE+RFC-3881 - BOM XML`` (the
    MSGID IHE ITI TF-2 3.20.7.1 gives for DICOM/RFC 3881 audit messages)."""
    severity = SEVERITY_NOTICE if record.outcome == "success" else SEVERITY_WARNING
    at = record.at if record.at.tzinfo else record.at.replace(tzinfo=UTC)
    timestamp = at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    host = (hostname or socket.gethostname() or "-")[:255]
    header = f"<{FACILITY_AUTHPRIV * 8 + severity}>1 {timestamp} {host} simral {os.getpid()} IHE+RFC-3881 - "
    return header.encode("ascii", "replace") + BOM + xml


def octet_counted(message: bytes) -> bytes:
    """RFC 5425 §4.3 framing: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode() + b" " + message
