"""UPS-RS workitems under ``/dicom-web/workitems`` (PS3.18 §11): the reading tasks as Unified
Procedure Steps for external reading tools (UPS Pull, PS3.4 Annex CC).

- Search (11.9) ``GET /workitems``: matching on ProcedureStepState, ScheduledProcedureStepPriority,
  PatientID and the Study Instance UID of the Input Information Sequence; ``limit`` / ``offset``.
- Retrieve (11.5) ``GET /workitems/{uid}``.
- Update (11.6) ``POST /workitems/{uid}`` (``application/dicom+json``): the performer of an IN
  PROGRESS workitem, with its Transaction UID (query parameter ``transaction``, ``00081195`` or the
  bare UID, or Transaction UID in the payload), sets the progress, comments and outputs; the
  attributes and answers are :func:`simral.reading.workitems.update_workitem`'s.
- Change State (11.7) ``PUT /workitems/{uid}/state``: IN PROGRESS, COMPLETED, CANCELED with the
  Transaction UID (the mapping onto the reading tasks is :mod:`simral.reading.workitems`).

Create (11.4) and the subscriptions (11.10-11.11) are answered 501: workitems are made by the
teleradiology flows, not by clients, and no event reports are sent. Request Cancellation (11.8) is
answered 501 too, as it does not map onto the reading tasks: a SCHEDULED reading task is cancelled
only with its request, by the requesting site (ANS flux 2, :mod:`simral.reading.service`), never by
a reading tool; for an IN PROGRESS one the standard has the SCP forward the request to the performer
(PS3.4 CC.2.2.3, "UPS Cancel Requested" event), which simral cannot do without subscriptions, and a
group administrator takes a task back with the worklist's release, which schedules it again rather
than cancelling it. The reading service decides who sees and changes what, and writes the audit
records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session

from simral.archive.service import audit_query
from simral.context import AppContext
from simral.dicomweb.api import DICOM_JSON, PREFIX, public_root
from simral.dicomweb.media import parse_accept
from simral.reading import workitems
from simral.web.auth import request_principal

#: Search page size when the client gives none, and the most one page holds.
DEFAULT_LIMIT = 100
MAX_LIMIT = 500
#: Search keys (PS3.18 11.9.3.2) by keyword and by tag, and their meaning.
KEYS = {
    "ProcedureStepState": "state",
    "00741000": "state",
    "ScheduledProcedureStepPriority": "priority",
    "00741200": "priority",
    "PatientID": "patient",
    "00100020": "patient",
    "StudyInstanceUID": "study",
    "0020000D": "study",
    "InputInformationSequence.StudyInstanceUID": "study",
    "00404021.0020000D": "study",
}
#: Query parameters that are not matching keys (PS3.18 8.3.4).
CONTROLS = {"limit", "offset", "includefield", "fuzzymatching"}


def _warning(text: str) -> dict[str, str]:
    """A Warning header (PS3.18 8.2.2 / 11.7.3.3)."""
    return {"Warning": f'299 simral: "{text}"'}


def _error(status: int, text: str) -> Response:
    return Response(
        orjson.dumps({"error": text}),
        status_code=status,
        media_type="application/json",
        headers=_warning(text),
    )


def _json(body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), media_type=DICOM_JSON, headers=headers)


def _accepts_json(request: Request) -> bool:
    ranges = parse_accept(request.headers.get("accept"))
    return any(r.media_type in {"*/*", "application/*", DICOM_JSON, "application/json"} for r in ranges)


def _number(text: str | None, default: int, name: str) -> int:
    if text is None or text == "":
        return default
    if not text.isdigit():
        raise ValueError(f"{name} must be a non-negative integer")
    return int(text)


def parse_search(params: list[tuple[str, str]]) -> tuple[workitems.Match, int, int, list[str]]:
    """The match, limit, offset and the ignored keys of a Search query (PS3.18 11.9.3)."""
    values: dict[str, list[str]] = {}
    ignored: list[str] = []
    limit_text = offset_text = None
    for key, value in params:
        if key == "limit":
            limit_text = value
        elif key == "offset":
            offset_text = value
        elif key in CONTROLS:
            continue
        elif key.upper() in KEYS or key in KEYS:
            meaning = KEYS.get(key) or KEYS[key.upper()]
            values.setdefault(meaning, []).extend(v.strip() for v in value.replace("\\", ",").split(","))
        else:
            ignored.append(key[:64])
    limit = min(_number(limit_text, DEFAULT_LIMIT, "limit"), MAX_LIMIT)
    offset = _number(offset_text, 0, "offset")
    states = tuple(v.upper() for v in values.get("state", []) if v)
    for key in ("priority", "patient", "study"):
        if len([v for v in values.get(key, []) if v]) > 1:
            raise ValueError(f"a single value is matched for {key}")
    match = workitems.Match(
        states=states,
        priority=next((v.upper() for v in values.get("priority", []) if v), ""),
        patient_id=next((v for v in values.get("patient", []) if v), ""),
        study_uid=next((v for v in values.get("study", []) if v), ""),
    )
    return match, limit, offset, ignored


def parse_state_request(body: bytes) -> tuple[str, str]:
    """The Procedure Step State and Transaction UID of a Change State payload (PS3.18 11.7.2)."""
    dataset = parse_dataset(body)
    state = str(dataset.get("ProcedureStepState", "") or "").strip()
    transaction = str(dataset.get("TransactionUID", "") or "").strip()
    return state, transaction


def parse_dataset(body: bytes) -> Dataset:
    """The one dataset of a DICOM JSON payload (PS3.18 F.2): an object or an array of one."""
    try:
        decoded = orjson.loads(body)
        if isinstance(decoded, list):
            if len(decoded) != 1:
                raise ValueError("one dataset expected")
            decoded = decoded[0]
        if not isinstance(decoded, dict):
            raise ValueError("a DICOM JSON object expected")
        return Dataset.from_json(decoded)
    except (ValueError, TypeError, KeyError, AttributeError, orjson.JSONDecodeError) as exc:
        raise ValueError(f"the payload is not DICOM JSON: {exc}") from None


#: Query parameters that carry the Transaction UID of an Update (PS3.18 11.6.1.2: the standard
#: names it ``{transaction-uid}``; clients use these names, or give the bare UID).
TRANSACTION_PARAMETERS = ("transaction", "transactionuid", "00081195")


def update_transaction(params: list[tuple[str, str]], dataset: Dataset) -> str:
    """The Transaction UID of an Update: the query parameter, or Transaction UID (0008,1195) in the
    payload as in the N-SET (PS3.4 CC.2.6); both must agree."""
    given: set[str] = set()
    for key, value in params:
        if key.lower() in TRANSACTION_PARAMETERS:
            given.add(value.strip())
        elif not value and key[:1].isdigit():  # ``?{transaction-uid}``
            given.add(key.strip())
    inline = str(dataset.get("TransactionUID", "") or "").strip()
    values = {v for v in (*given, inline) if v}
    if len(values) > 1:
        raise ValueError("The Transaction UID is incorrect")
    return next(iter(values), "")


#: What a state change or an update answers (None: the workitem is not visible to the caller).
_Outcome = workitems.StateChange | workitems.UpdateResult | None


def mount_workitems(web: FastAPI, ctx: AppContext) -> None:
    """Add the UPS-RS services (PS3.18 §11) to ``web``."""

    def _apply(
        change: Callable[[Session], workitems.StateChange | workitems.UpdateResult | None],
    ) -> Response:
        """Run ``change`` in one unit of work: 200 (with its warning), 404 when the workitem is not
        visible, the status of a refusal (PS3.18 Tables 11.6.3-2, 11.7.3-2)."""
        try:
            with ctx.db.unit_of_work() as session:
                result = change(session)
                warning = result.warning if result is not None else ""
        except workitems.WorkitemError as exc:
            return _error(exc.status, exc.warning)
        if result is None:
            return _error(404, "The Target Workitem was not found")
        return Response(status_code=200, headers=_warning(warning) if warning else None)

    def root(request: Request) -> str:
        return public_root(request, ctx.settings.public_url) + PREFIX

    @web.get(PREFIX + "/workitems")
    def search_workitems(request: Request) -> Response:
        """Search Transaction (PS3.18 11.9): 200 with the matches, 204 when none."""
        if not _accepts_json(request):
            return _error(406, "workitems are available as application/dicom+json")
        principal = request_principal(request)
        try:
            match, limit, offset, ignored = parse_search(list(request.query_params.multi_items()))
        except ValueError as exc:
            return _error(400, str(exc))
        with ctx.db.reading() as session:
            items, more = workitems.search(
                session, principal, match, limit=limit, offset=offset, root=root(request)
            )
            body = workitems.to_json(items)
        keys = {k: v[:200] for k, v in request.query_params.items()}
        if match.study_uid:
            keys["StudyInstanceUID"] = match.study_uid[:64]
        audit_query(ctx, principal, protocol="UPS-RS", level="WORKITEM", keys=keys, matches=len(body))
        headers: dict[str, str] = {}
        if ignored:
            headers = _warning(f"The following attributes were not used for matching: {', '.join(ignored)}")
        elif more:
            headers = _warning("There are additional results that can be requested")
        if not body:
            return Response(status_code=204, headers=headers)
        return _json(body, headers)

    @web.get(PREFIX + "/workitems/{uid}")
    def retrieve_workitem(request: Request, uid: str) -> Response:
        """Retrieve Transaction (PS3.18 11.5): the workitem as an array of one, 404 when unknown or
        not visible."""
        if not _accepts_json(request):
            return _error(406, "workitems are available as application/dicom+json")
        principal = request_principal(request)
        with ctx.db.reading() as session:
            item = workitems.retrieve(session, principal, uid, root=root(request))
            body = workitems.to_json([item]) if item is not None else []
        audit_query(
            ctx,
            principal,
            protocol="UPS-RS",
            level="WORKITEM",
            keys={"SOPInstanceUID": uid[:64]},
            matches=len(body),
        )
        if not body:
            return _error(404, "The Target Workitem was not found")
        return _json(body)

    @web.put(PREFIX + "/workitems/{uid}/state")
    async def change_workitem_state(request: Request, uid: str) -> Response:
        """Change State Transaction (PS3.18 11.7; PS3.4 CC.2.1.3)."""
        principal = request_principal(request)
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type not in {DICOM_JSON, "application/json"}:
            return _error(415, "the payload must be application/dicom+json")
        try:
            state, transaction = parse_state_request(await request.body())
        except ValueError as exc:
            return _error(400, str(exc))
        return _apply(
            lambda session: workitems.change_state(
                session, principal, uid, state=state, transaction_uid=transaction
            )
        )

    @web.post(PREFIX + "/workitems/{uid}")
    async def update_workitem(request: Request, uid: str) -> Response:
        """Update Workitem Transaction (PS3.18 11.6; PS3.4 CC.2.6 N-SET) by the performer."""
        principal = request_principal(request)
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type not in {DICOM_JSON, "application/json"}:
            return _error(415, "the payload must be application/dicom+json")
        try:
            dataset = parse_dataset(await request.body())
        except ValueError as exc:
            return _error(400, str(exc))
        try:
            transaction = update_transaction(list(request.query_params.multi_items()), dataset)
        except ValueError as exc:
            return _error(400, str(exc))
        return _apply(
            lambda session: workitems.update_workitem(
                session, principal, uid, payload=dataset, transaction_uid=transaction
            )
        )

    def not_implemented(request: Request) -> Response:
        request_principal(request)  # 401 first: an anonymous caller learns nothing of the service
        return _error(
            501,
            "simral creates workitems from the teleradiology flows; this UPS-RS transaction is not supported",
        )

    for path, methods in (
        ("/workitems", ["POST"]),  # Create (11.4)
        ("/workitems/{uid}/cancelrequest", ["POST"]),  # Request Cancellation (11.8)
        ("/workitems/{uid}/subscribers/{aet}", ["POST", "DELETE"]),  # (Un)subscribe (11.10-11)
        ("/workitems/{uid}/subscribers/{aet}/suspend", ["POST"]),  # Suspend Global Subscription
    ):
        web.add_api_route(PREFIX + path, not_implemented, methods=methods, include_in_schema=False)
