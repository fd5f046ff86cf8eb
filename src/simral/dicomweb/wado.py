"""WADO-RS bodies (PS3.18 §10.4): instances as stored or transcoded, metadata, bulk data, frames.

Every body is a generator: a study is sent one instance (or one chunk of an instance) at a time.
"""

from __future__ import annotations

import asyncio
import copy
import io
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from starlette.concurrency import iterate_in_threadpool

from simral.archive.service import InstanceMetadata, StoredInstance, local_copy, open_blob
from simral.context import AppContext
from simral.dicom.coerce import coerced_bytes
from simral.dicom.frames import decoded_frames, pixel_layout, stored_frames
from simral.dicom.header import DEFER_SIZE
from simral.dicom.render import RenderParams, render_frame
from simral.dicom.transcode import transcode_file
from simral.dicomweb.multipart import closing, part_head

log = logging.getLogger(__name__)

#: Read size when streaming stored files (a 512×512 CT slice is one read).
READ_SIZE = 4 * 1024 * 1024


def blob_chunks(ctx: AppContext, key: str) -> Iterator[bytes]:
    """The stored bytes of a blob (its staged copy while it is being published)."""
    with open_blob(ctx, key) as stream:
        while chunk := stream.read(READ_SIZE):
            yield chunk


def transcoded(ctx: AppContext, instance: StoredInstance, target: str) -> bytes:
    with local_copy(ctx, instance.blob_key) as path:
        dataset = transcode_file(path, target)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def read_whole(ctx: AppContext, key: str) -> bytes:
    """A blob's bytes in one read (used for blobs up to :data:`WHOLE_READ`)."""
    return b"".join(blob_chunks(ctx, key))


#: Instances read ahead of the one being sent by a retrieve.
READ_AHEAD = 4
#: Blobs up to this size are read in one worker-thread call; larger ones chunk by chunk.
WHOLE_READ = 16 * 1024 * 1024


def coerced(ctx: AppContext, instance: StoredInstance, target: str) -> bytes:
    """An instance in ``target`` with the patient identification its receiver knows."""
    assert instance.shown_patient is not None
    with local_copy(ctx, instance.blob_key) as path:
        return coerced_bytes(path, instance.shown_patient, target)


def _load_part(ctx: AppContext, instance: StoredInstance, target: str) -> bytes | None:
    """An instance's bytes in ``target`` (None: too large to hold, stream it in chunks)."""
    if instance.shown_patient is not None:
        return coerced(ctx, instance, target)
    if target != instance.transfer_syntax_uid:
        return transcoded(ctx, instance, target)
    if instance.size > WHOLE_READ:
        return None
    return read_whole(ctx, instance.blob_key)


def first_part(ctx: AppContext, plan: Sequence[tuple[StoredInstance, str]]) -> bytes | None:
    """The first part's bytes, read before the status line is sent so that a store outage is
    answered 503 rather than a 200 that breaks off (PS3.18 8.6; None: streamed, but reachable).
    Raises OSError (:class:`~simral.storage.base.StoreUnavailable` for an unreachable store)."""
    instance, target = plan[0]
    data = _load_part(ctx, instance, target)
    if data is None:
        open_blob(ctx, instance.blob_key).close()
    return data


async def instances_body(
    ctx: AppContext,
    boundary: str,
    plan: Sequence[tuple[StoredInstance, str]],
    *,
    first: bytes | None = None,
) -> AsyncIterator[bytes]:
    """multipart/related of ``application/dicom`` parts, each in its chosen transfer syntax.

    Reads (and transcodings) run in worker threads, up to :data:`READ_AHEAD` instances ahead of
    the one being sent, so disk and network overlap and a cold disk sees several reads at once.
    ``first``: the first part, already read by :func:`first_part`. A read failing once the status
    line is gone aborts the connection: the client sees a broken transfer, never a short body.
    """
    loop = asyncio.get_running_loop()
    pending: deque[asyncio.Future[bytes | None]] = deque()
    queued = 0
    if first is not None and plan:
        done: asyncio.Future[bytes | None] = loop.create_future()
        done.set_result(first)
        pending.append(done)
        queued = 1

    def top_up() -> None:
        nonlocal queued
        while queued < len(plan) and len(pending) < READ_AHEAD:
            instance, target = plan[queued]
            pending.append(loop.run_in_executor(None, _load_part, ctx, instance, target))
            queued += 1

    try:
        for index, (instance, target) in enumerate(plan):
            top_up()
            try:
                data = await pending.popleft()
            except Exception as exc:
                # The status line is gone: abort the response (no closing boundary, no last chunk).
                log.error("reading %s as %s failed: %s", instance.sop_uid, target, exc)
                raise
            top_up()
            head = part_head(
                boundary,
                f"application/dicom; transfer-syntax={target}",
                length=instance.size if data is None else len(data),
            )
            yield (b"\r\n" if index else b"") + head
            if data is not None:
                yield data
            else:
                async for chunk in iterate_in_threadpool(blob_chunks(ctx, instance.blob_key)):
                    yield chunk
        yield closing(boundary)
    finally:
        for future in pending:
            future.cancel()


def _absolute_bulk_uris(element: Any, instance_url: str) -> None:
    if isinstance(element, dict):
        uri = element.get("BulkDataURI")
        if isinstance(uri, str) and uri.startswith("bulkdata/"):
            element["BulkDataURI"] = f"{instance_url}/{uri}"
        for value in element.get("Value") or ():
            if isinstance(value, dict):
                for child in value.values():
                    _absolute_bulk_uris(child, instance_url)


def metadata_json(item: InstanceMetadata, *, study_url: str) -> dict[str, Any]:
    """The instance's header for ``/metadata``: absolute bulk-data URIs, pixel data by reference,
    and the syntax the archive holds it in (Available Transfer Syntax UID, PS3.18 10.4.1.2)."""
    instance_url = f"{study_url}/series/{item.series_uid}/instances/{item.sop_uid}"
    out = dict(item.meta)
    for tag, element in out.items():
        if isinstance(element, dict) and ("BulkDataURI" in element or element.get("vr") == "SQ"):
            element = out[tag] = copy.deepcopy(element)
            _absolute_bulk_uris(element, instance_url)
    if "00280010" in out:
        bits = (out.get("00280100") or {}).get("Value") or [16]
        out["7FE00010"] = {
            "vr": "OW" if bits[0] > 8 else "OB",
            "BulkDataURI": f"{instance_url}/bulkdata/7FE00010",
        }
    out["00083002"] = {"vr": "UI", "Value": [item.transfer_syntax_uid]}
    return out


def frames_body(
    ctx: AppContext, key: str, boundary: str, numbers: list[int], *, as_stored: bool, content_type: str
) -> Iterator[bytes]:
    """multipart/related of the requested frames, stored bytes or decoded (PS3.18 8.7.3.3)."""
    first = True
    with local_copy(ctx, key) as path, open(path, "rb") as stream:
        layout = pixel_layout(stream)
        frames = (
            stored_frames(stream, layout, numbers) if as_stored else decoded_frames(stream, layout, numbers)
        )
        for data in frames:
            yield (b"" if first else b"\r\n") + part_head(boundary, content_type, length=len(data))
            first = False
            yield data
    yield closing(boundary)


def single_part(boundary: str, content_type: str, data: bytes) -> bytes:
    """A whole multipart/related body of one part."""
    return part_head(boundary, content_type, length=len(data)) + data + closing(boundary)


_LONG_HEADER_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def _find_element(dataset: Dataset, tag: int) -> DataElement | None:
    if tag in dataset:
        return dataset[tag]
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                found = _find_element(item, tag)
                if found is not None:
                    return found
    return None


def bulk_value(ctx: AppContext, key: str, tag_text: str) -> bytes:
    """The value of a bulk-data element as Explicit VR Little Endian bytes (PS3.18 8.7.3.3.1).

    The URI names the element's tag; an element nested in a sequence is found depth-first.
    """
    try:
        tag = int(tag_text, 16)
    except ValueError:
        raise KeyError(tag_text) from None
    with local_copy(ctx, key) as path:
        dataset = dcmread(path, defer_size=DEFER_SIZE, stop_before_pixels=True)
        element = _find_element(dataset, tag)
        if element is None:
            raise KeyError(tag_text)
        buffer = DicomBytesIO()
        buffer.is_little_endian = True
        buffer.is_implicit_VR = False
        write_data_element(buffer, element)
    encoded = buffer.getvalue()
    return encoded[12 if element.VR in _LONG_HEADER_VRS else 8 :]


def render(ctx: AppContext, key: str, frame: int, params: RenderParams) -> bytes:
    """A rendered frame (PS3.18 §8.3.5) of a stored instance."""
    with local_copy(ctx, key) as path, open(path, "rb") as stream:
        return render_frame(stream, frame, params)
