"""Every entry point of simral with its authentication and authorization rule (security review).

Three tables, checked by ``tests/test_security_review.py``:

- :data:`HTTP_RULES` — every HTTP route (method, path template as FastAPI registers it, mounts as
  ``MOUNT``), including the DICOMweb, UPS-RS, WADO-URI and FHIR routers; a route missing here, or an
  entry without a route, fails the test, and every non-public route is called without credentials
  and must answer 401, 403, 404 or a redirect to the login page;
- :data:`DIMSE_RULES` — every DIMSE command and SOP class the DICOM listener serves
  (:data:`simral.dimse.server.SERVICE_CLASSES` and the storage SOP classes);
- :data:`HL7_RULES` — every HL7 v2 message type and trigger event the MLLP listener accepts.

A rule names its access level and the :mod:`simral.access.policy` functions (or a service's
policy helper, by dotted path) that decide it; the test resolves each name. Levels:

- ``public`` — no credential (the login pages, static assets, health, the API description);
- ``login-step`` — a step of the login: needs the pending session of the step before;
- ``capability`` — the URL's random token is the credential (a share link, OWASP "capability URL");
- ``authenticated`` — any authenticated principal (bearer token RFC 6750, or the MFA session cookie),
  the route then working on the principal's own data;
- ``policy`` — authenticated, then the named policy functions decide;
- ``network`` — no per-message credential: the listener's network exposure and, over TLS, the
  client certificate admit the caller (the HL7 v2 feed), then the named functions decide.

``python -m simral.web.route_rules --markdown`` prints the README's "Security: entry points" section.
"""

from __future__ import annotations

import argparse
import importlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, cast

Access = Literal["public", "login-step", "capability", "authenticated", "policy", "network"]
#: The method of a mounted ASGI application (the OHIF viewer) in :data:`HTTP_RULES`.
MOUNT = "MOUNT"
_POLICY_MODULE = "simral.access.policy"


@dataclass(frozen=True)
class Rule:
    """How an entry point authenticates its caller and which policy functions authorize it."""

    access: Access
    policies: tuple[str, ...] = ()
    note: str = ""

    def policy_functions(self) -> list[Callable[..., Any]]:
        """The policy callables named (bare names live in :mod:`simral.access.policy`)."""
        found = []
        for name in self.policies:
            module_name, _, attribute = name.rpartition(".") if "." in name else (_POLICY_MODULE, ".", name)
            function = getattr(importlib.import_module(module_name), attribute)
            if not callable(function):
                raise TypeError(f"{name} is not callable")
            found.append(function)
        return found


def public(note: str) -> Rule:
    return Rule("public", note=note)


def login_step(note: str) -> Rule:
    return Rule("login-step", note=note)


def capability(note: str) -> Rule:
    return Rule("capability", note=note)


def authenticated(note: str) -> Rule:
    return Rule("authenticated", note=note)


def policy(*names: str, note: str = "") -> Rule:
    return Rule("policy", tuple(names), note)


_READ = policy("visible_studies", "visible_series", note="a study the principal may not see is answered 404")
_DRIMM_READ = policy(
    "visible_studies",
    "visible_series",
    "simral.dmp.drimm.authorise_retrieve",
    note="also a DRIM-M consumer: Pro Santé Connect token + KOS-SOPInstanceUID, the manifest's series only",
)
_STORE = policy("may_store", note="STOW-RS (PS3.18 §10.5)")
_RENDER = policy("visible_studies", "visible_series", note="rendered/thumbnail (PS3.18 §10.4.1.1.3)")
_UPS_NOT_SUPPORTED = authenticated("then 501: workitems are created by the teleradiology flows")
_READING_FORM = policy("may_review_requests", note="the group's radiologist holding the task; CSRF token")
_AUTHOR = policy("may_review_requests", note="the report's author only (simral.reading.reports)")
_VIGILANCE = policy("may_manage_identities", note="administrators; CSRF token on decisions")

_DW = "/dicom-web"
_STUDY = f"{_DW}/studies/{{study}}"
_SERIES = f"{_STUDY}/series/{{series}}"
_INSTANCE = f"{_SERIES}/instances/{{sop}}"
_FRAMES = f"{_INSTANCE}/frames/{{frame_list}}"

#: (method, path) → rule, for every route of :func:`simral.web.app.create_web_app`.
HTTP_RULES: dict[tuple[str, str], Rule] = {
    # -- platform, API description -------------------------------------------------------------
    ("GET", "/openapi.json"): public("the OpenAPI document (no data)"),
    ("GET", "/docs"): public("Swagger UI page for the OpenAPI document"),
    ("GET", "/docs/oauth2-redirect"): public("Swagger UI helper page"),
    ("GET", "/redoc"): public("ReDoc page for the OpenAPI document"),
    ("GET", "/healthz"): public("liveness: the process answers (no data)"),
    ("GET", "/readyz"): public("readiness: database, schema at head, blob stores, not stopping (no data)"),
    ("GET", "/metrics"): Rule(
        "network",
        ("may_read_metrics",),
        "Prometheus figures (no patient data): a loopback caller connecting directly (no proxy "
        "headers, not behind_tls_proxy), else a regional administrator's token",
    ),
    ("GET", "/admin/metrics"): policy("may_read_metrics", note="the supervision page"),
    ("GET", "/api/retention/batches"): policy("may_manage_retention", note="CSP R.1112-7 deletion batches"),
    ("GET", "/api/retention/batches/{batch_id}"): policy("may_manage_retention"),
    ("POST", "/api/retention/batches/{batch_id}/approve"): policy(
        "may_manage_retention", note="approval queues the deletions (audited); CSRF header for sessions"
    ),
    ("GET", "/api/status"): authenticated("archive counts"),
    ("GET", "/api/changes"): policy(
        "visible_studies", note="change feed of the instances the principal sees"
    ),
    # -- DICOMweb (PS3.18) ----------------------------------------------------------------------
    ("GET", f"{_DW}/studies"): policy("may_query", "visible_studies", note="QIDO-RS (PS3.18 §10.6)"),
    ("GET", f"{_DW}/series"): policy("may_query", "visible_studies", "visible_series", note="QIDO-RS"),
    ("GET", f"{_DW}/instances"): policy("may_query", "visible_studies", "visible_series", note="QIDO-RS"),
    ("GET", f"{_STUDY}/series"): policy("may_query", "visible_studies", "visible_series", note="QIDO-RS"),
    ("GET", f"{_STUDY}/instances"): policy("may_query", "visible_studies", "visible_series", note="QIDO-RS"),
    ("GET", f"{_SERIES}/instances"): policy("may_query", "visible_studies", "visible_series", note="QIDO-RS"),
    ("GET", _STUDY): _DRIMM_READ,
    ("GET", _SERIES): _DRIMM_READ,
    ("GET", _INSTANCE): _DRIMM_READ,
    ("GET", f"{_STUDY}/metadata"): _DRIMM_READ,
    ("GET", f"{_SERIES}/metadata"): _DRIMM_READ,
    ("GET", f"{_INSTANCE}/metadata"): _DRIMM_READ,
    ("GET", _FRAMES): _DRIMM_READ,
    ("GET", f"{_INSTANCE}/bulkdata/{{tag}}"): _DRIMM_READ,
    ("GET", f"{_STUDY}/rendered"): _RENDER,
    ("GET", f"{_SERIES}/rendered"): _RENDER,
    ("GET", f"{_INSTANCE}/rendered"): _RENDER,
    ("GET", f"{_FRAMES}/rendered"): _RENDER,
    ("GET", f"{_STUDY}/thumbnail"): _RENDER,
    ("GET", f"{_SERIES}/thumbnail"): _RENDER,
    ("GET", f"{_INSTANCE}/thumbnail"): _RENDER,
    ("GET", f"{_FRAMES}/thumbnail"): _RENDER,
    ("POST", f"{_DW}/studies"): _STORE,
    ("POST", _STUDY): _STORE,
    ("GET", "/wado"): policy("visible_studies", "visible_series", note="WADO-URI (PS3.18 §9)"),
    # -- UPS-RS (PS3.18 §11): reading tasks ---------------------------------------------------
    ("GET", f"{_DW}/workitems"): policy(
        "may_review_requests", "may_assign_reading", note="the group's tasks"
    ),
    ("GET", f"{_DW}/workitems/{{uid}}"): policy("may_review_requests", "may_assign_reading"),
    ("PUT", f"{_DW}/workitems/{{uid}}/state"): policy("may_review_requests", note="claim/complete a task"),
    ("POST", f"{_DW}/workitems"): _UPS_NOT_SUPPORTED,
    ("POST", f"{_DW}/workitems/{{uid}}"): policy("may_review_requests", note="the performer's progress"),
    ("POST", f"{_DW}/workitems/{{uid}}/cancelrequest"): authenticated(
        "then 501: a reading task is cancelled with its request, by the requesting site"
    ),
    ("POST", f"{_DW}/workitems/{{uid}}/subscribers/{{aet}}"): _UPS_NOT_SUPPORTED,
    ("DELETE", f"{_DW}/workitems/{{uid}}/subscribers/{{aet}}"): _UPS_NOT_SUPPORTED,
    ("POST", f"{_DW}/workitems/{{uid}}/subscribers/{{aet}}/suspend"): _UPS_NOT_SUPPORTED,
    # -- FHIR (IHE PDQm ITI-78, PIXm ITI-83) ----------------------------------------------------
    ("GET", "/fhir/Patient/$ihe-pix"): policy("may_search_patients", note="PIXm ITI-83"),
    ("GET", "/fhir/Patient/{logical_id}"): policy("may_search_patients", note="PDQm ITI-78 read"),
    ("GET", "/fhir/Patient"): policy("may_search_patients", note="PDQm ITI-78 search"),
    # -- login, sessions ------------------------------------------------------------------------
    ("GET", "/static/simral.css"): public("stylesheet"),
    ("GET", "/login"): public("login form; sets the login CSRF cookie"),
    ("POST", "/login"): public("password check; login CSRF token (double submit); opens a pending session"),
    ("GET", "/login/totp"): login_step("needs the password step's pending session"),
    ("POST", "/login/totp"): login_step("pending session + its CSRF token; a new session id once verified"),
    ("GET", "/login/enrol"): login_step("needs the password step's pending session (first login)"),
    ("POST", "/login/enrol"): login_step("pending session + its CSRF token; a new session id once verified"),
    ("GET", "/login/oidc"): public("starts the OpenID Connect flow (PKCE, state, nonce); 404 when off"),
    ("GET", "/login/oidc/callback"): login_step("needs the pending-login cookie, state and PKCE verifier"),
    ("POST", "/logout"): authenticated("closes the session; CSRF token"),
    ("POST", "/session/organisation"): authenticated(
        "a session only; the professional must be a member of the organisation; CSRF token"
    ),
    # -- portal ---------------------------------------------------------------------------------
    ("GET", "/"): policy("may_query", "visible_studies", note="the study list"),
    ("GET", "/studies/{study_uid}"): policy("visible_studies", "may_break_glass"),
    ("POST", "/studies/{study_uid}/break-glass"): policy(
        "may_break_glass", note="stated reason, time-boxed, alerted, audited; CSRF token"
    ),
    ("GET", "/audit"): policy("may_read_audit", "audit_scope"),
    ("GET", "/admin"): policy("may_manage", note="site administrators see their organisations"),
    ("POST", "/admin/organisations"): policy("may_manage", note="CSRF token"),
    ("POST", "/admin/users"): policy("may_manage", note="CSRF token"),
    ("POST", "/admin/nodes"): policy("may_manage", note="CSRF token"),
    ("GET", "/account"): authenticated("the principal's own account"),
    ("POST", "/account/tokens"): policy("may_issue_token", note="for oneself; CSRF token"),
    ("GET", "/admin/jobs"): policy("may_manage"),
    ("POST", "/admin/jobs/{job_id}/{verb}"): policy("may_manage", note="retry/cancel; CSRF token"),
    ("GET", "/admin/retention"): policy(
        "may_manage_retention", note="batches and legal holds of the caller's organisations"
    ),
    ("GET", "/admin/retention/batches/{batch_id}"): policy(
        "may_manage_retention", note="patients of the batch: audited (retention.batch.view)"
    ),
    ("POST", "/admin/retention/review"): policy("may_manage_retention", note="audited; CSRF token"),
    ("POST", "/admin/retention/batches/{batch_id}/{verb}"): policy(
        "may_manage_retention", note="approve/cancel, audited; CSRF token"
    ),
    ("GET", "/import"): policy("may_store", note="a professional acting for an organisation"),
    ("POST", "/import"): policy("may_store", note="multipart upload: X-CSRF-Token header with a session"),
    ("GET", "/static/media-import.js"): public("script of the import page"),
    ("GET", "/static/reading-countdown.js"): public("countdown script of the reading worklist"),
    # -- export, sharing ------------------------------------------------------------------------
    ("GET", "/studies/{study_uid}/export.zip"): policy(
        "visible_studies", note="PDI ZIP; 404 when not visible"
    ),
    ("GET", "/deidentified-exports/{export_id}"): policy("may_manage"),
    ("POST", "/studies/{study_uid}/shares"): policy("may_share", "visible_studies", note="CSRF token"),
    ("POST", "/studies/{study_uid}/links"): policy("may_share", "visible_studies", note="CSRF token"),
    ("GET", "/shares"): authenticated("the principal's own shares and links"),
    ("POST", "/shares/{share_id}/revoke"): policy(
        "may_manage", note="the creator, or an administrator; CSRF"
    ),
    ("POST", "/links/{link_id}/revoke"): policy("may_manage", note="the creator, or an administrator; CSRF"),
    ("GET", "/s/{token}"): capability(
        "share link: the token (and the birth date when asked) is the credential"
    ),
    ("POST", "/s/{token}"): capability("share link birth-date check; sets the read-only visitor cookie"),
    ("GET", "/patient"): policy("is_patient_visitor", note="the patient's own link only"),
    ("GET", "/patient/studies/{study_uid}/export.zip"): policy("is_patient_visitor", "visible_studies"),
    # -- viewer, DRIM-M ----------------------------------------------------------------------------
    ("GET", "/viewer/app-config.js"): public("OHIF configuration (the DICOMweb root; no data)"),
    (MOUNT, "/viewer"): authenticated(
        "index.html needs a session or a share-link cookie; the static OHIF build itself has no data"
    ),
    ("GET", "/drimm/appel-contextuel"): policy(
        "simral.dmp.drimm.open_patient_context", note="DRIM-M contextual call of a logged-in professional"
    ),
    ("POST", "/drimm/appel-contextuel"): public("re-sent as the same GET (RFC 9110 §15.4.4), which logs in"),
    # -- teleradiology ------------------------------------------------------------------------------
    ("GET", "/api/reading/dashboard"): policy("dashboard_scope"),
    ("GET", "/reading/dashboard"): policy("dashboard_scope"),
    ("GET", "/reports/{report_id}/report.pdf"): policy("simral.reading.reports.may_see"),
    ("GET", "/reports/{report_id}/report.xml"): policy("simral.reading.reports.may_see"),
    ("GET", "/requests"): policy("may_request_exam", "may_review_requests", note="the workspace's requests"),
    ("GET", "/dmp"): policy(
        "simral.dmp.views.may_follow_dmp",
        note="the organisation acted for: its DMP entries; the patients shown audited (dmp.status.view)",
    ),
    ("GET", "/requests/new"): policy("may_request_exam"),
    ("POST", "/requests"): policy("may_request_exam", note="ANS Téléradiologie flux 1 from the portal; CSRF"),
    ("GET", "/requests/{request_id}"): policy("may_request_exam", "may_review_requests"),
    ("GET", "/requests/{request_id}/documents/{document_id}"): policy(
        "may_request_exam", "may_review_requests"
    ),
    ("POST", "/requests/{request_id}/accept"): policy("may_review_requests", note="flux 3; CSRF token"),
    ("POST", "/requests/{request_id}/refuse"): policy("may_review_requests", note="flux 3; CSRF token"),
    ("POST", "/requests/{request_id}/subspecialty"): policy(
        "may_request_exam", "may_review_requests", note="CSRF token"
    ),
    ("POST", "/requests/{request_id}/cancel"): policy("may_request_exam", note="flux 2; CSRF token"),
    ("POST", "/requests/{request_id}/complement"): policy(
        "may_request_exam", note="flux 4 for sites without a RIS; CSRF token"
    ),
    ("GET", "/static/report-autosave.js"): public("script of the report editor"),
    ("GET", "/static/report.css"): public("stylesheet of the report editor"),
    ("GET", "/reading/reports"): policy("may_review_requests"),
    ("GET", "/reading/tasks/{task_id}/report"): policy("simral.reading.reports.may_open_task"),
    ("POST", "/reading/tasks/{task_id}/report"): _READING_FORM,
    ("POST", "/reports/{report_id}/save"): _AUTHOR,
    ("POST", "/reports/{report_id}/sign"): policy(
        "may_review_requests", note="the author, with a fresh TOTP code; CSRF token"
    ),
    ("POST", "/reports/{report_id}/addendum"): _READING_FORM,
    ("POST", "/reading/tasks/{task_id}/opinions"): _READING_FORM,
    ("POST", "/opinions/{opinion_id}/answer"): policy(
        "may_review_requests", note="the radiologist asked; CSRF token"
    ),
    ("POST", "/api/reading/tasks/{task_id}/report"): policy("may_review_requests", note="the task's holder"),
    ("GET", "/api/reports/{report_id}"): policy("simral.reading.reports.may_see"),
    ("GET", "/api/reports/{report_id}/history"): policy("simral.reading.reports.may_see"),
    ("POST", "/api/reports/{report_id}/draft"): _AUTHOR,
    ("POST", "/api/reports/{report_id}/sign"): policy(
        "may_review_requests", note="the author, fresh TOTP code"
    ),
    ("POST", "/api/reports/{report_id}/addendum"): policy("may_review_requests"),
    ("POST", "/api/reading/tasks/{task_id}/second-opinions"): policy(
        "may_review_requests", note="task holder"
    ),
    ("GET", "/api/second-opinions"): authenticated("the opinions asked of the principal"),
    ("POST", "/api/second-opinions/{opinion_id}/answer"): policy("may_review_requests", note="the one asked"),
    ("GET", "/reading/tasks/{task_id}/viewer"): policy("simral.reading.reports.may_open_task"),
    ("GET", "/reading"): policy("may_review_requests", "may_assign_reading", note="the group's worklist"),
    ("GET", "/reading/oncall"): policy(
        "may_read_on_call", "may_schedule_on_call", note="the groups' schedule"
    ),
    ("POST", "/reading/oncall/add"): policy("may_schedule_on_call", note="CSRF token; audited"),
    ("POST", "/reading/oncall/{shift_id}/remove"): policy("may_schedule_on_call", note="CSRF token; audited"),
    ("POST", "/reading/tasks/{task_id}/{action}"): policy(
        "may_review_requests", "may_assign_reading", note="claim/release/reassign; CSRF token"
    ),
    ("GET", "/api/reading/tasks"): policy("may_review_requests", "may_assign_reading"),
    ("POST", "/api/reading/tasks/{task_id}/{action}"): policy("may_review_requests", "may_assign_reading"),
    # -- identity vigilance -------------------------------------------------------------------------
    ("GET", "/identities/vigilance"): _VIGILANCE,
    ("POST", "/identities/vigilance/{case_id:int}"): _VIGILANCE,
    ("GET", "/identities/changes"): _VIGILANCE,
    ("POST", "/identities/changes/{change_id:int}/undo"): _VIGILANCE,
    ("GET", "/identities/{identity_id:int}"): _VIGILANCE,
}

_ASSOCIATION = (
    "calling AE registered (else A-ASSOCIATE-RJ reason 3), registered host and TLS subject when bound"
)
#: (DIMSE command, SOP class UID or ``storage``) → rule; the caller is the registered node of the
#: calling AE title (:meth:`simral.dimse.server.DimseService.principal`).
DIMSE_RULES: dict[tuple[str, str], Rule] = {
    ("C-ECHO", "1.2.840.10008.1.1"): Rule("authenticated", note=_ASSOCIATION),
    ("C-STORE", "storage"): policy("may_store", note="every storage SOP class (PS3.4 B)"),
    ("C-FIND", "1.2.840.10008.5.1.4.1.2.1.1"): policy("may_query", "visible_studies", note="Patient Root"),
    ("C-FIND", "1.2.840.10008.5.1.4.1.2.2.1"): policy("may_query", "visible_studies", note="Study Root"),
    ("C-FIND", "1.2.840.10008.5.1.4.31"): policy(
        "may_perform_procedures", note="Modality Worklist (PS3.4 K)"
    ),
    ("C-MOVE", "1.2.840.10008.5.1.4.1.2.1.2"): policy(
        "visible_studies", note="Patient Root; the destination must be a registered node"
    ),
    ("C-MOVE", "1.2.840.10008.5.1.4.1.2.2.2"): policy(
        "visible_studies", note="Study Root; the destination must be a registered node"
    ),
    ("C-GET", "1.2.840.10008.5.1.4.1.2.1.3"): policy("visible_studies", note="Patient Root"),
    ("C-GET", "1.2.840.10008.5.1.4.1.2.2.3"): policy("visible_studies", note="Study Root"),
    ("N-ACTION", "1.2.840.10008.1.20.1"): policy(
        "visible_studies", note="Storage Commitment: only instances the caller sees are committed"
    ),
    ("N-CREATE", "1.2.840.10008.3.1.2.3.3"): policy("may_perform_procedures", note="MPPS (PS3.4 F.7)"),
    ("N-SET", "1.2.840.10008.3.1.2.3.3"): policy("may_perform_procedures", note="MPPS (PS3.4 F.7)"),
}

_HL7_SENDER = (
    "no per-message credential: hl7_host (loopback by default), MLLP/TLS client certificates "
    "(hl7_tls, tls_ca_file); MSH-3/MSH-4 are claimed, not proven, except for a registered RIS "
    "bound to its host or certificate (ris add --check-host / --tls-subject): AR 204 from elsewhere"
)
_RIS = "MSH-3^MSH-4 must be a registered RIS (simral ris add), acting for its site"
_IDENTITY_SENDER = (
    "MSH-3^MSH-4 must be a registered HL7 source (simral hl7-sources add) or RIS, else AR 204 "
    "(allow_unknown_hl7_senders: any sender, lab only); a source or RIS bound to its host or "
    "certificate (--check-host / --tls-subject) is believed only from there: AR 204 from elsewhere; "
    "refusals audited hl7.refused; no per-message credential: hl7_host (loopback by default), "
    "MLLP/TLS client certificates (hl7_tls, tls_ca_file)"
)
#: The sender rule of the identity feed and PDQ queries (:func:`simral.hl7.adt.sender_refusal`).
_IDENTITY_POLICY = "simral.patients.service.hl7_sender_refusal"


def _network(*names: str, note: str) -> Rule:
    return Rule("network", tuple(names), f"{note}; {_HL7_SENDER}")


def _identity_feed(note: str) -> Rule:
    return Rule("network", (_IDENTITY_POLICY,), f"{note}; {_IDENTITY_SENDER}")


#: (message type, trigger event) → rule for the MLLP listener (:mod:`simral.hl7.server`).
HL7_RULES: dict[tuple[str, str], Rule] = {
    **{
        ("ADT", event): _identity_feed("identity feed (PAM France), applied as the platform")
        for event in sorted(("A01", "A04", "A05", "A08", "A28", "A31", "A40", "A47", "A24", "A37"))
    },
    ("ORM", "O01"): _network("may_request_exam", note=f"ANS Téléradiologie flux 1, 2; {_RIS}"),
    ("OMI", "O23"): _network("may_request_exam", note=f"IHE SWF order, flux 4 post-exam data; {_RIS}"),
    ("ORU", "R01"): _network("may_request_exam", note=f"request document (CISIS_CDA_HL7_V2); {_RIS}"),
    ("QBP", "Q22"): _identity_feed("IHE PDQ ITI-21, answered as the platform"),
}


def served_routes(app: Any) -> set[tuple[str, str]]:
    """(method, path) of every route of ``app``, walking included routers; mounts as ``MOUNT``.

    ``HEAD`` is left out where ``GET`` is served (Starlette answers it from the GET route).
    """
    from fastapi.routing import iter_route_contexts
    from starlette.routing import Mount

    served: set[tuple[str, str]] = set()
    for route in iter_route_contexts(app.routes):
        if isinstance(route.original_route, Mount):
            served.add((MOUNT, str(route.path)))
            continue
        methods = set(route.methods or ())
        if "GET" in methods:
            methods.discard("HEAD")
        served.update((method, str(route.path)) for method in methods)
    return served


def _template(path: str) -> str:
    """A path template without Starlette's parameter converters (``{id:int}`` → ``{id}``)."""
    return re.sub(r"\{([^}:]+):[^}]+\}", r"{\1}", path)


def rule_for(method: str, path: str) -> Rule | None:
    """The rule of ``method path``, the path as a route or as an OpenAPI template."""
    wanted = (method.upper(), _template(path))
    return next((rule for (m, p), rule in HTTP_RULES.items() if (m, _template(p)) == wanted), None)


#: OpenAPI security schemes (OpenAPI 3.1 §4.8.27): the bearer token and the portal session cookie.
SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "simral tokens create",
    },
    "session": {"type": "apiKey", "in": "cookie", "name": "simral_session", "description": "portal session"},
}
_REFUSALS = {
    "401": {"description": "No valid credentials (WWW-Authenticate: Bearer)"},
    "403": {"description": "Not allowed by the access policy, or a missing CSRF token"},
}


def describe_security(document: dict[str, Any]) -> dict[str, Any]:
    """Add the rules to an OpenAPI document: each operation's ``security`` requirement (none for
    public ones) and its 401/403 answers, so that clients and fuzzers know what each one needs."""
    document.setdefault("components", {}).setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            rule = rule_for(method, path)
            if rule is None or not isinstance(operation, dict):
                continue
            if rule.access in ("authenticated", "policy"):
                operation["security"] = [{"bearer": []}, {"session": []}]
                for status, answer in _REFUSALS.items():
                    operation.setdefault("responses", {}).setdefault(status, answer)
            else:
                operation["security"] = []
            if rule.policies:
                operation["x-simral-policy"] = list(rule.policies)
    return document


def install_openapi_security(web: Any) -> None:
    """Serve ``/openapi.json`` with :func:`describe_security` applied (generated once)."""
    generate = web.openapi

    def secured() -> dict[str, Any]:
        document = cast(dict[str, Any], generate())  # FastAPI's, cached until the routes change
        if "bearer" not in document.get("components", {}).get("securitySchemes", {}):
            describe_security(document)
        return document

    web.openapi = secured


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _rows(rules: Iterable[tuple[tuple[str, str], Rule]]) -> list[str]:
    lines = []
    for (first, second), rule in rules:
        policies = ", ".join(f"`{name}`" for name in rule.policies)
        lines.append(
            f"| {_cell(first)} | `{_cell(second)}` | {rule.access} | {policies} | {_cell(rule.note)} |"
        )
    return lines


def markdown() -> str:
    """The README's "Security: entry points" section, generated from the three tables."""
    lines = [
        "## Security: entry points",
        "",
        "Generated by `python -m simral.web.route_rules --markdown` from `src/simral/web/route_rules.py`; "
        "`tests/test_security_review.py` fails when a route, DIMSE service or HL7 message type has no rule. "
        "Levels: `public` (no credential), `login-step` (the pending session of the previous login step), "
        "`capability` (the URL's random token), `authenticated` (bearer token or MFA session), `policy` "
        "(authenticated, then the named `simral.access.policy` functions decide), `network` (admitted by "
        "the listener's network exposure and TLS client certificate, no per-message credential).",
        "",
        "### HTTP",
        "",
        "| Method | Path | Access | Policy | Notes |",
        "| --- | --- | --- | --- | --- |",
        *_rows(sorted(HTTP_RULES.items(), key=lambda item: (item[0][1], item[0][0]))),
        "",
        "### DIMSE",
        "",
        "Every association: " + _ASSOCIATION + ".",
        "",
        "| Command | SOP class | Access | Policy | Notes |",
        "| --- | --- | --- | --- | --- |",
        *_rows(DIMSE_RULES.items()),
        "",
        "### HL7 v2 (MLLP)",
        "",
        "| Message | Event | Access | Policy | Notes |",
        "| --- | --- | --- | --- | --- |",
        *_rows(HL7_RULES.items()),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simral.web.route_rules", description=__doc__)
    parser.add_argument("--markdown", action="store_true", help="print the README section")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(), end="")
    else:
        parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
