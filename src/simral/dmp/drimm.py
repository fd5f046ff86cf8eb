"""The DRIM-M image source: WADO-RS for DRIM-M consumers, and the DRIM-M contextual call.

**WADO-RS for consumers** (ANS DRIM-M, DESIGN.md §8). Another platform's professional (a "DRIMbox
consommatrice") retrieves a series we published in a DMP manifest with::

    GET /dicom-web/studies/{study}/series/{series}            (and .../instances/{sop}, .../metadata)
    Authorization: Bearer <Pro Santé Connect access token>
    KOS-SOPInstanceUID: <SOP Instance UID of the manifest (KOS) found in the DMP>

- the token is checked by OAuth 2.0 Token Introspection (RFC 7662 §2) at Pro Santé Connect's
  endpoint, with this platform's client credentials (HTTP Basic, RFC 7662 §2.1); an active answer
  is reused for ``drimm_cache_seconds`` (never beyond its ``exp``), keyed by a hash of the token,
  which is never logged nor stored;
- the consumer is who the answer names: PSC's ``SubjectNameID`` (national id, ``8`` + RPPS), else
  ``preferred_username``, else ``sub``; ``given_name`` / ``family_name`` when present;
- the manifest must be in the archive, be a Key Object Selection Document (PS3.3 A.35.4, SOP Class
  1.2.840.10008.5.1.4.1.1.88.59) of the requested study, be one that simral itself published to the
  DMP and that is still current there — its :class:`~simral.dmp.models.DmpDocument` of kind
  ``manifest`` (uniqueId = the KOS SOP Instance UID) is ``published``: not replaced by a newer
  version (RPLC), deleted or masked to professionals (ITI-57), nor never sent — so that no other
  KOS of the archive (a modality's, an imported one, an IOCM rejection note) opens the images; and
  reference the requested series (and instance) in its Current Requested Procedure Evidence
  Sequence (0040,A375) (PS3.3 C.17.2.1);
- the consumer then reads, for that request only, the series that manifest references
  (:class:`~simral.access.policy.Principal` of kind ``drimm``); every decision, granted or refused,
  is audited with the consumer's identity and the manifest's UID.

**Contextual call** ("appel contextuel" of the DRIM-M specifications, as implemented by the ANS
DRIMbox): a professional's software opens our viewer on a patient with the parameters
``Patient.identifier.value`` / ``.system`` (INS and its OID), ``Patient.name.family``,
``Patient.name.given``, ``Patient.gender``, ``Patient.birthDate``, ``Address.district`` (INSEE code
of the birth place, as FR Core's birthPlace), ``InformationEtConsentement`` (the patient was
informed and consents), ``PatientID`` / ``PatientIDIssuer`` (the local identifier) and, optionally,
``Situation`` (the professional's "situation d'exercice": the structure they act for).
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
import threading
import time
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import orjson
from joserfc import jws
from joserfc.errors import JoseError
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from simral.access.policy import SYSTEM, Principal
from simral.archive import service as archive
from simral.audit import service as audit
from simral.config import Settings
from simral.context import AppContext
from simral.dmp.manifest import manifest_references
from simral.dmp.models import DMP_DELETED, DMP_MASKED, DMP_PUBLISHED, DMP_REPLACED, KIND_MANIFEST, DmpDocument
from simral.identity.service import TOKEN_ISSUER, get_organisation
from simral.patients import service as patients
from simral.patients.models import INS_OIDS, INS_TEST_OIDS, STATUS_QUAL, AssigningAuthority, PatientIdentity
from simral.patients.views import visible_person_studies

log = logging.getLogger(__name__)

#: The request header naming the manifest a DRIM-M consumer found in the DMP.
KOS_HEADER = "KOS-SOPInstanceUID"
#: Key Object Selection Document Storage (PS3.4 B.5).
KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
#: How long an introspection request may take (seconds).
INTROSPECTION_TIMEOUT = 10.0
#: RFC 6750 §3: the challenge for a missing token (no error code) and for a refused one.
CHALLENGE_NO_TOKEN = 'Bearer realm="simral"'
CHALLENGE_INVALID = 'Bearer realm="simral", error="invalid_token"'


class DrimmRefused(Exception):
    """A DRIM-M consumer's request refused: ``status`` 401 (token), 403 (manifest) or 503
    (introspection unavailable); ``reason`` is short and holds neither the token nor PHI."""

    def __init__(self, status: int, reason: str, *, challenge: str = "") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.challenge = challenge


# ------------------------------------------------------------------------------------------ tokens


@dataclass(frozen=True)
class Consumer:
    """The professional behind an active PSC token (RFC 7662 §2.2 answer)."""

    national_id: str
    display_name: str = ""
    #: The OAuth client the token was issued to (the consumer's platform).
    client_id: str = ""
    subject: str = ""


def is_local_token(token: str) -> bool:
    """Whether ``token`` claims to be one of simral's own bearer tokens (issuer ``simral``).

    Only the unverified claim is read: a forged one goes to the local verification and fails there.
    """
    try:
        payload = jws.extract_compact(token.encode()).payload
        claims = orjson.loads(payload)
    except (JoseError, ValueError, orjson.JSONDecodeError):
        return False
    return isinstance(claims, dict) and claims.get("iss") == TOKEN_ISSUER


def _token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def consumer_of(answer: Mapping[str, Any]) -> Consumer:
    """The consumer an active introspection answer names (PSC claims: ``SubjectNameID`` is the
    national id; the standard ``preferred_username`` / ``sub`` otherwise, RFC 7662 §2.2)."""
    national_id = str(
        answer.get("SubjectNameID") or answer.get("preferred_username") or answer.get("sub") or ""
    )
    name = " ".join(str(answer.get(key) or "").strip() for key in ("given_name", "family_name")).strip()
    return Consumer(
        national_id=national_id[:64],
        display_name=name[:200],
        client_id=str(answer.get("client_id") or "")[:128],
        subject=str(answer.get("sub") or "")[:128],
    )


class Introspector:
    """RFC 7662 client for PSC's introspection endpoint, with a short cache of active answers."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.drimm_introspection_url
        self.auth = (settings.drimm_client_id, settings.drimm_client_secret)
        self.cache_seconds = max(0.0, settings.drimm_cache_seconds)
        verify: ssl.SSLContext | bool = True
        if settings.drimm_ca_file:
            verify = ssl.create_default_context(cafile=settings.drimm_ca_file)
        self._client = httpx.Client(verify=verify, timeout=INTROSPECTION_TIMEOUT)
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Consumer]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def _cached(self, key: str) -> Consumer | None:
        with self._lock:
            entry = self._cache.get(key)
            if entry is None or entry[0] < time.monotonic():
                return None
            return entry[1]

    def _remember(self, key: str, consumer: Consumer, exp: Any) -> None:
        ttl = self.cache_seconds
        if isinstance(exp, int | float):
            ttl = min(ttl, float(exp) - time.time())
        if ttl <= 0:
            return
        with self._lock:
            if len(self._cache) > 5000:
                now = time.monotonic()
                self._cache = {k: v for k, v in self._cache.items() if v[0] >= now}
            self._cache[key] = (time.monotonic() + ttl, consumer)

    def introspect(self, token: str) -> Consumer:
        """The consumer of an active token; raises :class:`DrimmRefused` (401 inactive, 503
        endpoint unreachable or answering nonsense)."""
        key = _token_key(token)
        cached = self._cached(key)
        if cached is not None:
            return cached
        try:
            response = self._client.post(
                self.url,
                data={"token": token, "token_type_hint": "access_token"},
                auth=self.auth,
                headers={"Accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            log.warning("DRIM-M token introspection failed: %s", type(exc).__name__)
            raise DrimmRefused(503, "token introspection unavailable") from None
        if response.status_code != 200:
            log.warning("DRIM-M token introspection answered HTTP %s", response.status_code)
            raise DrimmRefused(503, "token introspection unavailable")
        try:
            answer = response.json()
        except ValueError:
            raise DrimmRefused(503, "token introspection answered no JSON") from None
        if not isinstance(answer, dict):
            raise DrimmRefused(503, "token introspection answered no JSON object")
        exp = answer.get("exp")
        if answer.get("active") is not True or (isinstance(exp, int | float) and exp <= time.time()):
            raise DrimmRefused(401, "inactive token", challenge=CHALLENGE_INVALID)
        consumer = consumer_of(answer)
        if not consumer.national_id:
            raise DrimmRefused(401, "token names no professional", challenge=CHALLENGE_INVALID)
        self._remember(key, consumer, exp)
        return consumer


def introspector(ctx: AppContext) -> Introspector:
    """This process's introspection client (built from the settings on first use)."""
    found = ctx.caches.get("drimm-introspector")
    if found is None:
        found = ctx.caches.setdefault("drimm-introspector", Introspector(ctx.settings))
    return cast(Introspector, found)


# ---------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ManifestGrant:
    """What a manifest lets its holder read: the series it references in one study."""

    kos_uid: str
    study_uid: str
    series: frozenset[str]


def check_manifest(
    ctx: AppContext,
    session: Session,
    *,
    kos_uid: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str | None = None,
) -> ManifestGrant:
    """The manifest named by a consumer, checked against the request; raises :class:`DrimmRefused`
    (403). The platform reads the manifest itself (the check decides what the consumer may read)."""
    kos = archive.get_instance(session, principal=SYSTEM, sop_uid=kos_uid)
    if kos is None:
        raise DrimmRefused(403, "unknown manifest")
    if kos.sop_class_uid != KOS_SOP_CLASS:
        raise DrimmRefused(403, "not a Key Object Selection document")
    if kos.study_uid != study_uid:
        raise DrimmRefused(403, "manifest of another study")
    _check_published(session, kos_uid=kos_uid, study_uid=study_uid)
    with archive.local_copy(ctx, kos.blob_key) as path:
        dataset = dcmread(path, stop_before_pixels=True)
    references = manifest_references(dataset, study_uid)
    if series_uid not in references:
        raise DrimmRefused(403, "series not referenced by the manifest")
    if sop_uid is not None and sop_uid not in references[series_uid]:
        raise DrimmRefused(403, "instance not referenced by the manifest")
    return ManifestGrant(kos_uid=kos_uid, study_uid=study_uid, series=frozenset(references))


#: Why a manifest in the archive grants nothing, by the state of its DMP entry.
_NOT_CURRENT = {
    DMP_REPLACED: "manifest replaced by a newer version",
    DMP_DELETED: "manifest deleted from the DMP",
    DMP_MASKED: "manifest masked to professionals in the DMP",
}


def _check_published(session: Session, *, kos_uid: str, study_uid: str) -> None:
    """Refuse (403) a KOS that is not a manifest simral published to the DMP and that is still
    current there: only such an entry is what a consumer may have found in the patient's DMP."""
    states = set(
        session.scalars(
            select(DmpDocument.state).where(
                DmpDocument.kind == KIND_MANIFEST,
                DmpDocument.unique_id == kos_uid,
                DmpDocument.study_uid == study_uid,
            )
        )
    )
    if DMP_PUBLISHED in states:
        return
    if not states:
        raise DrimmRefused(403, "manifest not published by this platform")
    for state, reason in _NOT_CURRENT.items():
        if state in states:
            raise DrimmRefused(403, reason)
    raise DrimmRefused(403, "manifest not published to the DMP")


def consumer_principal(consumer: Consumer, grant: ManifestGrant, *, address: str) -> Principal:
    """The policy's view of a consumer holding a checked manifest (one request)."""
    return Principal(
        kind="drimm",
        name=consumer.national_id,
        national_id=consumer.national_id,
        display_name=consumer.display_name,
        shared=frozenset({grant.study_uid}),
        series=grant.series,
        address=address,
        via="psc-introspection",
    )


def authorise_retrieve(
    ctx: AppContext,
    *,
    token: str,
    kos_uid: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str | None,
    address: str,
    resource: str,
) -> Principal:
    """Decide a DRIM-M consumer's WADO-RS request (see the module text) and audit the decision;
    return the consumer's principal or raise :class:`DrimmRefused`.

    ``token`` is the bearer token ("" when absent); ``resource`` names what was asked (``series``,
    ``instance``, ``series-metadata``).
    """
    consumer: Consumer | None = None
    try:
        if not token:
            raise DrimmRefused(401, "no bearer token", challenge=CHALLENGE_NO_TOKEN)
        if not kos_uid or len(kos_uid) > 64:
            raise DrimmRefused(403, "no manifest named")
        consumer = introspector(ctx).introspect(token)
        with ctx.db.reading() as session:
            grant = check_manifest(
                ctx, session, kos_uid=kos_uid, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid
            )
    except DrimmRefused as refusal:
        refused = Principal(
            kind="drimm",
            name=consumer.national_id if consumer else "anonymous",
            national_id=consumer.national_id if consumer else "",
            display_name=consumer.display_name if consumer else "",
            address=address,
            via="psc-introspection",
        )
        _audit_retrieve(
            ctx, refused, consumer, kos_uid=kos_uid, study_uid=study_uid, series_uid=series_uid,
            sop_uid=sop_uid, resource=resource, outcome="failure", reason=refusal.reason,
        )  # fmt: skip
        raise
    principal = consumer_principal(consumer, grant, address=address)
    _audit_retrieve(
        ctx, principal, consumer, kos_uid=kos_uid, study_uid=study_uid, series_uid=series_uid,
        sop_uid=sop_uid, resource=resource, outcome="success", reason="",
    )  # fmt: skip
    return principal


def _audit_retrieve(
    ctx: AppContext,
    principal: Principal,
    consumer: Consumer | None,
    *,
    kos_uid: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str | None,
    resource: str,
    outcome: str,
    reason: str,
) -> None:
    """One ``drimm.retrieve`` record (PS3.15 A.5.3.2 "DICOM Instances Accessed" for a consumer):
    the consumer's national id and name, the manifest, what was asked, the study's patient."""
    detail: dict[str, Any] = {
        "protocol": "WADO-RS",
        "resource": resource,
        "kos_sop_instance_uid": kos_uid[:64],
        "series_uid": series_uid[:64],
    }
    if sop_uid is not None:
        detail["sop_instance_uid"] = sop_uid[:64]
    if consumer is not None:
        detail["consumer"] = {
            "national_id": consumer.national_id,
            "name": consumer.display_name,
            "client_id": consumer.client_id,
        }
    if reason:
        detail["reason"] = reason
    with ctx.db.unit_of_work() as session:
        summary = archive.get_study(session, principal=SYSTEM, study_uid=study_uid[:64])
        audit.record(
            session,
            action="drimm.retrieve",
            principal=principal,
            outcome=outcome,
            study_uid=study_uid[:64],
            patient_id=summary.patient.patient_id if summary else "",
            patient_issuer=summary.patient.issuer if summary else "",
            detail=detail,
        )


# ----------------------------------------------------------------------------------- contextual call

#: The contextual call's parameters (names compared without case, as the DRIMbox does).
CONTEXT_PARAMETERS = {
    "patient.identifier.value": "ins_value",
    "patient.identifier.system": "ins_system",
    "patient.name.family": "family",
    "patient.name.given": "given",
    "patient.gender": "gender",
    "patient.birthdate": "birth_date",
    "address.district": "birth_place",
    "informationetconsentement": "consent",
    "patientid": "patient_id",
    "patientidissuer": "patient_id_issuer",
    "situation": "situation",
}
OPTIONAL_PARAMETERS = frozenset({"situation"})
#: Refusal codes of :func:`open_patient_context` (the page explains each).
REFUSALS = (
    "missing",
    "no-consent",
    "situation",
    "ins-system",
    "ins-invalid",
    "unknown-patient",
    "identity-conflict",
    "traits",
    "no-study",
)
_YES = frozenset({"true", "1", "yes", "oui", "o", "y"})
_FHIR_GENDER = {"male": "M", "female": "F", "other": "O", "m": "M", "f": "F", "o": "O"}


@dataclass(frozen=True)
class ContextualCall:
    """The parameters of one contextual call (empty when not given)."""

    ins_value: str = ""
    ins_system: str = ""
    family: str = ""
    given: str = ""
    gender: str = ""
    birth_date: str = ""
    birth_place: str = ""
    consent: str = ""
    patient_id: str = ""
    patient_id_issuer: str = ""
    situation: str = ""
    #: Names of mandatory parameters that were absent or empty.
    missing: tuple[str, ...] = ()

    @property
    def consented(self) -> bool:
        return self.consent.strip().lower() in _YES


def parse_contextual_call(params: Mapping[str, str]) -> ContextualCall:
    """Read the call's parameters (unknown ones are ignored; values trimmed and bounded)."""
    values: dict[str, str] = {}
    for name, value in params.items():
        target = CONTEXT_PARAMETERS.get(name.strip().lower())
        if target is not None:
            values[target] = str(value).strip()[:200]
    missing = tuple(
        name
        for name, target in CONTEXT_PARAMETERS.items()
        if name not in OPTIONAL_PARAMETERS and not values.get(target)
    )
    return ContextualCall(**values, missing=missing)


def _oid(value: str) -> str:
    return value[8:] if value.lower().startswith("urn:oid:") else value


def _fold(value: str) -> str:
    """Comparison form of a name: upper case, no diacritics, hyphens and apostrophes as spaces."""
    text = unicodedata.normalize("NFKD", value.replace("-", " ").replace("'", " "))
    return " ".join("".join(c for c in text if not unicodedata.combining(c)).upper().split())


def _birth_date(value: str) -> str:
    digits = re.sub(r"[^0-9]", "", value)
    return digits[:8] if len(digits) >= 8 else ""


def mismatched_traits(identity: PatientIdentity, call: ContextualCall) -> list[str]:
    """Traits of the call that the identity does not bear (RNIV: identity checked on its strict
    traits). Family name: birth or used name; given name: any birth first name or the used one; sex;
    birth date; birth place (INSEE code) when the identity knows it. A trait the identity does not
    know (but the birth place) cannot be checked and counts as a mismatch."""
    wrong = []
    families = {_fold(v) for v in (identity.birth_name, identity.used_name) if v}
    if _fold(call.family) not in families:
        wrong.append("family")
    givens = {_fold(v) for v in (identity.first_birth_given_name, identity.used_given_name) if v}
    givens |= {_fold(v) for v in identity.birth_given_names.split() if v}
    if not ({_fold(call.given), _fold(call.given.split(" ")[0])} & givens):
        wrong.append("given")
    if _FHIR_GENDER.get(call.gender.strip().lower(), "?") != (identity.sex or "!"):
        wrong.append("gender")
    if not identity.birth_date or _birth_date(call.birth_date) != identity.birth_date:
        wrong.append("birth_date")
    if identity.birth_place_code and call.birth_place.upper() != identity.birth_place_code.upper():
        wrong.append("birth_place")
    return wrong


@dataclass
class PatientContext:
    """What a contextual call found: the studies to open, or why it was refused."""

    refusal: str = ""
    study_uids: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)


def _situation_matches(session: Session, principal: Principal, situation: str) -> bool:
    """Whether ``situation`` names the organisation the professional acts for (code, FINESS or SIRET)."""
    organisation = get_organisation(session, principal.organisation) if principal.organisation else None
    if organisation is None:
        return False
    wanted = situation.strip().upper()
    return wanted in {v.upper() for v in (organisation.code, organisation.finess, organisation.siret) if v}


def _find_identity(
    session: Session, call: ContextualCall, *, allow_test_ins: bool
) -> tuple[PatientIdentity | None, str, str]:
    """(identity, how it was found, refusal): by a qualified INS first, else by PatientID + issuer."""
    system = _oid(call.ins_system)
    if system not in INS_OIDS and not (allow_test_ins and system in INS_TEST_OIDS):
        return None, "", "ins-system"
    try:
        ins = patients.check_ins(patients.Ins(call.ins_value, system), allow_test=allow_test_ins)
    except patients.PatientError:
        return None, "", "ins-invalid"
    carriers = [patients.effective_identity(session, i) for i in patients.identities_by_ins(session, ins)]
    qualified = [found for found in carriers if found.status == STATUS_QUAL and found.active]
    if qualified:
        return qualified[0], "ins", ""
    issuer = _oid(call.patient_id_issuer)
    ref = (
        patients.AuthorityRef(oid=issuer)
        if re.fullmatch(r"[0-2](\.(0|[1-9][0-9]*))+", issuer)
        else patients.AuthorityRef(namespace=issuer)
    )
    try:
        local = patients.get_identity(session, local_id=call.patient_id, authority=ref)
    except patients.PatientError:
        local = None
    if local is None:
        return None, "", "unknown-patient"
    local = patients.effective_identity(session, local)
    if local.ins_matricule and (local.ins_matricule, local.ins_oid) != (ins.matricule, ins.oid):
        return None, "patient-id", "identity-conflict"
    return local, "patient-id", ""


def open_patient_context(
    session: Session, *, principal: Principal, call: ContextualCall, allow_test_ins: bool
) -> PatientContext:
    """Resolve a contextual call for a logged-in professional and audit it (``drimm.contextual-call``).

    Refused when a mandatory parameter is missing, ``InformationEtConsentement`` is not true,
    ``Situation`` names another structure than the one the professional acts for, the patient is not
    found (a qualified INS, else PatientID in PatientIDIssuer's domain), the traits given do not
    match, or the professional may see none of the patient's studies (access policy: the studies
    of the organisation acted for, shares and open break-glass grants; ``Situation`` widens
    nothing — an emergency access stays the portal's explicit, audited break-glass).
    """
    outcome = PatientContext()
    identity: PatientIdentity | None = None
    if call.missing:
        outcome.refusal = "missing"
        outcome.detail["missing"] = list(call.missing)
    elif not call.consented:
        outcome.refusal = "no-consent"
    elif call.situation and not _situation_matches(session, principal, call.situation):
        outcome.refusal = "situation"
    else:
        identity, how, refusal = _find_identity(session, call, allow_test_ins=allow_test_ins)
        outcome.detail["found_by"] = how
        if identity is None:
            outcome.refusal = refusal
        else:
            wrong = mismatched_traits(identity, call)
            if wrong:
                outcome.refusal = "traits"
                outcome.detail["mismatched"] = wrong
            else:
                studies = visible_person_studies(session, principal=principal, person_id=identity.person_id)
                outcome.study_uids = [study.study_uid for study in studies]
                if not outcome.study_uids:
                    outcome.refusal = "no-study"
    if call.situation:
        outcome.detail["situation"] = call.situation[:64]
    outcome.detail["studies"] = len(outcome.study_uids)
    if outcome.refusal:
        outcome.detail["reason"] = outcome.refusal
    authority = session.get(AssigningAuthority, identity.authority_id) if identity else None
    audit.record(
        session,
        action="drimm.contextual-call",
        principal=principal,
        outcome="failure" if outcome.refusal else "success",
        study_uid=outcome.study_uids[0] if outcome.study_uids else "",
        patient_id=identity.local_id if identity else call.patient_id[:64],
        patient_issuer=patients.authority_label(authority) if authority else call.patient_id_issuer[:64],
        detail=outcome.detail,
    )
    return outcome
