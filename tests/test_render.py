"""Rendered frames and thumbnails (simral.dicom.render; PS3.18 §8.3.5, §9.5.1.3)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.pixels import pixel_array
from tests.corpus import data_file, part10

from simral.dicom.frames import FrameError
from simral.dicom.render import NotAcceptable, RenderError, RenderParams, render_frame

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def params(
    query: dict[str, str] | None = None, accept: str | None = None, *, thumbnail: bool = False
) -> RenderParams:
    return RenderParams.from_query(query or {}, accept, thumbnail=thumbnail)


def render(source: str | io.BytesIO, query: dict[str, str] | None = None, frame: int = 1) -> Image.Image:
    """Render ``source`` (a test file name or a Part 10 buffer) and decode the result with Pillow."""
    rendered = params(query)
    if isinstance(source, str):
        with data_file(source).open("rb") as stream:
            data = render_frame(stream, frame, rendered)
    else:
        source.seek(0)
        data = render_frame(source, frame, rendered)
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


# -- parameters ----------------------------------------------------------------------------------


def test_defaults() -> None:
    assert params() == RenderParams("image/jpeg", 90, None, None, None)
    assert params(thumbnail=True).viewport == (128, 128)
    assert params({"viewport": "64,32"}, thumbnail=True).viewport == (64, 32)


def test_parse_parameters() -> None:
    parsed = params({"window": "40,400,linear-exact", "viewport": "256,128", "quality": "55"})
    assert parsed.window == (40.0, 400.0, "LINEAR_EXACT")
    assert parsed.viewport == (256, 128) and parsed.region is None
    assert parsed.quality == 55
    assert params({"window": "-600.5,1500,SIGMOID"}).window == (-600.5, 1500.0, "SIGMOID")
    assert params({"window": "10,20"}).window == (10.0, 20.0, "LINEAR")
    region = params({"viewport": "100,100,10,20,-30,40"})
    assert region.viewport == (100, 100) and region.region == (10, 20, -30, 40)
    assert params({"viewport": "100,100,,,,"}).region == (0, 0, None, None)


@pytest.mark.parametrize(
    ("accept_query", "accept_header", "expected"),
    [
        (None, None, "image/jpeg"),
        (None, "image/png", "image/png"),
        (None, "application/dicom, image/png;q=0.5, image/gif", "image/gif"),
        (None, "image/webp, image/png;q=0.1", "image/png"),
        (None, "image/png;q=0, */*", "image/jpeg"),
        (None, 'multipart/related; type="image/png"', "image/png"),
        ("image/gif", "image/png", "image/gif"),  # the query parameter overrides the header
    ],
)
def test_accept(accept_query: str | None, accept_header: str | None, expected: str) -> None:
    query = {"accept": accept_query} if accept_query else {}
    assert params(query, accept_header).media_type == expected


@pytest.mark.parametrize("accept", ["application/dicom", "image/webp, image/jp2", "image/png;q=0"])
def test_not_acceptable(accept: str) -> None:
    with pytest.raises(NotAcceptable):
        params({}, accept)
    with pytest.raises(NotAcceptable):
        params({"accept": accept}, "image/jpeg")


@pytest.mark.parametrize(
    "query",
    [
        {"window": "abc"},
        {"window": "40"},
        {"window": "40,0,linear"},
        {"window": "40,0.5,linear"},
        {"window": "40,-3,sigmoid"},
        {"window": "40,400,cubic"},
        {"window": "nan,400"},
        {"viewport": "0,10"},
        {"viewport": "10"},
        {"viewport": "1,2,3"},
        {"viewport": "10,10,-1,0,5,5"},
        {"viewport": "10,10,0,0,0,5"},
        {"viewport": "99999,10"},
        {"quality": "0"},
        {"quality": "101"},
        {"quality": "high"},
    ],
)
def test_bad_parameters(query: dict[str, str]) -> None:
    with pytest.raises(RenderError):
        params(query)
    assert not issubclass(NotAcceptable, RenderError)


# -- rendering -----------------------------------------------------------------------------------


def test_render_grayscale_jpeg() -> None:
    image = render("CT_small.dcm")
    assert image.format == "JPEG" and image.mode == "L" and image.size == (128, 128)
    values = pixels(image)
    assert values.std() > 10


def test_render_png_matches_the_linear_window_formula() -> None:
    """PS3.3 C.11.2.1.2.1 (LINEAR) applied to the modality values of CT_small."""
    image = render("CT_small.dcm", {"accept": "image/png", "window": "40,400,linear"})
    assert image.format == "PNG" and image.mode == "L"
    dataset = dcmread(data_file("CT_small.dcm"))
    values = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    expected = np.clip(((values - 39.5) / 399 + 0.5) * 255, 0, 255)
    assert np.abs(pixels(image) - expected).max() <= 1


def test_window_changes_the_output() -> None:
    narrow = pixels(render("CT_small.dcm", {"accept": "image/png", "window": "40,80"}))
    wide = pixels(render("CT_small.dcm", {"accept": "image/png", "window": "40,2000"}))
    sigmoid = pixels(render("CT_small.dcm", {"accept": "image/png", "window": "40,80,sigmoid"}))
    assert not np.array_equal(narrow, wide) and not np.array_equal(narrow, sigmoid)
    assert (pixels(render("CT_small.dcm", {"accept": "image/png", "window": "-100000,10"})) == 255).all()
    assert (pixels(render("CT_small.dcm", {"accept": "image/png", "window": "100000,10"})) == 0).all()


def test_header_window_is_the_default() -> None:
    dataset = dcmread(data_file("MR_small.dcm"))
    dataset.WindowCenter, dataset.WindowWidth = 600, 400
    with_header = pixels(render(part10(dataset), {"accept": "image/png"}))
    explicit = pixels(render(part10(dataset), {"accept": "image/png", "window": "600,400,linear"}))
    del dataset.WindowCenter, dataset.WindowWidth
    min_max = pixels(render(part10(dataset), {"accept": "image/png"}))
    assert np.array_equal(with_header, explicit)
    assert not np.array_equal(with_header, min_max)
    assert min_max.min() == 0 and min_max.max() == 255


def test_functional_group_window_and_rescale() -> None:
    """Enhanced CT: Frame VOI LUT and Pixel Value Transformation in the shared groups (PS3.3 C.7.6.16)."""
    dataset = dcmread(data_file("eCT_Supplemental.dcm"), stop_before_pixels=True)
    voi = dataset.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    window = f"{float(voi.WindowCenter)},{float(voi.WindowWidth)},linear"
    default = pixels(render("eCT_Supplemental.dcm", {"accept": "image/png"}, frame=2))
    explicit = pixels(render("eCT_Supplemental.dcm", {"accept": "image/png", "window": window}, frame=2))
    assert np.array_equal(default, explicit) and default.std() > 5


def test_monochrome1_is_inverted() -> None:
    dataset = dcmread(data_file("MR_small.dcm"))
    query = {"accept": "image/png", "window": "600,800"}
    mono2 = pixels(render(part10(dataset), query))
    dataset.PhotometricInterpretation = "MONOCHROME1"
    mono1 = pixels(render(part10(dataset), query))
    assert np.array_equal(mono1, 255 - mono2)


def test_viewport_keeps_the_aspect_ratio() -> None:
    assert render("CT_small.dcm", {"viewport": "64,32"}).size == (32, 32)
    assert render("JPEG-LL.dcm", {"viewport": "100,100"}).size == (25, 100)  # 256 x 1024
    assert render("MR_small.dcm", {"viewport": "256,256"}).size == (256, 256)  # scaled up
    assert render("CT_small.dcm", {"viewport": "50,50,0,0,64,32"}).size == (50, 25)


def test_thumbnail() -> None:
    with data_file("US1_J2KR.dcm").open("rb") as stream:
        data = render_frame(stream, 1, params(thumbnail=True))
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.mode == "RGB" and image.size == (128, 96)


def test_region_crop_and_flip() -> None:
    query = {"accept": "image/png", "window": "40,400"}
    left = pixels(render("CT_small.dcm", {**query, "viewport": "64,128,0,0,64,128"}))
    flipped = pixels(render("CT_small.dcm", {**query, "viewport": "64,128,64,0,-64,128"}))
    whole = pixels(render("CT_small.dcm", query))
    assert np.array_equal(left, whole[:, :64])
    assert np.array_equal(flipped, left[:, ::-1])
    upside_down = pixels(render("CT_small.dcm", {**query, "viewport": "128,128,0,128,,-128"}))
    assert np.array_equal(upside_down, whole[::-1])
    with pytest.raises(RenderError, match="outside"):
        render("CT_small.dcm", {"viewport": "10,10,500,500,10,10"})


def test_rgb_png_is_the_pixel_data() -> None:
    image = render("SC_rgb.dcm", {"accept": "image/png"})
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), dcmread(data_file("SC_rgb.dcm")).pixel_array)


def test_ybr_jpeg_multiframe() -> None:
    first = render("color3d_jpeg_baseline.dcm", {"accept": "image/png"}, frame=1)
    later = render("color3d_jpeg_baseline.dcm", {"accept": "image/png"}, frame=60)
    assert first.mode == "RGB" and first.size == (640, 480)
    expected = pixel_array(data_file("color3d_jpeg_baseline.dcm"), index=59)
    assert np.array_equal(np.asarray(later), expected)
    assert not np.array_equal(np.asarray(first), np.asarray(later))


def test_palette_color() -> None:
    image = render("examples_palette.dcm", {"accept": "image/png"})
    values = pixels(image)
    assert image.mode == "RGB" and image.size == (800, 350)
    assert (values[..., 0] != values[..., 1]).any()  # really coloured


def test_one_bit_image() -> None:
    values = pixels(render("liver.dcm", {"accept": "image/png"}, frame=2))
    assert set(np.unique(values)) == {0, 255}


def test_multiframe_frames_differ() -> None:
    query = {"accept": "image/png"}
    assert not np.array_equal(
        pixels(render("emri_small.dcm", query, 1)), pixels(render("emri_small.dcm", query, 5))
    )
    with pytest.raises(FrameError, match="out of range"):
        render("emri_small.dcm", query, 11)


def test_quality_and_gif() -> None:
    with data_file("MR_small.dcm").open("rb") as stream:
        low = render_frame(stream, 1, params({"quality": "10", "viewport": "256,256"}))
        high = render_frame(stream, 1, params({"quality": "95", "viewport": "256,256"}))
    assert len(low) < len(high)
    gif = render("US1_J2KR.dcm", {"accept": "image/gif", "viewport": "64,64"})
    assert gif.format == "GIF" and gif.size == (64, 48)
