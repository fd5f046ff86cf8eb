"""Header parsing and validation (DESIGN.md §3 step 1) and the matching rules (PS3.4 C.2.2.2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from tests.corpus import bad_inputs, storable_test_files

from simral.dicom.header import RejectedInstance, read_header
from simral.dicom.matching import normalise_tm, parse_match


def test_every_storable_corpus_file_is_accepted() -> None:
    for path in storable_test_files():
        header = read_header(path)
        assert header.sop_uid == str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        model = header.json_model()
        assert "7FE00010" not in model and "00020010" not in model


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("truncated", "cut short"),
        ("no_meta", "not a DICOM Part 10 file"),
        ("missing_study_uid", "missing StudyInstanceUID"),
        ("missing_sop_uid", "missing SOPInstanceUID"),
        ("absurd_length", "beyond the end of the data"),
        ("garbage", "not a DICOM Part 10 file"),
    ],
)
def test_bad_files_are_refused_with_a_reason(tmp_path: Path, name: str, reason: str) -> None:
    with pytest.raises(RejectedInstance, match=reason):
        read_header(bad_inputs(tmp_path)[name])


def test_truncated_encapsulated_pixel_data_is_refused(tmp_path: Path) -> None:
    encapsulated = [
        p
        for p in storable_test_files()
        if dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_encapsulated
    ]
    assert encapsulated
    for path in encapsulated:
        data = path.read_bytes()
        cut = tmp_path / path.name
        cut.write_bytes(data[: len(data) - 100])
        with pytest.raises(RejectedInstance, match="truncated"):
            read_header(cut)


@pytest.mark.parametrize(
    ("value", "vr", "candidate", "expected"),
    [
        ("DOE*", "PN", "doe^john", True),
        ("DOE*", "PN", "ROE^JOHN", False),
        ("D?E", "LO", "DOE", True),
        ("D?E", "LO", "doe", False),  # case-sensitive outside PN
        ("20200101-20201231", "DA", "20200615", True),
        ("20200101-20201231", "DA", "20210101", False),
        ("-1030", "TM", normalise_tm("103059"), True),
        ("-1030", "TM", normalise_tm("1031"), False),
        ("1.2\\1.3", "UI", "1.3", True),
        ("", "LO", "anything", True),
        ("*", "LO", "", True),
        ("YAMADA^TAROU", "PN", "Yamada^Tarou=山田^太郎=やまだ^たろう", True),
    ],
)
def test_matching(value: str, vr: str, candidate: str, expected: bool) -> None:
    assert parse_match(value, vr).matches(candidate) is expected
