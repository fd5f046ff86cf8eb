"""DICOM JSON (PS3.18 Annex F) of an instance's header, built from the raw element bytes.

The output is the one pydicom gives with ``Dataset.to_json_dict(bulk_data_threshold=4096,
bulk_data_element_handler=bulk_data_uri, suppress_invalid_tags=True)`` on the data set without group 0002
and Pixel Data (:func:`pydicom_dataset_to_json`, the reference), several times faster: the common elements
of a header (text, number strings, binary numbers, tags, person names, binary values) are rendered
straight from the bytes pydicom read (``RawDataElement``) without building a ``DataElement``.

Anything outside that fast path -- sequences (whose items are then walked here again), ambiguous VRs
('US or SS', 'OB or OW'...), explicit VR UN, values of a wrong length, deferred non-binary values, person
names that are not ASCII or use ISO 2022 code extensions, number strings that do not parse cleanly,
values that would fail pydicom's validation inside a sequence -- is converted by pydicom itself, element
by element, exactly as before (same exceptions, same dropped elements). Non-default pydicom settings
(validation mode, DS/IS as numpy or Decimal, datetime conversion, raw element hooks...) send the whole
data set to the reference implementation.

pydicom's rules reproduced here (pydicom 3.0):

* a top-level element is converted under the caller's validation mode (normally WARN); its JSON is built
  under ``config.strict_reading()``, and an element whose JSON fails is left out (suppress_invalid_tags);
* sequence items are converted and rendered under strict reading without suppression, so any failure
  inside a sequence leaves out the whole top-level sequence;
* binary values (OB, OD, OF, OL, OV, OW, UN) longer than ``(threshold // 4) * 3`` bytes become
  ``{"BulkDataURI": "bulkdata/<tag of that element>"}``, shorter ones InlineBinary; text values are always
  inline whatever their length;
* DS/IS values become numbers (an empty value among several, or one that does not parse, leaves the
  element out), PN values ``{"Alphabetic", "Ideographic", "Phonetic"}`` groups, AT values 8 hex digits.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable
from typing import Any

from pydicom import config
from pydicom.charset import decode_bytes, default_encoding, need_tail_escape_sequence_encodings
from pydicom.datadict import DicomDictionary
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.hooks import hooks, raw_element_value, raw_element_vr
from pydicom.tag import _LUT_DESCRIPTOR_TAGS, BaseTag
from pydicom.valuerep import TEXT_VR_DELIMS, VALIDATORS, is_valid_ds

_pydicom_private_vr: Callable[[Dataset | None, BaseTag], str] | None
try:  # pydicom's own VR lookup for private tags (PS3.5 §6.2.2), reused for identical results
    from pydicom.hooks import _private_vr_for_tag as _pydicom_private_vr
except ImportError:  # pragma: no cover - another pydicom version: implicit VR private tags go to pydicom
    _pydicom_private_vr = None

__all__ = ["BULK_DATA_THRESHOLD", "bulk_data_uri", "dataset_to_json", "pydicom_dataset_to_json"]

BULK_DATA_THRESHOLD = 4096
#: Binary values longer than this (bytes) are bulk data: their base64 text would exceed the threshold.
_INLINE_LIMIT = (BULK_DATA_THRESHOLD // 4) * 3
_PIXEL_DATA = 0x7FE00010
#: LUT Descriptors, whose first value pydicom reads as unsigned whatever the VR.
_LUT_DESCRIPTOR = frozenset(int(tag) for tag in _LUT_DESCRIPTOR_TAGS)
_UNDEFINED_LENGTH = 0xFFFFFFFF

#: Python codecs in which ASCII text decodes and encodes as itself, without escape sequences.
_ASCII_TRANSPARENT = frozenset(
    {
        "iso8859",
        "latin_1",
        "iso8859_2",
        "iso8859_3",
        "iso8859_4",
        "iso_ir_126",
        "iso_ir_127",
        "iso_ir_138",
        "iso_ir_144",
        "iso_ir_148",
        "iso_ir_166",
        "UTF8",
        "utf_8",
        "GB18030",
        "GBK",
    }
) - frozenset(need_tail_escape_sequence_encodings)

JsonElement = dict[str, Any]
# (value bytes, raw element, encodings, strict) -> JSON element, or None to let pydicom convert it
_Handler = Callable[[bytes, RawDataElement, list[str], bool], "JsonElement | None"]


def bulk_data_uri(element: Any) -> str:
    """The BulkDataURI of a binary element above the threshold: relative, named after its own tag."""
    return f"bulkdata/{element.tag:08X}"


def pydicom_dataset_to_json(dataset: Dataset) -> dict[str, Any]:
    """The reference: pydicom's conversion of ``dataset`` without group 0002 and Pixel Data.

    Converts (hence mutates) every raw element of ``dataset``.
    """
    body = Dataset()
    for element in dataset:
        if element.tag.group == 0x0002 or element.tag == _PIXEL_DATA:
            continue
        body.add(element)
    body.set_original_encoding(dataset.is_implicit_VR, dataset.is_little_endian, dataset._character_set)
    return body.to_json_dict(
        bulk_data_threshold=BULK_DATA_THRESHOLD,
        bulk_data_element_handler=bulk_data_uri,
        suppress_invalid_tags=True,
    )


def dataset_to_json(dataset: Dataset) -> dict[str, Any]:
    """DICOM JSON of ``dataset`` without group 0002, pixel data or values above the threshold.

    Same output (and same exceptions) as :func:`pydicom_dataset_to_json`. Elements handed to pydicom are
    converted in ``dataset`` as pydicom does; the others are left raw.
    """
    if not _fast_path_usable():
        return pydicom_dataset_to_json(dataset)
    result: dict[str, Any] = {}
    encodings: list[str] | None = None
    # plain ints: comparing pydicom's BaseTag runs Python code
    for tag, elem in sorted([(int(tag), elem) for tag, elem in dataset._dict.items()], key=_first):
        if tag >> 16 == 0x0002 or tag == _PIXEL_DATA:
            if isinstance(elem, RawDataElement):
                dataset[tag]  # the reference converts it too, and fails if it cannot be converted
            continue
        json_element: JsonElement | None
        if isinstance(elem, RawDataElement):
            json_element = None
            if elem.VR != "SQ":
                if encodings is None:
                    encodings = _encodings(dataset)
                try:
                    json_element = _raw_to_json(elem, tag, dataset, encodings, False)
                except Exception:
                    json_element = None
            if json_element is None:
                # pydicom converts the element under the caller's validation mode; a failure here
                # is a failure of the whole conversion, as in the reference
                json_element = _top_level_json(dataset[tag])
        else:
            json_element = _top_level_json(elem)
        if json_element is not None:
            result[f"{tag:08X}"] = json_element
    return result


def _first(pair: tuple[int, Any]) -> int:
    return pair[0]


def _fast_path_usable() -> bool:
    """True when pydicom is configured as the fast path assumes (its defaults)."""
    return (
        config.settings.reading_validation_mode == config.WARN
        and config.data_element_callback is None
        and not config.use_DS_decimal
        and not config.use_DS_numpy
        and not config.use_IS_numpy
        and not config.datetime_conversion
        and not config.use_none_as_empty_text_VR_value
        and config.replace_un_with_known_vr
        and hooks.raw_element_vr is raw_element_vr
        and hooks.raw_element_value is raw_element_value
        and not hooks.raw_element_kwargs
    )


def _encodings(dataset: Dataset) -> list[str]:
    """The Python encodings pydicom decodes the text of ``dataset`` with (as in ``Dataset.__getitem__``)."""
    encodings = dataset.original_character_set or dataset._character_set
    if not encodings:
        return [default_encoding]
    if isinstance(encodings, str):
        return [encodings]
    return list(encodings)


# ---------------------------------------------------------------------------------------------------------
# Converted elements and sequences (pydicom's DataElement.to_json_dict, items walked here)
# ---------------------------------------------------------------------------------------------------------

_PLAIN_TEXT_VRS = {
    vr: vr for vr in ("AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT")
}


def _top_level_json(elem: DataElement) -> JsonElement | None:
    """JSON of a converted top-level element, None when pydicom would leave it out."""
    json_element = _plain_text_json(elem)
    if json_element is not None:
        return json_element
    try:
        with config.strict_reading():
            return _converted_json(elem)
    except Exception:
        return None


def _plain_text_json(elem: DataElement) -> JsonElement | None:
    """JSON of a converted text element whose value is plain ``str`` (e.g. the UIDs read_header read)."""
    vr = elem.VR
    if vr not in _PLAIN_TEXT_VRS:
        return None
    value = elem.value
    if isinstance(value, str):
        name = _PLAIN_TEXT_VRS[vr]
        return {"vr": name, "Value": [str(value)]} if value else {"vr": name}
    return None


def _converted_json(elem: DataElement) -> JsonElement:
    """JSON of a converted element, under strict reading; raises where pydicom raises."""
    if elem.VR == "SQ":
        return {"vr": "SQ", "Value": [_item_json(item) for item in elem.value]}
    return elem.to_json_dict(bulk_data_uri, BULK_DATA_THRESHOLD)


def _item_json(item: Dataset) -> dict[str, Any]:
    """JSON of a sequence item, under strict reading and without suppression (as ``Dataset.to_json``)."""
    result: dict[str, Any] = {}
    encodings: list[str] | None = None
    for tag, elem in [(int(tag), elem) for tag, elem in item._dict.items()]:
        json_element: JsonElement | None = None
        if isinstance(elem, RawDataElement):
            if elem.VR != "SQ":
                if encodings is None:
                    encodings = _encodings(item)
                try:
                    json_element = _raw_to_json(elem, tag, item, encodings, True)
                except Exception:
                    json_element = None
            if json_element is None:
                json_element = _converted_json(item[tag])
        else:
            json_element = _plain_text_json(elem) or _converted_json(elem)
        result[f"{tag:08X}"] = json_element
    return result


# ---------------------------------------------------------------------------------------------------------
# Raw elements
# ---------------------------------------------------------------------------------------------------------


def _raw_to_json(
    raw: RawDataElement, tag: int, ds: Dataset, encodings: list[str], strict: bool
) -> JsonElement | None:
    """JSON of the raw element ``raw`` (tag ``tag``) of ``ds`` as pydicom would render it, or None to let
    pydicom convert it.

    ``strict``: inside a sequence, where pydicom converts under strict reading; values pydicom would
    refuse there are left to pydicom (which raises).
    """
    vr = raw.VR
    if vr is None:  # implicit VR: the dictionary's VR (PS3.5 §7.1.3)
        entry = DicomDictionary.get(tag)
        if entry is not None:
            vr = entry[0]
        elif tag >> 16 & 1 and _pydicom_private_vr is not None:
            vr = _pydicom_private_vr(ds, BaseTag(tag))
        else:  # repeating groups, group lengths, unknown tags
            return None
    elif vr == "UN":  # pydicom may replace it with the dictionary's VR
        return None
    handler = _HANDLERS.get(vr)
    if handler is None or tag in _LUT_DESCRIPTOR:
        return None
    length = raw.length
    if length == _UNDEFINED_LENGTH:
        return None
    value = raw.value
    if length == 0:
        return {"vr": _VR_NAMES[vr]}
    if value is None:  # deferred read (only at the top level, values above the defer size)
        if vr in _BINARY_VRS and length > _INLINE_LIMIT and not strict:
            return {"vr": _VR_NAMES[vr], "BulkDataURI": f"bulkdata/{tag:08X}"}
        return None
    if type(value) is not bytes or not value:
        return None
    return handler(value, raw, encodings, strict)


def _binary(vr: str) -> _Handler:
    """OB, OD, OF, OL, OV, OW, UN: the bytes as they are (no byte swapping), inline or bulk data."""

    def handler(value: bytes, raw: RawDataElement, encodings: list[str], strict: bool) -> JsonElement | None:
        if len(value) > _INLINE_LIMIT:
            return {"vr": vr, "BulkDataURI": f"bulkdata/{raw.tag:08X}"}
        return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}

    return handler


def _numbers(code: str, size: int, vr: str) -> _Handler:
    little, big = struct.Struct("<" + code), struct.Struct(">" + code)

    def handler(value: bytes, raw: RawDataElement, encodings: list[str], strict: bool) -> JsonElement | None:
        length = len(value)
        if length % size:
            return None  # pydicom raises BytesLengthException
        if length == size:
            number = (little if raw.is_little_endian else big).unpack(value)[0]
            return {"vr": vr, "Value": [number]}
        fmt = f"{'<' if raw.is_little_endian else '>'}{length // size}{code}"
        return {"vr": vr, "Value": list(struct.unpack(fmt, value))}

    return handler


def _at(value: bytes, raw: RawDataElement, encodings: list[str], strict: bool) -> JsonElement | None:
    if len(value) % 4:
        return None
    words = struct.unpack(f"{'<' if raw.is_little_endian else '>'}{len(value) // 2}H", value)
    return {"vr": "AT", "Value": [f"{words[i] << 16 | words[i + 1]:08X}" for i in range(0, len(words), 2)]}


def _text_json(vr: str, values: list[str]) -> JsonElement:
    """A text element's JSON from its values as pydicom splits them (one empty value: no Value)."""
    if len(values) == 1:
        return {"vr": vr, "Value": values} if values[0] else {"vr": vr}
    return {"vr": vr, "Value": values}


def _string(vr: str) -> _Handler:
    """AS, CS, DA, DT, TM: ASCII, trailing spaces and NULs removed, split on backslash."""

    def handler(value: bytes, raw: RawDataElement, encodings: list[str], strict: bool) -> JsonElement | None:
        return _text_json(vr, value.decode(default_encoding).rstrip(" \x00").split("\\"))

    return handler


def _ae(value: bytes, raw: RawDataElement, encodings: list[str], strict: bool) -> JsonElement | None:
    return _text_json("AE", [s.strip() for s in value.decode(default_encoding).split("\\")])


def _ui(value: bytes, raw: RawDataElement, encodings: list[str], strict: bool) -> JsonElement | None:
    items = value.decode(default_encoding).rstrip("\0 ").split("\\")
    if strict:
        validate = VALIDATORS["UI"]
        if not all(validate("UI", item)[0] for item in items):
            return None
    return _text_json("UI", [item.strip() for item in items])


def _ur(value: bytes, raw: RawDataElement, encodings: list[str], strict: bool) -> JsonElement | None:
    text = value.decode(default_encoding).rstrip()
    return {"vr": "UR", "Value": [text]} if text else {"vr": "UR"}


def _decode(value: bytes, encodings: list[str]) -> str:
    """pydicom's ``decode_bytes`` for text VRs, with its shortcut inlined."""
    if b"\x1b" not in value:
        try:
            return value.decode(encodings[0])
        except (LookupError, UnicodeError):
            pass  # pydicom warns and replaces, or raises under strict reading
    return decode_bytes(value, encodings, TEXT_VR_DELIMS)


def _multi_text(vr: str) -> _Handler:
    """SH, LO, UC: decoded with the character set, split on backslash, trailing spaces and NULs removed."""

    def handler(value: bytes, raw: RawDataElement, encodings: list[str], strict: bool) -> JsonElement | None:
        parts = _decode(value, encodings).split("\\")
        if strict:
            validate = VALIDATORS.get(vr)
            if validate is not None and not all(validate(vr, part)[0] for part in parts):
                return None
        return _text_json(vr, [part.rstrip("\0 ") for part in parts])

    return handler


def _single_text(vr: str) -> _Handler:
    """LT, ST, UT: one value, backslashes kept, trailing spaces and NULs removed."""

    def handler(value: bytes, raw: RawDataElement, encodings: list[str], strict: bool) -> JsonElement | None:
        text = _decode(value, encodings)
        if strict:
            validate = VALIDATORS.get(vr)
            if validate is not None and not validate(vr, text)[0]:
                return None
        text = text.rstrip("\0 ")
        return {"vr": vr, "Value": [text]} if text else {"vr": vr}

    return handler


def _ds(value: bytes, raw: RawDataElement, encodings: list[str], strict: bool) -> JsonElement | None:
    items = value.decode(default_encoding).strip().rstrip(" \x00").split("\\")
    if len(items) == 1 and not items[0]:
        return {"vr": "DS"}
    numbers: list[float] = []
    for item in items:
        stripped = item.strip()
        if not stripped:
            return None  # an empty value among several: pydicom leaves the element out
        if strict and not is_valid_ds(stripped):
            return None
        numbers.append(float(item))  # ValueError -> pydicom (which retries other VRs, then drops it)
    return {"vr": "DS", "Value": numbers}


def _is(value: bytes, raw: RawDataElement, encodings: list[str], strict: bool) -> JsonElement | None:
    items = value.decode(default_encoding).rstrip(" \x00").split("\\")
    if len(items) == 1 and not items[0]:
        return {"vr": "IS"}
    validate = VALIDATORS["IS"]
    numbers: list[int] = []
    for item in items:
        if not item.strip():
            return None
        number = int(item)  # ValueError ("1.5", "1e3"...) -> pydicom
        if number != float(item):
            return None  # pydicom keeps a float (ISfloat) for these
        if strict and (not validate("IS", item)[0] or not -(2**31) <= number < 2**31):
            return None
        numbers.append(number)
    return {"vr": "IS", "Value": numbers}


def _pn(value: bytes, raw: RawDataElement, encodings: list[str], strict: bool) -> JsonElement | None:
    """ASCII person names in an ASCII-transparent character set; anything else goes to pydicom."""
    stripped = value.rstrip(b"\x00 ")
    if not stripped.isascii() or b"\x1b" in stripped or encodings[0] not in _ASCII_TRANSPARENT:
        return None
    names = stripped.decode("ascii").split("\\")
    validate = VALIDATORS["PN"]
    groups: list[dict[str, str]] = []
    for name in names:
        if strict and not validate("PN", name)[0]:
            return None
        components = name.split("=")
        while components and not components[-1]:
            components.pop()
        if not components:
            if len(names) == 1:
                return {"vr": "PN"}
            return None  # an empty name among several: pydicom fails on it and leaves the element out
        group = {"Alphabetic": components[0]}
        if len(components) > 1:
            group["Ideographic"] = components[1]
        if len(components) > 2:
            group["Phonetic"] = components[2]
        groups.append(group)
    return {"vr": "PN", "Value": groups}


_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})

_HANDLERS: dict[str, _Handler] = {
    **{vr: _binary(vr) for vr in _BINARY_VRS},
    "US": _numbers("H", 2, "US"),
    "SS": _numbers("h", 2, "SS"),
    "UL": _numbers("L", 4, "UL"),
    "SL": _numbers("l", 4, "SL"),
    "FL": _numbers("f", 4, "FL"),
    "FD": _numbers("d", 8, "FD"),
    "UV": _numbers("Q", 8, "UV"),
    "SV": _numbers("q", 8, "SV"),
    "AT": _at,
    "AE": _ae,
    "AS": _string("AS"),
    "CS": _string("CS"),
    "DA": _string("DA"),
    "DT": _string("DT"),
    "TM": _string("TM"),
    "UI": _ui,
    "UR": _ur,
    "SH": _multi_text("SH"),
    "LO": _multi_text("LO"),
    "UC": _multi_text("UC"),
    "LT": _single_text("LT"),
    "ST": _single_text("ST"),
    "UT": _single_text("UT"),
    "DS": _ds,
    "IS": _is,
    "PN": _pn,
}
#: The VRs of the fast path as plain ``str`` (pydicom's VR may be its ``VR`` enum).
_VR_NAMES = {vr: vr for vr in _HANDLERS}
