"""Patient identity operations: the regional master patient index (DESIGN.md §6).

Rules (Référentiel National d'IdentitoVigilance; IHE ITI TF-2b 3.30 Patient Administration
Management and its French national extension; IHE PIX for cross-referencing):

- an identity is (local id, assigning authority); identities of one human being are linked to one
  :class:`~simral.patients.models.Person`;
- the same INS (matricule + OID) from two authorities links the two identities to one person,
  unless their strict traits disagree (then a vigilance case, no link);
- a known local id received with different strict traits (birth name, birth first names, first
  birth first name, sex, birth date, birth place) changes nothing and opens a vigilance case;
- a merge (A40), link (A24 or INS), unlink (A37) and change of identifier (A47) is an
  :class:`~simral.patients.models.IdentityChange` that can be undone (unmerge keeps the record);
- every change is audited through :func:`simral.audit.service.record` in the caller's
  transaction; services never commit (DESIGN.md §2).

Later work builds on :func:`person_identities` (query expansion by linked identities) and
:func:`identity_for_organisation` (PatientID coercion at retrieve time, IHE PIR-style).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Protocol, TypeVar, cast

from sqlalchemy import Table, bindparam, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from simral.access.policy import (
    AccessDenied,
    Principal,
    may_manage,
    may_manage_identities,
    may_store,
    peer_binding_refusal,
)
from simral.audit import service as audit
from simral.db.base import utcnow
from simral.patients.models import (
    CASE_CONFLICTING_TRAITS,
    CASE_INS_STATUS_CHANGE,
    CASE_OPEN,
    CASE_RESOLVED,
    CASE_SUSPECTED_DUPLICATE,
    CHANGE_IDENTIFIER,
    CHANGE_LINK,
    CHANGE_MERGE,
    CHANGE_UNLINK,
    INS_OIDS,
    INS_TEST_OIDS,
    STATUS_PROV,
    STATUS_QUAL,
    STATUS_RECUP,
    STATUSES,
    AssigningAuthority,
    Hl7Message,
    Hl7Source,
    IdentityChange,
    PatientIdentity,
    Person,
    StudyIdentity,
    VigilanceCase,
)


class PatientError(ValueError):
    """An identity operation that cannot be done; ``code`` is the HL7 table 0357 error code an
    HL7 adapter answers with (204 unknown key, 205 duplicate key, 207 application error...)."""

    def __init__(self, message: str, *, code: str = "207") -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class AuthorityRef:
    """How a message names an authority: HD namespace and/or ISO OID, or an organisation code."""

    namespace: str = ""
    oid: str = ""
    organisation_code: str = ""

    @property
    def label(self) -> str:
        return self.oid or self.namespace or self.organisation_code


@dataclass(frozen=True)
class Traits:
    """Identity traits (RNIV): the strict ones of the INS, then the used name and first name."""

    birth_name: str = ""
    #: Every birth first name, space-separated, in civil-status order.
    birth_given_names: str = ""
    first_birth_given_name: str = ""
    sex: str = ""
    birth_date: str = ""
    birth_place_code: str = ""
    used_name: str = ""
    used_given_name: str = ""


#: Traits an identity keeps once known: a different value is a conflict, never an update.
STRICT_TRAITS = (
    "birth_name",
    "birth_given_names",
    "first_birth_given_name",
    "sex",
    "birth_date",
    "birth_place_code",
)
OTHER_TRAITS = ("used_name", "used_given_name")


@dataclass(frozen=True)
class Ins:
    """An INS: matricule (NIR or NIA, 15 characters with its key) and the OID saying which."""

    matricule: str
    oid: str


@dataclass
class UpsertResult:
    """What :func:`upsert_identity` did."""

    identity: PatientIdentity
    created: bool = False
    changed: tuple[str, ...] = ()
    cases: list[VigilanceCase] | None = None


_NIR = re.compile(r"^[1-8][0-9]{4}(?:[0-9]{2}|2A|2B)[0-9]{8}$")
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


def check_ins(ins: Ins, *, allow_test: bool) -> Ins:
    """Check an INS: a known OID (test and demonstration OIDs only when ``allow_test``) and a
    matricule of 15 characters whose key is 97 − (number mod 97), Corsica 2A/2B counted as 19/18
    (the NIR's rule, which the NIA follows)."""
    matricule = ins.matricule.strip().upper()
    if ins.oid not in INS_OIDS and not (allow_test and ins.oid in INS_TEST_OIDS):
        allowed = "test OIDs allowed" if allow_test else "test OIDs not allowed (ins_test_oids_allowed)"
        raise PatientError(f"INS OID {ins.oid!r} is not an INS authority ({allowed})", code="103")
    if not _NIR.match(matricule):
        raise PatientError("INS matricule is not 15 characters of a NIR/NIA", code="102")
    number = int(matricule[:13].replace("2A", "19").replace("2B", "18"))
    if 97 - number % 97 != int(matricule[13:]):
        raise PatientError("INS matricule key does not match", code="102")
    return Ins(matricule, ins.oid)


def is_ins_oid(oid: str) -> bool:
    """Whether ``oid`` is one of the INS OIDs (production, test or demonstration)."""
    return oid in INS_OIDS or oid in INS_TEST_OIDS


def _fold(value: str) -> str:
    """Comparison form of a trait: upper case, no diacritics, single spaces (hyphens kept)."""
    text = unicodedata.normalize("NFKD", value)
    return " ".join("".join(c for c in text if not unicodedata.combining(c)).upper().split())


def normalise_sex(value: str) -> str:
    """M, F or O; unknown (U, A, N, empty) as ''. HL7 table 0001 and DICOM (0010,0040)."""
    code = value.strip().upper()[:1]
    return code if code in ("M", "F", "O") else ""


def normalise_traits(traits: Traits) -> Traits:
    """Trimmed traits, sex normalised, birth date cut to YYYYMMDD."""
    cleaned = {f.name: " ".join(str(getattr(traits, f.name) or "").split()) for f in fields(Traits)}
    cleaned["sex"] = normalise_sex(cleaned["sex"])
    cleaned["birth_date"] = re.sub(r"[^0-9]", "", cleaned["birth_date"])[:8]
    cleaned["birth_place_code"] = cleaned["birth_place_code"].upper()[:5]
    if not cleaned["first_birth_given_name"] and cleaned["birth_given_names"]:
        cleaned["first_birth_given_name"] = cleaned["birth_given_names"].split()[0]
    limits = {"birth_given_names": 200}
    return Traits(**{name: value[: limits.get(name, 100)] for name, value in cleaned.items()})


def conflicting_traits(known: PatientIdentity | Traits, received: Traits) -> dict[str, list[str]]:
    """Strict traits both sides know and that differ: {trait: [known, received]}."""
    conflicts = {}
    for name in STRICT_TRAITS:
        mine, theirs = str(getattr(known, name) or ""), str(getattr(received, name) or "")
        if mine and theirs and _fold(mine) != _fold(theirs):
            conflicts[name] = [mine, theirs]
    return conflicts


def traits_of(identity: PatientIdentity) -> Traits:
    """An identity's traits as a value."""
    return Traits(**{f.name: getattr(identity, f.name) for f in fields(Traits)})


# ------------------------------------------------------------------------------ authorities


def _insert_ignore(session: Session, model: Any, values: dict[str, Any]) -> bool:
    """INSERT … ON CONFLICT DO NOTHING (any unique constraint); True when a row was inserted."""
    table = cast(Table, model.__table__)
    dialect = session.get_bind().dialect.name
    stmt: Any
    if dialect == "postgresql":
        stmt = postgresql.insert(table).values(**values).on_conflict_do_nothing()
    elif dialect == "sqlite":
        stmt = sqlite.insert(table).values(**values).on_conflict_do_nothing()
    else:  # pragma: no cover - other databases are not supported
        stmt = insert(table).values(**values)
    key = next(iter(table.primary_key.columns))
    return session.connection().execute(stmt.returning(key)).first() is not None


def authority_for_organisation(session: Session, code: str) -> AssigningAuthority | None:
    """The authority of an organisation's patient ids: by its ``patient_id_oid`` when it has one,
    else one keyed by the organisation's code. None when there is no such organisation."""
    from simral.identity.service import get_organisation

    found = session.scalar(select(AssigningAuthority).where(AssigningAuthority.organisation_code == code))
    if found is not None:
        return found
    organisation = get_organisation(session, code)
    if organisation is None:
        return None
    oid = organisation.patient_id_oid or None
    if oid is not None:
        by_oid = session.scalar(select(AssigningAuthority).where(AssigningAuthority.oid == oid))
        if by_oid is not None:
            by_oid.organisation_code = code
            return by_oid
    _insert_ignore(
        session,
        AssigningAuthority,
        {"oid": oid, "namespace": code, "organisation_code": code, "created_at": utcnow()},
    )
    return session.scalar(select(AssigningAuthority).where(AssigningAuthority.organisation_code == code))


def resolve_authority(
    session: Session, ref: AuthorityRef, *, create: bool = True
) -> AssigningAuthority | None:
    """The authority named by ``ref`` (created when unknown and ``create``).

    An OID identifies the authority (HL7 v2.5 HD.2 with HD.3 ``ISO``; DICOM Universal Entity ID of
    type ISO); a namespace alone (HD.1, Issuer of Patient ID) matches the authority of that
    namespace or organisation code; an organisation code gives that organisation's authority.
    """
    if ref.oid:
        if not _OID.match(ref.oid) or len(ref.oid) > 64:
            raise PatientError(f"assigning authority {ref.oid!r} is not an OID", code="102")
        if is_ins_oid(ref.oid):
            raise PatientError("an INS OID is not the authority of a local patient id", code="102")
        found = session.scalar(select(AssigningAuthority).where(AssigningAuthority.oid == ref.oid))
        if found is not None:
            if ref.namespace and not found.namespace:
                found.namespace = ref.namespace[:64]
            return found
        if ref.namespace:
            # A namespace first seen without its OID: the OID completes it.
            nameless = session.scalar(
                select(AssigningAuthority)
                .where(AssigningAuthority.namespace == ref.namespace[:64], AssigningAuthority.oid.is_(None))
                .order_by(AssigningAuthority.id)
                .limit(1)
            )
            if nameless is not None:
                nameless.oid = ref.oid
                return nameless
        if not create:
            return None
        _insert_ignore(
            session,
            AssigningAuthority,
            {
                "oid": ref.oid,
                "namespace": ref.namespace[:64],
                "organisation_code": _organisation_of_oid(session, ref.oid),
                "created_at": utcnow(),
            },
        )
        return session.scalar(select(AssigningAuthority).where(AssigningAuthority.oid == ref.oid))
    if ref.organisation_code:
        return authority_for_organisation(session, ref.organisation_code)
    if ref.namespace:
        namespace = ref.namespace[:64]
        found = session.scalar(
            select(AssigningAuthority)
            .where(
                (AssigningAuthority.namespace == namespace)
                | (AssigningAuthority.organisation_code == namespace)
            )
            .order_by(AssigningAuthority.id)
            .limit(1)
        )
        if found is not None or not create:
            return found
        authority = AssigningAuthority(namespace=namespace)
        session.add(authority)
        session.flush()
        return authority
    return None


def _organisation_of_oid(session: Session, oid: str) -> str | None:
    """The organisation whose patient-id authority is ``oid``, unless it already has one."""
    from simral.identity.models import Organisation

    code = session.scalar(select(Organisation.code).where(Organisation.patient_id_oid == oid).limit(1))
    if code is None:
        return None
    taken = session.scalar(select(AssigningAuthority.id).where(AssigningAuthority.organisation_code == code))
    return None if taken is not None else str(code)


# Built once: every query naming a PatientID (C-FIND, QIDO-RS) looks the asker's authority up.
_AUTHORITY_OF_ORGANISATION = select(AssigningAuthority.id).where(
    AssigningAuthority.organisation_code == bindparam("code")
)
_AUTHORITY_OF_OID = select(AssigningAuthority.id).where(AssigningAuthority.oid == bindparam("oid"))


@functools.cache
def _organisation_oid() -> Any:
    from simral.identity.models import Organisation  # identity imports this module

    return select(Organisation.patient_id_oid).where(Organisation.code == bindparam("code"))


def organisation_authority_id(session: Session, code: str) -> int | None:
    """The id of an organisation's patient-id authority, without creating it (read-only)."""
    found = session.scalar(_AUTHORITY_OF_ORGANISATION, {"code": code})
    if found is not None:
        return int(found)
    oid = session.scalar(_organisation_oid(), {"code": code})
    if not oid:
        return None
    by_oid = session.scalar(_AUTHORITY_OF_OID, {"oid": oid})
    return int(by_oid) if by_oid is not None else None


def authority_label(authority: AssigningAuthority) -> str:
    """The authority as the audit trail names it: its OID, else its namespace."""
    return authority.oid or authority.namespace


# ------------------------------------------------------------------------------- identities


def get_identity(session: Session, *, local_id: str, authority: AuthorityRef) -> PatientIdentity | None:
    """The identity with this local id in this authority (None when either is unknown)."""
    found = resolve_authority(session, authority, create=False)
    if found is None:
        return None
    return session.scalar(
        select(PatientIdentity).where(
            PatientIdentity.authority_id == found.id, PatientIdentity.local_id == local_id
        )
    )


def get_identity_or_raise(session: Session, *, local_id: str, authority: AuthorityRef) -> PatientIdentity:
    """As :func:`get_identity`; an unknown identity is a :class:`PatientError` (HL7 code 204)."""
    identity = get_identity(session, local_id=local_id, authority=authority)
    if identity is None:
        raise PatientError(f"unknown patient identifier in authority {authority.label}", code="204")
    return identity


def effective_identity(session: Session, identity: PatientIdentity) -> PatientIdentity:
    """The identity that stands for ``identity`` now: itself, or the one it was merged into."""
    seen = {identity.id}
    while identity.merged_into_id is not None:
        target = session.get(PatientIdentity, identity.merged_into_id)
        if target is None or target.id in seen:
            break
        seen.add(target.id)
        identity = target
    return identity


def person_identities(
    session: Session, person_id: int, *, include_merged: bool = True
) -> list[PatientIdentity]:
    """Every identity of a person (merged ones too unless ``include_merged`` is False), by id."""
    query = select(PatientIdentity).where(PatientIdentity.person_id == person_id)
    if not include_merged:
        query = query.where(PatientIdentity.merged_into_id.is_(None))
    return list(session.scalars(query.order_by(PatientIdentity.id)))


def linked_identities(session: Session, identity: PatientIdentity) -> list[PatientIdentity]:
    """All identities of the same person as ``identity`` (itself included): the keys a query by
    any of them is to be expanded with."""
    return person_identities(session, effective_identity(session, identity).person_id)


def identity_for_organisation(
    session: Session, *, person_id: int, organisation_code: str
) -> PatientIdentity | None:
    """The active identity an organisation knows a person by (its authority's), if any: the
    PatientID to show that organisation (IHE PIR-style coercion)."""
    authority_id = organisation_authority_id(session, organisation_code)
    if authority_id is None:
        return None
    return identity_in_authority(session, person_id=person_id, authority_id=authority_id)


def identity_in_authority(session: Session, *, person_id: int, authority_id: int) -> PatientIdentity | None:
    """The person's active identity in an assigning authority (the first, when several)."""
    return session.scalar(
        select(PatientIdentity)
        .where(
            PatientIdentity.person_id == person_id,
            PatientIdentity.authority_id == authority_id,
            PatientIdentity.merged_into_id.is_(None),
        )
        .order_by(PatientIdentity.id)
        .limit(1)
    )


def identities_by_ins(session: Session, ins: Ins) -> list[PatientIdentity]:
    """Identities carrying this INS, by id."""
    return list(
        session.scalars(
            select(PatientIdentity)
            .where(PatientIdentity.ins_oid == ins.oid, PatientIdentity.ins_matricule == ins.matricule)
            .order_by(PatientIdentity.id)
        )
    )


def _may_feed(principal: Principal) -> None:
    if not (may_store(principal) or may_manage_identities(principal)):
        raise AccessDenied(f"{principal.audit_name} may not feed patient identities")


def _may_manage(principal: Principal) -> None:
    if not may_manage_identities(principal):
        raise AccessDenied(f"{principal.audit_name} may not manage patient identities")


def _audit(
    session: Session,
    action: str,
    identity: PatientIdentity,
    *,
    principal: Principal,
    detail: dict[str, Any],
    outcome: str = "success",
) -> None:
    authority = session.get(AssigningAuthority, identity.authority_id)
    audit.record(
        session,
        action=action,
        principal=principal,
        outcome=outcome,
        patient_id=identity.local_id,
        patient_issuer=authority_label(authority) if authority is not None else "",
        detail={"identity": identity.id, "person": identity.person_id, **detail},
    )


def _record_change(
    session: Session,
    *,
    kind: str,
    action: str,
    subject: PatientIdentity,
    other: PatientIdentity | None,
    moved: list[list[int]],
    principal: Principal,
    source: str,
    detail: dict[str, Any] | None = None,
    audit_detail: dict[str, Any] | None = None,
) -> IdentityChange:
    """Keep an identity change (so it can be undone) and audit it in the same transaction."""
    change = IdentityChange(
        kind=kind,
        identity_id=subject.id,
        other_identity_id=other.id if other is not None else None,
        moved=moved,
        detail=detail or {},
        source=source[:128],
        actor=principal.audit_name[:128],
        created_at=utcnow(),
    )
    session.add(change)
    session.flush()
    _audit(
        session,
        action,
        subject,
        principal=principal,
        detail={"change": change.id, **(audit_detail or {}), "source": source},
    )
    return change


def _open_case(
    session: Session,
    *,
    kind: str,
    identity: PatientIdentity,
    other: PatientIdentity | None = None,
    detail: dict[str, Any],
    source: str,
    principal: Principal,
) -> VigilanceCase | None:
    """Open a vigilance case unless the same one is already open; audited."""
    other_id = other.id if other is not None else None
    for case in session.scalars(
        select(VigilanceCase).where(
            VigilanceCase.kind == kind,
            VigilanceCase.state == CASE_OPEN,
            VigilanceCase.identity_id == identity.id,
        )
    ):
        if case.other_identity_id == other_id and case.detail == detail:
            return None
    case = VigilanceCase(
        kind=kind,
        state=CASE_OPEN,
        identity_id=identity.id,
        other_identity_id=other_id,
        detail=detail,
        source=source[:128],
        created_at=utcnow(),
    )
    session.add(case)
    session.flush()
    _audit(
        session,
        "patient.vigilance-case",
        identity,
        principal=principal,
        outcome="warning",
        detail={"case": case.id, "kind": kind, "other_identity": other_id, "source": source},
    )
    return case


_STATUS_RANK = {STATUS_PROV: 0, "VALI": 1, STATUS_RECUP: 1, STATUS_QUAL: 2}


def upsert_identity(
    session: Session,
    *,
    local_id: str,
    authority: AuthorityRef,
    traits: Traits,
    principal: Principal,
    source: str,
    ins: Ins | None = None,
    status: str | None = None,
    attributes: str | None = None,
    allow_test_ins: bool = False,
    at: datetime | None = None,
) -> UpsertResult:
    """Create or update the identity (``local_id``, ``authority``) from received traits.

    New identity: created on a new person with the traits, INS and status (default PROV), then
    linked by INS to the person of another authority's identity with the same INS when the strict
    traits agree. Known identity: empty traits are filled, the used name and first name updated,
    the status changed; a strict trait or an INS that differs from the known one changes nothing
    and opens a ``conflicting-traits`` case. A status that leaves RECUP/QUAL opens an
    ``ins-status-change`` case. RECUP and QUAL need an INS (RNIV).
    """
    _may_feed(principal)
    local_id = local_id.strip()
    if not local_id or len(local_id) > 64:
        raise PatientError("a patient identifier of 1 to 64 characters is required", code="101")
    if status is not None and status not in STATUSES:
        raise PatientError(f"unknown identity status {status!r} (one of {', '.join(STATUSES)})", code="103")
    if ins is not None:
        ins = check_ins(ins, allow_test=allow_test_ins)
    traits = normalise_traits(traits)
    found = resolve_authority(session, authority)
    if found is None:
        raise PatientError("no assigning authority for the patient identifier", code="101")
    now = at or utcnow()
    identity = session.scalar(
        select(PatientIdentity).where(
            PatientIdentity.authority_id == found.id, PatientIdentity.local_id == local_id
        )
    )
    if identity is None:
        if status in (STATUS_RECUP, STATUS_QUAL) and ins is None:
            raise PatientError(f"identity status {status} requires an INS", code="101")
        return _create(
            session,
            authority=found,
            local_id=local_id,
            traits=traits,
            ins=ins,
            status=status or STATUS_PROV,
            attributes=attributes or "",
            source=source,
            principal=principal,
            now=now,
        )
    return _update(
        session,
        identity,
        traits=traits,
        ins=ins,
        status=status,
        attributes=attributes,
        source=source,
        principal=principal,
        now=now,
    )


def _create(
    session: Session,
    *,
    authority: AssigningAuthority,
    local_id: str,
    traits: Traits,
    ins: Ins | None,
    status: str,
    attributes: str,
    source: str,
    principal: Principal,
    now: datetime,
) -> UpsertResult:
    person = Person(created_at=now, updated_at=now)
    session.add(person)
    session.flush()
    values: dict[str, Any] = {
        "authority_id": authority.id,
        "local_id": local_id,
        "person_id": person.id,
        **{f.name: getattr(traits, f.name) for f in fields(Traits)},
        "ins_matricule": ins.matricule if ins else "",
        "ins_oid": ins.oid if ins else "",
        "status": status,
        "status_at": now,
        "status_source": source[:128],
        "attributes": attributes[:64],
        "merged_into_id": None,
        "active": True,
        "created_at": now,
        "updated_at": now,
    }
    inserted = _insert_ignore(session, PatientIdentity, values)
    identity = session.scalar(
        select(PatientIdentity).where(
            PatientIdentity.authority_id == authority.id, PatientIdentity.local_id == local_id
        )
    )
    assert identity is not None
    if not inserted:
        # Another transaction created it first (PostgreSQL): update it like a known identity.
        session.delete(person)
        return _update(
            session,
            identity,
            traits=traits,
            ins=ins,
            status=status,
            attributes=attributes,
            source=source,
            principal=principal,
            now=now,
        )
    _audit(
        session,
        "patient.identity-create",
        identity,
        principal=principal,
        detail={"source": source, "status": status, "ins": bool(ins)},
    )
    cases: list[VigilanceCase] = []
    cases += _check_duplicates(session, identity, source=source, principal=principal)
    if ins is not None:
        cases += _link_by_ins(session, identity, source=source, principal=principal)
    return UpsertResult(identity, created=True, cases=cases)


def _update(
    session: Session,
    identity: PatientIdentity,
    *,
    traits: Traits,
    ins: Ins | None,
    status: str | None,
    attributes: str | None,
    source: str,
    principal: Principal,
    now: datetime,
) -> UpsertResult:
    conflicts = conflicting_traits(identity, traits)
    if (
        ins is not None
        and identity.ins_matricule
        and (identity.ins_matricule, identity.ins_oid)
        != (
            ins.matricule,
            ins.oid,
        )
    ):
        conflicts["ins"] = [f"{identity.ins_matricule}@{identity.ins_oid}", f"{ins.matricule}@{ins.oid}"]
    if conflicts:
        received = {name: getattr(traits, name) for name in STRICT_TRAITS + OTHER_TRAITS}
        if ins is not None:
            received["ins"] = f"{ins.matricule}@{ins.oid}"
        if status is not None:
            received["status"] = status
        case = _open_case(
            session,
            kind=CASE_CONFLICTING_TRAITS,
            identity=identity,
            detail={
                "reason": "same identifier, different strict traits",
                "conflicts": conflicts,
                "received": received,
            },
            source=source,
            principal=principal,
        )
        return UpsertResult(identity, cases=[case] if case else [])
    changed: list[str] = []
    for name in STRICT_TRAITS:
        value = getattr(traits, name)
        if value and not getattr(identity, name):
            setattr(identity, name, value)
            changed.append(name)
    for name in OTHER_TRAITS:
        value = getattr(traits, name)
        if value and value != getattr(identity, name):
            setattr(identity, name, value)
            changed.append(name)
    new_ins = ins is not None and not identity.ins_matricule
    if ins is not None and new_ins:
        identity.ins_matricule, identity.ins_oid = ins.matricule, ins.oid
        changed.append("ins")
    if attributes is not None and attributes[:64] != identity.attributes:
        identity.attributes = attributes[:64]
        changed.append("attributes")
    cases: list[VigilanceCase] = []
    if status is not None and status != identity.status:
        if status in (STATUS_RECUP, STATUS_QUAL) and not identity.ins_matricule:
            raise PatientError(f"identity status {status} requires an INS", code="101")
        previous = identity.status
        identity.status, identity.status_at, identity.status_source = status, now, source[:128]
        changed.append("status")
        _audit(
            session,
            "patient.status-change",
            identity,
            principal=principal,
            detail={"from": previous, "to": status, "source": source},
        )
        if (
            previous in (STATUS_RECUP, STATUS_QUAL)
            and _STATUS_RANK[status] <= _STATUS_RANK[previous]
            and (status != previous)
        ):
            case = _open_case(
                session,
                kind=CASE_INS_STATUS_CHANGE,
                identity=identity,
                detail={"from": previous, "to": status},
                source=source,
                principal=principal,
            )
            if case:
                cases.append(case)
    if changed:
        identity.updated_at = now
        session.flush()
        _audit(
            session,
            "patient.identity-update",
            identity,
            principal=principal,
            detail={"changed": changed, "source": source},
        )
    if new_ins:
        cases += _link_by_ins(session, identity, source=source, principal=principal)
    return UpsertResult(identity, changed=tuple(changed), cases=cases)


#: Suspected-duplicate cases opened for one new identity, at most (the most recent look-alikes).
MAX_DUPLICATE_CASES = 10


def _check_duplicates(
    session: Session, identity: PatientIdentity, *, source: str, principal: Principal
) -> list[VigilanceCase]:
    """A new identity whose strict traits equal those of another active identity of the same
    authority is a suspected duplicate (two local ids for one patient).

    One case per pair, for the :data:`MAX_DUPLICATE_CASES` most recent such identities: placeholder
    identities (an unknown patient's default traits, test patients) can share their traits by the
    hundred, and a case for each made every new one cost as much as all before it.
    """
    if not (identity.birth_name and identity.first_birth_given_name and identity.birth_date and identity.sex):
        return []
    cases = []
    matched = 0
    for other in session.scalars(
        select(PatientIdentity)
        .where(
            PatientIdentity.authority_id == identity.authority_id,
            PatientIdentity.birth_date == identity.birth_date,
            PatientIdentity.id != identity.id,
            PatientIdentity.merged_into_id.is_(None),
        )
        .order_by(PatientIdentity.id.desc())
    ):
        same = all(
            _fold(getattr(other, name)) == _fold(getattr(identity, name))
            for name in ("birth_name", "first_birth_given_name", "sex")
        )
        if same:
            matched += 1
            if matched > MAX_DUPLICATE_CASES:
                break
            case = _open_case(
                session,
                kind=CASE_SUSPECTED_DUPLICATE,
                identity=identity,
                other=other,
                detail={"reason": "same strict traits under two identifiers of one authority"},
                source=source,
                principal=principal,
            )
            if case:
                cases.append(case)
    return cases


def _link_by_ins(
    session: Session, identity: PatientIdentity, *, source: str, principal: Principal
) -> list[VigilanceCase]:
    """Link ``identity`` to the person of another authority's identity with the same INS (IHE PIX
    cross-reference by the national identifier) when strict traits agree; otherwise, or within
    one authority, open a case."""
    ins = Ins(identity.ins_matricule, identity.ins_oid)
    cases = []
    for other in identities_by_ins(session, ins):
        if other.id == identity.id or other.merged_into_id is not None:
            continue
        if other.person_id == identity.person_id:
            continue
        conflicts = conflicting_traits(other, traits_of(identity))
        detail: dict[str, Any]
        if other.authority_id == identity.authority_id:
            kind, detail = (
                CASE_SUSPECTED_DUPLICATE,
                {"reason": "same INS under two identifiers of one authority"},
            )
        elif conflicts:
            kind, detail = (
                CASE_CONFLICTING_TRAITS,
                {"reason": "same INS, different strict traits", "conflicts": conflicts},
            )
        else:
            _link(session, other, identity, principal=principal, source=source or "ins", reason="ins")
            continue
        case = _open_case(
            session,
            kind=kind,
            identity=identity,
            other=other,
            detail=detail,
            source=source,
            principal=principal,
        )
        if case:
            cases.append(case)
    return cases


# ------------------------------------------------------------------ merges, links, renames


def _join_persons(session: Session, target_person: int, source_person: int) -> list[list[int]]:
    """Move every identity of ``source_person`` to ``target_person``: [[identity, from, to], ...]."""
    moved = []
    for identity in person_identities(session, source_person):
        identity.person_id = target_person
        moved.append([identity.id, source_person, target_person])
    person = session.get(Person, target_person)
    if person is not None:
        person.updated_at = utcnow()
    return moved


def _link(
    session: Session,
    first: PatientIdentity,
    second: PatientIdentity,
    *,
    principal: Principal,
    source: str,
    reason: str,
) -> IdentityChange | None:
    if first.person_id == second.person_id:
        return None
    return _record_change(
        session,
        kind=CHANGE_LINK,
        action="patient.link",
        subject=first,
        other=second,
        moved=_join_persons(session, first.person_id, second.person_id),
        detail={"reason": reason},
        audit_detail={"other_identity": second.id, "reason": reason},
        principal=principal,
        source=source,
    )


def link_identities(
    session: Session,
    first: PatientIdentity,
    second: PatientIdentity,
    *,
    principal: Principal,
    source: str = "",
    reason: str = "link",
) -> IdentityChange | None:
    """Say two identities are one person (HL7 A24 Link Patient Information): the second one's
    person joins the first one's. None when they already are. Undone by :func:`unlink_identities`."""
    _may_manage(principal)
    return _link(session, first, second, principal=principal, source=source, reason=reason)


def unlink_identities(
    session: Session,
    first: PatientIdentity,
    second: PatientIdentity,
    *,
    principal: Principal,
    source: str = "",
) -> IdentityChange | None:
    """Say two identities are not one person (HL7 A37 Unlink Patient Information): the link that
    joined them is undone if there is one, else the second identity gets a person of its own.
    None when they are not linked."""
    _may_manage(principal)
    if first.person_id != second.person_id:
        return None
    link = session.scalar(
        select(IdentityChange)
        .where(
            IdentityChange.kind == CHANGE_LINK,
            IdentityChange.undone_at.is_(None),
            (
                (IdentityChange.identity_id == first.id) & (IdentityChange.other_identity_id == second.id)
                | (IdentityChange.identity_id == second.id) & (IdentityChange.other_identity_id == first.id)
            ),
        )
        .order_by(IdentityChange.id.desc())
        .limit(1)
    )
    if link is not None:
        try:
            return undo_change(session, link.id, principal=principal, source=source)
        except PatientError:
            pass  # later changes moved these identities: split the second one off instead
    now = utcnow()
    person = Person(created_at=now, updated_at=now)
    session.add(person)
    session.flush()
    moved = [[second.id, second.person_id, person.id]]
    second.person_id = person.id
    return _record_change(
        session,
        kind=CHANGE_UNLINK,
        action="patient.unlink",
        subject=first,
        other=second,
        moved=moved,
        audit_detail={"other_identity": second.id},
        principal=principal,
        source=source,
    )


def merge_identities(
    session: Session,
    *,
    survivor: PatientIdentity,
    merged: PatientIdentity,
    principal: Principal,
    source: str = "",
    reason: str = "",
) -> IdentityChange:
    """Merge ``merged`` into ``survivor`` (HL7 A40 Merge Patient — Patient Identifier List, IHE
    ITI TF-2b 3.30.4.2): both of one authority; ``merged`` becomes inactive, points at the
    survivor, and its person's identities join the survivor's person. Two different INS are never
    merged. Undone by :func:`unmerge`."""
    _may_manage(principal)
    if survivor.id == merged.id:
        raise PatientError("an identity cannot be merged into itself", code="205")
    if survivor.authority_id != merged.authority_id:
        raise PatientError("a merge joins two identifiers of one authority (link identities instead)")
    if merged.merged_into_id is not None:
        raise PatientError("this identifier was already merged", code="205")
    if survivor.merged_into_id is not None:
        raise PatientError("the surviving identifier was itself merged into another one", code="205")
    if (
        survivor.ins_matricule
        and merged.ins_matricule
        and (survivor.ins_matricule, survivor.ins_oid) != (merged.ins_matricule, merged.ins_oid)
    ):
        raise PatientError("the two identities carry different INS: not merged (identity vigilance)")
    moved = (
        _join_persons(session, survivor.person_id, merged.person_id)
        if (survivor.person_id != merged.person_id)
        else []
    )
    merged.merged_into_id = survivor.id
    merged.active = False
    merged.updated_at = utcnow()
    change = _record_change(
        session,
        kind=CHANGE_MERGE,
        action="patient.merge",
        subject=survivor,
        other=merged,
        moved=moved,
        detail={"merged_local_id": merged.local_id, "survivor_local_id": survivor.local_id, "reason": reason},
        audit_detail={"merged_identity": merged.id, "merged_local_id": merged.local_id, "reason": reason},
        principal=principal,
        source=source,
    )
    return change


def unmerge(
    session: Session, change_id: int, *, principal: Principal, source: str = "", reason: str = ""
) -> IdentityChange:
    """Undo a merge: the merged identity is active again with the person it had (the merge record
    is kept, marked undone)."""
    change = session.get(IdentityChange, change_id)
    if change is None or change.kind != CHANGE_MERGE:
        raise PatientError(f"no merge {change_id}", code="204")
    return undo_change(session, change_id, principal=principal, source=source, reason=reason)


def last_merge(
    session: Session, *, survivor: PatientIdentity, merged: PatientIdentity
) -> IdentityChange | None:
    """The merge of ``merged`` into ``survivor`` still in force, if any."""
    return session.scalar(
        select(IdentityChange)
        .where(
            IdentityChange.kind == CHANGE_MERGE,
            IdentityChange.identity_id == survivor.id,
            IdentityChange.other_identity_id == merged.id,
            IdentityChange.undone_at.is_(None),
        )
        .order_by(IdentityChange.id.desc())
        .limit(1)
    )


def undo_change(
    session: Session, change_id: int, *, principal: Principal, source: str = "", reason: str = ""
) -> IdentityChange:
    """Undo a merge, link, unlink or change of identifier, provided no later change moved the same
    identities (undo that one first). The change stays recorded, with who undid it, when and why."""
    _may_manage(principal)
    change = session.get(IdentityChange, change_id)
    if change is None:
        raise PatientError(f"no identity change {change_id}", code="204")
    if change.undone_at is not None:
        raise PatientError(f"identity change {change_id} was already undone", code="205")
    for identity_id, _before, after in change.moved:
        identity = session.get(PatientIdentity, identity_id)
        if identity is None or identity.person_id != after:
            raise PatientError(f"identity change {change_id} was followed by others on the same identities")
    subject = session.get(PatientIdentity, change.identity_id)
    assert subject is not None
    if change.kind == CHANGE_MERGE:
        merged = session.get(PatientIdentity, change.other_identity_id)
        if merged is None or merged.merged_into_id != change.identity_id:
            raise PatientError(f"merge {change_id} no longer holds")
        merged.merged_into_id = None
        merged.active = True
        merged.updated_at = utcnow()
    elif change.kind == CHANGE_IDENTIFIER:
        old = str(change.detail.get("old_local_id", ""))
        clash = session.scalar(
            select(PatientIdentity.id).where(
                PatientIdentity.authority_id == subject.authority_id, PatientIdentity.local_id == old
            )
        )
        if clash is not None:
            raise PatientError("the former identifier is in use again", code="205")
        subject.local_id = old
    for identity_id, before, _after in change.moved:
        identity = session.get(PatientIdentity, identity_id)
        assert identity is not None
        identity.person_id = before
    change.undone_at = utcnow()
    change.undone_by = principal.audit_name[:128]
    if reason:
        change.detail = {**change.detail, "undo_reason": reason[:500]}
    session.flush()
    _audit(
        session,
        f"patient.undo-{change.kind}",
        subject,
        principal=principal,
        detail={
            "change": change.id,
            "other_identity": change.other_identity_id,
            "source": source,
            "reason": reason[:200],
        },
    )
    return change


def change_identifier(
    session: Session,
    identity: PatientIdentity,
    *,
    new_local_id: str,
    principal: Principal,
    source: str = "",
) -> IdentityChange:
    """Correct an identity's local id (HL7 A47 Change Patient Identifier List, IHE ITI TF-2b
    3.30.4.3): the identity, its links and its studies stay; the former id is recorded."""
    _may_manage(principal)
    new_local_id = new_local_id.strip()
    if not new_local_id or len(new_local_id) > 64:
        raise PatientError("a patient identifier of 1 to 64 characters is required", code="101")
    if new_local_id == identity.local_id:
        raise PatientError("the new identifier equals the current one", code="205")
    clash = session.scalar(
        select(PatientIdentity.id).where(
            PatientIdentity.authority_id == identity.authority_id, PatientIdentity.local_id == new_local_id
        )
    )
    if clash is not None:
        raise PatientError(
            "the new identifier is already in use in this authority (merge instead)", code="205"
        )
    old = identity.local_id
    identity.local_id = new_local_id
    identity.updated_at = utcnow()
    return _record_change(
        session,
        kind=CHANGE_IDENTIFIER,
        action="patient.change-identifier",
        subject=identity,
        other=None,
        moved=[],
        detail={"old_local_id": old, "new_local_id": new_local_id},
        audit_detail={"old_local_id": old},
        principal=principal,
        source=source,
    )


def set_status(
    session: Session, identity: PatientIdentity, *, status: str, principal: Principal, source: str
) -> UpsertResult:
    """Change an identity's status (with its date and source); leaving RECUP/QUAL opens a case."""
    _may_manage(principal)
    return upsert_identity(
        session,
        local_id=identity.local_id,
        authority=_ref_of(session, identity),
        traits=Traits(),
        status=status,
        principal=principal,
        source=source,
        allow_test_ins=True,
    )


def _ref_of(session: Session, identity: PatientIdentity) -> AuthorityRef:
    authority = session.get(AssigningAuthority, identity.authority_id)
    assert authority is not None
    return AuthorityRef(namespace=authority.namespace, oid=authority.oid or "")


# ------------------------------------------------------------------------ vigilance cases


def list_cases(
    session: Session, *, state: str | None = CASE_OPEN, kind: str | None = None
) -> list[VigilanceCase]:
    """Vigilance cases, oldest first (open ones by default)."""
    query = select(VigilanceCase)
    if state is not None:
        query = query.where(VigilanceCase.state == state)
    if kind is not None:
        query = query.where(VigilanceCase.kind == kind)
    return list(session.scalars(query.order_by(VigilanceCase.id)))


def resolve_case(
    session: Session,
    case_id: int,
    *,
    resolution: str,
    principal: Principal,
    apply_received: bool = False,
) -> VigilanceCase:
    """Close a case with a stated resolution; for a ``conflicting-traits`` case about one
    identifier, ``apply_received`` replaces the known strict traits by the received ones (the
    deliberate correction a person made after checking)."""
    _may_manage(principal)
    case = session.get(VigilanceCase, case_id)
    if case is None:
        raise PatientError(f"no vigilance case {case_id}", code="204")
    if case.state != CASE_OPEN:
        raise PatientError(f"vigilance case {case_id} is already resolved", code="205")
    identity = session.get(PatientIdentity, case.identity_id)
    assert identity is not None
    applied: list[str] = []
    if apply_received:
        received = case.detail.get("received")
        if case.kind != CASE_CONFLICTING_TRAITS or case.other_identity_id is not None or not received:
            raise PatientError("only received traits of one identifier can be applied")
        for name in STRICT_TRAITS + OTHER_TRAITS:
            value = str(received.get(name, "") or "")
            if value and value != getattr(identity, name):
                setattr(identity, name, value)
                applied.append(name)
        identity.updated_at = utcnow()
    case.state = CASE_RESOLVED
    case.resolved_at = utcnow()
    case.resolved_by = principal.audit_name[:128]
    case.resolution = resolution[:500]
    session.flush()
    _audit(
        session,
        "patient.vigilance-resolve",
        identity,
        principal=principal,
        detail={"case": case.id, "kind": case.kind, "applied": applied, "resolution": resolution[:200]},
    )
    return case


# ---------------------------------------------------------------------------- DICOM ingest


@dataclass(frozen=True)
class DicomPatient:
    """The patient of a DICOM header (PS3.3 C.7.1.1 Patient Module, C.2.2 Patient Identification
    with Table 10-18 Issuer of Patient ID Macro): id, issuer, INS candidates and traits."""

    patient_id: str
    issuer: str = ""
    issuer_oid: str = ""
    #: (matricule, OID) of Other Patient IDs Sequence items whose issuer is an INS OID.
    ins: tuple[tuple[str, str], ...] = ()
    traits: Traits = Traits()


def _issuer_oid(item: Any) -> str:
    """The ISO Universal Entity ID of an Issuer of Patient ID Qualifiers Sequence (PS3.3 10-18)."""
    qualifiers = item.get("IssuerOfPatientIDQualifiersSequence")
    if not qualifiers:
        return ""
    first = qualifiers[0]
    if str(first.get("UniversalEntityIDType", "") or "").strip().upper() != "ISO":
        return ""
    return str(first.get("UniversalEntityID", "") or "").strip()


def _pn(value: Any) -> tuple[str, str]:
    """Family and given name components of a PN value."""
    if not value:
        return "", ""
    text = str(value).split("=")[0]
    parts = text.split("^")
    return parts[0].strip(), (parts[1].strip() if len(parts) > 1 else "")


def dicom_patient(dataset: Any) -> DicomPatient:
    """Read the patient identity keys from a header (never raises on odd values).

    Patient's Name goes to the used name and first name (it is not always the birth name);
    Patient's Birth Name (0010,1005) to the birth name; sex and birth date are strict traits. INS:
    items of Other Patient IDs Sequence (0010,1002) whose Issuer of Patient ID Qualifiers carry an
    INS OID (ISO), as DESIGN.md §6 and the ANS convention (Issuer ``ASIP-SANTE-INS-NIR``) say.
    """
    try:
        patient_id = str(dataset.get("PatientID", "") or "").strip()
        ins = []
        for item in dataset.get("OtherPatientIDsSequence", None) or []:
            oid = _issuer_oid(item)
            value = str(item.get("PatientID", "") or "").strip()
            if value and is_ins_oid(oid):
                ins.append((value, oid))
        used_name, used_given = _pn(dataset.get("PatientName", ""))
        birth_name, _ = _pn(dataset.get("PatientBirthName", ""))
        traits = Traits(
            birth_name=birth_name,
            sex=str(dataset.get("PatientSex", "") or ""),
            birth_date=str(dataset.get("PatientBirthDate", "") or ""),
            used_name=used_name,
            used_given_name=used_given.split(" ")[0] if used_given else "",
        )
        return DicomPatient(
            patient_id=patient_id,
            issuer=str(dataset.get("IssuerOfPatientID", "") or "").strip(),
            issuer_oid=_issuer_oid(dataset),
            ins=tuple(ins),
            traits=traits,
        )
    except Exception:  # a malformed element must not fail an ingest: no identity work then
        return DicomPatient(patient_id="")


def study_is_linked(session: Session, study_pk: int) -> bool:
    """Whether the study already has its identity."""
    return (
        session.scalar(select(StudyIdentity.identity_id).where(StudyIdentity.study_pk == study_pk))
        is not None
    )


def link_study(
    session: Session,
    *,
    study_pk: int,
    patient: DicomPatient,
    organisation: str,
    principal: Principal,
    allow_test_ins: bool = False,
) -> int | None:
    """Link an archived study to the identity of its patient (once per study, in the ingest
    transaction); return the identity id, or None when the study has no identifiable patient.

    The authority is the header's Issuer of Patient ID (with its ISO qualifier), or, when absent,
    the storing organisation's patient-id authority. An invalid INS is ignored (the images are
    kept; the identity is PROV without INS). Traits that conflict open a vigilance case; the
    study is still linked to the identity its PatientID names.
    """
    linked = session.scalar(select(StudyIdentity.identity_id).where(StudyIdentity.study_pk == study_pk))
    if linked is not None:
        return int(linked)
    if not patient.patient_id or len(patient.patient_id) > 64:
        return None
    if patient.issuer or patient.issuer_oid:
        ref = AuthorityRef(namespace=patient.issuer, oid=patient.issuer_oid)
    elif organisation:
        ref = AuthorityRef(organisation_code=organisation)
    else:
        return None
    ins = None
    for matricule, oid in patient.ins:
        try:
            ins = check_ins(Ins(matricule, oid), allow_test=allow_test_ins)
            break
        except PatientError:
            continue
    source = f"dicom:{organisation or principal.audit_name}"
    try:
        with session.begin_nested():
            result = upsert_identity(
                session,
                local_id=patient.patient_id,
                authority=ref,
                traits=patient.traits,
                ins=ins,
                principal=principal,
                source=source,
                allow_test_ins=allow_test_ins,
            )
    except PatientError:
        return None
    _insert_ignore(
        session,
        StudyIdentity,
        {"study_pk": study_pk, "identity_id": result.identity.id, "created_at": utcnow()},
    )
    return result.identity.id


def study_person_has_ins(session: Session, study_pk: int, matricule: str) -> bool:
    """Whether the person the study is linked to carries the INS ``matricule`` on one of their
    identities: an instance naming the patient by INS (a DMP manifest, PatientID = INS, DESIGN.md
    §6) then belongs to that study's patient."""
    persons = (
        select(PatientIdentity.person_id)
        .join(StudyIdentity, StudyIdentity.identity_id == PatientIdentity.id)
        .where(StudyIdentity.study_pk == study_pk)
    )
    return (
        session.scalar(
            select(PatientIdentity.id)
            .where(PatientIdentity.person_id.in_(persons), PatientIdentity.ins_matricule == matricule)
            .limit(1)
        )
        is not None
    )


def study_identity(session: Session, study_pk: int) -> PatientIdentity | None:
    """The identity a study was stored under (not following merges: see :func:`effective_identity`)."""
    return session.scalar(
        select(PatientIdentity)
        .join(StudyIdentity, StudyIdentity.identity_id == PatientIdentity.id)
        .where(StudyIdentity.study_pk == study_pk)
    )


def study_person(session: Session, study_pk: int) -> int | None:
    """The person a study belongs to now (after merges and links)."""
    identity = study_identity(session, study_pk)
    return effective_identity(session, identity).person_id if identity is not None else None


def person_study_pks(session: Session, person_id: int) -> list[int]:
    """The archived studies of every identity of a person (for query expansion; the caller still
    filters them through the access policy)."""
    return list(
        session.scalars(
            select(StudyIdentity.study_pk)
            .join(PatientIdentity, PatientIdentity.id == StudyIdentity.identity_id)
            .where(PatientIdentity.person_id == person_id)
            .order_by(StudyIdentity.study_pk)
        )
    )


# ------------------------------------------------------------------------- HL7 message log


def find_message(session: Session, dedup_key: str) -> Hl7Message | None:
    """The message already received under this key (sending application, facility, MSH-10)."""
    return session.scalar(select(Hl7Message).where(Hl7Message.dedup_key == dedup_key))


def record_message(
    session: Session,
    *,
    dedup_key: str | None,
    control_id: str,
    sending_application: str,
    sending_facility: str,
    message_type: str,
    peer: str,
    raw: str,
    outcome: str,
    error: str,
    ack: str,
    principal: Principal,
) -> Hl7Message:
    """Keep an inbound message and the acknowledgement it gets, in the caller's transaction (with
    the changes it made, for AA), before that acknowledgement is sent; audited."""
    message = Hl7Message(
        dedup_key=dedup_key,
        control_id=control_id[:64],
        sending_application=sending_application[:200],
        sending_facility=sending_facility[:200],
        message_type=message_type[:32],
        peer=peer[:64],
        raw=raw,
        outcome=outcome,
        error=error[:1000],
        ack=ack,
        received_at=utcnow(),
    )
    session.add(message)
    session.flush()
    audit.record(
        session,
        action="hl7.message",
        principal=principal,
        outcome="success" if outcome == "AA" else "failure",
        detail={"message": message.id, "type": message_type, "control_id": control_id[:64], "ack": outcome},
    )
    return message


def list_messages(session: Session, *, outcome: str | None = None, limit: int = 200) -> list[Hl7Message]:
    """Received messages, newest first (``outcome`` AE/AR: those kept for review)."""
    query = select(Hl7Message)
    if outcome is not None:
        query = query.where(Hl7Message.outcome == outcome)
    return list(session.scalars(query.order_by(Hl7Message.id.desc()).limit(limit)))


def identity_traits(identity: PatientIdentity) -> dict[str, str]:
    """An identity's INS and traits (Référentiel INS) in the shape of an imaging request's patient
    copy (:attr:`simral.reading.models.ImagingRequest.patient`): what documents and messages name
    the patient by, beside the local identifier."""
    return {
        "ins": identity.ins_matricule,
        "ins_oid": identity.ins_oid,
        "status": identity.status,
        "birth_name": identity.birth_name,
        "birth_given_names": identity.birth_given_names,
        "first_birth_given_name": identity.first_birth_given_name,
        "used_name": identity.used_name,
        "used_given_name": identity.used_given_name,
        "sex": identity.sex,
        "birth_date": identity.birth_date,
        "birth_place_code": identity.birth_place_code,
    }


# --------------------------------------------------------------------- HL7 identity sources


def add_hl7_source(
    session: Session,
    *,
    name: str,
    application: str,
    facility: str = "",
    host: str = "",
    check_host: bool = False,
    tls_subject: str = "",
    principal: Principal,
) -> Hl7Source:
    """Register a sender of the ADT identity feed or of PDQ queries (the hospital's identity
    manager, a PDQ consumer) by its MSH-3 ``application`` and MSH-4 ``facility`` ("" = any).

    With ``check_host`` its messages are believed from ``host`` only; with ``tls_subject`` only over
    MLLP TLS with a verified client certificate of that subject CN (:func:`hl7_sender_refusal`).
    Platform configuration: the platform itself and regional administrators."""
    if not may_manage(principal):
        raise AccessDenied(f"{principal.audit_name} may not register HL7 sources")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
        raise PatientError(f"invalid HL7 source name {name!r} (letters, digits, . _ -; up to 64)", code="102")
    application, facility, host, tls_subject = (
        application.strip(),
        facility.strip(),
        host.strip(),
        tls_subject.strip(),
    )
    if not application or len(application) > 200 or len(facility) > 200:
        raise PatientError(
            "an HL7 source needs its MSH-3 sending application (up to 200 characters)", code="101"
        )
    if check_host and not host:
        raise PatientError("--check-host needs the source's --host", code="101")
    if session.scalar(select(Hl7Source.id).where(Hl7Source.name == name)) is not None:
        raise PatientError(f"an HL7 source named {name!r} already exists", code="205")
    same = select(Hl7Source.name).where(Hl7Source.application == application, Hl7Source.facility == facility)
    taken = session.scalar(same)
    if taken is not None:
        raise PatientError(f"HL7 source {taken} already sends as {application}^{facility}", code="205")
    source = Hl7Source(
        name=name,
        application=application,
        facility=facility,
        host=host,
        check_host=check_host,
        tls_subject=tls_subject,
        created_at=utcnow(),
    )
    session.add(source)
    session.flush()
    audit.record(
        session,
        action="hl7-source.create",
        principal=principal,
        detail={
            "name": name,
            "application": application,
            "facility": facility,
            "host": host,
            "check_host": check_host,
            "tls_subject": tls_subject,
        },
    )
    return source


def list_hl7_sources(session: Session) -> list[Hl7Source]:
    """Every registered HL7 source, by name."""
    return list(session.scalars(select(Hl7Source).order_by(Hl7Source.name)))


def remove_hl7_source(session: Session, name: str, *, principal: Principal) -> None:
    """Forget an HL7 source: its messages are refused from now on (unless the lab setting
    ``allow_unknown_hl7_senders`` is on)."""
    if not may_manage(principal):
        raise AccessDenied(f"{principal.audit_name} may not remove HL7 sources")
    source = session.scalar(select(Hl7Source).where(Hl7Source.name == name))
    if source is None:
        raise PatientError(f"no HL7 source named {name!r}", code="204")
    session.delete(source)
    audit.record(
        session,
        action="hl7-source.delete",
        principal=principal,
        detail={"name": name, "application": source.application, "facility": source.facility},
    )


def find_hl7_source(session: Session, application: str, facility: str) -> Hl7Source | None:
    """The source that sends as ``application``/``facility`` (MSH-3/MSH-4): the one registered with
    both, else one registered with the application alone."""
    candidates = session.scalars(
        select(Hl7Source).where(Hl7Source.application == application).order_by(Hl7Source.id)
    )
    return sender_for_facility(list(candidates), facility)


class _RegisteredSender(Protocol):
    facility: str


SenderT = TypeVar("SenderT", bound=_RegisteredSender)


def sender_for_facility(candidates: Sequence[SenderT], facility: str) -> SenderT | None:
    """Among the registered senders of one MSH-3 application, the one for MSH-4 ``facility``: the
    one registered with it, else one registered without a facility (any facility), else None."""
    exact = next((sender for sender in candidates if sender.facility == facility), None)
    return exact or next((sender for sender in candidates if not sender.facility), None)


def hl7_sender_refusal(
    session: Session,
    *,
    application: str,
    facility: str,
    address: str,
    tls_subject: str | None,
    admit_unregistered: bool,
) -> str:
    """Why an identity message (ADT feed, PDQ query) naming ``application``/``facility``
    (MSH-3/MSH-4) may not be taken from this connection, or "" when it may.

    A registered source bound to its host (``check_host``) or client certificate (``tls_subject``)
    is believed only from there, as a registered RIS is; a sender that is no registered source is
    refused unless ``admit_unregistered`` (the caller's rule: a registered RIS, or the lab setting
    ``allow_unknown_hl7_senders``), as DICOM refuses unknown calling AE titles."""
    source = find_hl7_source(session, application, facility)
    if source is None:
        return "" if admit_unregistered else "not a registered HL7 source (simral hl7-sources add)"
    refused = peer_binding_refusal(
        bound_host=source.host,
        check_host=source.check_host,
        bound_subject=source.tls_subject,
        address=address,
        subject=tls_subject,
    )
    return f"HL7 source {source.name} {refused}" if refused else ""
