"""simral.dicom.json_model against pydicom's DICOM JSON conversion, the code it replaces.

Every file of the test corpora is read twice with ``read_header`` (conversion mutates the raw elements)
and converted by both; the JSON texts (keys sorted) must be identical, which is stricter than equality
after a JSON round trip (1 and 1.0 differ) and works for NaN. Where the reference raises, the new code
must raise the same exception type.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom.data
import pytest
from pydicom.charset import encode_string
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from tests.corpus import (
    charset_instances,
    ct_series,
    multi_series_study,
    quiet_pydicom,
    small_instances,
    storable_test_files,
)

from simral.dicom.header import read_header
from simral.dicom.json_model import dataset_to_json

# ---------------------------------------------------------------------------------------------------------
# The reference: simral.dicom.header.dataset_to_json as it was before json_model
# ---------------------------------------------------------------------------------------------------------

BULK_DATA_THRESHOLD = 4096


def _bulk_data_uri(element: Any) -> str:
    return f"bulkdata/{element.tag:08X}"


def reference_dataset_to_json(dataset: Dataset) -> dict[str, Any]:
    """DICOM JSON of ``dataset`` without group 0002, pixel data or values above the threshold."""
    body = Dataset()
    for element in dataset:
        if element.tag.group == 0x0002 or element.tag == 0x7FE00010:
            continue
        body.add(element)
    body.set_original_encoding(dataset.is_implicit_VR, dataset.is_little_endian, dataset._character_set)
    return body.to_json_dict(
        bulk_data_threshold=BULK_DATA_THRESHOLD,
        bulk_data_element_handler=_bulk_data_uri,
        suppress_invalid_tags=True,
    )


# ---------------------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    """The corpus has many deliberately odd files; pydicom warns about each."""
    with quiet_pydicom():
        yield


def _convert(function: Any, path: Path) -> tuple[str | None, type[BaseException] | None]:
    dataset = read_header(path).dataset  # a fresh read: conversion mutates the raw elements
    try:
        result = function(dataset)
    except Exception as exc:
        return None, type(exc)
    return json.dumps(result, sort_keys=True), None


def assert_same_json(path: Path) -> None:
    expected, expected_error = _convert(reference_dataset_to_json, path)
    got, error = _convert(dataset_to_json, path)
    assert error is expected_error, f"{path}: raised {error}, the reference {expected_error}"
    if expected is None or got is None:
        return
    if got != expected:
        old, new = json.loads(expected), json.loads(got)
        differing = sorted(
            key
            for key in set(old) | set(new)
            if json.dumps(old.get(key), sort_keys=True) != json.dumps(new.get(key), sort_keys=True)
        )
        details = "; ".join(f"{key}: {old.get(key)!r:.300} != {new.get(key)!r:.300}" for key in differing)
        pytest.fail(f"{path}: {details}")
    # the DICOM JSON text is what is stored: same text, hence equal after a JSON round trip too
    assert json.loads(got) == json.loads(expected) or "NaN" in got


def assert_all_same(paths: Sequence[Path]) -> None:
    assert paths
    for path in paths:
        assert_same_json(path)


# ---------------------------------------------------------------------------------------------------------
# The corpora
# ---------------------------------------------------------------------------------------------------------


def _corpus_id(path: Path) -> str:
    parts = path.parts
    return "/".join(parts[-2:])


@pytest.mark.parametrize("path", storable_test_files(), ids=_corpus_id)
def test_pydicom_corpus_file(path: Path) -> None:
    assert_same_json(path)


def test_charset_instances(tmp_path: Path) -> None:
    assert_all_same([instance.path for instance in charset_instances(tmp_path)])


def test_charset_samples_as_they_are() -> None:
    """pydicom's character set files themselves (not all storable), when read_header takes them."""
    paths = []
    for name in sorted(pydicom.data.get_charset_files("*.dcm")):
        path = Path(name)
        try:
            read_header(path)
        except Exception:
            continue
        paths.append(path)
    for path in paths:
        assert_same_json(path)


def test_ct_series(tmp_path: Path) -> None:
    assert_all_same(ct_series(tmp_path, slices=3))


def test_small_instances(tmp_path: Path) -> None:
    assert_all_same(small_instances(tmp_path, count=30, per_series=10))


def test_multi_series_study(tmp_path: Path) -> None:
    assert_all_same(multi_series_study(tmp_path, series=4, per_series=2, rows=64, cols=64))


@pytest.mark.skipif(importlib.util.find_spec("deid_data") is None, reason="deid-data not installed")
def test_deid_data_files() -> None:
    import deid_data  # type: ignore[import-not-found]

    root = Path(deid_data.__file__).parent
    paths = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        try:
            read_header(path)
        except Exception:
            continue
        paths.append(path)
    assert_all_same(paths)


def test_fast_path_leaves_a_ct_header_raw(tmp_path: Path) -> None:
    """The CT header is rendered from the raw bytes, not by converting its elements (read_header
    decodes only the attributes the index reads, to refuse a malformed one at step 1)."""
    (path,) = ct_series(tmp_path, slices=1)
    dataset = read_header(path).dataset
    raw_before = sum(isinstance(e, RawDataElement) for e in dataset._dict.values())
    dataset_to_json(dataset)
    raw_after = sum(isinstance(e, RawDataElement) for e in dataset._dict.values())
    assert raw_before > 30
    assert raw_after == raw_before


# ---------------------------------------------------------------------------------------------------------
# Odd values, written byte for byte
# ---------------------------------------------------------------------------------------------------------

_LONG_LENGTH_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}

# An element: (tag, VR, value) where the value is bytes, or for SQ a list of items (lists of elements);
# ("undefined", items) gives the sequence and its items undefined lengths.
Element = tuple[int, str, Any]


def _encode(elements: Sequence[Element], implicit: bool, little: bool) -> bytes:
    end = "<" if little else ">"
    out = bytearray()
    for tag, vr, value in elements:
        undefined = False
        if vr == "SQ":
            items = value
            if isinstance(value, tuple):
                undefined, items = True, value[1]
            body = bytearray()
            for item in items:
                encoded = _encode(item, implicit, little)
                if undefined:
                    body += struct.pack(f"{end}HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + encoded
                    body += struct.pack(f"{end}HHI", 0xFFFE, 0xE00D, 0)
                else:
                    body += struct.pack(f"{end}HHI", 0xFFFE, 0xE000, len(encoded)) + encoded
            if undefined:
                body += struct.pack(f"{end}HHI", 0xFFFE, 0xE0DD, 0)
            data = bytes(body)
        else:
            data = value
        length = 0xFFFFFFFF if undefined else len(data)
        out += struct.pack(f"{end}HH", tag >> 16, tag & 0xFFFF)
        if implicit:
            out += struct.pack(f"{end}I", length)
        elif vr in _LONG_LENGTH_VRS:
            out += vr.encode() + b"\0\0" + struct.pack(f"{end}I", length)
        else:
            out += vr.encode() + struct.pack(f"{end}H", length)
        out += data
    return bytes(out)


def _write(path: Path, elements: list[Element], transfer_syntax: str) -> Path:
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little = transfer_syntax != ExplicitVRBigEndian
    sop_uid = generate_uid(entropy_srcs=[path.name])
    identifying: list[Element] = [
        (0x00080016, "UI", SecondaryCaptureImageStorage.encode() + b"\0"),
        (0x00080018, "UI", sop_uid.encode() + (b"\0" if len(sop_uid) % 2 else b"")),
        (0x0020000D, "UI", b"1.2.3.4"),
        (0x0020000E, "UI", b"1.2.3.4.5\0"),
    ]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    buffer = io.BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    body = sorted(identifying + elements, key=lambda e: e[0])
    buffer.write(_encode(body, implicit, little))
    path.write_bytes(buffer.getvalue())
    return path


def _text_cases() -> list[Element]:
    return [
        (0x00080008, "CS", b"ORIGINAL \\PRIMARY\\"),
        (0x00080060, "CS", b"\0\0"),
        (0x00080054, "AE", b" AE1 \\ AE2  "),
        (0x00080020, "DA", b"20240101\\2023"),
        (0x00080030, "TM", b"101010.123 "),
        (0x00080070, "LO", b"MAKER \\ TWO\0"),
        (0x00081010, "SH", b"STATION-NAME-LONGER-THAN-16"),
        (0x00081030, "LO", b"x" * 70),
        (0x00081040, "LO", b""),
        (0x00104000, "LT", b"line one\\ with a backslash\r\n  "),
        (0x00081080, "LO", b"ONE\\\\THREE "),
        (0x00204000, "LT", b"z" * 6000),
        (0x00321066, "UT", b"reason \\ with backslash  "),
        (0x00081190, "UR", b"http://example.invalid/x  "),
        (0x00080012, "DA", b"2024"),
        (0x00100010, "PN", b"DOE^JOHN=IDEO=PHON"),
        (0x00100020, "LO", b"ID\x00"),
        (0x00101001, "PN", b"A^B\\C^D\\=X"),
        (0x00081050, "PN", b"ONE\\"),
        (0x00081060, "PN", b"="),
        (0x00081070, "PN", b"A=B=C=D"),
        (0x00101060, "PN", b"=ONLY^IDEO"),
        (0x00102160, "SH", b"\\"),
        (0x00180015, "CS", b"head"),
        (0x00200052, "UI", b" 1.2.3 \\4.5\0"),
        (0x00200200, "UI", b"01.2.abc"),
    ]


def _number_cases(little: bool) -> list[Element]:
    end = "<" if little else ">"
    return [
        (0x00180050, "DS", b"1\\\\2 "),
        (0x00180060, "DS", b" 1.5e3 "),
        (0x00180088, "DS", b"abc "),
        (0x00181020, "LO", b"v1"),
        (0x00181100, "DS", b"12345678901234567 "),
        (0x00181110, "DS", b"+.5 "),
        (0x00181111, "DS", b"nan "),
        (0x00181120, "DS", b"  "),
        (0x00181130, "DS", b"1_0 "),
        (0x00181150, "IS", b"1.0 "),
        (0x00181151, "IS", b"1.5 "),
        (0x00181152, "IS", b"99999999999999999999"),
        (0x00181160, "SH", b"FILTER"),
        (0x00181170, "IS", b"12\\"),
        (0x00181190, "DS", b"0.5\\0.6"),
        (0x00181210, "SH", b"K"),
        (0x00181153, "IS", b" -3 "),
        (0x00181154, "IS", b"\t "),
        (0x00181155, "CS", b"A"),
        (0x00189345, "FD", struct.pack(f"{end}d", float("inf"))),
        (0x00189306, "FD", struct.pack(f"{end}2d", 0.25, -1e300)),
        (0x00189307, "FD", struct.pack(f"{end}d", 2.0)),
        (0x00189310, "FD", struct.pack(f"{end}d", 1.0)),
        (0x00189311, "FD", b""),
        (0x00180086, "IS", b"1\\2\\3 "),
        (0x00280002, "US", struct.pack(f"{end}H", 1)),
        (0x00280008, "IS", b"1 "),
        (0x00280009, "AT", struct.pack(f"{end}HH", 0x0018, 0x1063)),
        (0x00280010, "US", struct.pack(f"{end}H", 2)),
        (0x00280011, "US", struct.pack(f"{end}H", 2)),
        (0x00280030, "DS", b"0.5\\0.5 "),
        (0x00280100, "US", struct.pack(f"{end}H", 8)),
        (0x00280101, "US", struct.pack(f"{end}H", 8)),
        (0x00280102, "US", struct.pack(f"{end}H", 7)),
        (0x00280103, "US", struct.pack(f"{end}H", 1)),
        (0x00280106, "SS", struct.pack(f"{end}h", -5)),
        (0x00281052, "DS", b"-1024 "),
        (0x00209165, "AT", struct.pack(f"{end}4H", 0x0020, 0x9056, 0x0020, 0x9057)),
        (0x00209167, "AT", b""),
        (0x00209157, "UL", struct.pack(f"{end}3L", 1, 2, 0xFFFFFFFF)),
        (0x00209241, "FL", struct.pack(f"{end}f", float("nan"))),
        (0x00209162, "US", struct.pack(f"{end}3H", 1, 2, 65535)),
        (0x00209221, "OB", b"\x01\x02\x03"),
        (0x00209222, "OB", b"\xff" * 5000),
        (0x00209228, "UL", struct.pack(f"{end}L", 7)),
        (0x0020920E, "OW", b"\x01\x02" * 40000),
        (0x00209170, "OB", b""),
        (0x00660016, "OF", struct.pack(f"{end}2f", 1.0, 2.0)),
        (0x00660040, "OL", struct.pack(f"{end}2L", 1, 2)),
        (0x0066002F, "SQ", []),
        (0x00720052, "AT", struct.pack(f"{end}HH", 0x0010, 0x0010)),
        (0x0072005E, "AE", b"AE\\"),
        (0x00720062, "CS", b"X "),
        (0x00720064, "IS", b"7"),
        (0x00720066, "LO", b"L"),
        (0x00720068, "LT", b"T"),
        (0x0072006A, "PN", b"P^N"),
        (0x0072006C, "SH", b"S"),
        (0x0072006E, "ST", b"st" * 600),
        (0x00720070, "UT", b"U"),
        (0x00720072, "DS", b"1.5"),
        (0x00720074, "FD", struct.pack(f"{end}d", 3.5)),
        (0x00720076, "FL", struct.pack(f"{end}f", 0.1)),
        (0x00720078, "UL", struct.pack(f"{end}L", 9)),
        (0x0072007A, "US", struct.pack(f"{end}H", 9)),
        (0x0072007C, "SL", struct.pack(f"{end}l", -9)),
        (0x0072007E, "SS", struct.pack(f"{end}h", -9)),
        (0x0072007F, "DA", b"20240102"),
        (0x00720080, "CS", b"cs"),
        (0x00720081, "SV", struct.pack(f"{end}q", -(2**40))),
        (0x00720082, "UV", struct.pack(f"{end}Q", 2**63)),
        (0x00720061, "DT", b"20240102030405.123456+0100 "),
        (0x00720063, "SQ", []),
    ]


def _sequence_cases(little: bool) -> list[Element]:
    end = "<" if little else ">"
    good_item: list[Element] = [
        (0x00080100, "SH", b"T-D1100 "),
        (0x00080102, "SH", b"SRT "),
        (0x00080104, "LO", b"Brain"),
        (0x00180050, "DS", b"2.5 "),
    ]
    return [
        (0x00082218, "SQ", [good_item, good_item]),  # Anatomic Region Sequence
        (0x00081032, "SQ", ("undefined", [good_item, []])),  # Procedure Code Sequence
        (0x00081110, "SQ", [[(0x00081150, "UI", b"01.2\0"), (0x00081155, "UI", b"1.2.3\0")]]),
        (0x00081111, "SQ", [[(0x00081150, "UI", b"1.2.840.10008.3.1.2.3.1\0")]]),
        (
            0x00081115,
            "SQ",
            [[(0x00081140, "SQ", [[(0x00081155, "UI", b"1.2 ")]]), (0x0020000E, "UI", b"1.3")]],
        ),
        (0x00081120, "SQ", [[(0x00100010, "PN", b"X" * 70)]]),
        (0x00081125, "SQ", [[(0x00180050, "DS", b"12345678901234567 ")]]),
        (0x00081140, "SQ", [[(0x00200013, "IS", b"1.5 ")]]),
        (0x00081145, "SQ", [[(0x00080070, "LO", b"x" * 70)]]),
        (0x00081150, "UI", b"1.2.3\0"),
        (0x00081198, "SQ", [[(0x00209128, "UL", struct.pack(f"{end}L", 5)), (0x00209056, "SS", b"\x01")]]),
        (0x00081199, "SQ", [[(0x00081190, "UR", b"u"), (0x00189307, "FD", struct.pack(f"{end}d", 1.0))]]),
        (0x00081250, "SQ", [[(0x00209222, "OB", b"\xee" * 4000), (0x00209221, "OB", b"\x01")]]),
        (0x00283000, "SQ", [[(0x00283002, "US", struct.pack(f"{end}3H", 256, 0, 8))]]),  # LUT Descriptor
        (0x00283010, "SQ", [[(0x00283002, "SS", struct.pack(f"{end}3h", -1, 0, 16))]]),
        (
            0x00400275,
            "SQ",
            [[(0x00321060, "LO", b"PROC\\X"), (0x00400007, "LO", b"ONE "), (0x00321064, "SQ", [])]],
        ),
        (0x00400260, "SQ", [[(0x00100010, "PN", b"A\\")]]),
        (0x00400555, "SQ", [[(0x0040A043, "SQ", [[(0x00080104, "LO", b"y" * 65)]])]]),
    ]


def _private_cases(little: bool) -> list[Element]:
    end = "<" if little else ">"
    return [
        (0x00190010, "LO", b"GEMS_ACQU_01"),
        (0x00191002, "SL", struct.pack(f"{end}l", -7)),
        (0x00191003, "DS", b"1.25"),
        (0x00191006, "UN", b"\x01\x02"),
        (0x00191011, "SS", struct.pack(f"{end}h", -3)),
        (0x00191018, "LO", b"private text "),
        (0x001910A3, "UL", struct.pack(f"{end}L", 99)),
        (0x001910F0, "OB", b"\x00\x01"),
        (0x00290010, "LO", b"UNKNOWN CREATOR"),
        (0x00291001, "OB", b"\x01\x02\x03\x04"),
        (0x00291002, "LO", b"text\\more "),
        (0x00291003, "UN", b"\x05" * 10),
        (0x00291004, "US", struct.pack(f"{end}H", 5)),
    ]


def _un_cases() -> list[Element]:
    return [
        (0x00101010, "UN", b"042Y"),  # Patient's Age, as UN
        (0x00104000, "UN", b"comment "),
    ]


def _charset_cases(charset: bytes, encodings: list[str], text: str) -> list[Element]:
    encoded = encode_string(text, encodings)
    if len(encoded) % 2:
        encoded += b" "
    return [
        (0x00080005, "CS", charset),
        (0x00081030, "LO", encoded),
        (0x00100010, "PN", encoded),
        (0x00104000, "LT", encoded),
        (0x00080090, "PN", b"ASCII^NAME"),
        (0x00081048, "PN", b"ASCII^ONE\\ASCII^TWO="),
        (0x00081040, "SH", b"ASCII"),
    ]


def _odd_file_cases() -> dict[str, tuple[list[Element], str]]:
    """Named data sets of odd values, each with the transfer syntax to write it in."""
    cases: dict[str, tuple[list[Element], str]] = {}
    for name, ts in (
        ("explicit_le", ExplicitVRLittleEndian),
        ("implicit_le", ImplicitVRLittleEndian),
        ("explicit_be", ExplicitVRBigEndian),
    ):
        little = ts != ExplicitVRBigEndian
        cases[f"text_{name}"] = (_text_cases(), ts)
        cases[f"numbers_{name}"] = (_number_cases(little), ts)
        cases[f"sequences_{name}"] = (_sequence_cases(little), ts)
        cases[f"private_{name}"] = (_private_cases(little), ts)
    cases["un_explicit"] = (_un_cases(), ExplicitVRLittleEndian)
    cases["implicit_unknown_and_repeaters"] = (
        [
            (0x00080000, "UL", struct.pack("<L", 10)),
            (0x00089999, "LO", b"unknown public"),
            (0x60003000, "OW", b"\x00\x01" * 8),
            (0x60000010, "US", struct.pack("<H", 4)),
            (0x00280106, "US", struct.pack("<H", 3)),
            (0x00280103, "US", struct.pack("<H", 0)),
            (0x00283002, "US", struct.pack("<3H", 4, 0, 8)),
        ],
        ImplicitVRLittleEndian,
    )
    cases["utf8"] = (_charset_cases(b"ISO_IR 192", ["UTF8"], "Ærøskøbing^Zoë"), ExplicitVRLittleEndian)
    cases["latin1"] = (_charset_cases(b"ISO_IR 100", ["latin_1"], "Müller^Hans"), ExplicitVRLittleEndian)
    cases["japanese_iso2022"] = (
        _charset_cases(
            b"\\ISO 2022 IR 87", ["iso8859", "iso2022_jp"], "Yamada^Tarou=山田^太郎=やまだ^たろう"
        ),
        ExplicitVRLittleEndian,
    )
    cases["invalid_utf8"] = (
        [
            (0x00080005, "CS", b"ISO_IR 192"),
            (0x00100010, "PN", b"BAD\xff\xfe^X"),
            (0x00081030, "LO", b"\xc3("),
        ],
        ExplicitVRLittleEndian,
    )
    cases["unknown_charset"] = (
        [(0x00080005, "CS", b"FOO_BAR "), (0x00081030, "LO", b"caf\xe9"), (0x00100010, "PN", b"N\xe9^X")],
        ExplicitVRLittleEndian,
    )
    cases["nested_charset"] = (
        [
            (0x00080005, "CS", b"ISO_IR 100"),
            (0x00081030, "LO", b"caf\xe9"),
            (
                0x00400275,
                "SQ",
                [
                    [
                        (0x00080005, "CS", b"ISO_IR 192"),
                        (0x00400007, "LO", "café".encode()),
                        (0x00100010, "PN", b"A"),
                    ]
                ],
            ),
        ],
        ExplicitVRLittleEndian,
    )
    # Bits Allocated: an attribute the index does not read (a malformed Rows refuses the instance).
    cases["wrong_length_number"] = (
        [(0x00280100, "US", b"\x01\x02\x03\x04\x05\x06\x07")],
        ExplicitVRLittleEndian,
    )
    cases["wrong_length_at"] = ([(0x00209165, "AT", b"\x01\x02\x03\x04\x05\x06")], ExplicitVRLittleEndian)
    return cases


@pytest.mark.parametrize("name", sorted(_odd_file_cases()))
def test_odd_values(tmp_path: Path, name: str) -> None:
    elements, transfer_syntax = _odd_file_cases()[name]
    path = _write(tmp_path / f"{name}.dcm", elements, transfer_syntax)
    read_header(path)  # the case must be a file simral accepts
    assert_same_json(path)


def test_already_converted_elements(tmp_path: Path) -> None:
    """Elements converted before the JSON is made (e.g. by Header.text) render the same."""
    elements, transfer_syntax = _odd_file_cases()["sequences_explicit_le"]
    path = _write(tmp_path / "converted.dcm", elements + _text_cases(), transfer_syntax)
    results = []
    for function in (reference_dataset_to_json, dataset_to_json):
        dataset = read_header(path).dataset
        for tag in list(dataset._dict)[::2]:
            with contextlib.suppress(Exception):
                dataset[tag]
        results.append(json.dumps(function(dataset), sort_keys=True))
    assert results[0] == results[1]


def test_deferred_binary_values_are_bulk_data_without_being_read(tmp_path: Path) -> None:
    elements, transfer_syntax = _odd_file_cases()["numbers_explicit_le"]
    path = _write(tmp_path / "deferred.dcm", elements, transfer_syntax)
    dataset = read_header(path).dataset
    deferred = dataset._dict[0x0020920E]
    assert isinstance(deferred, RawDataElement) and deferred.value is None
    assert dataset_to_json(dataset)["0020920E"] == {"vr": "OW", "BulkDataURI": "bulkdata/0020920E"}
    assert_same_json(path)
