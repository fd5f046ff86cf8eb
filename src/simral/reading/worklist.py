"""Modality Worklist (PS3.4 K, Modality Worklist Information Model – FIND 1.2.840.10008.5.1.4.31).

A site's modalities ask, with C-FIND, for the procedures scheduled for them: every
:class:`ScheduledProcedure` of the calling node's organisation still SCHEDULED or IN PROGRESS,
joined to its :class:`ImagingRequest` and the patient identity, is one worklist item (PS3.4 K.6.1:
one Scheduled Procedure Step per item, with its Requested Procedure, Imaging Service Request and
Patient). The identifier's matching keys select items (PS3.4 C.2.2.2 single value, wildcard, list
of UIDs, ranges, sequence matching, and the combined date-time range of K.6.1.2.2 / C.2.2.2.5);
each answer carries the keys the identifier asked for (C.2.2.1.2 return keys).

The patient is shown as the site knows them: PatientID is the site's IPP with its Issuer of
Patient ID and ISO qualifier (PS3.3 Table 10-18); the INS goes in Other Patient IDs Sequence with
the ANS namespace (DESIGN.md §6) once the identity is qualified (RNIV: an INS is used only then).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import UTC, datetime, tzinfo
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from sqlalchemy import select
from sqlalchemy.orm import Session

from simral.access.policy import Principal, may_perform_procedures
from simral.dicom.matching import Match, normalise_da, normalise_tm, parse_match
from simral.patients.models import STATUS_QUAL, AssigningAuthority, PatientIdentity
from simral.patients.service import effective_identity, identity_traits
from simral.reading.models import (
    PRIORITY_URGENT,
    STEP_IN_PROGRESS,
    STEP_SCHEDULED,
    ImagingRequest,
    ScheduledProcedure,
)

#: Modality Worklist Information Model – FIND SOP Class (PS3.4 K.6.1.1.2).
MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"
#: Scheduled Procedure Step states a worklist shows (PS3.4 K.6.1: steps still to be performed).
WORKLIST_STATES = (STEP_SCHEDULED, STEP_IN_PROGRESS)

#: Issuer of Patient ID of an INS, by INS OID (NIR .8, NIA .9; test .10 and demonstration .11).
INS_NAMESPACES = {
    "1.2.250.1.213.1.4.8": "ASIP-SANTE-INS-NIR",
    "1.2.250.1.213.1.4.9": "ASIP-SANTE-INS-NIA",
    "1.2.250.1.213.1.4.10": "ASIP-SANTE-INS-NIR",
    "1.2.250.1.213.1.4.11": "ASIP-SANTE-INS-NIR",
}

_SPS = "ScheduledProcedureStepSequence"
#: Scheduled Procedure Step keys simral matches on (PS3.4 Table K.6-1: the required ones and the
#: optional ID, description and status).
_SPS_MATCHING = frozenset(
    {
        "ScheduledStationAETitle",
        "ScheduledProcedureStepStartDate",
        "ScheduledProcedureStepStartTime",
        "Modality",
        "ScheduledPerformingPhysicianName",
        "ScheduledProcedureStepID",
        "ScheduledProcedureStepDescription",
        "ScheduledProcedureStepStatus",
        "ScheduledStationName",
    }
)
#: Matching keys at the top level (keyword → the sub-keys matched inside a sequence, or None).
#: A value in any other key is a return key only: universal matching (PS3.4 C.2.2.1).
_MATCHING: dict[str, frozenset[str] | None] = {
    "PatientName": None,
    "PatientID": None,
    "IssuerOfPatientID": None,
    "PatientBirthDate": None,
    "PatientSex": None,
    "AccessionNumber": None,
    "RequestedProcedureID": None,
    "RequestedProcedureDescription": None,
    "RequestedProcedurePriority": None,
    "StudyInstanceUID": None,
    "PlacerOrderNumberImagingServiceRequest": None,
    "ReferringPhysicianName": None,
    "RequestingPhysician": None,
    _SPS: _SPS_MATCHING,
    "OtherPatientIDsSequence": frozenset({"PatientID", "IssuerOfPatientID"}),
}
#: Pregnancy Status (0010,21C0) for the request's LOINC 82810-3 answer.
_PREGNANCY = {"N": 1, "Y": 3, "UNK": 4}


class WorklistError(ValueError):
    """An identifier the worklist cannot answer; ``status`` is the C-FIND failure status."""

    def __init__(self, message: str, *, status: int = 0xA900) -> None:
        super().__init__(message)
        self.status = status


def local_timezone() -> tzinfo:
    """The modalities' wall clock (metropolitan France), in which scheduled dates and times are
    given (DA/TM carry no offset; PS3.5 §6.2)."""
    try:
        from zoneinfo import ZoneInfo

        return ZoneInfo("Europe/Paris")
    except Exception:  # no time zone database: UTC rather than nothing
        return UTC


# ------------------------------------------------------------------------------- the items


def _pn(family: str, given: str) -> str:
    return f"{family}^{given}" if given else family


def _issuer_qualifiers(oid: str) -> list[Dataset]:
    if not oid:
        return []
    qualifier = Dataset()
    qualifier.UniversalEntityID = oid
    qualifier.UniversalEntityIDType = "ISO"
    return [qualifier]


def _patient_from_identity(session: Session, identity: PatientIdentity) -> dict[str, Any]:
    identity = effective_identity(session, identity)
    authority = session.get(AssigningAuthority, identity.authority_id)
    return {
        "ipp": identity.local_id,
        "ipp_namespace": (authority.namespace or authority.organisation_code or "") if authority else "",
        "ipp_oid": (authority.oid or "") if authority else "",
        **identity_traits(identity),
    }


def _patient_module(ds: Dataset, patient: dict[str, Any]) -> None:
    """Patient Identification and Demographic attributes (PS3.4 Table K.6-1, PS3.3 C.7.1.1)."""
    family = str(patient.get("used_name") or patient.get("birth_name") or "")
    given = str(patient.get("used_given_name") or patient.get("first_birth_given_name") or "")
    ds.PatientName = _pn(family, given)
    ds.PatientID = str(patient.get("ipp") or "")[:64]
    ds.IssuerOfPatientID = str(patient.get("ipp_namespace") or "")[:64]
    ds.IssuerOfPatientIDQualifiersSequence = Sequence(_issuer_qualifiers(str(patient.get("ipp_oid") or "")))
    birth = str(patient.get("birth_name") or "")
    ds.PatientBirthName = _pn(birth, str(patient.get("birth_given_names") or "")) if birth else ""
    ds.PatientBirthDate = normalise_da(str(patient.get("birth_date") or ""))[:8]
    sex = str(patient.get("sex") or "").upper()[:1]
    ds.PatientSex = sex if sex in ("M", "F") else ("O" if sex else "")
    others: list[Dataset] = []
    ins, ins_oid = str(patient.get("ins") or ""), str(patient.get("ins_oid") or "")
    if ins and ins_oid and patient.get("status") == STATUS_QUAL:
        item = Dataset()
        item.PatientID = ins
        item.IssuerOfPatientID = INS_NAMESPACES.get(ins_oid, "ASIP-SANTE-INS-NIR")
        item.IssuerOfPatientIDQualifiersSequence = Sequence(_issuer_qualifiers(ins_oid))
        item.TypeOfPatientID = "TEXT"
        others.append(item)
    ds.OtherPatientIDsSequence = Sequence(others)


def _decimal(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"[:16]


def worklist_item(step: ScheduledProcedure, request: ImagingRequest, patient: dict[str, Any]) -> Dataset:
    """The complete worklist item of one scheduled step (PS3.4 Table K.6-1)."""
    start_date, start_time = scheduled_at(step.start_at)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    sps = Dataset()
    sps.ScheduledStationAETitle = step.station_ae
    sps.ScheduledProcedureStepStartDate = start_date
    sps.ScheduledProcedureStepStartTime = start_time
    sps.Modality = step.modality
    sps.ScheduledPerformingPhysicianName = ""
    sps.ScheduledProcedureStepDescription = step.description[:64]
    sps.ScheduledStationName = ""
    sps.ScheduledProcedureStepLocation = ""
    sps.ScheduledProcedureStepID = step.step_id
    sps.ScheduledProcedureStepStatus = step.state
    # The accepting radiologist's imaging protocol (ANS flux 3) for the technologist.
    sps.CommentsOnTheScheduledProcedureStep = request.protocol[:10240]
    ds.ScheduledProcedureStepSequence = Sequence([sps])
    # Requested Procedure (PS3.3 C.4.11).
    ds.RequestedProcedureID = step.requested_procedure_id
    ds.RequestedProcedureDescription = step.description[:64]
    ds.StudyInstanceUID = step.study_uid
    ds.RequestedProcedurePriority = "STAT" if request.priority == PRIORITY_URGENT else "ROUTINE"
    ds.ReasonForTheRequestedProcedure = (request.justification or request.purpose)[:64]
    # Imaging Service Request (PS3.3 C.4.13).
    ds.AccessionNumber = step.accession_number
    ds.IssuerOfAccessionNumberSequence = Sequence(
        [_accession_issuer(request.accession_authority)] if request.accession_authority else []
    )
    requester = request.requester or {}
    requesting = _pn(str(requester.get("family") or ""), str(requester.get("given") or ""))
    ds.RequestingPhysician = requesting
    ds.ReferringPhysicianName = requesting
    ds.PlacerOrderNumberImagingServiceRequest = request.placer_number[:16]
    ds.ImagingServiceRequestComments = request.clinical_history[:10240]
    # Patient (PS3.3 C.7.1.1) and what the request says of them.
    _patient_module(ds, patient)
    ds.PatientWeight = _decimal(request.weight_kg)
    ds.PatientSize = _decimal(request.height_cm / 100 if request.height_cm else None)
    pregnancy = _PREGNANCY.get(request.pregnancy.strip().upper())
    ds.add_new(0x001021C0, "US", pregnancy)
    return ds


def _accession_issuer(authority: str) -> Dataset:
    item = Dataset()
    item.UniversalEntityID = authority[:64]
    item.UniversalEntityIDType = "ISO"
    return item


# ---------------------------------------------------------------------------- matching


def _element(dataset: Dataset, keyword: str) -> DataElement | None:
    """The element ``keyword`` of ``dataset`` (not its value), or None."""
    return dataset.data_element(keyword) if keyword in dataset else None


def _text(element: Any) -> str:
    """An element's value as the matching rules read it (multiple values joined with '\\')."""
    if element is None or element.value is None:
        return ""
    value = element.value
    if isinstance(value, list | tuple | MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


def _stored(candidate: Dataset, keyword: str, vr: str) -> str:
    value = _text(_element(candidate, keyword))
    if vr == "DA":
        return normalise_da(value)
    if vr == "TM":
        return normalise_tm(value)
    return value.strip() if vr != "PN" else value


def _vr(keyword: str, element: Any) -> str:
    try:
        return str(dictionary_VR(keyword))
    except KeyError:
        return str(element.VR)


def _combined_range(query: Dataset) -> tuple[Match, Match] | None:
    """The Scheduled Procedure Step Start Date and Time as one date-time range when both are ranges
    (PS3.4 C.2.2.2.5.1), else None (each is matched on its own)."""
    date = parse_match(_text(_element(query, "ScheduledProcedureStepStartDate")), "DA")
    time = parse_match(_text(_element(query, "ScheduledProcedureStepStartTime")), "TM")
    if date.kind == "range" and time.kind == "range":
        return date, time
    return None


def _in_combined_range(candidate: Dataset, date: Match, time: Match) -> bool:
    stored_date = _stored(candidate, "ScheduledProcedureStepStartDate", "DA")
    stored_time = _stored(candidate, "ScheduledProcedureStepStartTime", "TM") or "000000.000000"
    if not stored_date:
        return False
    low_date, high_date = date.values
    low_time, high_time = time.values
    at = stored_date + stored_time
    low = (low_date + (low_time or "000000.000000")) if low_date else ""
    high = (high_date + (high_time or "235959.999999")) if high_date else ""
    return (not low or at >= low) and (not high or at <= high)


def matches(query: Dataset, candidate: Dataset, keys: dict[str, frozenset[str] | None] | None = None) -> bool:
    """Whether ``candidate`` (a worklist item, or an item of one of its sequences) matches every
    matching key of ``query`` (PS3.4 C.2.2.2; sequence matching C.2.2.2.6: some item of the
    candidate's sequence matches the query's item)."""
    keys = _MATCHING if keys is None else keys
    skipped: set[str] = set()
    if "ScheduledProcedureStepStartDate" in keys:
        combined = _combined_range(query)
        if combined is not None:
            if not _in_combined_range(candidate, *combined):
                return False
            skipped = {"ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime"}
    for element in query:
        keyword = element.keyword
        if not keyword or keyword not in keys or keyword in skipped:
            continue
        if element.VR == "SQ":
            sub_keys = keys[keyword]
            if sub_keys is None or not element.value:
                continue
            wanted = element.value[0]
            stored = _element(candidate, keyword)
            items = list(stored.value) if stored is not None and stored.value else [Dataset()]
            if not any(matches(wanted, item, dict.fromkeys(sub_keys)) for item in items):
                return False
            continue
        vr = _vr(keyword, element)
        match = parse_match(_text(element), vr)
        if match.kind == "universal":
            continue
        if not match.matches(_stored(candidate, keyword, vr)):
            return False
    return True


def response_identifier(query: Dataset, item: Dataset) -> Dataset:
    """The answer to ``query`` for a matching ``item``: the keys the query holds, with the item's
    values (zero length when the item has none; PS3.4 C.2.2.1.2, sequence keys C.2.2.2.6 — an empty
    sequence key returns the whole items)."""
    answer = Dataset()
    answer.SpecificCharacterSet = item.get("SpecificCharacterSet", "ISO_IR 192")
    for element in query:
        keyword = element.keyword
        if keyword == "SpecificCharacterSet":
            continue
        stored = _element(item, keyword) if keyword else None
        if element.VR == "SQ":
            stored_items = list(stored.value) if stored is not None and stored.value else []
            if element.value and len(element.value[0]):
                wanted = element.value[0]
                answer[element.tag] = copy.deepcopy(stored) if stored is not None else element
                answer[element.tag].value = Sequence([response_identifier(wanted, it) for it in stored_items])
                for answered in answer[element.tag].value:
                    if "SpecificCharacterSet" in answered:
                        del answered.SpecificCharacterSet
            else:
                answer.add_new(element.tag, "SQ", Sequence([copy.deepcopy(it) for it in stored_items]))
            continue
        if stored is not None:
            answer[element.tag] = copy.deepcopy(stored)
        else:
            answer.add_new(element.tag, element.VR if element.VR not in ("UN", "") else "UN", None)
    return answer


# ------------------------------------------------------------------------------- the query


def _single(query: Dataset, keyword: str, vr: str) -> Match:
    return parse_match(_text(_element(query, keyword)), vr)


def find(session: Session, query: Dataset, *, principal: Principal) -> Iterator[Dataset]:
    """The worklist items of the calling node's site matching ``query``, as answers (PS3.4 K.4.1.3).

    Only a node of the site (and the platform) sees a site's worklist; other principals get
    nothing. The usual unique keys (accession number, Study Instance UID, step ID, modality) narrow
    the database query; every key is then matched exactly.
    """
    site = principal.organisation
    statement = (
        select(ScheduledProcedure, ImagingRequest)
        .join(ImagingRequest, ImagingRequest.id == ScheduledProcedure.request_id)
        .where(ScheduledProcedure.state.in_(WORKLIST_STATES))
    )
    if principal.kind == "system" and not site:
        pass
    elif may_perform_procedures(principal, site):
        statement = statement.where(ScheduledProcedure.site_code == site)
    else:
        return
    accession = _single(query, "AccessionNumber", "SH")
    if accession.kind == "single":
        statement = statement.where(ScheduledProcedure.accession_number == accession.values[0])
    study = _single(query, "StudyInstanceUID", "UI")
    if study.kind in ("single", "list"):
        statement = statement.where(ScheduledProcedure.study_uid.in_(study.values))
    steps = _element(query, _SPS)
    if steps is not None and steps.value:
        wanted = steps.value[0]
        step_id = _single(wanted, "ScheduledProcedureStepID", "SH")
        if step_id.kind == "single":
            statement = statement.where(ScheduledProcedure.step_id == step_id.values[0])
        modality = _single(wanted, "Modality", "CS")
        if modality.kind == "single":
            statement = statement.where(ScheduledProcedure.modality == modality.values[0])
    statement = statement.order_by(ScheduledProcedure.start_at, ScheduledProcedure.id)
    for step, request in session.execute(statement):
        identity = session.get(PatientIdentity, request.identity_id) if request.identity_id else None
        patient = (
            _patient_from_identity(session, identity) if identity is not None else dict(request.patient or {})
        )
        item = worklist_item(step, request, patient)
        if matches(query, item):
            yield response_identifier(query, item)


def query_keys(query: Dataset) -> dict[str, str]:
    """The keys a query gave values to, for its audit record (sequence items flattened)."""
    keys: dict[str, str] = {}
    for element in query:
        if element.VR == "SQ":
            for item in element.value or []:
                keys.update(query_keys(item))
        elif element.keyword and element.value not in (None, ""):
            keys[element.keyword] = _text(element)[:200]
    return keys


def scheduled_at(value: datetime) -> tuple[str, str]:
    """A scheduled start as the worklist shows it: local DA and TM."""
    local = (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(local_timezone())
    return local.strftime("%Y%m%d"), local.strftime("%H%M%S")
