"""Query/Retrieve matching over the index (PS3.4 C.4.1 C-FIND, C.6 information models).

An identifier (a pydicom Dataset with Query/Retrieve Level and matching/return keys) becomes an
SQL query on the indexed keys, a Python post-filter for the other keys (matched on the stored
DICOM JSON), and one response identifier per match holding exactly the requested keys plus the
unique keys of the levels (C.4.1.1.3.2).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from sqlalchemy import ColumnElement, Select, and_, false, or_, select, union
from sqlalchemy.orm import InstrumentedAttribute, Session

from simral.access.policy import AccessDenied, Principal, may_query, visible_studies
from simral.archive.counts import not_rejected
from simral.archive.models import Instance, Patient, Series, Study
from simral.dicom.matching import Match, parse_match, wildcard_to_like
from simral.patients import crossref
from simral.patients.crossref import ShownIdentity

Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
Model = Literal["PATIENT", "STUDY"]
LEVELS: tuple[Level, ...] = ("PATIENT", "STUDY", "SERIES", "IMAGE")


class QueryError(ValueError):
    """An identifier the SCP cannot process (PS3.4 C.4.1.1.4: status A900 / C000)."""

    def __init__(self, message: str, *, status: int = 0xA900) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Key:
    """An indexed matching key: its column and VR."""

    column: InstrumentedAttribute[Any]
    vr: str


KEYS: dict[Level, dict[str, Key]] = {
    "PATIENT": {
        "PatientName": Key(Patient.name_upper, "PN"),
        "PatientID": Key(Patient.patient_id, "LO"),
        "IssuerOfPatientID": Key(Patient.issuer, "LO"),
        "PatientBirthDate": Key(Patient.birth_date, "DA"),
        "PatientSex": Key(Patient.sex, "CS"),
    },
    "STUDY": {
        "StudyInstanceUID": Key(Study.study_uid, "UI"),
        "StudyDate": Key(Study.study_date, "DA"),
        "StudyTime": Key(Study.study_time, "TM"),
        "AccessionNumber": Key(Study.accession_number, "SH"),
        "StudyID": Key(Study.study_id, "SH"),
        "StudyDescription": Key(Study.description, "LO"),
        "ReferringPhysicianName": Key(Study.referring_physician_upper, "PN"),
    },
    "SERIES": {
        "SeriesInstanceUID": Key(Series.series_uid, "UI"),
        "Modality": Key(Series.modality, "CS"),
        "SeriesNumber": Key(Series.series_number, "IS"),
        "SeriesDescription": Key(Series.description, "LO"),
        "BodyPartExamined": Key(Series.body_part, "CS"),
        "SeriesDate": Key(Series.series_date, "DA"),
        "SeriesTime": Key(Series.series_time, "TM"),
    },
    "IMAGE": {
        "SOPInstanceUID": Key(Instance.sop_uid, "UI"),
        "SOPClassUID": Key(Instance.sop_class_uid, "UI"),
        "InstanceNumber": Key(Instance.instance_number, "IS"),
    },
}

UNIQUE_KEY: dict[Level, str] = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}

#: Attributes computed by the SCP rather than read from a header (PS3.4 C.6.1.1.2-5, C.6.2.1.2).
COMPUTED: dict[str, Level] = {
    "NumberOfPatientRelatedStudies": "PATIENT",
    "NumberOfPatientRelatedSeries": "PATIENT",
    "NumberOfPatientRelatedInstances": "PATIENT",
    "NumberOfStudyRelatedSeries": "STUDY",
    "NumberOfStudyRelatedInstances": "STUDY",
    "ModalitiesInStudy": "STUDY",
    "SOPClassesInStudy": "STUDY",
    "NumberOfSeriesRelatedInstances": "SERIES",
}
COMPUTED_VR: dict[str, str] = {
    keyword: ("CS" if keyword == "ModalitiesInStudy" else "UI" if keyword == "SOPClassesInStudy" else "IS")
    for keyword in COMPUTED
}
#: Study-level keys matched against the study's series or instances.
STUDY_MEMBERSHIP: dict[str, tuple[InstrumentedAttribute[Any], str]] = {
    "ModalitiesInStudy": (Series.modality, "CS"),
    "SOPClassesInStudy": (Instance.sop_class_uid, "UI"),
}
ALWAYS_SKIPPED = {
    "QueryRetrieveLevel",
    "SpecificCharacterSet",
    "RetrieveAETitle",
    "InstanceAvailability",
    "TimezoneOffsetFromUTC",
}

_ENTITY = {"PATIENT": Patient, "STUDY": Study, "SERIES": Series, "IMAGE": Instance}


def _column_clause(column: InstrumentedAttribute[Any], match: Match, vr: str) -> ColumnElement[bool]:
    if vr == "IS":
        try:
            numbers = [int(v) for v in match.values]
        except ValueError:
            return false()
        return column.in_(numbers) if match.kind == "list" else column == numbers[0]
    if match.kind == "single":
        if vr == "PN":
            value = match.values[0]
            return or_(
                column == value,
                column.like(wildcard_to_like(value) + "=%", escape="!"),
                column.like("%=" + wildcard_to_like(value), escape="!"),
            )
        return column == match.values[0]
    if match.kind == "list":
        return column.in_(match.values)
    if match.kind == "wildcard":
        like = wildcard_to_like(match.values[0])
        if vr == "PN":
            return or_(
                column.like(like, escape="!"),
                column.like(like + "=%", escape="!"),
                column.like("%=" + like, escape="!"),
            )
        return column.like(like, escape="!")
    low, high = match.values
    clauses = [column != ""]
    if low:
        clauses.append(column >= low)
    if high:
        clauses.append(column <= high)
    return and_(*clauses)


def json_text(element: dict[str, Any] | None) -> str:
    """The value of a DICOM JSON element as backslash-joined text (PN: alphabetic group)."""
    if not element:
        return ""
    values = element.get("Value") or []
    out = []
    for value in values:
        if isinstance(value, dict):
            out.append(
                "=".join(value.get(g, "") for g in ("Alphabetic", "Ideographic", "Phonetic")).rstrip("=")
            )
        else:
            out.append(str(value))
    return "\\".join(out)


def _has_value(element: Any) -> bool:
    if element.VR == "SQ":
        return False
    value = element.value
    return value not in (None, "", b"") and str(value) != ""


@dataclass(frozen=True)
class PatientKey:
    """A single-valued PatientID matching key with its issuer: the key a query is expanded from
    to the other identities of the same person (DESIGN.md §6, :mod:`simral.patients.crossref`)."""

    patient_id: str
    issuer: str = ""
    issuer_oid: str = ""


@dataclass
class Plan:
    """A parsed identifier: the level, the SQL conditions and the post-filters.

    ``identity_conditions`` hold the PatientID / Issuer of Patient ID conditions apart from the
    others: :func:`run` widens them to the person's linked identities when ``patient_key`` is set.
    """

    level: Level
    conditions: list[ColumnElement[bool]]
    post_filters: list[tuple[str, Match]]
    return_tags: list[int]
    identity_conditions: list[ColumnElement[bool]] = field(default_factory=list)
    patient_key: PatientKey | None = None
    #: A StudyDate range or list narrows the studies: :func:`run` then pages them in StudyDate order,
    #: which the index on the date answers without reading the whole range.
    by_study_date: bool = False


def _fuzzy_name_clause(column: InstrumentedAttribute[Any], match: Match) -> ColumnElement[bool]:
    """Fuzzy person-name matching (PS3.4 C.2.2.2.1.4, PS3.18 8.3.4.1): case-insensitive, and the
    value may begin any name component or word (``dup`` finds ``DUPONT^JEAN`` and ``MARTIN^DUPUIS``)."""
    like = wildcard_to_like(match.values[0].rstrip("*")) + "%"
    return or_(*(column.like(prefix + like, escape="!") for prefix in ("", "%^", "% ", "%-", "%=")))


def plan(identifier: Dataset, *, model: Model = "STUDY", fuzzy_names: bool = False) -> Plan:
    """Parse a C-FIND identifier for the Patient Root or Study Root model.

    ``fuzzy_names`` turns single-value and trailing-wildcard person-name keys into fuzzy matches
    (QIDO-RS ``fuzzymatching=true``).
    """
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS:
        raise QueryError(f"invalid Query/Retrieve Level {level!r}")
    if model == "STUDY" and level == "PATIENT":
        raise QueryError("PATIENT level is not part of the Study Root model")
    depth = LEVELS.index(level)  # type: ignore[arg-type]
    indexed = {kw: (lvl, key) for lvl in LEVELS[: depth + 1] for kw, key in KEYS[lvl].items()}
    conditions: list[ColumnElement[bool]] = []
    identity_conditions: list[ColumnElement[bool]] = []
    identity_values: dict[str, str] = {}
    post_filters: list[tuple[str, Match]] = []
    return_tags: list[int] = []
    by_study_date = False
    for element in identifier:
        keyword = element.keyword or keyword_for_tag(element.tag)
        if element.tag.group in {0x0000, 0x0002} or keyword in ALWAYS_SKIPPED:
            continue
        return_tags.append(int(element.tag))
        if not _has_value(element):
            continue
        if keyword in STUDY_MEMBERSHIP and depth >= LEVELS.index("STUDY"):
            # Matches a study when any of its series / instances matches (PS3.4 C.6.2.1.2).
            column, vr = STUDY_MEMBERSHIP[keyword]
            match = parse_match(
                "\\".join(str(v) for v in element.value) if element.VM > 1 else str(element.value), vr
            )
            if match.kind != "universal":
                member = select(Series.study_pk).where(Series.num_instances > 0)
                if column.class_ is Instance:
                    member = member.join(Instance, Instance.series_pk == Series.id).where(not_rejected())
                conditions.append(Study.id.in_(member.where(_column_clause(column, match, vr))))
            continue
        if keyword in COMPUTED:
            continue
        raw = element.value
        text = "\\".join(str(v) for v in raw) if isinstance(raw, list | tuple) or element.VM > 1 else str(raw)
        if element.VR == "PN":
            text = str(raw) if not isinstance(raw, list | tuple) else "\\".join(str(v) for v in raw)
        if keyword in indexed:
            key = indexed[keyword][1]
            match = parse_match(text, key.vr)
            fuzzy = (
                fuzzy_names
                and key.vr == "PN"
                and match.kind in {"single", "wildcard"}
                and not any(c in match.values[0].rstrip("*") for c in "*?")
            )
            if fuzzy:
                conditions.append(_fuzzy_name_clause(key.column, match))
            elif match.kind != "universal" and keyword in ("PatientID", "IssuerOfPatientID"):
                identity_conditions.append(_column_clause(key.column, match, key.vr))
                if match.kind == "single":
                    identity_values[keyword] = match.values[0]
            elif match.kind != "universal":
                conditions.append(_column_clause(key.column, match, key.vr))
                by_study_date = by_study_date or keyword == "StudyDate"
        else:
            try:
                vr = dictionary_VR(element.tag)
            except KeyError:
                vr = element.VR
            match = parse_match(text, vr)
            if match.kind != "universal":
                post_filters.append((f"{int(element.tag):08X}", match))
    patient_key = None
    if "PatientID" in identity_values and (
        "IssuerOfPatientID" in identity_values or len(identity_conditions) == 1
    ):
        patient_key = PatientKey(
            identity_values["PatientID"],
            identity_values.get("IssuerOfPatientID", ""),
            _issuer_universal_id(identifier),
        )
    return Plan(
        level=level,  # type: ignore[arg-type]
        conditions=conditions,
        post_filters=post_filters,
        return_tags=return_tags,
        identity_conditions=identity_conditions,
        patient_key=patient_key,
        by_study_date=by_study_date,
    )


def _issuer_universal_id(identifier: Dataset) -> str:
    """The ISO universal id of Issuer of Patient ID Qualifiers Sequence, if the identifier has one
    (PS3.3 Table 10-18)."""
    qualifiers = identifier.get("IssuerOfPatientIDQualifiersSequence")
    if not qualifiers:
        return ""
    item = qualifiers[0]
    if str(item.get("UniversalEntityIDType", "") or "").upper() not in ("", "ISO"):
        return ""
    return str(item.get("UniversalEntityID", "") or "").strip()


@functools.cache
def _base_query(level: Level) -> Select:
    """The rows a level matches, without what IOCM rejection notes rejected (IHE RAD-66): rejected
    instances, and series or studies left with none (their counts exclude rejected instances).

    Built once per level (statements are immutable: each query adds its conditions to a copy)."""
    if level == "PATIENT":
        return (
            select(Patient)
            .join(Study, Study.patient_pk == Patient.id)
            .where(Study.num_instances > 0)
            .distinct()
        )
    if level == "STUDY":
        return (
            select(Study, Patient)
            .join(Patient, Patient.id == Study.patient_pk)
            .where(Study.num_instances > 0)
        )
    if level == "SERIES":
        return (
            select(Series, Study, Patient)
            .join(Study, Study.id == Series.study_pk)
            .join(Patient, Patient.id == Study.patient_pk)
            .where(Series.num_instances > 0)
        )
    return (
        select(Instance, Series, Study, Patient)
        .join(Series, Series.id == Instance.series_pk)
        .join(Study, Study.id == Series.study_pk)
        .join(Patient, Patient.id == Study.patient_pk)
        .where(not_rejected())
    )


def _order(level: Level) -> list[Any]:
    if level == "PATIENT":
        return [Patient.id]
    if level == "STUDY":
        return [Study.id]
    if level == "SERIES":
        return [Series.series_number, Series.id]
    return [Instance.instance_number, Instance.id]


@dataclass
class Result:
    """One match: the entity rows at each level, for building the response identifier."""

    level: Level
    patient: Patient
    study: Study | None = None
    series: Series | None = None
    instance: Instance | None = None
    #: The patient identifier the asker knows, when it differs from the stored one (coercion).
    shown_identity: ShownIdentity | None = None

    @property
    def meta(self) -> dict[str, Any]:
        """The DICOM JSON the level's attributes are read from."""
        if self.instance is not None:
            return self.instance.meta
        if self.series is not None:
            return self.series.meta
        if self.study is not None:
            return self.study.meta
        return self.patient.meta


def run(
    session: Session,
    query_plan: Plan,
    *,
    principal: Principal,
    limit: int | None = None,
    offset: int = 0,
    newest_first: bool = False,
) -> Iterator[Result]:
    """Execute a plan, yielding matches visible to ``principal`` (post-filters applied lazily).

    A PatientID key also matches the studies of the person's other identities (merged, linked,
    same INS), and each study-level or lower match carries the identifier the asker knows
    (:mod:`simral.patients.crossref`). ``newest_first`` orders studies by StudyDate and StudyTime
    descending (worklists, study lists).
    """
    if not may_query(principal):
        raise AccessDenied(f"{principal.audit_name} may not query")
    level = query_plan.level
    query = visible_studies(principal, _base_query(level))
    for condition in query_plan.conditions:
        query = query.where(condition)
    named = None
    if query_plan.patient_key is not None:
        key = query_plan.patient_key
        named = crossref.named_identity(
            session,
            patient_id=key.patient_id,
            issuer=key.issuer,
            issuer_oid=key.issuer_oid,
            organisation=principal.organisation,
        )
    if query_plan.identity_conditions:
        if named is not None:
            # One IN over a UNION (rather than "patient matches OR study in ..."), which the
            # databases answer from the indexes on both sides.
            as_stored = (
                select(Study.id)
                .join(Patient, Patient.id == Study.patient_pk)
                .where(*query_plan.identity_conditions)
            )
            query = query.where(Study.id.in_(union(as_stored, crossref.person_studies(named))))
        else:
            query = query.where(and_(*query_plan.identity_conditions))
    coercion = crossref.Coercion(session, named=named, organisation=principal.organisation)
    if newest_first and level != "PATIENT":
        query = query.order_by(Study.study_date.desc(), Study.study_time.desc())
    elif query_plan.by_study_date and level == "STUDY":
        # A page of a date range is read in the order of the index on StudyDate (ties by id, a
        # deterministic order for offset paging), not by sorting every study of the range.
        query = query.order_by(Study.study_date)
    query = query.order_by(*_order(level))
    sql_paging = not query_plan.post_filters
    if sql_paging:
        if offset:
            query = query.offset(offset)
        if limit is not None:
            query = query.limit(limit)
    skipped = 0
    produced = 0
    for partition in session.execute(query).yield_per(500).partitions():
        results = [_result(level, row) for row in partition]
        if coercion.useful:  # the stored identities of the page, in one query
            coercion.prefetch(r.study.id for r in results if r.study is not None)
        for result in results:
            if query_plan.post_filters and not all(
                match.matches(json_text(_lookup(result, tag))) for tag, match in query_plan.post_filters
            ):
                continue
            if not sql_paging:
                if skipped < offset:
                    skipped += 1
                    continue
                if limit is not None and produced >= limit:
                    return
            produced += 1
            if result.study is not None and coercion.useful:
                result.shown_identity = coercion.for_study(result.study.id)
            yield result


def _result(level: Level, row: Any) -> Result:
    if level == "PATIENT":
        return Result(level, patient=row[0])
    if level == "STUDY":
        return Result(level, study=row[0], patient=row[1])
    if level == "SERIES":
        return Result(level, series=row[0], study=row[1], patient=row[2])
    return Result(level, instance=row[0], series=row[1], study=row[2], patient=row[3])


def _lookup(result: Result, tag: str) -> dict[str, Any] | None:
    element: dict[str, Any] | None = result.meta.get(tag)
    if element is None and result.level != "PATIENT":
        element = result.patient.meta.get(tag)
    return element


def _computed(result: Result, keyword: str) -> Any:
    patient, study, series = result.patient, result.study, result.series
    values: dict[str, Callable[[], Any]] = {
        "NumberOfPatientRelatedStudies": lambda: patient.num_studies,
        "NumberOfPatientRelatedSeries": lambda: patient.num_series,
        "NumberOfPatientRelatedInstances": lambda: patient.num_instances,
        "NumberOfStudyRelatedSeries": lambda: study.num_series if study else None,
        "NumberOfStudyRelatedInstances": lambda: study.num_instances if study else None,
        "ModalitiesInStudy": lambda: study.modalities.split("\\") if study and study.modalities else None,
        "SOPClassesInStudy": lambda: study.sop_classes.split("\\") if study and study.sop_classes else None,
        "NumberOfSeriesRelatedInstances": lambda: series.num_instances if series else None,
    }
    return values[keyword]()


def response_json(result: Result, query_plan: Plan, *, model: Model = "STUDY") -> dict[str, Any]:
    """The requested keys plus the unique keys of the levels, as DICOM JSON (PS3.18 F.2).

    Attributes computed by the archive (C.6.1.1.2-5) carry their value; keys of a lower level than
    the match's are returned empty (C.4.1.1.3.2).
    """
    depth = LEVELS.index(result.level)
    first_level = 0 if model == "PATIENT" else 1
    tags = list(
        dict.fromkeys(
            [int(Tag(UNIQUE_KEY[lvl])) for lvl in LEVELS[first_level : depth + 1]] + query_plan.return_tags
        )
    )
    out: dict[str, Any] = {}
    for tag in tags:
        hex_tag = f"{tag:08X}"
        keyword = keyword_for_tag(tag)
        if keyword in COMPUTED:
            value = _computed(result, keyword) if LEVELS.index(COMPUTED[keyword]) <= depth else None
            element: dict[str, Any] = {"vr": COMPUTED_VR[keyword]}
            if value not in (None, "", []):
                element["Value"] = value if isinstance(value, list) else [value]
            out[hex_tag] = element
            continue
        found = _lookup(result, hex_tag)
        if found is not None:
            out[hex_tag] = found
        else:
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = "UN"
            out[hex_tag] = {"vr": vr}
    if result.shown_identity is not None:
        for hex_tag, element in result.shown_identity.as_json().items():
            if hex_tag in out:
                out[hex_tag] = element
    charset = result.meta.get("00080005") or result.patient.meta.get("00080005")
    if charset:
        out["00080005"] = charset
    return out


def response_identifier(
    result: Result, query_plan: Plan, *, retrieve_ae_title: str = "", model: Model = "STUDY"
) -> Dataset:
    """The C-FIND response identifier for ``result`` (requested keys + unique keys of the levels)."""
    dataset = Dataset.from_json(response_json(result, query_plan, model=model))
    dataset.QueryRetrieveLevel = result.level
    if retrieve_ae_title:
        dataset.RetrieveAETitle = retrieve_ae_title
    dataset.InstanceAvailability = "ONLINE"
    return dataset
