"""QIDO-RS (PS3.18 §10.6): query parameters → a C-FIND identifier → the archive's query service.

Matching is the archive's C-FIND matching (PS3.4 C.2.2.2: single value, list of UIDs, wildcards,
ranges), so DIMSE and DICOMweb answer the same question the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from sqlalchemy.orm import Session

from simral.access.policy import Principal
from simral.archive import query
from simral.archive.query import Level, QueryError

#: Most matches one query returns; more are refused with a ``Warning`` (PS3.18 8.3.4.4).
MAX_RESULTS = 10000

#: Attributes returned by default (PS3.18 Tables 10.6.3-3 to 10.6.3-5), plus StudyDescription.
DEFAULT_RETURN: dict[str, tuple[str, ...]] = {
    "STUDY": (
        "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
        "StudyDescription", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
        "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    ),
    "SERIES": (
        "Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime", "RequestAttributesSequence", "StudyInstanceUID",
    ),
    "IMAGE": (
        "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
        "NumberOfFrames", "StudyInstanceUID", "SeriesInstanceUID",
    ),
}  # fmt: skip

#: What ``includefield=all`` adds at study and series level: the Patient, General Study, Patient
#: Study and General Series / Equipment modules (PS3.3 C.7.1.1, C.7.2.1, C.7.2.2, C.7.3.1, C.7.5.1).
ALL_FIELDS: dict[str, frozenset[str]] = {
    "STUDY": frozenset({
        "00100010", "00100020", "00100021", "00100024", "00100030", "00100032", "00100040", "00101000",
        "00101001", "00101002", "00102160", "00104000", "0020000D", "00080020", "00080030", "00080090",
        "00080096", "0008009C", "00200010", "00080050", "00080051", "00081030", "00081048", "00081060",
        "00321033", "00081032", "00401012", "00081080", "00101010", "00101020", "00101030", "00102180",
        "001021B0", "001021C0", "00080005",
    }),
    "SERIES": frozenset({
        "00080060", "0020000E", "00200011", "00200060", "00080021", "00080031", "00081050", "00181030",
        "0008103E", "00081070", "00180015", "00185100", "00400244", "00400245", "00400253", "00400254",
        "00400275", "00200052", "00080070", "00080080", "00081010", "00081090", "0020000D", "00080005",
    }),
}  # fmt: skip


@dataclass
class QidoQuery:
    """A parsed QIDO-RS request."""

    level: Level
    identifier: Dataset
    limit: int | None
    offset: int
    fuzzy: bool
    include_all: bool


def _tag_of(attribute: str) -> int:
    name = attribute.strip()
    if "." in name:
        raise QueryError(f"sequence matching ({name}) is not supported", status=0xC000)
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        return int(name, 16)
    tag = tag_for_keyword(name)
    if tag is None:
        raise QueryError(f"unknown attribute {name!r}", status=0xC000)
    return int(tag)


def _vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


def _add_key(identifier: Dataset, tag: int, value: str | None) -> None:
    vr = _vr(tag)
    if vr in {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}:
        raise QueryError(f"{keyword_for_tag(tag) or f'{tag:08X}'} cannot be a query key", status=0xC000)
    if vr == "SQ":
        if value:
            raise QueryError("sequence matching is not supported", status=0xC000)
        identifier.add_new(tag, vr, [])
        return
    if vr == "UI" and value:
        value = value.replace(",", "\\")  # UID list matching (PS3.18 8.3.4.1)
    identifier.add_new(tag, vr, value if value else None)


def _int_option(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise QueryError(f"{name} must be a non-negative integer", status=0xC000) from None
    if value < 0:
        raise QueryError(f"{name} must be a non-negative integer", status=0xC000)
    return value


def parse(level: Level, params: Sequence[tuple[str, str]], fixed: dict[str, str]) -> QidoQuery:
    """Build the identifier of a QIDO-RS request (PS3.18 8.3.4: match, includefield, paging).

    ``fixed`` holds the UIDs of the resource path (``/studies/{uid}/series``).
    """
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    matching: dict[int, list[str]] = {}
    include: list[int] = []
    limit: int | None = None
    offset = 0
    fuzzy = include_all = False
    for name, value in params:
        if name == "limit":
            limit = _int_option(name, value)
        elif name == "offset":
            offset = _int_option(name, value)
        elif name == "fuzzymatching":
            if value.lower() not in {"true", "false"}:
                raise QueryError("fuzzymatching must be true or false", status=0xC000)
            fuzzy = value.lower() == "true"
        elif name == "includefield":
            for field in value.split(","):
                if field.strip().lower() == "all":
                    include_all = True
                elif field.strip():
                    include.append(_tag_of(field))
        else:
            matching.setdefault(_tag_of(name), []).append(value)
    for keyword, uid in fixed.items():
        matching[int(Tag(keyword))] = [uid]
    for keyword in DEFAULT_RETURN[level]:
        tag = int(Tag(keyword))
        if tag not in matching:
            _add_key(identifier, tag, None)
    for tag in include:
        if tag not in matching and tag not in identifier:
            _add_key(identifier, tag, None)
    for tag, values in matching.items():
        if tag in identifier:
            del identifier[tag]
        _add_key(identifier, tag, "\\".join(values))
    return QidoQuery(level, identifier, limit, offset, fuzzy, include_all)


def search(
    session: Session, qido: QidoQuery, *, principal: Principal, dicomweb_root: str
) -> tuple[list[dict[str, object]], bool]:
    """Run the query; return the DICOM JSON matches and whether more remain beyond the limit."""
    query_plan = query.plan(qido.identifier, fuzzy_names=qido.fuzzy)
    wanted = MAX_RESULTS if qido.limit is None else min(qido.limit, MAX_RESULTS)
    matches: list[dict[str, object]] = []
    more = False
    for result in query.run(session, query_plan, principal=principal, limit=wanted + 1, offset=qido.offset):
        if len(matches) == wanted:
            more = True
            break
        out: dict[str, object] = {}
        if qido.include_all:
            meta = result.meta
            allowed = ALL_FIELDS.get(qido.level)
            out.update({tag: element for tag, element in meta.items() if allowed is None or tag in allowed})
        out.update(query.response_json(result, query_plan))
        study_uid = result.study.study_uid if result.study else ""
        url = f"{dicomweb_root}/studies/{study_uid}"
        if result.series is not None:
            url += f"/series/{result.series.series_uid}"
        if result.instance is not None:
            url += f"/instances/{result.instance.sop_uid}"
        out["00080056"] = {"vr": "CS", "Value": ["ONLINE"]}
        out["00081190"] = {"vr": "UR", "Value": [url]}
        matches.append(dict(sorted(out.items())))
    return matches, more
