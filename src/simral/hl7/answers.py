"""The answer to an imaging request, ANS Téléradiologie flux 3 "Réponse à la demande d'examen
d'imagerie": ORU^R01^ORU_R01, HL7 v2.5.1, MSH-21 ``1.0^CISIS_TLR_HL7_V2``, built with hl7apy.

- accepted: ORC-1 ``OK`` and one OBSERVATION group, OBX-2 ``ED``, OBX-3 ``PROTOCOLE_IMAGERIE``, the
  protocol text base64-encoded in OBX-5 (``^TEXT^^Base64^<data>``, the guide's "protocole
  encapsulé"), OBX-11 ``F``;
- refused: ORC-1 ``OC`` with the reason in ORC-16 (CE.2 text), no OBSERVATION group.

ORC-12 and OBR-16 name the radiologist who answered (XCN, national id ``8``+RPPS in the ASIP-SANTE-PS
authority 1.2.250.1.71.4.2.1, type IDNPS), ORC-17 ``PLATEFORME_TLR^^TLR_TYPE_ORGANISATION``, ORC-21
the teleradiology group (XON with its FINESS), OBR-4 ``REPONSE_DEMANDE^…^TLR_OBR_PROCEDURE``; PID is
the patient as the request named them (PAM France: INS and IPP in PID-3, birth name type L).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message

from simral.hl7.adt import Encoding
from simral.reading.models import REQUEST_ACCEPTED, REQUEST_REFUSED, ImagingRequest

VERSION = "2.5.1"
#: MSH-21 message profile of the ANS guide (version ^ name).
PROFILE = "1.0^CISIS_TLR_HL7_V2"
#: Authority of professionals' national ids (PS_IdNat) and of structures (Struct_IdNat).
PS_AUTHORITY = "ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO"
ST_AUTHORITY = "ASIP-SANTE-ST&1.2.250.1.71.4.2.2&ISO"
INS_NAMESPACE = "ASIP-SANTE-INS-NIR"
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
    msh = message.msh
    msh.msh_3 = _text(platform.application)
    msh.msh_4 = _text(platform.facility)
    msh.msh_5 = _text(receiver.application)
    msh.msh_6 = _text(receiver.facility)
    msh.msh_7 = (at or datetime.now(UTC)).strftime("%Y%m%d%H%M%S")
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = control_id
    msh.msh_11 = "P"
    msh.msh_12 = VERSION
    msh.msh_17 = "FRA"
    msh.msh_18 = "UNICODE UTF-8"
    msh.msh_21 = PROFILE

    patient = request.patient or {}
    pid = message.add_segment("PID")
    for name, values in _pid_fields(patient).items():
        for value in values:
            pid.add_field(name).value = value
    if patient.get("birth_date"):
        pid.pid_7 = _text(patient["birth_date"])
    if patient.get("sex"):
        pid.pid_8 = _text(patient["sex"])
    if patient.get("status"):
        pid.pid_32 = _text(patient["status"])

    kind = "ISO" if request.placer_authority else ""
    placer = f"{_text(request.placer_number)}^^{_text(request.placer_authority)}^{kind}"
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
    obr.obr_4 = "REPONSE_DEMANDE^Réponse à une demande d’examen d'imagerie^TLR_OBR_PROCEDURE"
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
