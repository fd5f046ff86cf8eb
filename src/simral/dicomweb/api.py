"""DICOMweb routes under ``/dicom-web`` (PS3.18 §10): translate HTTP to archive service calls."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from simral.access.policy import AccessDenied, may_store
from simral.archive.query import Level, QueryError
from simral.archive.service import (
    IngestResult,
    StoredInstance,
    audit_query,
    audit_reads,
    find_instances,
    instances_metadata,
    with_shown_identities,
)
from simral.context import AppContext
from simral.dicom.frames import FrameError, media_type_of
from simral.dicom.render import NotAcceptable as RenderNotAcceptable
from simral.dicom.render import RenderError, RenderParams
from simral.dicomweb import qido, stow, wado
from simral.dicomweb.media import NotAcceptable, choose_frames, choose_syntax, instance_syntaxes, parse_accept
from simral.dicomweb.multipart import (
    MultipartError,
    PartSpooler,
    ReceivedPart,
    content_type_header,
    new_boundary,
    request_boundary,
)
from simral.dmp import drimm
from simral.storage.base import StoreUnavailable
from simral.web.auth import SESSION_COOKIE, client_address, request_principal

DICOM_JSON = "application/dicom+json"
log = logging.getLogger(__name__)

PREFIX = "/dicom-web"
#: Batches of one STOW-RS request ingested at the same time.
STOW_CONCURRENCY = 2
#: Parts indexed in one transaction (STOW-RS acknowledges the whole request at its end).
STOW_BATCH = 8


class DicomwebError(Exception):
    """An error answered with an HTTP status and a short text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def public_root(request: Request, public_url: str) -> str:
    """The URL the client reached us at: the configured public URL, else the request's Host
    (with the listening port when the client left it out, as some clients do)."""
    if public_url:
        return public_url.rstrip("/")
    host = request.headers.get("host", "")
    server = request.scope.get("server")
    if host and ":" not in host.rsplit("]", 1)[-1] and server and server[1] not in (80, 443):
        host = f"{host}:{server[1]}"
    return f"{request.url.scheme}://{host or 'localhost'}"


def _json(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body),
        status_code=status,
        media_type=DICOM_JSON,
        headers=headers,
    )


def _wants_json(request: Request) -> None:
    ranges = parse_accept(request.headers.get("accept"))
    if not any(r.media_type in {"*/*", "application/*", DICOM_JSON, "application/json"} for r in ranges):
        raise DicomwebError(406, "this resource is available as application/dicom+json")


def mount_dicomweb(web: FastAPI, ctx: AppContext) -> None:
    """Add the DICOMweb services to ``web``."""
    router = APIRouter(prefix=PREFIX)

    def dicomweb_root(request: Request) -> str:
        return public_root(request, ctx.settings.public_url) + PREFIX

    @web.exception_handler(DicomwebError)
    async def _dicomweb_error(request: Request, exc: DicomwebError) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @web.exception_handler(StoreUnavailable)
    async def _store_unavailable(request: Request, exc: StoreUnavailable) -> Response:
        log.error("store unavailable: %s", exc)
        return JSONResponse(
            {"error": "the archive store is unavailable"}, status_code=503, headers={"Retry-After": "10"}
        )

    @web.exception_handler(AccessDenied)
    async def _denied(request: Request, exc: AccessDenied) -> Response:
        return JSONResponse({"error": "access denied"}, status_code=403)

    @web.exception_handler(drimm.DrimmRefused)
    async def _drimm_refused(request: Request, exc: drimm.DrimmRefused) -> Response:
        headers = {"WWW-Authenticate": exc.challenge} if exc.challenge else None
        return JSONResponse({"error": exc.reason}, status_code=exc.status, headers=headers)

    # -- DRIM-M consumers (DESIGN.md §8) -------------------------------------------------------
    def _drimm_consumer(request: Request, study: str, series: str, sop: str | None, resource: str) -> None:
        """A request carrying ``KOS-SOPInstanceUID`` and a bearer token that is not one of ours (or
        no credential at all) is a DRIM-M consumer's: :func:`simral.dmp.drimm.authorise_retrieve`
        decides it, and its principal (the manifest's series only) serves the request."""
        kos_uid = request.headers.get(drimm.KOS_HEADER)
        if kos_uid is None or not drimm.introspector(ctx).enabled:
            return
        authorization = request.headers.get("authorization", "")
        scheme, _, token = authorization.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if token and drimm.is_local_token(token):
            return
        if not authorization and request.cookies.get(SESSION_COOKIE):
            return
        request.state.principal = drimm.authorise_retrieve(
            ctx,
            token=token,
            kos_uid=kos_uid.strip(),
            study_uid=study,
            series_uid=series,
            sop_uid=sop,
            address=client_address(request),
            resource=resource,
        )

    # -- QIDO-RS (PS3.18 10.6) -----------------------------------------------------------------
    def _search(request: Request, level: Level, fixed: dict[str, str]) -> Response:
        _wants_json(request)
        principal = request_principal(request)
        try:
            parsed = qido.parse(level, list(request.query_params.multi_items()), fixed)
            with ctx.db.reading() as session:
                matches, more = qido.search(
                    session,
                    parsed,
                    principal=principal,
                    dicomweb_root=dicomweb_root(request),
                )
        except QueryError as exc:
            raise DicomwebError(400, str(exc)) from None
        keys = {**{k: v[:200] for k, v in request.query_params.items()}, **fixed}
        audit_query(ctx, principal, protocol="QIDO-RS", level=level, keys=keys, matches=len(matches))
        headers = {}
        if more:
            headers["Warning"] = '299 simral: "There are additional results that can be requested"'
        return _json(matches, headers=headers)

    @router.get("/studies")
    def search_studies(request: Request) -> Response:
        return _search(request, "STUDY", {})

    @router.get("/series")
    def search_series(request: Request) -> Response:
        return _search(request, "SERIES", {})

    @router.get("/instances")
    def search_instances(request: Request) -> Response:
        return _search(request, "IMAGE", {})

    @router.get("/studies/{study}/series")
    def search_study_series(request: Request, study: str) -> Response:
        return _search(request, "SERIES", {"StudyInstanceUID": study})

    @router.get("/studies/{study}/instances")
    def search_study_instances(request: Request, study: str) -> Response:
        return _search(request, "IMAGE", {"StudyInstanceUID": study})

    @router.get("/studies/{study}/series/{series}/instances")
    def search_series_instances(request: Request, study: str, series: str) -> Response:
        return _search(request, "IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": series})

    # -- WADO-RS instances (PS3.18 10.4.1.1.1) ---------------------------------------------------
    def _instances(request: Request, study: str, series: str | None, sop: str | None) -> list[StoredInstance]:
        principal = request_principal(request)
        with ctx.db.reading() as session:
            found = find_instances(
                session, principal=principal, study_uid=study, series_uid=series, sop_uid=sop
            )
        audit_reads(
            ctx,
            principal,
            [study[:64]],
            outcome="success" if found else "failure",
            detail={"protocol": "WADO-RS"},
        )
        if not found:
            raise DicomwebError(404, "no such resource")
        return found

    def _retrieve(
        request: Request, study: str, series: str | None = None, sop: str | None = None
    ) -> Response:
        try:
            acceptable = instance_syntaxes(request.headers.get("accept"))
        except NotAcceptable as exc:
            raise DicomwebError(406, str(exc)) from None
        found = _instances(request, study, series, sop)
        with ctx.db.reading() as session:
            found = with_shown_identities(session, request_principal(request), found)
        plan = []
        for instance in found:
            target = choose_syntax(instance.transfer_syntax_uid, acceptable)
            if target is None:
                raise DicomwebError(
                    406, f"instance {instance.sop_uid} cannot be sent in any of {', '.join(acceptable)}"
                )
            plan.append((instance, target))
        first = wado.first_part(ctx, plan) if plan else None  # StoreUnavailable: 503 (above)
        boundary = new_boundary()
        return StreamingResponse(
            wado.instances_body(ctx, boundary, plan, first=first),
            media_type=content_type_header("application/dicom", boundary),
        )

    @router.get("/studies/{study}")
    def retrieve_study(request: Request, study: str) -> Response:
        return _retrieve(request, study)

    @router.get("/studies/{study}/series/{series}")
    def retrieve_series(request: Request, study: str, series: str) -> Response:
        _drimm_consumer(request, study, series, None, "series")
        return _retrieve(request, study, series)

    @router.get("/studies/{study}/series/{series}/instances/{sop}")
    def retrieve_instance(request: Request, study: str, series: str, sop: str) -> Response:
        _drimm_consumer(request, study, series, sop, "instance")
        return _retrieve(request, study, series, sop)

    # -- metadata (PS3.18 10.4.1.1.2) ----------------------------------------------------------
    def _metadata(
        request: Request, study: str, series: str | None = None, sop: str | None = None
    ) -> Response:
        _wants_json(request)
        principal = request_principal(request)
        with ctx.db.reading() as session:
            items = instances_metadata(
                session, principal=principal, study_uid=study, series_uid=series, sop_uid=sop
            )
        audit_reads(
            ctx,
            principal,
            [study[:64]],
            outcome="success" if items else "failure",
            detail={"protocol": "WADO-RS"},
        )
        if not items:
            raise DicomwebError(404, "no such resource")
        study_url = f"{dicomweb_root(request)}/studies/{study}"
        return _json([wado.metadata_json(item, study_url=study_url) for item in items])

    @router.get("/studies/{study}/metadata")
    def study_metadata(request: Request, study: str) -> Response:
        return _metadata(request, study)

    @router.get("/studies/{study}/series/{series}/metadata")
    def series_metadata(request: Request, study: str, series: str) -> Response:
        _drimm_consumer(request, study, series, None, "series-metadata")
        return _metadata(request, study, series)

    @router.get("/studies/{study}/series/{series}/instances/{sop}/metadata")
    def instance_metadata(request: Request, study: str, series: str, sop: str) -> Response:
        return _metadata(request, study, series, sop)

    # -- frames and bulk data (PS3.18 10.4.1.1.3-4) ---------------------------------------------
    def _frame_numbers(text: str, available: int) -> list[int]:
        try:
            numbers = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise DicomwebError(400, "frame list must be comma-separated integers") from None
        if not numbers or any(n < 1 for n in numbers):
            raise DicomwebError(400, "frame numbers start at 1")
        if any(n > available for n in numbers):
            raise DicomwebError(404, f"the instance has {available} frame(s)")
        return numbers

    def _frames(request: Request, instance: StoredInstance, numbers: list[int]) -> Response:
        stored = instance.transfer_syntax_uid
        try:
            choice = choose_frames(request.headers.get("accept"), stored, media_type_of(stored))
        except NotAcceptable as exc:
            raise DicomwebError(406, str(exc)) from None
        part_type = f"{choice.content_type}; transfer-syntax={choice.transfer_syntax}"
        boundary = new_boundary()
        return StreamingResponse(
            wado.frames_body(
                ctx, instance.blob_key, boundary, numbers, as_stored=choice.as_stored, content_type=part_type
            ),
            media_type=content_type_header(choice.content_type, boundary),
        )

    def _one_instance(request: Request, study: str, series: str, sop: str) -> tuple[StoredInstance, int]:
        instance = _instances(request, study, series, sop)[0]
        return instance, instance.frame_count

    @router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frame_list}")
    def retrieve_frames(request: Request, study: str, series: str, sop: str, frame_list: str) -> Response:
        instance, available = _one_instance(request, study, series, sop)
        if available == 0:
            raise DicomwebError(404, "the instance has no pixel data")
        return _frames(request, instance, _frame_numbers(frame_list, available))

    @router.get("/studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag}")
    def retrieve_bulkdata(request: Request, study: str, series: str, sop: str, tag: str) -> Response:
        instance, available = _one_instance(request, study, series, sop)
        if tag.upper() == "7FE00010":
            if available == 0:
                raise DicomwebError(404, "the instance has no pixel data")
            return _frames(request, instance, list(range(1, available + 1)))
        try:
            value = wado.bulk_value(ctx, instance.blob_key, tag)
        except KeyError:
            raise DicomwebError(404, f"no bulk data element {tag}") from None
        boundary = new_boundary()
        return StreamingResponse(
            iter([wado.single_part(boundary, "application/octet-stream", value)]),
            media_type=content_type_header("application/octet-stream", boundary),
        )

    # -- rendered and thumbnail (PS3.18 10.4.1.1.5-6, 8.3.5) ------------------------------------
    def _render(request: Request, instance: StoredInstance, frame: int, *, thumbnail: bool) -> Response:
        try:
            params = RenderParams.from_query(
                dict(request.query_params), request.headers.get("accept"), thumbnail=thumbnail
            )
        except RenderNotAcceptable as exc:
            raise DicomwebError(406, str(exc)) from None
        except RenderError as exc:
            raise DicomwebError(400, str(exc)) from None
        try:
            image = wado.render(ctx, instance.blob_key, frame, params)
        except FrameError as exc:
            raise DicomwebError(404, str(exc)) from None
        except RenderError as exc:
            raise DicomwebError(400, str(exc)) from None
        return Response(image, media_type=params.media_type)

    def _representative(request: Request, study: str, series: str | None) -> StoredInstance:
        found = _instances(request, study, series, None)
        if series is None:
            first_series = found[0].series_uid
            found = [i for i in found if i.series_uid == first_series]
        imaged = [i for i in found if i.frame_count > 0]
        if not imaged:
            raise DicomwebError(404, "no image in this resource")
        return imaged[len(imaged) // 2]

    for suffix, thumbnail in (("rendered", False), ("thumbnail", True)):
        _add_render_routes(router, suffix, thumbnail, _render, _representative, _one_instance)

    # -- STOW-RS (PS3.18 10.5) ----------------------------------------------------------------------
    async def _store(request: Request, study: str | None) -> Response:
        principal = request_principal(request)
        if not may_store(principal):
            raise AccessDenied(f"{principal.audit_name} may not store instances")
        try:
            part_type, boundary = request_boundary(request.headers.get("content-type", ""))
        except MultipartError as exc:
            raise DicomwebError(
                415, f'STOW-RS takes multipart/related; type="application/dicom": {exc}'
            ) from None
        if part_type not in {"application/dicom", ""}:
            raise DicomwebError(415, f"parts of type {part_type} are not supported; send application/dicom")
        outcome = stow.StowOutcome(dicomweb_root(request))
        spooler = PartSpooler(boundary, ctx.store.scratch_dir())
        source = f"stow:{request.client.host if request.client else ''}"
        # Parts are ingested in batches of STOW_BATCH (one group commit each), up to
        # STOW_CONCURRENCY batches at a time while the next parts arrive; results keep part order.
        in_flight: deque[asyncio.Future[list[IngestResult]]] = deque()
        waiting: list[ReceivedPart] = []
        loop = asyncio.get_running_loop()

        async def collect(keep: int) -> None:
            while len(in_flight) > keep:
                for result in await in_flight.popleft():
                    outcome.add(result)

        def launch(parts: list[ReceivedPart], *, at_least: int) -> None:
            waiting.extend(parts)
            while waiting and len(waiting) >= at_least:
                batch = waiting[:STOW_BATCH]
                del waiting[:STOW_BATCH]
                in_flight.append(
                    loop.run_in_executor(
                        None,
                        functools.partial(
                            stow.store_parts, ctx, batch, principal=principal, study_uid=study, source=source
                        ),
                    )
                )

        try:
            async for chunk in request.stream():
                spooler.feed(chunk)
                launch(spooler.completed(), at_least=STOW_BATCH)
                await collect(STOW_CONCURRENCY - 1)
            spooler.finish()
            launch(spooler.completed(), at_least=1)
            await collect(0)
        except MultipartError as exc:
            spooler.discard()
            launch([], at_least=1)
            await collect(0)
            if not outcome.referenced and not outcome.failed:
                raise DicomwebError(400, str(exc)) from None
            outcome.fail(stow.PROCESSING_FAILURE)
        except OSError as exc:
            # A part could not be spooled (disk full): what was received whole is still stored,
            # the rest is refused "Out of Resources" (PS3.18 10.5.3, PS3.4 B.2.3 A700).
            log.error("STOW-RS part could not be written: %s", exc.strerror or exc)
            spooler.discard()
            launch([], at_least=1)
            await collect(0)
            outcome.fail(stow.OUT_OF_RESOURCES)
        except BaseException:
            spooler.discard()
            for part in waiting:
                part.path.unlink(missing_ok=True)
            for future in in_flight:
                with contextlib.suppress(BaseException):
                    await future
            raise
        if not outcome.referenced and not outcome.failed:
            raise DicomwebError(400, "the request body holds no part")
        return _json(outcome.body(), status=outcome.http_status)

    @router.post("/studies")
    async def store_instances(request: Request) -> Response:
        return await _store(request, None)

    @router.post("/studies/{study}")
    async def store_study_instances(request: Request, study: str) -> Response:
        return await _store(request, study)

    web.include_router(router)


def _add_render_routes(
    router: APIRouter, suffix: str, thumbnail: bool, render: Any, representative: Any, one: Any
) -> None:
    @router.get(f"/studies/{{study}}/{suffix}", name=f"study_{suffix}")
    def study_image(request: Request, study: str) -> Response:
        return render(request, representative(request, study, None), 1, thumbnail=thumbnail)  # type: ignore[no-any-return]

    @router.get(f"/studies/{{study}}/series/{{series}}/{suffix}", name=f"series_{suffix}")
    def series_image(request: Request, study: str, series: str) -> Response:
        return render(request, representative(request, study, series), 1, thumbnail=thumbnail)  # type: ignore[no-any-return]

    @router.get(f"/studies/{{study}}/series/{{series}}/instances/{{sop}}/{suffix}", name=f"instance_{suffix}")
    def instance_image(request: Request, study: str, series: str, sop: str) -> Response:
        instance, available = one(request, study, series, sop)
        if available == 0:
            raise DicomwebError(404, "the instance has no pixel data")
        return render(request, instance, 1, thumbnail=thumbnail)  # type: ignore[no-any-return]

    @router.get(
        f"/studies/{{study}}/series/{{series}}/instances/{{sop}}/frames/{{frame_list}}/{suffix}",
        name=f"frame_{suffix}",
    )
    def frame_image(request: Request, study: str, series: str, sop: str, frame_list: str) -> Response:
        instance, available = one(request, study, series, sop)
        try:
            frame = int(frame_list.split(",")[0])
        except ValueError:
            raise DicomwebError(400, "frame number must be an integer") from None
        if not 1 <= frame <= available:
            raise DicomwebError(404, f"the instance has {available} frame(s)")
        return render(request, instance, frame, thumbnail=thumbnail)  # type: ignore[no-any-return]
