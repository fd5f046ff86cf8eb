"""The answer to an imaging request (DESIGN.md §7 flux 3), in the shape the order asked for.

**ANS Téléradiologie flux 3** "Réponse à la demande d'examen d'imagerie", to the requests of the
ANS guide (flux 1, ORM^O01): ORU^R01^ORU_R01, HL7 v2.5.1, MSH-21 ``1.0^CISIS_TLR_HL7_V2``
(:func:`build_answer`).

- accepted: ORC-1 ``OK`` and one OBSERVATION group, OBX-2 ``ED``, OBX-3 ``PROTOCOLE_IMAGERIE``, the
  protocol text base64-encoded in OBX-5 (``^TEXT^^Base64^<data>``, the guide's "protocole
  encapsulé"), OBX-11 ``F``;
- refused: ORC-1 ``OC`` with the reason in ORC-16 (CE.2 text), no OBSERVATION group.

ORC-12 and OBR-16 name the radiologist who answered (XCN, national id ``8``+RPPS in the ASIP-SANTE-PS
authority 1.2.250.1.71.4.2.1, type IDNPS), ORC-17 ``PLATEFORME_TLR^^TLR_TYPE_ORGANISATION``, ORC-21
the teleradiology group (XON with its FINESS), OBR-4 ``REPONSE_DEMANDE^…^TLR_OBR_PROCEDURE``; PID is
the patient as the request named them (PAM France: INS and IPP in PID-3, birth name type L).

**ORL^O22** (HL7 v2.5.1 §4.4.6 order response, ORL_O22 structure), to a RIS that sent its order as
an IHE RAD SWF OMI^O23 ORC-1 ``NW`` (:func:`build_order_response`). The ANS guide (specifications
techniques, "Évènements déclenchants" and "Flux 3") defines the answer only for its own flux 1: an
ORU^R01 that "ne s'appuie sur aucun profil IHE"; new orders as OMI^O23 are not part of it (its
OMI^O23 is flux 4, ORC-1 ``SR``). So the ANS requesters keep flux 3, and a RIS speaking the IHE
order messages gets the HL7 order response the issue asks for, ORL^O22, as the same durable answer
(the job queue, retried until the RIS acknowledges it). HL7 v2.5.1 pairs OMI^O23 with ORI^O24 (§4.4.10,
structure ORI_O24); ORL^O22 is the OML^O21 response, kept here because the project's issue names it.

- MSA: ``AA`` and MSA-2 the control id (MSH-10) of the OMI^O23 it answers;
- PID: as above; ORC-1 ``OK`` (HL7 table 0119 "Order/service accepted & OK") or ``UA`` ("Unable
  to accept order/service": the filler refuses a new order) with the reason in ORC-16 (CE.2 text);
  ORC-2 / OBR-2 the placer number, ORC-3 / OBR-3 simral's filler number (the request id in the
  platform's namespace), ORC-5 the order status (table 0038: ``SC`` scheduled, ``CA`` cancelled),
  ORC-12 the requester as ordered, ORC-19 (action by) the radiologist who answered, ORC-21 the group;
- TQ1 (accepted): TQ1-7 the scheduled start, TQ1-9 the priority (``S`` urgent, ``R`` routine);
- OBR-4 the ordered service as the OMI's OBR-4 gave it;
- the protocol: ORL_O22 has no OBX and no NTE inside the order group, so the protocol travels in
  the message's NTE (NTE-3 the text, lines as repetitions; NTE-4 ``PROTOCOLE_IMAGERIE^Protocole
  d'imagerie médicale^TLR_OBSERVATION``, the ANS guide's code for it).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message

from simral.hl7.adt import Encoding
from simral.reading.models import (
    PRIORITY_URGENT,
    REQUEST_ACCEPTED,
    REQUEST_REFUSED,
    ImagingRequest,
    ScheduledProcedure,
)

VERSION = "2.5.1"
#: MSH-21 message profile of the ANS guide (version ^ name).
PROFILE = "1.0^CISIS_TLR_HL7_V2"
#: Authority of professionals' national ids (PS_IdNat) and of structures (Struct_IdNat).
PS_AUTHORITY = "ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO"
ST_AUTHORITY = "ASIP-SANTE-ST&1.2.250.1.71.4.2.2&ISO"
INS_NAMESPACE = "ASIP-SANTE-INS-NIR"
#: The order message (MSH-9.1^9.2) whose senders get an ORL^O22 rather than the flux 3 ORU^R01.
IHE_ORDER = "OMI^O23"
#: OBR-4 of the flux 3 answer (table TLR_OBR_PROCEDURE); of an ORL^O22 whose order had no OBR-4.
ANSWER_PROCEDURE = "REPONSE_DEMANDE^Réponse à une demande d’examen d'imagerie^TLR_OBR_PROCEDURE"
PROTOCOL_CODE = "PROTOCOLE_IMAGERIE^Protocole d'imagerie médicale^TLR_OBSERVATION"
_ENC = Encoding()


@dataclass(frozen=True)
class Party:
    """An application and facility (MSH-3/4 or MSH-5/6), with the organisation's name and FINESS."""

    application: str
    facility: str = ""
    name: str = ""
    finess: str = ""


@dataclass(frozen=True)
class Responder:
    """The radiologist who answered (ORC-12 / OBR-16)."""

    national_id: str
    name: str


def _text(value: Any) -> str:
    """A value escaped for one component (HL7 v2.5.1 §2.7)."""
    return _ENC.escape_text(str(value or ""))


def _pid_fields(patient: dict[str, Any]) -> dict[str, list[str]]:
    identifiers = []
    if patient.get("ins"):
        identifiers.append(
            f"{_text(patient['ins'])}^^^{INS_NAMESPACE}&{_text(patient.get('ins_oid'))}&ISO^INS"
        )
    if patient.get("ipp"):
        identifiers.append(
            f"{_text(patient['ipp'])}^^^{_text(patient.get('ipp_namespace'))}&{_text(patient.get('ipp_oid'))}"
            f"&{'ISO' if patient.get('ipp_oid') else ''}^PI"
        )
    names = [
        f"{_text(patient.get('birth_name'))}^{_text(patient.get('first_birth_given_name'))}"
        f"^{_text(patient.get('birth_given_names'))}^^^^L"
    ]
    if patient.get("used_name"):
        names.append(f"{_text(patient['used_name'])}^{_text(patient.get('used_given_name'))}^^^^^D")
    places = [f"^^^^^^BDL^^{_text(patient['birth_place_code'])}"] if patient.get("birth_place_code") else []
    return {"PID_3": identifiers, "PID_5": names, "PID_11": places}


def add_msh(
    message: Message,
    message_type: str,
    control_id: str,
    *,
    platform: Party,
    receiver: Party,
    at: datetime | None = None,
) -> Any:
    """Fill ``message``'s MSH (HL7 v2.5.1 §2.14.9) for a message from ``platform`` to ``receiver``:
    MSH-9 ``message_type``, MSH-10 ``control_id``, production, French, UTF-8; the MSH segment."""
    msh = message.msh
    msh.msh_3 = _text(platform.application)
    msh.msh_4 = _text(platform.facility)
    msh.msh_5 = _text(receiver.application)
    msh.msh_6 = _text(receiver.facility)
    msh.msh_7 = (at or datetime.now(UTC)).strftime("%Y%m%d%H%M%S")
    msh.msh_9 = message_type
    msh.msh_10 = control_id
    msh.msh_11 = "P"
    msh.msh_12 = VERSION
    msh.msh_17 = "FRA"
    msh.msh_18 = "UNICODE UTF-8"
    return msh


def add_pid(parent: Any, patient: dict[str, Any]) -> None:
    """A PID segment for ``patient`` (a request's identity copy), added to ``parent`` (a message or a
    group): identifiers (INS, IPP), names, birth date and place, sex, identity reliability (PID-32)."""
    pid = parent.add_segment("PID")
    for name, values in _pid_fields(patient).items():
        for value in values:
            pid.add_field(name).value = value
    if patient.get("birth_date"):
        pid.pid_7 = _text(patient["birth_date"])
    if patient.get("sex"):
        pid.pid_8 = _text(patient["sex"])
    if patient.get("status"):
        pid.pid_32 = _text(patient["status"])


def _placer(request: ImagingRequest) -> str:
    """ORC-2: the placer order number with its assigning authority (EI)."""
    kind = "ISO" if request.placer_authority else ""
    return f"{_text(request.placer_number)}^^{_text(request.placer_authority)}^{kind}"


def _xcn(responder: Responder) -> str:
    if not responder.national_id:
        return f"^{_text(responder.name)}"
    return f"{_text(responder.national_id)}^{_text(responder.name)}^^^^^^^{PS_AUTHORITY}^D^^^IDNPS"


def build_answer(
    request: ImagingRequest,
    *,
    control_id: str,
    receiver: Party,
    platform: Party,
    responder: Responder,
    at: datetime | None = None,
) -> str:
    """The flux 3 message (segments separated by CR) answering ``request``, accepted or refused."""
    if request.state not in (REQUEST_ACCEPTED, REQUEST_REFUSED):
        raise ValueError(f"request {request.id} is {request.state}: only an answered request has an answer")
    accepted = request.state == REQUEST_ACCEPTED
    message = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.TOLERANT)
    msh = add_msh(message, "ORU^R01^ORU_R01", control_id, platform=platform, receiver=receiver, at=at)
    msh.msh_21 = PROFILE

    patient = request.patient or {}
    add_pid(message, patient)

    placer = _placer(request)
    orc = message.add_segment("ORC")
    orc.orc_1 = "OK" if accepted else "OC"
    orc.orc_2 = placer
    orc.orc_12 = _xcn(responder)
    if not accepted and request.refusal_reason:
        orc.orc_16 = f"^{_text(request.refusal_reason)[:199]}"
    orc.orc_17 = "PLATEFORME_TLR^^TLR_TYPE_ORGANISATION"
    facility_name = _text(platform.name or platform.facility)
    orc.orc_21 = (
        f"{facility_name}^^^^^{ST_AUTHORITY}^FINEG^^^{_text(platform.finess)}"
        if platform.finess
        else facility_name
    )

    obr = message.add_segment("OBR")
    obr.obr_2 = placer
    obr.obr_4 = ANSWER_PROCEDURE
    obr.obr_16 = _xcn(responder)

    if accepted:
        obx = message.add_segment("OBX")
        obx.obx_1 = "1"
        obx.obx_2 = "ED"
        obx.obx_3 = "PROTOCOLE_IMAGERIE^Protocole d'imagerie médicale^TLR_OBSERVATION"
        data = base64.b64encode(request.protocol.encode("utf-8")).decode("ascii")
        obx.obx_5 = f"^TEXT^^Base64^{data}"
        obx.obx_11 = "F"
    return str(message.to_er7()) + "\r"


def answers_with_orl(request: ImagingRequest) -> bool:
    """Whether the request's answer is an ORL^O22 (its order was an IHE OMI^O23)."""
    return (request.hl7_order or {}).get("message") == IHE_ORDER


def _hl7_time(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.strftime("%Y%m%d%H%M%S%z")


def _requester_xcn(requester: dict[str, Any]) -> str:
    """ORC-12 as the order gave it (id ^ family ^ given ^^^ prefix ^^^ authority ^ … IDNPS)."""
    if not (requester.get("id") or requester.get("family")):
        return ""
    authority = f"&{_text(requester['authority'])}&ISO" if requester.get("authority") else ""
    return (
        f"{_text(requester.get('id'))}^{_text(requester.get('family'))}^{_text(requester.get('given'))}"
        f"^^^{_text(requester.get('prefix'))}^^^{authority}"
    ).rstrip("^")


def build_order_response(
    request: ImagingRequest,
    *,
    control_id: str,
    receiver: Party,
    platform: Party,
    responder: Responder,
    step: ScheduledProcedure | None = None,
    at: datetime | None = None,
) -> str:
    """The ORL^O22 (segments separated by CR) answering an IHE OMI^O23 ``request``: accepted (ORC-1
    OK, the protocol in NTE) or refused (ORC-1 UA, the reason in ORC-16)."""
    if request.state not in (REQUEST_ACCEPTED, REQUEST_REFUSED):
        raise ValueError(f"request {request.id} is {request.state}: only an answered request has an answer")
    accepted = request.state == REQUEST_ACCEPTED
    order = request.hl7_order or {}
    message = Message("ORL_O22", version=VERSION, validation_level=VALIDATION_LEVEL.TOLERANT)
    add_msh(message, "ORL^O22^ORL_O22", control_id, platform=platform, receiver=receiver, at=at)
    msa = message.add_segment("MSA")
    msa.msa_1 = "AA"
    msa.msa_2 = _text(order.get("control_id"))[:199]
    if accepted:
        nte = message.add_segment("NTE")
        nte.nte_1 = "1"
        nte.nte_2 = "L"  # HL7 table 0105: the ancillary (filler) department is the source
        for line in request.protocol.splitlines() or [""]:
            nte.add_field("NTE_3").value = _text(line)
        nte.nte_4 = PROTOCOL_CODE

    response = message.add_group("ORL_O22_RESPONSE")
    patient_group = response.add_group("ORL_O22_PATIENT")
    patient = request.patient or {}
    add_pid(patient_group, patient)

    placer = _placer(request)
    filler = f"{request.id}^{_text(platform.application)}"
    order_group = patient_group.add_group("ORL_O22_ORDER")
    orc = order_group.add_segment("ORC")
    orc.orc_1 = "OK" if accepted else "UA"
    orc.orc_2 = placer
    orc.orc_3 = filler
    orc.orc_5 = "SC" if accepted else "CA"
    requester = _requester_xcn(request.requester or {})
    if requester:
        orc.orc_12 = requester
    if not accepted and request.refusal_reason:
        orc.orc_16 = f"^{_text(request.refusal_reason)[:199]}"
    orc.orc_19 = _xcn(responder)
    facility_name = _text(platform.name or platform.facility)
    orc.orc_21 = (
        f"{facility_name}^^^^^{ST_AUTHORITY}^FINEG^^^{_text(platform.finess)}"
        if platform.finess
        else facility_name
    )
    if accepted and step is not None:
        tq1 = order_group.add_group("ORL_O22_TIMING").add_segment("TQ1")
        tq1.tq1_1 = "1"
        tq1.tq1_7 = _hl7_time(step.start_at)
        tq1.tq1_9 = "S" if request.priority == PRIORITY_URGENT else "R"
    obr = order_group.add_group("ORL_O22_OBSERVATION_REQUEST").add_segment("OBR")
    obr.obr_1 = "1"
    obr.obr_2 = placer
    obr.obr_3 = filler
    service = order.get("service") or {}
    ordered = "^".join(_text(service.get(part)) for part in ("code", "text", "system")).rstrip("^")
    obr.obr_4 = ordered or ANSWER_PROCEDURE
    return str(message.to_er7()) + "\r"


def build(
    request: ImagingRequest,
    *,
    control_id: str,
    receiver: Party,
    platform: Party,
    responder: Responder,
    step: ScheduledProcedure | None = None,
) -> str:
    """The answer the request's RIS expects: ORL^O22 for an IHE OMI^O23 order, else flux 3."""
    if answers_with_orl(request):
        return build_order_response(
            request,
            control_id=control_id,
            receiver=receiver,
            platform=platform,
            responder=responder,
            step=step,
        )
    return build_answer(
        request, control_id=control_id, receiver=receiver, platform=platform, responder=responder
    )
