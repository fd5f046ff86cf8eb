"""Rendered frames for WADO-RS /rendered and /thumbnail (PS3.18 §9.5.1.3, §8.3.5, §8.7.4).

One frame is decoded (:mod:`simral.dicom.frames`), put through the grayscale pipeline of PS3.4 N.2
(Modality LUT, VOI LUT / window, MONOCHROME1 inversion) or converted to RGB, cropped and scaled
to the viewport, and encoded as JPEG, PNG or GIF with 8 bits per sample.

Not supported: the ``annotation``, ``charset`` and ``iccprofile`` parameters (ignored), presentation
states, overlays, and Float Pixel Data.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, convert_color_space

from simral.dicom.frames import frame_arrays, read_header

#: Rendered media types this module can produce (PS3.18 Table 8.7.4-1), by Pillow format name.
RENDERED_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}
DEFAULT_MEDIA_TYPE = "image/jpeg"
DEFAULT_QUALITY = 90
THUMBNAIL_VIEWPORT = (128, 128)
#: Largest viewport side accepted, to bound the memory of a rendered image.
MAX_VIEWPORT = 8192
_FUNCTIONS = {"LINEAR": "LINEAR", "LINEAR_EXACT": "LINEAR_EXACT", "SIGMOID": "SIGMOID"}


class RenderError(ValueError):
    """Invalid rendering parameters (HTTP 400, PS3.18 §8.3.5)."""


class NotAcceptable(ValueError):
    """None of the acceptable media types can be rendered (HTTP 406, PS3.18 §8.7.4).

    Deliberately not a :class:`RenderError`, so the two map to distinct status codes.
    """


def _select_media_type(accept: str) -> str:
    """The first supported type of an Accept value by q-value, ``*/*`` and ``image/*`` → JPEG (RFC 9110)."""
    candidates: list[tuple[float, int, str]] = []
    for position, entry in enumerate(accept.split(",")):
        parts = [part.strip() for part in entry.split(";")]
        media = parts[0].lower()
        if not media:
            continue
        quality = 1.0
        params: dict[str, str] = {}
        for param in parts[1:]:
            key, _, value = param.partition("=")
            params[key.strip().lower()] = value.strip().strip('"').lower()
        try:
            quality = float(params.get("q", "1"))
        except ValueError:
            quality = 0.0
        if media == "multipart/related" and "type" in params:
            media = params["type"]
        if quality > 0:
            candidates.append((-quality, position, media))
    for _, _, media in sorted(candidates):
        if media in RENDERED_TYPES:
            return media
        if media in ("*/*", "image/*"):
            return DEFAULT_MEDIA_TYPE
    raise NotAcceptable(f"cannot render as {accept!r}; supported: {', '.join(RENDERED_TYPES)}")


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RenderError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise RenderError(f"{what}: {text!r} is not a finite number")
    return value


def _integer(text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise RenderError(f"{what}: {text!r} is not an integer") from None


@dataclass(frozen=True)
class RenderParams:
    """Rendering parameters of PS3.18 §8.3.5.1 (accept, quality, viewport, window)."""

    media_type: str = DEFAULT_MEDIA_TYPE
    #: JPEG quality 1..100 (PS3.18 §8.3.5.1.2); ignored for PNG and GIF.
    quality: int = DEFAULT_QUALITY
    #: (center, width, function) with function LINEAR, LINEAR_EXACT or SIGMOID (PS3.3 C.11.2.1.2).
    window: tuple[float, float, str] | None = None
    #: (vw, vh): the region is scaled to fit, aspect ratio kept (PS3.18 §8.3.5.1.3).
    viewport: tuple[int, int] | None = None
    #: Source region (sx, sy, sw, sh); sw / sh None = to the image edge, negative = flipped.
    region: tuple[int, int, int | None, int | None] | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str], accept: str | None, *, thumbnail: bool) -> RenderParams:
        """Parse the query parameters; the ``accept`` parameter overrides the Accept header (§8.3.3.1).

        Raises :class:`RenderError` for malformed values and :class:`NotAcceptable` when no
        acceptable media type can be rendered. Thumbnails default to a 128x128 viewport.
        """
        accept_value = query.get("accept") or accept or ""
        media_type = _select_media_type(accept_value) if accept_value.strip() else DEFAULT_MEDIA_TYPE

        quality = DEFAULT_QUALITY
        if (text := query.get("quality")) is not None:
            quality = _integer(text, "quality")
            if not 1 <= quality <= 100:
                raise RenderError(f"quality: {quality} is not within 1..100")

        window = None
        if (text := query.get("window")) is not None:
            window = _parse_window(text)

        viewport: tuple[int, int] | None = THUMBNAIL_VIEWPORT if thumbnail else None
        region = None
        if (text := query.get("viewport")) is not None:
            viewport, region = _parse_viewport(text)
        return cls(media_type=media_type, quality=quality, window=window, viewport=viewport, region=region)


def _parse_window(text: str) -> tuple[float, float, str]:
    """``window=center,width[,function]`` (PS3.18 §8.3.5.1.4); function names as in PS3.18 or PS3.3."""
    values = [value.strip() for value in text.split(",")]
    if len(values) not in (2, 3):
        raise RenderError(f"window: expected center,width,function, got {text!r}")
    center = _number(values[0], "window center")
    width = _number(values[1], "window width")
    name = (values[2] if len(values) == 3 and values[2] else "linear").upper().replace("-", "_")
    function = _FUNCTIONS.get(name)
    if function is None:
        raise RenderError(f"window: unknown function {values[2]!r} (linear, linear-exact or sigmoid)")
    if function == "LINEAR" and width < 1:
        raise RenderError(f"window: width {values[1]} must be at least 1 for linear (PS3.3 C.11.2.1.2)")
    if width <= 0:
        raise RenderError(f"window: width {values[1]} must be greater than 0")
    return center, width, function


def _parse_viewport(text: str) -> tuple[tuple[int, int], tuple[int, int, int | None, int | None] | None]:
    """``viewport=vw,vh[,sx,sy,sw,sh]`` (PS3.18 §8.3.5.1.3)."""
    values = [value.strip() for value in text.split(",")]
    if len(values) not in (2, 6):
        raise RenderError(f"viewport: expected vw,vh or vw,vh,sx,sy,sw,sh, got {text!r}")
    vw, vh = _integer(values[0], "viewport width"), _integer(values[1], "viewport height")
    if not (0 < vw <= MAX_VIEWPORT and 0 < vh <= MAX_VIEWPORT):
        raise RenderError(f"viewport: size {vw}x{vh} not within 1..{MAX_VIEWPORT}")
    if len(values) == 2:
        return (vw, vh), None
    sx = _integer(values[2], "viewport sx") if values[2] else 0
    sy = _integer(values[3], "viewport sy") if values[3] else 0
    sw = _integer(values[4], "viewport sw") if values[4] else None
    sh = _integer(values[5], "viewport sh") if values[5] else None
    if sx < 0 or sy < 0:
        raise RenderError("viewport: sx and sy must not be negative")
    if sw == 0 or sh == 0:
        raise RenderError("viewport: sw and sh must not be zero")
    return (vw, vh), (sx, sy, sw, sh)


# -- pixel pipeline (PS3.4 N.2) ----------------------------------------------------------------


def _first(value: Any) -> float | None:
    try:
        if value is None or value == "":
            return None
        number = float(value[0] if isinstance(value, list | tuple | MultiValue) else value)
    except (TypeError, ValueError, IndexError):
        return None
    return number if math.isfinite(number) else None


def _frame_item(dataset: Dataset, frame: int, sequence: str) -> Dataset | None:
    """The functional group macro item for ``frame`` (PS3.3 C.7.6.16): per-frame, else shared."""
    for groups_keyword, index in (
        ("PerFrameFunctionalGroupsSequence", frame - 1),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = dataset.get(groups_keyword)
        if not groups or index >= len(groups):
            continue
        items = groups[index].get(sequence)
        if items:
            item: Dataset = items[0]
            return item
    return None


def _modality(array: np.ndarray, dataset: Dataset, frame: int) -> np.ndarray:
    """Modality LUT: Rescale Slope / Intercept or Modality LUT Sequence (PS3.3 C.11.1)."""
    item = _frame_item(dataset, frame, "PixelValueTransformationSequence")
    if item is not None and "RescaleSlope" in item:
        slope = _first(item.get("RescaleSlope")) or 1.0
        intercept = _first(item.get("RescaleIntercept")) or 0.0
        return array.astype(np.float64) * slope + intercept
    try:
        result: np.ndarray = apply_modality_lut(array, dataset)
    except Exception:  # malformed LUT / rescale values: render the stored values
        return array.astype(np.float64)
    return result.astype(np.float64)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI window to 0..255 (PS3.3 C.11.2.1.2.1 LINEAR, .2 LINEAR_EXACT, C.11.2.1.3.1 SIGMOID)."""
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        scaled = ((values - center) / width + 0.5) * 255.0
    elif width > 1:
        scaled = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    else:  # width 1: a threshold at center - 0.5
        scaled = np.where(values > center - 0.5, 255.0, 0.0)
    return np.clip(scaled, 0.0, 255.0)


def _header_window(dataset: Dataset, frame: int) -> tuple[float, float, str] | None:
    item = _frame_item(dataset, frame, "FrameVOILUTSequence")
    for source in (item, dataset):
        if source is None:
            continue
        center, width = _first(source.get("WindowCenter")), _first(source.get("WindowWidth"))
        if center is None or width is None:
            continue
        function = str(source.get("VOILUTFunction", "") or "LINEAR").strip().upper()
        function = _FUNCTIONS.get(function, "LINEAR")
        if width >= 1 or (width > 0 and function != "LINEAR"):
            return center, width, function
    return None


def _min_max(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float64)
    return (values - low) * (255.0 / (high - low))


def _grayscale(
    array: np.ndarray, dataset: Dataset, frame: int, params: RenderParams, inverse: bool
) -> np.ndarray:
    values = _modality(array, dataset, frame)
    window = params.window or _header_window(dataset, frame)
    if window is not None:
        out = _window(values, *window)
    elif "VOILUTSequence" in dataset:
        try:
            out = _min_max(np.asarray(apply_voi(values, dataset), dtype=np.float64))
        except Exception:
            out = _min_max(values)
    else:
        out = _min_max(values)
    out8 = np.rint(out).astype(np.uint8)
    return 255 - out8 if inverse else out8


def _to_8bit(array: np.ndarray, bits: int) -> np.ndarray:
    if array.dtype == np.uint8 and bits <= 8:
        return array
    top = float(2**bits - 1) if bits > 0 else float(array.max() or 1)
    return np.rint(np.clip(array.astype(np.float64) * (255.0 / top), 0, 255)).astype(np.uint8)


def _color(array: np.ndarray, dataset: Dataset, photometric: str, bits_stored: int) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(array, dataset)
            descriptor = dataset.get("RedPaletteColorLookupTableDescriptor") or [0, 0, 8]
            bits = int(descriptor[2])
        except Exception as exc:
            raise RenderError(f"cannot apply the palette color lookup table: {exc}") from None
        # Some writers put 8-bit entries in a table declared as 16-bit (PS3.3 C.7.6.3.1.5).
        return _to_8bit(rgb, 16 if bits > 8 and rgb.max() > 255 else 8)
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        array = convert_color_space(array, photometric, "RGB")
    return _to_8bit(array, bits_stored)


def _viewport(image: Image.Image, params: RenderParams) -> Image.Image:
    """Crop the source region, flip for negative sw / sh, and scale to fit (PS3.18 §8.3.5.1.3)."""
    if params.region is not None:
        sx, sy, sw, sh = params.region
        width, height = image.size
        sw = width - sx if sw is None else sw
        sh = height - sy if sh is None else sh
        left, right = sorted((sx, sx + sw))
        top, bottom = sorted((sy, sy + sh))
        left, top = max(0, left), max(0, top)
        right, bottom = min(width, right), min(height, bottom)
        if right <= left or bottom <= top:
            raise RenderError(
                f"viewport: source region {params.region} lies outside the {width}x{height} image"
            )
        image = image.crop((left, top, right, bottom))
        if sw < 0:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if sh < 0:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if params.viewport is not None:
        vw, vh = params.viewport
        width, height = image.size
        scale = min(vw / width, vh / height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image


def render_frame(stream: BinaryIO, frame: int, params: RenderParams) -> bytes:
    """Render frame ``frame`` (1-based) of the Part 10 file in ``stream`` (PS3.18 §9.5.1.3).

    Raises :class:`simral.dicom.frames.FrameError` for a missing frame or undecodable pixel data.
    """
    dataset, layout = read_header(stream)
    array, photometric = next(frame_arrays(stream, layout, [frame]))
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if array.ndim == 3:
            array = array[..., 0]
        pixels = _grayscale(array, dataset, frame, params, inverse=photometric == "MONOCHROME1")
        image = Image.fromarray(pixels)
    else:
        if array.ndim == 2 and photometric != "PALETTE COLOR":
            array = np.stack([array] * 3, axis=-1)
        rgb = _color(array, dataset, photometric, layout.bits_stored or layout.bits_allocated)
        image = Image.fromarray(np.ascontiguousarray(rgb[..., :3]))
    image = _viewport(image, params)
    output = io.BytesIO()
    format_name = RENDERED_TYPES.get(params.media_type)
    if format_name is None:
        raise NotAcceptable(f"cannot render as {params.media_type}")
    if format_name == "JPEG":
        image.save(output, format="JPEG", quality=params.quality)
    else:
        image.save(output, format=format_name)
    return output.getvalue()
