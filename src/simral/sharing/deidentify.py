"""De-identification for teaching and research: PS3.15 Annex E, Basic Application Level
Confidentiality Profile (E.2) with the options chosen per export (E.3).

One :class:`Deidentifier` serves one export: it de-identifies one data set at a time (a study is
streamed, never held whole) and keeps what must stay consistent across the export's instances:
the UID map (same input UID → same output UID, in every attribute and nested reference, PS3.15
E.1.1 "U") and one pseudonym per patient. Its :meth:`Deidentifier.pseudonym_map` is what the
sharing service stores under the access policy; the per-export key of the UID hash is never kept.

The action of each attribute comes from PS3.15 Table E.1-1. The Basic Profile column is the one
encoded by KitwareMedical's ``dicom-anonymizer`` (``dicomfields_2026c``: the 2026c edition, kept
up to date by its maintainers); the option columns used here (E.3.6.1 Retain Longitudinal Temporal
Information Full Dates, E.3.9 Retain UIDs, E.3.5 Clean Descriptors, E.3.7 Retain Patient
Characteristics, E.3.8 Retain Device Identity, E.3.11 Retain Institution Identity) are written
below from the standard's text. Combined actions are resolved as E.1.1 describes (the weakest
action that keeps the IOD conformant): ``X/Z`` → Z, ``X/D`` → D, ``X/Z/D`` and ``Z/D`` → Z unless
the attribute is Type 1 where it stands, ``X/Z/U*`` → the sequence kept with its UIDs replaced.
Private attributes are removed (E.3.10 Retain Safe Private is not offered), and so are curves
(50xx) and overlays (60xx, the whole Overlay Plane module: Clean Graphics is not offered).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as _table
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID_dictionary

#: Table E.1-1 Basic Profile action per category of ``dicom-anonymizer``'s table.
_CATEGORIES = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}
#: The actions this module applies (PS3.15 E.1.1).
ACTIONS = frozenset({"D", "Z", "X", "K", "C", "U", *_CATEGORIES.values()})


def _basic_profile() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    """(tag → action, [(group, element, group mask, element mask, action)]) of Table E.1-1."""
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, action in _CATEGORIES.items():
        for entry in getattr(_table, category):
            if len(entry) == 2:
                exact[int(Tag(entry[0], entry[1]))] = action
            else:
                group, element, group_mask, element_mask = entry
                masked.append((group, element, group_mask, element_mask, action))
    return exact, masked


BASIC_PROFILE, _MASKED = _basic_profile()


def _tags(keywords: Iterable[str]) -> frozenset[int]:
    found = (tag_for_keyword(keyword) for keyword in keywords)
    return frozenset(int(tag) for tag in found if tag is not None)


#: E.3.6.1: "Retain Longitudinal Temporal Information With Full Dates": the dates and times of the
#: table (VR DA, DT, TM, and the Timezone Offset From UTC they are read with) are kept, except the
#: patient's birth, which the option does not cover.
_BIRTH = _tags(["PatientBirthDate", "PatientBirthTime"])


def _vr(tag: int) -> str:
    return str(dictionary_VR(tag)) if keyword_for_tag(tag) else ""


_DATES = frozenset(
    tag for tag in BASIC_PROFILE if tag not in _BIRTH and _vr(tag) in ("DA", "DT", "TM")
) | _tags(["TimezoneOffsetFromUTC", "FrameOriginTimestamp"])  # the offset times are read with

#: E.3.9: "Retain UIDs": every UID the table replaces, and the reference sequences that only carry
#: UIDs (their items are still processed).
_UIDS = frozenset(tag for tag, action in BASIC_PROFILE.items() if "U" in action) | _tags(
    [
        "ReferencedStudySequence",
        "ReferencedPerformedProcedureStepSequence",
        "ReferencedImageSequence",
        "SourceImageSequence",
    ]
)

#: E.3.5: "Clean Descriptors": free text entered by people (descriptions, comments, labels, notes,
#: narratives, reasons) is kept, cleaned of identifying information, instead of removed. Free text
#: the option does not name (Text String, Topic..., Image Presentation Comments) stays removed.
_DESCRIPTOR_WORDS = ("Description", "Comment", "Label", "Notes", "Narrative", "Reason")
_NOT_DESCRIPTORS = _tags(
    [
        "ImagePresentationComments",
        "TextComments",
        "ModifiedImageDescription",
        "DeviceDescription",
        "DeviceLabel",
        "XRayDetectorLabel",
        "ConfidentialityConstraintOnPatientDataDescription",
    ]
)
_DESCRIPTORS = frozenset(
    tag
    for tag, action in BASIC_PROFILE.items()
    if "U" not in action
    and tag not in _NOT_DESCRIPTORS
    and any(word in (keyword_for_tag(tag) or "") for word in _DESCRIPTOR_WORDS)
) | _tags(
    [
        "ProtocolName",
        "AdditionalPatientHistory",
        "RequestAttributesSequence",
        "RequestedContrastAgent",
        "ContrastBolusAgent",
        "Impressions",
        "InterpretationText",
        "AcquisitionProtocolName",
        "EntityName",
        "RTPlanName",
        "MakerNote",
        "TreatmentSite",
        "Occupation",
        "Allergies",
        "MedicalAlerts",
        "PatientState",
        "AdmittingDiagnosesCodeSequence",
    ]
)

#: E.3.7: "Retain Patient Characteristics" (K), and the characteristics kept cleaned (C).
_PATIENT_CHARACTERISTICS_KEPT = _tags(
    [
        "PatientSex",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "EthnicGroup",
        "SmokingStatus",
        "PregnancyStatus",
        "PatientSexNeutered",
        "PatientSizeCodeSequence",
    ]
)
_PATIENT_CHARACTERISTICS_CLEANED = _tags(["Allergies", "MedicalAlerts", "PatientState", "SpecialNeeds"])

#: E.3.8: "Retain Device Identity".
_DEVICE_IDENTITY = _tags(
    [
        "DeviceSerialNumber",
        "DeviceUID",
        "DetectorID",
        "StationName",
        "GantryID",
        "GeneratorID",
        "PlateID",
        "CassetteID",
        "SourceSerialNumber",
        "DeviceLabel",
        "DeviceDescription",
        "DeviceID",
        "DeviceAlternateIdentifier",
        "ManufacturerDeviceIdentifier",
        "ManufacturerDeviceClassUID",
        "TreatmentMachineName",
        "XRayDetectorID",
        "XRayDetectorLabel",
        "XRaySourceID",
        "PerformedStationAETitle",
        "PerformedStationName",
        "PerformedStationNameCodeSequence",
        "PerformedStationGeographicLocationCodeSequence",
        "ScheduledStationAETitle",
        "ScheduledStationName",
        "ScheduledStationNameCodeSequence",
        "ScheduledStationGeographicLocationCodeSequence",
        "ScheduledStudyLocation",
        "ScheduledStudyLocationAETitle",
        "TransducerIdentificationSequence",
        "UDISequence",
    ]
)

#: E.3.11: "Retain Institution Identity".
_INSTITUTION_IDENTITY = _tags(
    [
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "InstitutionCodeSequence",
        "InstitutionalDepartmentTypeCodeSequence",
    ]
)

#: Attributes the table empties (Z) that PS3.3 F.5 makes Type 1 in a DICOMDIR STUDY record: a
#: dummy value is given instead (Z allows "a non-zero length value that may be a dummy value").
_DUMMY_INSTEAD_OF_EMPTY = _tags(["StudyDate", "StudyTime", "StudyID"])
#: ``Z/D`` and ``X/Z/D`` attributes that are Type 1 in the enhanced multi-frame IODs (Enhanced
#: General Equipment, Multi-frame Functional Groups, Enhanced MR/CT Image modules, PS3.3 C.7.5.2,
#: C.7.6.16) and in the SR Document General module (Content Date/Time, PS3.3 C.17.2).
_TYPE1_ENHANCED = _tags(["DeviceSerialNumber", "InstitutionName", "AcquisitionDateTime"])
_TYPE1_CONTENT = _tags(["ContentDate", "ContentTime"])
#: ``X/Z`` and ``X/Z/D`` sequences that are Type 2 where they stand (Acquisition Context Module,
#: PS3.3 C.7.6.14): emptied; the others are removed.
_TYPE2_SEQUENCES = _tags(["AcquisitionContextSequence"])

_PATIENT_ID = int(Tag("PatientID"))
_PATIENT_NAME = int(Tag("PatientName"))
_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "PN"})

#: PS3.16 CID 7050 "De-identification Method" codes (DCM).
_METHOD_CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "retain_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
}

DUMMY_TEXT = "DEIDENTIFIED"
_DUMMIES: dict[str, Any] = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "IS": "0",
    "DS": "0",
    "US": 0,
    "SS": 0,
    "UL": 0,
    "SL": 0,
    "UV": 0,
    "SV": 0,
    "FL": 0.0,
    "FD": 0.0,
    "AT": 0,
    "UR": "",
    "OB": b"\x00\x00",
    "OW": b"\x00\x00",
    "OD": b"\x00" * 8,
    "OF": b"\x00" * 4,
    "OL": b"\x00" * 4,
    "OV": b"\x00" * 8,
    "UN": b"\x00\x00",
}


@dataclass(frozen=True)
class DeidentifyOptions:
    """The PS3.15 E.3 options chosen for one export (the Basic Profile always applies)."""

    retain_dates: bool = False
    retain_uids: bool = False
    clean_descriptors: bool = False
    retain_patient_characteristics: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False

    def chosen(self) -> list[str]:
        """Names of the options chosen, in CID 7050 order."""
        return [name for name in _METHOD_CODES if name != "basic" and getattr(self, name)]

    def actions(self) -> dict[int, str]:
        """Tag → action of Table E.1-1 with these options' columns applied."""
        actions = dict(BASIC_PROFILE)
        overrides: list[tuple[bool, frozenset[int], str]] = [
            (self.clean_descriptors, _DESCRIPTORS, "C"),
            (self.retain_dates, _DATES, "K"),
            (self.retain_uids, _UIDS, "K"),
            (self.retain_patient_characteristics, _PATIENT_CHARACTERISTICS_KEPT, "K"),
            (self.retain_patient_characteristics, _PATIENT_CHARACTERISTICS_CLEANED, "C"),
            (self.retain_device_identity, _DEVICE_IDENTITY, "K"),
            (self.retain_institution_identity, _INSTITUTION_IDENTITY, "K"),
        ]
        for chosen, tags, action in overrides:
            if chosen:
                actions.update(dict.fromkeys((tag for tag in tags if tag in actions), action))
        return actions


@dataclass
class Pseudonym:
    """A patient of the export and the identity given in its place."""

    original_id: str
    original_issuer: str
    original_name: str
    patient_id: str
    patient_name: str


class _Cleaner:
    """E.3.5 "clean": the text kept with the identifying values of its data set taken out (names,
    identifiers, the birth date) and anything shaped like a date, a long number, an e-mail address."""

    _PATTERNS = re.compile(
        r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"  # e-mail addresses
        r"|\b\d{1,4}[/.-]\d{1,2}[/.-]\d{1,4}\b"  # dates, 12/03/1962, 1962-03-12
        r"|\+?\d[\d .-]{3,}\d"  # identifiers, phone numbers, years (4 digits and more)
    )

    def __init__(self, values: Iterable[str]) -> None:
        words = {word for value in values for word in re.split(r"[\s^=,]+", value) if len(word) >= 2}
        ordered = sorted(words, key=len, reverse=True)
        self._words = (
            re.compile("|".join(rf"(?<!\w){re.escape(word)}(?!\w)" for word in ordered), re.IGNORECASE)
            if ordered
            else None
        )

    def clean(self, text: str) -> str:
        if self._words is not None:
            text = self._words.sub("", text)
        text = self._PATTERNS.sub("", text)
        return re.sub(r"\s{2,}", " ", text).strip(" ,;:-")


def _identifying_values(ds: Dataset) -> list[str]:
    """Values a cleaned text must not repeat: every person name and the identifiers of the data set."""
    values: list[str] = []

    def walk(dataset: Dataset) -> None:
        for elem in dataset:
            if elem.VR == "SQ":
                for item in elem.value or ():
                    walk(item)
            elif elem.VR == "PN" or elem.keyword in _IDENTIFYING_KEYWORDS:
                values.extend(str(v) for v in _values(elem) if v not in (None, ""))

    walk(ds)
    birth = str(ds.get("PatientBirthDate", "") or "")
    if len(birth) == 8:
        values += [birth, f"{birth[6:]}/{birth[4:6]}/{birth[:4]}", f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"]
    return values


_IDENTIFYING_KEYWORDS = frozenset(
    {
        "PatientID",
        "OtherPatientIDs",
        "IssuerOfPatientID",
        "AccessionNumber",
        "StudyID",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "MedicalRecordLocator",
        "ReferringPhysicianAddress",
        "StationName",
        "DeviceSerialNumber",
        "RequestedProcedureID",
        "PlacerOrderNumberImagingServiceRequest",
        "FillerOrderNumberImagingServiceRequest",
    }
)


def _values(elem: DataElement) -> list[Any]:
    value = elem.value
    if isinstance(value, MultiValue | list):
        return list(value)
    return [value]


def is_private(tag: BaseTag) -> bool:
    """Whether ``tag`` is a private attribute or private creator (odd group, PS3.5 7.8)."""
    return bool(tag.group % 2) and tag.group > 0x0008


class Deidentifier:
    """De-identifies the data sets of one export, consistently (PS3.15 E.1.1)."""

    def __init__(self, options: DeidentifyOptions, *, uid_root: str = "2.25.", label: str = "DEID") -> None:
        self.options = options
        self._actions = options.actions()
        #: Per-export key of the UID hash: same input UID → same output UID within this export
        #: only; it is never stored (the map is).
        self._key = secrets.token_bytes(32)
        self._uid_root = uid_root
        self._label = label
        self.uids: dict[str, str] = {}
        self.patients: dict[tuple[str, str], Pseudonym] = {}

    # -- the export's consistent replacements -----------------------------------------------------

    def new_uid(self, uid: str) -> str:
        """The UID replacing ``uid`` in this export (HMAC-SHA-256 under the per-export key, shown
        as a UUID-derived UID under ``2.25``, PS3.5 B.2); well-known UIDs (SOP classes, transfer
        syntaxes, coding schemes) are not instance UIDs and stay."""
        uid = uid.strip().rstrip("\x00")
        if not uid or uid in UID_dictionary:
            return uid
        if uid not in self.uids:
            digest = hmac.new(self._key, uid.encode("ascii", "replace"), hashlib.sha256).digest()
            self.uids[uid] = f"{self._uid_root}{int.from_bytes(digest[:16], 'big')}"
        return self.uids[uid]

    def pseudonym(self, ds: Dataset) -> Pseudonym:
        """The export's pseudonym of the patient of ``ds`` (one per Patient ID and issuer)."""
        key = (str(ds.get("PatientID", "") or ""), str(ds.get("IssuerOfPatientID", "") or ""))
        if key not in self.patients:
            number = f"{len(self.patients) + 1:04d}"
            self.patients[key] = Pseudonym(
                original_id=key[0],
                original_issuer=key[1],
                original_name=str(ds.get("PatientName", "") or ""),
                patient_id=f"{self._label}-{number}",
                patient_name=f"{self._label}^{number}",
            )
        return self.patients[key]

    def pseudonym_map(self) -> dict[str, Any]:
        """What the export replaced: patients and UIDs (JSON-ready; personal data, keep it under
        the access policy)."""
        return {
            "patients": [vars(p).copy() for p in self.patients.values()],
            "uids": dict(self.uids),
        }

    # -- one data set ---------------------------------------------------------------------------

    def refuses(self, ds: Dataset) -> str:
        """Why ``ds`` cannot be de-identified by this profile, or "" (PS3.15 E.1.1: identifying
        information burned into the pixels needs the Clean Pixel Data Option, not offered)."""
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            return "burned-in annotation (Clean Pixel Data Option not offered)"
        return ""

    def apply(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` in place (and its file meta information); return it."""
        pseudonym = self.pseudonym(ds)
        cleaner = _Cleaner(_identifying_values(ds)) if "C" in self._actions.values() else None
        context = _Context(
            pseudonym=pseudonym,
            cleaner=cleaner,
            enhanced="SharedFunctionalGroupsSequence" in ds,
            document="ContentSequence" in ds,
        )
        self._dataset(ds, context)
        self._mark(ds)
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            for keyword in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                            "ReceivingApplicationEntityTitle", "PrivateInformationCreatorUID",
                            "PrivateInformation"):  # fmt: skip
                if keyword in meta:
                    del meta[keyword]
            if "SOPInstanceUID" in ds:
                meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return ds

    def _action(self, tag: BaseTag) -> str | None:
        action = self._actions.get(int(tag))
        if action is not None:
            return action
        for group, element, group_mask, element_mask, masked in _MASKED:
            if tag.group & group_mask == group and tag.element & element_mask == element:
                return masked
        return None

    def _dataset(self, ds: Dataset, context: _Context) -> None:
        for tag in list(ds.keys()):
            if is_private(tag) or tag.element == 0x0000 or (tag.group & 0xFF00) in (0x5000, 0x6000):
                # Private attributes (E.1.1), group lengths, curves and whole overlay planes (their
                # data and comments are X: the rest of the module would no longer be conformant).
                del ds[tag]
                continue
            elem = ds[tag]
            action = self._action(tag)
            if action is None or action == "K":
                if elem.VR == "SQ":
                    self._items(elem, context)  # "K: ... cleaned for sequences" (E.1.1)
                continue
            self._apply(ds, elem, action, context)

    def _items(self, elem: DataElement, context: _Context, *, clean: bool = False) -> None:
        for item in elem.value or ():
            self._dataset(item, context)
            if clean and context.cleaner is not None:
                for inner in item.iterall():
                    if inner.VR in _TEXT_VRS and inner.value not in (None, ""):
                        self._clean(inner, context)

    def _apply(self, ds: Dataset, elem: DataElement, action: str, context: _Context) -> None:
        tag = int(elem.tag)
        if tag == _PATIENT_ID:
            elem.value = context.pseudonym.patient_id
            return
        if tag == _PATIENT_NAME:
            elem.value = context.pseudonym.patient_name
            return
        if action == "X":
            del ds[elem.tag]
        elif action == "U":
            self._replace_uids(elem)
        elif action == "C":
            if elem.VR == "SQ":
                self._items(elem, context, clean=True)
            elif elem.VR in _TEXT_VRS and context.cleaner is not None:
                self._clean(elem, context)
            else:
                elem.value = None
        elif action == "X/Z/U*":
            if elem.VR == "SQ":
                self._items(elem, context)  # kept, its instance UIDs replaced (U)
            elif elem.VR == "UI":
                self._replace_uids(elem)
            else:
                elem.value = None
        elif action == "D" or action == "X/D":
            if elem.VR == "SQ" and action == "X/D":
                del ds[elem.tag]
            else:
                self._dummy(elem, context)
        elif action in ("X/Z", "X/Z/D") and elem.VR == "SQ" and tag not in _TYPE2_SEQUENCES:
            del ds[elem.tag]  # a Type 3 sequence is absent, never empty (VM 1-n, PS3.5 7.5)
        elif action in ("Z/D", "X/Z/D"):
            type1 = (context.enhanced and tag in _TYPE1_ENHANCED) or (
                context.document and tag in _TYPE1_CONTENT
            )
            if type1 and elem.VR != "SQ":
                self._dummy(elem, context)
            else:
                self._empty(elem)
        else:  # Z, X/Z
            if tag in _DUMMY_INSTEAD_OF_EMPTY:
                self._dummy(elem, context)
            else:
                self._empty(elem)

    def _replace_uids(self, elem: DataElement) -> None:
        if elem.VR != "UI":
            self._empty(elem)
            return
        values = [self.new_uid(str(v)) for v in _values(elem) if v not in (None, "")]
        elem.value = values if len(values) > 1 else (values[0] if values else None)

    @staticmethod
    def _empty(elem: DataElement) -> None:
        elem.value = Sequence() if elem.VR == "SQ" else None

    def _dummy(self, elem: DataElement, context: _Context) -> None:
        """D: a non-zero length dummy value of the attribute's VR (E.1.1)."""
        vr = elem.VR
        if vr == "SQ":
            items = list(elem.value or ())
            if items and all("CodeValue" in item or "LongCodeValue" in item for item in items):
                code = Dataset()
                code.CodeValue = "DEID"
                code.CodingSchemeDesignator = "99SIMRAL"
                code.CodeMeaning = "De-identified"
                elem.value = Sequence([code])
            else:
                self._items(elem, context)
        elif vr == "UI":
            self._replace_uids(elem)
        elif vr == "PN":
            elem.value = DUMMY_TEXT
        elif vr in _DUMMIES:
            elem.value = _DUMMIES[vr]
        else:  # LO, SH, CS, ST, LT, UT, UC, AE
            elem.value = DUMMY_TEXT

    @staticmethod
    def _clean(elem: DataElement, context: _Context) -> None:
        assert context.cleaner is not None
        cleaned = [context.cleaner.clean(str(v)) for v in _values(elem) if v is not None]
        elem.value = cleaned if len(cleaned) > 1 else (cleaned[0] if cleaned else None)

    def _mark(self, ds: Dataset) -> None:
        """The attributes PS3.15 E.1.1 (and PS3.3 C.7.1.1) ask of a de-identified instance."""
        ds.PatientIdentityRemoved = "YES"
        names = ["basic", *self.options.chosen()]
        ds.DeidentificationMethod = [_METHOD_CODES[name][1][:64] for name in names]
        codes = []
        for name in names:
            code = Dataset()
            code.CodeValue, code.CodeMeaning = _METHOD_CODES[name]
            code.CodingSchemeDesignator = "DCM"
            codes.append(code)
        ds.DeidentificationMethodCodeSequence = Sequence(codes)
        ds.LongitudinalTemporalInformationModified = "UNMODIFIED" if self.options.retain_dates else "REMOVED"


@dataclass(frozen=True)
class _Context:
    """What the actions need to know about the data set being de-identified."""

    pseudonym: Pseudonym
    cleaner: _Cleaner | None
    #: An enhanced multi-frame instance (some Z/D attributes are Type 1 there).
    enhanced: bool
    #: A structured document (Content Date and Time are Type 1).
    document: bool
