"""Frame access for WADO-RS /frames and bulk data (simral.dicom.frames; PS3.18 §8.7.3, PS3.5 §8 and A.4)."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.pixels import pixel_array
from pydicom.pixels.utils import pack_bits
from pydicom.uid import ExplicitVRLittleEndian
from tests.corpus import data_file, part10

from simral.dicom.frames import (
    UNDEFINED_LENGTH,
    FrameError,
    UndecodableFrame,
    decoded_frames,
    media_type_of,
    pixel_layout,
    read_header,
    stored_frames,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class CountingReader(io.RawIOBase):
    """A seekable file that counts the bytes read through it."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("rb")
        self.name = str(path)
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readinto(self, buffer: Any) -> int:
        data = self._file.read(len(buffer))
        buffer[: len(data)] = data
        self.bytes_read += len(data)
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()


def frames_of(path: Path | BinaryIO, numbers: list[int], *, decoded: bool = False) -> list[bytes]:
    stream = path.open("rb") if isinstance(path, Path) else path
    try:
        layout = pixel_layout(stream)
        return list((decoded_frames if decoded else stored_frames)(stream, layout, numbers))
    finally:
        if isinstance(path, Path):
            stream.close()


# -- layout --------------------------------------------------------------------------------------


def test_layout_native_points_at_the_pixel_data_value() -> None:
    path = data_file("CT_small.dcm")
    dataset = dcmread(path)
    with path.open("rb") as stream:
        stream.seek(1234)  # any position
        layout = pixel_layout(stream)
        assert (layout.rows, layout.columns, layout.samples_per_pixel) == (128, 128, 1)
        assert (layout.bits_allocated, layout.bits_stored, layout.number_of_frames) == (16, 16, 1)
        assert layout.photometric_interpretation == "MONOCHROME2"
        assert layout.transfer_syntax_uid == ExplicitVRLittleEndian
        assert not layout.encapsulated
        assert layout.value_length == len(dataset.PixelData) == layout.frame_size
        stream.seek(layout.value_offset)
        assert stream.read(layout.value_length) == dataset.PixelData


def test_layout_encapsulated() -> None:
    path = data_file("emri_small_jpeg_2k_lossless.dcm")
    with path.open("rb") as stream:
        layout = pixel_layout(stream)
        assert layout.encapsulated and layout.value_length == UNDEFINED_LENGTH
        assert layout.number_of_frames == 10
        stream.seek(layout.value_offset)
        assert stream.read(4) == b"\xfe\xff\x00\xe0"  # the Basic Offset Table item (PS3.5 A.4)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("rtplan.dcm", "no Pixel Data"),
        ("image_dfl.dcm", "deflated"),
        ("no_meta.dcm", "not a DICOM Part 10 file"),
    ],
)
def test_layout_errors(name: str, message: str) -> None:
    with data_file(name).open("rb") as stream, pytest.raises(FrameError, match=message):
        pixel_layout(stream)


# -- stored frames -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["emri_small.dcm", "emri_small_big_endian.dcm", "SC_rgb_2frame.dcm", "rtdose.dcm"]
)
def test_stored_native_frames_are_slices_of_the_value(name: str) -> None:
    path = data_file(name)
    dataset = dcmread(path)
    frames = int(dataset.get("NumberOfFrames", 1))
    size = dataset.Rows * dataset.Columns * dataset.SamplesPerPixel * dataset.BitsAllocated // 8
    numbers = [frames, 1, (frames + 1) // 2]
    got = frames_of(path, numbers)
    assert got == [dataset.PixelData[(n - 1) * size : n * size] for n in numbers]


@pytest.mark.parametrize(
    "name",
    [
        "emri_small_RLE.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
        "examples_ybr_color.dcm",
        "SC_rgb_rle_2frame.dcm",
        "JPEG-LL.dcm",
        "MR_small_RLE.dcm",
        "US1_J2KR.dcm",
    ],
)
def test_stored_encapsulated_frames_match_pydicom(name: str) -> None:
    path = data_file(name)
    dataset = dcmread(path)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    reference = list(generate_frames(dataset.PixelData, number_of_frames=frames))
    numbers = sorted({frames, 1, (frames + 1) // 2}, reverse=True)
    assert frames_of(path, numbers) == [reference[n - 1] for n in numbers]


def test_stored_frames_read_only_what_is_needed() -> None:
    path = data_file("color3d_jpeg_baseline.dcm")  # 120 JPEG frames
    reference = list(generate_frames(dcmread(path).PixelData, number_of_frames=120))
    reader = CountingReader(path)
    with io.BufferedReader(reader, buffer_size=4096) as stream:
        layout = pixel_layout(stream)
        assert list(stored_frames(stream, layout, [77])) == [reference[76]]
    total = sum(len(frame) for frame in reference)
    assert reader.bytes_read < len(reference[76]) + total // 10


def _j2k_dataset() -> tuple[Dataset, list[bytes]]:
    dataset = dcmread(data_file("emri_small_jpeg_2k_lossless.dcm"))
    frames = list(generate_frames(dataset.PixelData, number_of_frames=10))
    return dataset, frames


@pytest.mark.parametrize(("fragments_per_frame", "has_bot"), [(3, False), (2, True), (1, False)])
def test_stored_frames_split_over_fragments(fragments_per_frame: int, has_bot: bool) -> None:
    """Multi-fragment frames are found by the Basic Offset Table, else by EOC/EOI markers (PS3.5 A.4)."""
    dataset, frames = _j2k_dataset()
    dataset.PixelData = encapsulate(frames, fragments_per_frame=fragments_per_frame, has_bot=has_bot)
    buffer = part10(dataset)
    got = frames_of(buffer, [10, 1, 4])
    for frame, number in zip(got, [10, 1, 4], strict=True):
        expected = frames[number - 1]
        assert frame[: len(expected)] == expected and len(frame) - len(expected) <= 1  # even-length padding
    assert frames_of(buffer, [4], decoded=True)[0] == pixel_array(dataset, index=3).astype("<u2").tobytes()


def test_stored_frames_use_the_extended_offset_table() -> None:
    """Extended Offset Table (7FE0,0001) and its Lengths (7FE0,0002) locate frames (PS3.3 C.7.6.3.1.8)."""
    dataset, frames = _j2k_dataset()
    odd = [frame + b"\x00" if len(frame) % 2 == 0 else frame for frame in frames]
    pixel_data, offsets, lengths = encapsulate_extended(odd)
    dataset.PixelData = pixel_data
    dataset.ExtendedOffsetTable = offsets
    dataset.ExtendedOffsetTableLengths = lengths  # pydicom's lengths include the padding byte
    buffer = part10(dataset)
    layout = pixel_layout(buffer)
    assert layout.extended_offsets is not None and len(layout.extended_offsets) == 10
    assert frames_of(buffer, [2, 9]) == [odd[1] + b"\x00", odd[8] + b"\x00"]
    dataset.ExtendedOffsetTableLengths = struct.pack("<10Q", *(len(frame) for frame in odd))
    assert frames_of(part10(dataset), [2, 9]) == [odd[1], odd[8]]


def test_stored_frames_without_boundaries_raise() -> None:
    dataset, frames = _j2k_dataset()
    # Three fragments that are not ends of frames: no offset table, no way to split into 10 frames.
    dataset.PixelData = encapsulate([frames[0][:100], frames[0][100:200], frames[0][200:]], has_bot=False)
    with pytest.raises(FrameError, match="cannot split"):
        frames_of(part10(dataset), [1])


def test_one_bit_frames_are_repacked_from_bit_zero() -> None:
    """Bits Allocated 1: frames of 15 bits do not start on byte boundaries (PS3.5 §8.1.1)."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 2, size=(4, 3, 5), dtype=np.uint8)
    dataset = dcmread(data_file("liver.dcm"))
    dataset.Rows, dataset.Columns, dataset.NumberOfFrames = 3, 5, 4
    dataset.PixelData = pack_bits(pixels)
    buffer = part10(dataset)
    numbers = [3, 1, 4, 2]
    expected = [pack_bits(pixels[n - 1], pad=False) for n in numbers]
    assert frames_of(buffer, numbers) == expected
    assert frames_of(buffer, numbers, decoded=True) == expected


def test_one_bit_frames_of_a_real_instance() -> None:
    path = data_file("liver.dcm")
    for number in (1, 3):
        expected = pack_bits(pixel_array(path, index=number - 1), pad=False)
        assert frames_of(path, [number]) == [expected]
        assert frames_of(data_file("liver_expb.dcm"), [number], decoded=True) == [expected]


@pytest.mark.parametrize("number", [0, -1, 11])
def test_out_of_range_frame_numbers(number: int) -> None:
    for name in ("emri_small.dcm", "emri_small_RLE.dcm"):
        with pytest.raises(FrameError, match="out of range"):
            frames_of(data_file(name), [1, number])
        with pytest.raises(FrameError, match="out of range"):
            frames_of(data_file(name), [number], decoded=True)


def test_truncated_pixel_data() -> None:
    with pytest.raises(FrameError, match="truncated"):
        frames_of(data_file("MR_truncated.dcm"), [1])
    with pytest.raises(FrameError, match="truncated"):
        frames_of(data_file("emri_small_jpeg_2k_lossless_too_short.dcm"), [1])


# -- decoded frames ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "emri_small_RLE.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
        "JPEG-LL.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "SC_rgb_rle_16bit_2frame.dcm",
        "SC_rgb_rle_32bit_2frame.dcm",
        "US1_J2KR.dcm",
        "color3d_jpeg_baseline.dcm",  # YBR_FULL_422 JPEG: decoded to RGB
        "rtdose_rle.dcm",
    ],
)
def test_decoded_frames_equal_pydicom_pixel_array(name: str) -> None:
    path = data_file(name)
    with path.open("rb") as stream:
        layout = pixel_layout(stream)
        numbers = sorted({layout.number_of_frames, 1})
        got = list(decoded_frames(stream, layout, numbers))
    for frame, number in zip(got, numbers, strict=True):
        array = pixel_array(path, index=number - 1)
        assert frame == array.astype(array.dtype.newbyteorder("<")).tobytes()
        assert (
            len(frame) == layout.rows * layout.columns * layout.samples_per_pixel * layout.bits_allocated // 8
        )


def test_decoded_native_frames_are_little_endian() -> None:
    little = frames_of(data_file("emri_small.dcm"), [2, 7], decoded=True)
    big = frames_of(data_file("emri_small_big_endian.dcm"), [2, 7], decoded=True)
    stored_big = frames_of(data_file("emri_small_big_endian.dcm"), [2, 7])
    assert big == little
    assert stored_big != little  # stored frames stay as stored
    assert little[1] == pixel_array(data_file("emri_small.dcm"), index=6).astype("<u2").tobytes()


def test_undecodable_frame() -> None:
    with pytest.raises(UndecodableFrame):
        frames_of(data_file("JPEG2000-embedded-sequence-delimiter.dcm"), [1], decoded=True)


def test_read_header_returns_the_dataset() -> None:
    with data_file("MR_small.dcm").open("rb") as stream:
        dataset, layout = read_header(stream)
    assert dataset.Modality == "MR" and "PixelData" not in dataset
    assert layout.bits_stored == 16 and layout.pixel_representation == 1


# -- media types (PS3.18 Table 8.7.3-5) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("uid", "media_type"),
    [
        ("1.2.840.10008.1.2.4.50", "image/jpeg"),
        ("1.2.840.10008.1.2.4.51", "image/jpeg"),
        ("1.2.840.10008.1.2.4.57", "image/jpeg"),
        ("1.2.840.10008.1.2.4.70", "image/jpeg"),
        ("1.2.840.10008.1.2.4.80", "image/jls"),
        ("1.2.840.10008.1.2.4.81", "image/jls"),
        ("1.2.840.10008.1.2.4.90", "image/jp2"),
        ("1.2.840.10008.1.2.4.91", "image/jp2"),
        ("1.2.840.10008.1.2.4.92", "image/jpx"),
        ("1.2.840.10008.1.2.4.93", "image/jpx"),
        ("1.2.840.10008.1.2.5", "image/dicom-rle"),
        ("1.2.840.10008.1.2.4.201", "image/jphc"),
        ("1.2.840.10008.1.2.4.102", "video/mp4"),
        ("1.2.840.10008.1.2", None),
        ("1.2.840.10008.1.2.1", None),
        ("1.2.840.10008.1.2.2", None),
        ("1.2.840.10008.1.2.1.99", None),
    ],
)
def test_media_type_of(uid: str, media_type: str | None) -> None:
    assert media_type_of(uid) == media_type
