"""IHE PDQm and PIXm over FHIR R4 (ITI TF-2 3.78 Mobile Patient Demographics Query ITI-78, 3.83
Mobile Patient Identifier Cross-reference Query ITI-83), translated into
:mod:`simral.patients.search` calls.

Routes (JSON only, ``application/fhir+json``):

- ``GET /fhir/Patient?family=&given=&birthdate=&gender=&identifier=&_id=&_count=`` — a ``Bundle``
  of type ``searchset`` (ITI TF-2 3.78.4.1). FHIR string search: ``family``/``given`` match the
  start of a birth or used name, case- and accent-insensitively, ``:exact`` the whole name;
  ``birthdate`` YYYY[-MM[-DD]] with the ``eq`` prefix only; ``identifier`` a token
  ``urn:oid:<oid>|<value>`` (``urn:oid:<oid>|``: known in that domain). A parameter this server
  does not support is refused (400) rather than ignored, so a query never widens silently; an
  identifier domain it does not know is 404 (ITI TF-2 3.78.4.1.3, case 4).
- ``GET /fhir/Patient/{id}`` — one Patient (FHIR read, ITI TF-2 3.78.4.3).
- ``GET /fhir/Patient/$ihe-pix?sourceIdentifier=urn:oid:<oid>|<value>[&targetSystem=urn:oid:<oid>]``
  — a ``Parameters`` with a ``targetIdentifier`` and a ``targetId`` per other identity of the
  person (ITI TF-2 3.83.4.1.3): unknown source domain 400, unknown source identifier 404, unknown
  target system 403, each with an ``OperationOutcome`` (3.83.4.2.2).

A Patient is one identity of the index (its logical id is the identity's id): ``identifier`` the
INS (``urn:oid:`` of the INS OID, type v2-0203 NI, use official) and the local id (``urn:oid:`` of
its authority, type v2-0203 PI, use usual), ``name`` the birth name (official) and the used name
(usual), ``gender``, ``birthDate``, ``active`` false once merged, ``link`` to the person's other
identities (``seealso``) and along merges (``replaced-by`` / ``replaces``).

Resources are built with the models of **fhir.resources** 8.x: its default package is FHIR R5,
so the ``fhir.resources.R4B`` models are used, R4B (4.3) being R4 with the same Patient, Bundle,
Parameters and OperationOutcome structures. Every request needs an authenticated principal
(bearer token or session) that :func:`simral.access.policy.may_search_patients`; the services
audit every query.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fhir.resources.R4B.bundle import Bundle, BundleEntry, BundleEntrySearch, BundleLink
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.humanname import HumanName
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.operationoutcome import OperationOutcome, OperationOutcomeIssue
from fhir.resources.R4B.parameters import Parameters, ParametersParameter
from fhir.resources.R4B.patient import Patient, PatientLink
from fhir.resources.R4B.reference import Reference

from simral.access.policy import AccessDenied, Principal
from simral.context import AppContext
from simral.patients import search
from simral.patients.search import Criteria, Found, IdentifierKey, PatientIdentifier, TextMatch
from simral.patients.service import AuthorityRef
from simral.web.auth import LoginRequired, request_principal

FHIR_JSON = "application/fhir+json"
OID_URN = "urn:oid:"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
SEARCH_TRANSACTION = "ITI-78"
PIX_TRANSACTION = "ITI-83"
#: FHIR administrative gender → the index's sex.
GENDERS = {"male": "M", "female": "F", "other": "O", "unknown": ""}
SEXES = {"M": "male", "F": "female", "O": "other"}
SEARCH_PARAMETERS = frozenset(
    {"family", "family:exact", "given", "given:exact", "birthdate", "gender", "identifier", "_id"}
)
_BIRTHDATE = re.compile(r"(?:eq)?(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")


class FhirError(Exception):
    """A request answered with an ``OperationOutcome`` (HTTP status, FHIR issue type, text)."""

    def __init__(self, status: int, code: str, text: str) -> None:
        super().__init__(text)
        self.status, self.code, self.text = status, code, text


def _json(resource: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        resource.model_dump_json(exclude_none=True), status_code=status, media_type=FHIR_JSON, headers=headers
    )


def _outcome(error: FhirError, headers: dict[str, str] | None = None) -> Response:
    """An ``OperationOutcome`` with one error issue (FHIR R4 §3.1.0.4 http, issue-type codes)."""
    issue = OperationOutcomeIssue(severity="error", code=error.code, diagnostics=error.text)
    return _json(OperationOutcome(issue=[issue]), error.status, headers)


def _principal(request: Request) -> Principal:
    try:
        return request_principal(request)
    except LoginRequired:
        raise FhirError(401, "login", "authentication required") from None


def _base(request: Request) -> str:
    return f"{str(request.base_url).rstrip('/')}/fhir/"


def _params(request: Request, allowed: frozenset[str]) -> dict[str, list[str]]:
    """Query parameters by name; ``_format`` must ask for JSON; unknown ones are refused."""
    out: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        if name == "_format":
            if "json" not in value:
                raise FhirError(400, "not-supported", "only JSON (_format=json) is supported")
            continue
        if name not in allowed:
            raise FhirError(400, "not-supported", f"parameter {name!r} is not supported")
        out.setdefault(name, []).append(value)
    return out


def _single(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1 or "," in values[0]:
        raise FhirError(400, "not-supported", f"parameter {name!r} takes one value")
    return values[0]


def _oid_of(system: str) -> str:
    return system[len(OID_URN) :] if system.startswith(OID_URN) else ""


def _token(value: str) -> IdentifierKey:
    """A token ``[system]|[value]`` or ``value`` (FHIR R4 search §3.1.1.4.5.3); a system other than
    ``urn:oid:`` names no domain the index knows."""
    if "|" not in value:
        return IdentifierKey(value=value.strip())
    system, _, code = value.partition("|")
    if not system:
        return IdentifierKey(value=code.strip())
    oid = _oid_of(system)
    if not oid:
        raise search.UnknownDomain(f"identifier system {system!r} is not known")
    return IdentifierKey(value=code.strip(), domain=AuthorityRef(oid=oid))


def _name(params: dict[str, list[str]], name: str) -> TextMatch | None:
    """A string parameter: starts-with by default, the whole name with ``:exact``."""
    starts, exact = _single(params, name), _single(params, f"{name}:exact")
    if starts is not None and exact is not None:
        raise FhirError(400, "not-supported", f"{name} is given twice")
    if starts is not None:
        return TextMatch(starts, prefix=True)
    return TextMatch(exact) if exact is not None else None


def _criteria(params: dict[str, list[str]]) -> tuple[Criteria, int]:
    family = _name(params, "family")
    given = _name(params, "given")
    birth_date = ""
    birthdate = _single(params, "birthdate")
    if birthdate is not None:
        match = _BIRTHDATE.fullmatch(birthdate.strip())
        if match is None:
            raise FhirError(400, "invalid", "birthdate is [eq]YYYY[-MM[-DD]]")
        birth_date = "".join(part or "" for part in match.groups())
    sex: str | None = None
    gender = _single(params, "gender")
    if gender is not None:
        if gender not in GENDERS:
            raise FhirError(400, "invalid", "gender is male, female, other or unknown")
        sex = GENDERS[gender]
    identifier = _single(params, "identifier")
    identity_id: int | None = None
    logical_id = _single(params, "_id")
    if logical_id is not None:
        identity_id = int(logical_id) if logical_id.isdigit() else -1
    criteria = Criteria(
        family=family,
        given=given,
        birth_date=birth_date,
        sex=sex,
        identifier=_token(identifier) if identifier is not None else None,
        identity_id=identity_id,
    )
    count = search.MAX_RESULTS
    counts = params.pop("_count", None)
    if counts:
        if len(counts) > 1 or not counts[0].isdigit():
            raise FhirError(400, "invalid", "_count is a number")
        count = min(int(counts[0]), search.MAX_RESULTS)
    return criteria, count


# ------------------------------------------------------------------------------- resources


def _birth_date(value: str) -> str | None:
    if len(value) == 8:
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    if len(value) == 6:
        return f"{value[:4]}-{value[4:]}"
    return value if len(value) == 4 else None


def _identifier(identifier: PatientIdentifier) -> Identifier:
    if identifier.is_ins:
        kind = Coding(system=V2_0203, code="NI", display="National unique individual identifier")
    else:
        kind = Coding(system=V2_0203, code="PI", display="Patient internal identifier")
    return Identifier(
        use="official" if identifier.is_ins else "usual",
        type=CodeableConcept(coding=[kind], text="INS" if identifier.is_ins else "IPP"),
        system=f"{OID_URN}{identifier.oid}" if identifier.oid else None,
        value=identifier.value,
        assigner=Reference(display=identifier.namespace) if identifier.namespace else None,
    )


def _links(found: Found, person: Sequence[Found], base: str) -> list[PatientLink]:
    identity = found.identity
    links = []
    for other in person:
        if other.identity.id == identity.id:
            continue
        if identity.merged_into_id == other.identity.id:
            kind = "replaced-by"
        elif other.identity.merged_into_id == identity.id:
            kind = "replaces"
        elif other.active and found.active:
            kind = "seealso"
        else:
            continue
        links.append(PatientLink(other=Reference(reference=f"{base}Patient/{other.identity.id}"), type=kind))
    return links


def patient_resource(found: Found, person: Sequence[Found], base: str) -> Patient:
    """The Patient of one identity (module docstring)."""
    identity = found.identity
    names = []
    if identity.birth_name:
        given = identity.birth_given_names.split() or [identity.first_birth_given_name]
        names.append(
            HumanName(use="official", family=identity.birth_name, given=[g for g in given if g] or None)
        )
    if identity.used_name or identity.used_given_name:
        names.append(
            HumanName(
                use="usual",
                family=identity.used_name or None,
                given=[identity.used_given_name] if identity.used_given_name else None,
            )
        )
    # FHIR ``date`` may be partial (YYYY, YYYY-MM): the model takes its string form.
    birth_date: Any = _birth_date(identity.birth_date)
    return Patient(
        id=str(identity.id),
        active=found.active,
        identifier=[_identifier(i) for i in search.identifiers_for(found, person)],
        name=names or None,
        gender=SEXES.get(identity.sex, "unknown"),
        birthDate=birth_date,
        link=_links(found, person, base) or None,
    )


# ---------------------------------------------------------------------------------- routes


def _audit_query(request: Request) -> dict[str, Any]:
    return {"path": request.url.path, "parameters": [[k, v] for k, v in request.query_params.multi_items()]}


def _search_error(exc: Exception) -> FhirError:
    if isinstance(exc, AccessDenied):
        return FhirError(403, "forbidden", "not permitted to search patient identities")
    if isinstance(exc, search.UnknownDomain):
        return FhirError(404, "not-found", "identifier domain not recognized")
    return FhirError(400, "invalid", str(exc))


def _pix_error(exc: Exception) -> FhirError:
    """The ITI-83 failure of a refused cross-reference (ITI TF-2 3.83.4.2.2)."""
    if isinstance(exc, search.UnknownTargetDomain):
        return FhirError(403, "code-invalid", "targetSystem not found")
    if isinstance(exc, search.UnknownDomain):
        return FhirError(400, "code-invalid", "sourceIdentifier Assigning Authority not found")
    if isinstance(exc, search.UnknownIdentifier):
        return FhirError(404, "not-found", "sourceIdentifier Patient Identifier not found")
    return _search_error(exc)


def mount_fhir(web: FastAPI, ctx: AppContext) -> None:
    """Add the PDQm and PIXm routes under ``/fhir`` to ``web``."""

    def refused(principal: Principal, request: Request, transaction: str, error: FhirError) -> Response:
        with ctx.db.unit_of_work() as session:
            search.audit_refused(
                session,
                principal=principal,
                transaction=transaction,
                query=_audit_query(request),
                reason=f"{error.status} {error.text}",
            )
        return _outcome(error)

    @web.get("/fhir/Patient/$ihe-pix", response_class=Response)
    def ihe_pix(request: Request) -> Response:
        """PIXm Get Corresponding Identifiers (ITI TF-2 3.83.4.1)."""
        try:
            principal = _principal(request)
        except FhirError as error:
            return _outcome(error, {"WWW-Authenticate": 'Bearer realm="simral"'})
        try:
            params = _params(request, frozenset({"sourceIdentifier", "targetSystem"}))
            source = _single(params, "sourceIdentifier")
            system, _, value = (source or "").partition("|")
            if not system or not value:
                raise FhirError(400, "invalid", "sourceIdentifier is required as system|value")
            source_oid = _oid_of(system)
            if not source_oid:
                raise FhirError(400, "code-invalid", "sourceIdentifier Assigning Authority not found")
            targets = []
            for target in params.get("targetSystem", []):
                if not _oid_of(target):
                    raise FhirError(403, "code-invalid", "targetSystem not found")
                targets.append(AuthorityRef(oid=_oid_of(target)))
            base = _base(request)
            with ctx.db.unit_of_work() as session:
                result = search.cross_reference(
                    session,
                    source=IdentifierKey(value=value, domain=AuthorityRef(oid=source_oid)),
                    targets=targets,
                    principal=principal,
                    transaction=PIX_TRANSACTION,
                    query=_audit_query(request),
                )
        except FhirError as error:
            return refused(principal, request, PIX_TRANSACTION, error)
        except (AccessDenied, search.SearchError) as exc:
            return refused(principal, request, PIX_TRANSACTION, _pix_error(exc))
        parameters = [
            ParametersParameter(name="targetIdentifier", valueIdentifier=_identifier(identifier))
            for identifier in result.identifiers
        ]
        referenced: list[int] = []
        for identifier in result.identifiers:
            if identifier.identity_id is not None and identifier.identity_id not in referenced:
                referenced.append(identifier.identity_id)
        parameters += [
            ParametersParameter(
                name="targetId", valueReference=Reference(reference=f"{base}Patient/{identity_id}")
            )
            for identity_id in referenced
        ]
        return _json(Parameters(parameter=parameters or None))

    @web.get("/fhir/Patient/{logical_id}", response_class=Response)
    def read_patient(request: Request, logical_id: str) -> Response:
        """FHIR read of one Patient (ITI TF-2 3.78.4.3)."""
        try:
            principal = _principal(request)
        except FhirError as error:
            return _outcome(error, {"WWW-Authenticate": 'Bearer realm="simral"'})
        try:
            _params(request, frozenset())
            base = _base(request)
            with ctx.db.unit_of_work() as session:
                found = (
                    search.read_identity(
                        session,
                        int(logical_id),
                        principal=principal,
                        transaction=SEARCH_TRANSACTION,
                        query=_audit_query(request),
                    )
                    if logical_id.isdigit()
                    else None
                )
                if found is None:
                    raise FhirError(404, "not-found", f"Patient/{logical_id} is not known")
                person = search.same_person(session, [found])[found.identity.person_id]
                resource = patient_resource(found, person, base)
        except FhirError as error:
            return refused(principal, request, SEARCH_TRANSACTION, error)
        except (AccessDenied, search.SearchError) as exc:
            return refused(principal, request, SEARCH_TRANSACTION, _search_error(exc))
        return _json(resource)

    @web.get("/fhir/Patient", response_class=Response)
    def search_patients(request: Request) -> Response:
        """PDQm Query Patient Resource (ITI TF-2 3.78.4.1): a searchset Bundle."""
        try:
            principal = _principal(request)
        except FhirError as error:
            return _outcome(error, {"WWW-Authenticate": 'Bearer realm="simral"'})
        try:
            params = _params(request, SEARCH_PARAMETERS | {"_count"})
            criteria, count = _criteria(params)
            base = _base(request)
            with ctx.db.unit_of_work() as session:
                result = search.search_identities(
                    session,
                    criteria,
                    principal=principal,
                    transaction=SEARCH_TRANSACTION,
                    query=_audit_query(request),
                    limit=count,
                )
                persons = search.same_person(session, result.found)
                entries = [
                    BundleEntry(
                        fullUrl=f"{base}Patient/{found.identity.id}",
                        resource=patient_resource(found, persons[found.identity.person_id], base),
                        search=BundleEntrySearch(mode="match"),
                    )
                    for found in result.found
                ]
        except FhirError as error:
            return refused(principal, request, SEARCH_TRANSACTION, error)
        except (AccessDenied, search.SearchError) as exc:
            return refused(principal, request, SEARCH_TRANSACTION, _search_error(exc))
        bundle = Bundle(
            type="searchset",
            total=result.total,
            link=[BundleLink(relation="self", url=str(request.url))],
            entry=entries or None,
        )
        return _json(bundle)
