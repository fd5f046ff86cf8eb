"""Patient queries for other systems: demographic search and identifier cross-referencing over the
regional patient index (DESIGN.md §6), shared by the HL7 v2 and FHIR adapters.

- :func:`search_identities` — the Patient Demographics Supplier (IHE ITI TF-2a 3.21 PDQ ITI-21,
  ITI TF-2 3.78 PDQm ITI-78): active identities matching names, birth date, sex, an identifier;
- :func:`cross_reference` — the Patient Identifier Cross-reference Manager (ITI TF-2 3.83 PIXm
  ITI-83): the identifiers the other identities of the same person carry, following merges to
  the surviving identity;
- :func:`read_identity` — one identity by its index id (the FHIR logical id).

The match unit is the identity (a patient as one authority knows them, with that authority's
traits); identities of one person are found together through :func:`identifiers_for`. Names
match the birth name or the used name, first names the birth first names or the used first name,
case- and accent-insensitively (the RNIV comparison form of the vigilance checks), exactly or as
a prefix. Every query is audited (action ``patient.query``, PS3.15 A.5.3 Query) with what was
asked, in the caller's unit of work; a refused one with :func:`audit_refused`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, false, func, or_, select
from sqlalchemy.orm import Session

from simral.access.policy import AccessDenied, Principal, may_search_patients
from simral.audit import service as audit
from simral.patients.models import INS_NIA_OID, AssigningAuthority, PatientIdentity
from simral.patients.service import (
    AuthorityRef,
    Ins,
    PatientError,
    _fold,
    authority_label,
    effective_identity,
    is_ins_oid,
)

#: Most identities one query returns (HL7 QAK-4 and FHIR ``Bundle.total`` still count them all).
MAX_RESULTS = 100
#: Most candidate rows a query reads before comparing names (the SQL filter is coarser).
MAX_CANDIDATES = 5000
#: HD.1 namespaces of the INS in PAM France (PID-3 of type INS).
INS_NIR_NAMESPACE = "ASIP-SANTE-INS-NIR"
INS_NIA_NAMESPACE = "ASIP-SANTE-INS-NIA"
INS_NAMESPACES = frozenset({INS_NIR_NAMESPACE, INS_NIA_NAMESPACE})
#: The audit action of every patient query.
QUERY_ACTION = "patient.query"


class SearchError(PatientError):
    """A query that cannot be answered (``code``: the HL7 table 0357 code the v2 adapter gives)."""


class InvalidCriteria(SearchError):
    """A malformed or missing search parameter."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="102")


class UnknownDomain(SearchError):
    """A patient identity domain (assigning authority) the index does not know."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="204")


class UnknownTargetDomain(UnknownDomain):
    """A requested target domain (PIXm ``targetSystem``) the index does not know."""


class UnknownIdentifier(SearchError):
    """A source identifier no identity carries."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="204")


# ----------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class TextMatch:
    """A name criterion: exact, or a prefix (PDQ trailing ``*``; FHIR string search by default)."""

    text: str
    prefix: bool = False

    def matches(self, value: str) -> bool:
        wanted, known = _fold(self.text), _fold(value)
        if not known:
            return False
        return known.startswith(wanted) if self.prefix else known == wanted


@dataclass(frozen=True)
class IdentifierKey:
    """An identifier criterion: a value in a domain; no value means "known in that domain", no
    domain means "in any domain" (local ids and INS alike)."""

    value: str = ""
    domain: AuthorityRef | None = None


@dataclass(frozen=True)
class Criteria:
    """What a demographic query asks; every given criterion must match (AND)."""

    family: TextMatch | None = None
    given: TextMatch | None = None
    #: YYYY, YYYYMM or YYYYMMDD.
    birth_date: str = ""
    #: M, F, O, or "" for an unknown sex; None for any.
    sex: str | None = None
    identifier: IdentifierKey | None = None
    identity_id: int | None = None

    def is_empty(self) -> bool:
        return (
            self.family is None
            and self.given is None
            and not self.birth_date
            and self.sex is None
            and self.identifier is None
            and self.identity_id is None
        )


@dataclass(frozen=True)
class Domain:
    """A patient identity domain the index knows: an assigning authority, or the INS (of one OID,
    or of any INS OID when only the PAM France namespace names it)."""

    authority: AssigningAuthority | None = None
    ins_oid: str = ""

    @property
    def is_ins(self) -> bool:
        return self.authority is None

    def holds(self, identifier: PatientIdentifier) -> bool:
        if self.authority is None:
            return identifier.is_ins and (not self.ins_oid or identifier.oid == self.ins_oid)
        return not identifier.is_ins and identifier.authority_id == self.authority.id


@dataclass(frozen=True)
class PatientIdentifier:
    """An identifier as a response shows it (HL7 CX, FHIR Identifier): a local id with its
    authority (``identity_id`` the identity it names), or an INS."""

    value: str
    namespace: str
    oid: str
    is_ins: bool = False
    identity_id: int | None = None
    authority_id: int | None = None


@dataclass(frozen=True)
class Found:
    """An identity with its assigning authority."""

    identity: PatientIdentity
    authority: AssigningAuthority

    @property
    def active(self) -> bool:
        return self.identity.merged_into_id is None

    @property
    def ins(self) -> Ins | None:
        identity = self.identity
        return Ins(identity.ins_matricule, identity.ins_oid) if identity.ins_matricule else None

    @property
    def local_identifier(self) -> PatientIdentifier:
        return PatientIdentifier(
            value=self.identity.local_id,
            namespace=self.authority.namespace,
            oid=self.authority.oid or "",
            identity_id=self.identity.id,
            authority_id=self.authority.id,
        )

    @property
    def ins_identifier(self) -> PatientIdentifier | None:
        ins = self.ins
        if ins is None:
            return None
        return PatientIdentifier(
            value=ins.matricule, namespace=ins_namespace(ins.oid), oid=ins.oid, is_ins=True
        )


@dataclass(frozen=True)
class SearchResult:
    """The identities returned (at most the limit) and how many matched in all."""

    found: list[Found]
    total: int


@dataclass(frozen=True)
class CrossReference:
    """The identifiers of the person a source identifier names, in the requested domains."""

    identifiers: list[PatientIdentifier]


def ins_namespace(oid: str) -> str:
    """The PAM France HD.1 of an INS OID (NIA, else NIR: production, test and demonstration)."""
    return INS_NIA_NAMESPACE if oid == INS_NIA_OID else INS_NIR_NAMESPACE


# ----------------------------------------------------------------------------------- lookups


def resolve_domain(session: Session, ref: AuthorityRef) -> Domain:
    """The domain ``ref`` names, read-only (an OID decides; else the namespace or organisation
    code); raises :class:`UnknownDomain`."""
    if ref.oid and is_ins_oid(ref.oid):
        return Domain(ins_oid=ref.oid)
    if not ref.oid and ref.namespace.strip().upper() in INS_NAMESPACES:
        return Domain()
    found: AssigningAuthority | None = None
    if ref.oid:
        found = session.scalar(select(AssigningAuthority).where(AssigningAuthority.oid == ref.oid[:64]))
    elif ref.namespace:
        found = session.scalar(
            select(AssigningAuthority)
            .where(
                (AssigningAuthority.namespace == ref.namespace[:64])
                | (AssigningAuthority.organisation_code == ref.namespace[:32])
            )
            .order_by(AssigningAuthority.id)
            .limit(1)
        )
    if found is None:
        raise UnknownDomain(f"patient identity domain {ref.label or '(empty)'} is not known")
    return Domain(authority=found)


def _with_authorities(session: Session, identities: Iterable[PatientIdentity]) -> list[Found]:
    rows = list(identities)
    ids = {row.authority_id for row in rows}
    authorities = {
        a.id: a for a in session.scalars(select(AssigningAuthority).where(AssigningAuthority.id.in_(ids)))
    }
    return [Found(row, authorities[row.authority_id]) for row in rows]


def same_person(session: Session, found: Sequence[Found]) -> dict[int, list[Found]]:
    """Every identity (merged ones too) of each found identity's person, by person id."""
    persons = {f.identity.person_id for f in found}
    if not persons:
        return {}
    rows = session.scalars(
        select(PatientIdentity).where(PatientIdentity.person_id.in_(persons)).order_by(PatientIdentity.id)
    )
    out: dict[int, list[Found]] = {person: [] for person in persons}
    for item in _with_authorities(session, rows):
        out[item.identity.person_id].append(item)
    return out


def identifiers_for(
    found: Found, person: Sequence[Found], domains: Sequence[Domain] = ()
) -> list[PatientIdentifier]:
    """The identifiers to show for ``found``: without ``domains``, its INS and its local id (PAM
    France PID-3); with ``domains`` (HL7 QPD-8 What Domains Returned, ITI TF-2a 3.21.4.1.2.2.2),
    the identifiers its person has in those domains, in their order (its own first, then the
    person's other active identities), none for a domain where the person has none."""
    own = [i for i in (found.ins_identifier, found.local_identifier) if i is not None]
    if not domains:
        return own
    others: list[PatientIdentifier] = []
    for item in person:
        if item.identity.id == found.identity.id or not item.active:
            continue
        others += [i for i in (item.local_identifier, item.ins_identifier) if i is not None]
    shown: list[PatientIdentifier] = []
    for domain in domains:
        for candidate in own + others:
            if domain.holds(candidate) and candidate not in shown:
                shown.append(candidate)
                if domain.is_ins:
                    break  # one INS per domain
    return shown


def records_for(
    found: Sequence[Found], persons: dict[int, list[Found]], domains: Sequence[Domain] = ()
) -> list[tuple[Found, list[PatientIdentifier]]]:
    """The records a demographics response carries, each with the identifiers to show.

    Without ``domains``, one per matching identity with its own identifiers. With ``domains``
    (ITI TF-2a 3.21.4.1.2.2.2), one per person: the person's identifiers in those domains, with the
    demographics of the first matching identity that belongs to one of them (else of the first
    matching identity); a person with no identifier there is left out.
    """
    if not domains:
        return [(item, identifiers_for(item, persons.get(item.identity.person_id, []))) for item in found]
    records: list[tuple[Found, list[PatientIdentifier]]] = []
    seen: set[int] = set()
    for item in found:
        person_id = item.identity.person_id
        if person_id in seen:
            continue
        seen.add(person_id)
        matched = [f for f in found if f.identity.person_id == person_id]
        in_domain = [f for f in matched if any(d.holds(f.local_identifier) for d in domains)]
        chosen = (in_domain or matched)[0]
        identifiers = identifiers_for(chosen, persons.get(person_id, []), domains)
        if identifiers:
            records.append((chosen, identifiers))
    return records


def _identity_ids_by_local_id(session: Session, value: str, authority_id: int | None) -> set[int]:
    """Ids of the identities carrying ``value`` (in ``authority_id`` if given), merges followed."""
    query = select(PatientIdentity).where(PatientIdentity.local_id == value[:64])
    if authority_id is not None:
        query = query.where(PatientIdentity.authority_id == authority_id)
    return {effective_identity(session, identity).id for identity in session.scalars(query)}


def _identifier_condition(session: Session, key: IdentifierKey) -> ColumnElement[bool]:
    domain = resolve_domain(session, key.domain) if key.domain is not None else None
    value = key.value.strip()
    conditions: list[ColumnElement[bool]] = []
    if domain is None or domain.is_ins:
        ins_oid = domain.ins_oid if domain is not None else ""
        if value:
            condition = PatientIdentity.ins_matricule == value.upper()[:15]
        else:
            condition = PatientIdentity.ins_matricule != ""
        if ins_oid:
            condition = condition & (PatientIdentity.ins_oid == ins_oid)
        conditions.append(condition)
    if domain is None or not domain.is_ins:
        authority_id = domain.authority.id if domain is not None and domain.authority is not None else None
        if value:
            ids = _identity_ids_by_local_id(session, value, authority_id)
            conditions.append(PatientIdentity.id.in_(ids) if ids else false())
        elif authority_id is not None:
            conditions.append(PatientIdentity.authority_id == authority_id)
    return or_(*conditions) if conditions else false()


def _like_pattern(text: str, *, anywhere: bool) -> str:
    escaped = _fold(text).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%" if anywhere else f"{escaped}%"


def _given_names(identity: PatientIdentity) -> list[str]:
    names = [identity.first_birth_given_name, identity.birth_given_names, identity.used_given_name]
    names += identity.birth_given_names.split()
    return [name for name in names if name]


def check_criteria(criteria: Criteria) -> None:
    """Raise :class:`InvalidCriteria` for an empty query or a malformed value."""
    if criteria.is_empty():
        raise InvalidCriteria("at least one search parameter is required")
    if criteria.birth_date and (
        not criteria.birth_date.isdigit() or len(criteria.birth_date) not in (4, 6, 8)
    ):
        raise InvalidCriteria("a birth date is YYYY, YYYYMM or YYYYMMDD")
    if criteria.sex is not None and criteria.sex not in ("M", "F", "O", ""):
        raise InvalidCriteria("sex is M, F, O or unknown")
    for name in (criteria.family, criteria.given):
        if name is not None and not _fold(name.text):
            raise InvalidCriteria("a name criterion is empty")
    if criteria.identifier is not None and not (criteria.identifier.value or criteria.identifier.domain):
        raise InvalidCriteria("an identifier criterion needs a value or a domain")


def _matching(session: Session, criteria: Criteria) -> list[PatientIdentity]:
    query = select(PatientIdentity).where(PatientIdentity.merged_into_id.is_(None))
    if criteria.identity_id is not None:
        identity = session.get(PatientIdentity, criteria.identity_id)
        if identity is None:
            return []
        query = query.where(PatientIdentity.id == effective_identity(session, identity).id)
    if criteria.identifier is not None:
        query = query.where(_identifier_condition(session, criteria.identifier))
    if criteria.birth_date:
        query = query.where(PatientIdentity.birth_date.like(f"{criteria.birth_date}%"))
    if criteria.sex is not None:
        query = query.where(PatientIdentity.sex == criteria.sex)
    if criteria.family is not None:
        pattern = _like_pattern(criteria.family.text, anywhere=False)
        query = query.where(
            or_(
                func.upper(PatientIdentity.birth_name).like(pattern, escape="\\"),
                func.upper(PatientIdentity.used_name).like(pattern, escape="\\"),
            )
        )
    if criteria.given is not None:
        pattern = _like_pattern(criteria.given.text, anywhere=True)
        query = query.where(
            or_(
                func.upper(PatientIdentity.birth_given_names).like(pattern, escape="\\"),
                func.upper(PatientIdentity.first_birth_given_name).like(pattern, escape="\\"),
                func.upper(PatientIdentity.used_given_name).like(pattern, escape="\\"),
            )
        )
    candidates = session.scalars(query.order_by(PatientIdentity.id).limit(MAX_CANDIDATES))
    family, given = criteria.family, criteria.given
    return [
        identity
        for identity in candidates
        if (family is None or any(family.matches(n) for n in (identity.birth_name, identity.used_name)))
        and (given is None or any(given.matches(n) for n in _given_names(identity)))
    ]


# ---------------------------------------------------------------------------------- services


def _may_search(principal: Principal) -> None:
    if not may_search_patients(principal):
        raise AccessDenied(f"{principal.audit_name} may not search patient identities")


def _audit(
    session: Session,
    principal: Principal,
    *,
    transaction: str,
    query: dict[str, Any],
    outcome: str = "success",
    total: int = 0,
    found: Sequence[Found] = (),
    reason: str = "",
) -> None:
    detail: dict[str, Any] = {
        "transaction": transaction,
        "keys": query,
        "matches": total,
        "identities": [f.identity.id for f in found],
    }
    if reason:
        detail["reason"] = reason[:200]
    single = found[0] if len(found) == 1 else None
    audit.record(
        session,
        action=QUERY_ACTION,
        principal=principal,
        outcome=outcome,
        patient_id=single.identity.local_id if single is not None else "",
        patient_issuer=authority_label(single.authority) if single is not None else "",
        detail=detail,
    )


def audit_refused(
    session: Session, *, principal: Principal, transaction: str, query: dict[str, Any], reason: str
) -> None:
    """Audit a query that was refused or could not be answered (its own unit of work: the failed
    one was rolled back)."""
    _audit(session, principal, transaction=transaction, query=query, outcome="failure", reason=reason)


def search_identities(
    session: Session,
    criteria: Criteria,
    *,
    principal: Principal,
    transaction: str,
    query: dict[str, Any],
    limit: int = MAX_RESULTS,
) -> SearchResult:
    """Active identities matching ``criteria`` (ITI TF-2a 3.21.4.1.3, ITI TF-2 3.78.4.1.3), by id;
    an identifier of a merged identity finds the surviving one. ``query`` is what was asked, as the
    protocol carried it, for the audit record. Raises :class:`AccessDenied`, :class:`InvalidCriteria`
    and :class:`UnknownDomain` (an identifier criterion in a domain the index does not know)."""
    _may_search(principal)
    check_criteria(criteria)
    matching = _matching(session, criteria)
    found = _with_authorities(session, matching[: max(0, min(limit, MAX_RESULTS))])
    _audit(session, principal, transaction=transaction, query=query, total=len(matching), found=found)
    return SearchResult(found=found, total=len(matching))


def read_identity(
    session: Session, identity_id: int, *, principal: Principal, transaction: str, query: dict[str, Any]
) -> Found | None:
    """One identity by its index id, merged or not (FHIR read, ITI TF-2 3.78.4.3); audited."""
    _may_search(principal)
    identity = session.get(PatientIdentity, identity_id)
    found = _with_authorities(session, [identity]) if identity is not None else []
    _audit(session, principal, transaction=transaction, query=query, total=len(found), found=found)
    return found[0] if found else None


def cross_reference(
    session: Session,
    *,
    source: IdentifierKey,
    targets: Sequence[AuthorityRef] = (),
    principal: Principal,
    transaction: str,
    query: dict[str, Any],
) -> CrossReference:
    """The identifiers of the person ``source`` names, other than ``source`` itself (ITI TF-2
    3.83.4.1.3): the local ids of the person's active identities (a merged source identifier gives
    its surviving identity) and the person's INS, restricted to ``targets`` when given.

    Raises :class:`UnknownDomain` (source domain), :class:`UnknownTargetDomain`,
    :class:`UnknownIdentifier` (no identity carries the source identifier), :class:`AccessDenied`.
    """
    _may_search(principal)
    if source.domain is None or not source.value.strip():
        raise InvalidCriteria("the source identifier needs a domain and a value")
    source_domain = resolve_domain(session, source.domain)
    target_domains: list[Domain] = []
    for target in targets:
        try:
            target_domains.append(resolve_domain(session, target))
        except UnknownDomain:
            raise UnknownTargetDomain(f"target domain {target.label} is not known") from None
    value = source.value.strip()
    if source_domain.is_ins:
        query_ins = select(PatientIdentity).where(PatientIdentity.ins_matricule == value.upper()[:15])
        if source_domain.ins_oid:
            query_ins = query_ins.where(PatientIdentity.ins_oid == source_domain.ins_oid)
        named = [effective_identity(session, i) for i in session.scalars(query_ins)]
    else:
        assert source_domain.authority is not None
        identity = session.scalar(
            select(PatientIdentity).where(
                PatientIdentity.authority_id == source_domain.authority.id,
                PatientIdentity.local_id == value[:64],
            )
        )
        named = [effective_identity(session, identity)] if identity is not None else []
    if not named:
        raise UnknownIdentifier("no patient carries the source identifier")
    persons = same_person(session, _with_authorities(session, named))
    identifiers: list[PatientIdentifier] = []
    for item in (item for members in persons.values() for item in members):
        if not item.active:
            continue
        for candidate in (item.local_identifier, item.ins_identifier):
            if candidate is None or candidate in identifiers:
                continue
            if _is_source(candidate, source_domain, value):
                continue
            if target_domains and not any(domain.holds(candidate) for domain in target_domains):
                continue
            identifiers.append(candidate)
    found = [item for members in persons.values() for item in members if item.active]
    _audit(session, principal, transaction=transaction, query=query, total=len(identifiers), found=found)
    return CrossReference(identifiers=identifiers)


def _is_source(candidate: PatientIdentifier, domain: Domain, value: str) -> bool:
    if domain.is_ins:
        return candidate.is_ins and candidate.value == value.upper() and domain.holds(candidate)
    return domain.holds(candidate) and candidate.value == value
