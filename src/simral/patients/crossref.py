"""Identity cross-referencing for queries and retrieves (DESIGN.md §6; IHE ITI TF-1 5 PIX, ITI TF-1
Patient Information Reconciliation: identifiers shown to a consumer are those of its own domain).

Two uses, both read-only:

- **Query expansion.** A query naming one patient identifier (DICOM PatientID with its issuer, or
  the asking organisation's authority when the issuer is absent) also finds the studies of every
  identity of the same regional person: the identities a merge (A40) folded into it, the ones a
  link (A24, or a shared INS) joined to it. The access policy still filters what is returned.
- **Coercion.** Each returned study carries the patient identifier the asking side knows: the
  identity the query named (after merges), else the asking organisation's identity of the person.
  Stored bytes are never changed; only responses are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, bindparam, select
from sqlalchemy.orm import Session

from simral.patients.models import AssigningAuthority, PatientIdentity, StudyIdentity
from simral.patients.service import effective_identity, identity_in_authority, organisation_authority_id

_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
# Statements run by every query naming a patient, built once.
_IDENTITY = select(PatientIdentity).where(
    PatientIdentity.authority_id == bindparam("authority_id"),
    PatientIdentity.local_id == bindparam("local_id"),
)
_STORED_IDENTITIES = (
    select(
        StudyIdentity.study_pk,
        PatientIdentity.id,
        PatientIdentity.person_id,
        PatientIdentity.authority_id,
        PatientIdentity.merged_into_id,
    )
    .join(PatientIdentity, PatientIdentity.id == StudyIdentity.identity_id)
    .where(StudyIdentity.study_pk.in_(bindparam("study_pks", expanding=True)))
)


@dataclass(frozen=True)
class ShownIdentity:
    """A patient identifier as a response shows it: PatientID, Issuer of Patient ID and the
    issuer's universal id (PS3.3 Table 10-18 Issuer of Patient ID Macro)."""

    patient_id: str
    issuer: str
    issuer_oid: str

    def as_json(self) -> dict[str, dict[str, Any]]:
        """The three attributes in DICOM JSON (PS3.18 F.2), keyed by tag."""
        out: dict[str, dict[str, Any]] = {
            "00100020": {"vr": "LO", "Value": [self.patient_id]},
            "00100021": {"vr": "LO", "Value": [self.issuer]} if self.issuer else {"vr": "LO"},
        }
        if self.issuer_oid:
            out["00100024"] = {
                "vr": "SQ",
                "Value": [
                    {
                        "00400032": {"vr": "UT", "Value": [self.issuer_oid]},
                        "00400033": {"vr": "CS", "Value": ["ISO"]},
                    }
                ],
            }
        else:
            out["00100024"] = {"vr": "SQ"}
        return out


def _authority_ids(session: Session, *, issuer: str, issuer_oid: str) -> list[int]:
    """Authorities an Issuer of Patient ID (and its universal id) names, without creating any.

    An OID names one authority; a namespace names the authorities of that namespace or of that
    organisation code. An issuer value that is itself an OID is read as one (QIDO-RS has no way to
    send the qualifiers sequence).
    """
    if not issuer_oid and _OID.fullmatch(issuer):
        issuer_oid, issuer = issuer, ""
    if issuer_oid:
        found = session.scalar(select(AssigningAuthority.id).where(AssigningAuthority.oid == issuer_oid))
        return [int(found)] if found is not None else []
    return [
        int(found)
        for found in session.scalars(
            select(AssigningAuthority.id).where(
                (AssigningAuthority.namespace == issuer[:64])
                | (AssigningAuthority.organisation_code == issuer[:32])
            )
        )
    ]


def named_identity(
    session: Session, *, patient_id: str, issuer: str, issuer_oid: str, organisation: str
) -> PatientIdentity | None:
    """The identity a PatientID query key names: in the issuer's authority when the key has one,
    else in the asking organisation's. None when the authority or the identifier is unknown, or
    when nothing says which authority the identifier belongs to (an archive-wide node asking by a
    bare PatientID: the same IPP at two sites is two patients, never expanded)."""
    from simral.patients.service import organisation_authority_id

    if issuer or issuer_oid:
        authorities = _authority_ids(session, issuer=issuer, issuer_oid=issuer_oid)
    elif organisation:
        own = organisation_authority_id(session, organisation)
        authorities = [own] if own is not None else []
    else:
        return None
    if len(authorities) != 1:
        return None
    return session.scalar(_IDENTITY, {"authority_id": authorities[0], "local_id": patient_id})


def person_studies(identity: PatientIdentity) -> Select:  # type: ignore[type-arg]
    """A subquery of the study keys of every identity of ``identity``'s person.

    A merged identity keeps the person it was joined to, so the old identifier of an A40 finds the
    survivor's studies and the survivor finds the old identifier's; an unmerge moves it back.
    """
    return (
        select(StudyIdentity.study_pk)
        .join(PatientIdentity, PatientIdentity.id == StudyIdentity.identity_id)
        .where(PatientIdentity.person_id == identity.person_id)
    )


@dataclass(frozen=True)
class _StoredIdentity:
    """The identity a study was stored under, as much as coercion needs of it."""

    id: int
    person_id: int
    authority_id: int
    active: bool


class Coercion:
    """The patient identifier each returned study is to show one query's asker (cached per person).

    ``named`` is the identity the query named, if any; ``organisation`` the asker's organisation.
    A study stored under an active identity of the target authority is shown as stored. The stored
    identities of a page of studies are read in one query (:meth:`prefetch`), the asker's authority
    once.
    """

    def __init__(self, session: Session, *, named: PatientIdentity | None, organisation: str) -> None:
        self.session = session
        self.named = effective_identity(session, named) if named is not None else None
        self.organisation = organisation
        self._by_person: dict[int, PatientIdentity | None] = {}
        self._authorities: dict[int, AssigningAuthority | None] = {}
        self._stored: dict[int, _StoredIdentity | None] = {}
        self._own_authority: int | None = None
        self._own_resolved = False

    @property
    def useful(self) -> bool:
        """Whether anything can be coerced at all (a named identity or an asking organisation)."""
        return self.named is not None or bool(self.organisation)

    def _own_authority_id(self) -> int | None:
        """The authority of the asking organisation's patient IDs (looked up once)."""
        if not self._own_resolved:
            self._own_authority = (
                organisation_authority_id(self.session, self.organisation) if self.organisation else None
            )
            self._own_resolved = True
        return self._own_authority

    def _target(self, person_id: int) -> PatientIdentity | None:
        if person_id not in self._by_person:
            target = None
            if self.named is not None and self.named.person_id == person_id:
                target = self.named
            elif self.organisation:
                own = self._own_authority_id()
                target = (
                    identity_in_authority(self.session, person_id=person_id, authority_id=own)
                    if own is not None
                    else None
                )
            self._by_person[person_id] = target
        return self._by_person[person_id]

    def _authority(self, authority_id: int) -> AssigningAuthority | None:
        if authority_id not in self._authorities:
            self._authorities[authority_id] = self.session.get(AssigningAuthority, authority_id)
        return self._authorities[authority_id]

    def prefetch(self, study_pks: Iterable[int]) -> None:
        """Read the stored identities of these studies in one query (a page of query results)."""
        missing = [pk for pk in dict.fromkeys(study_pks) if pk not in self._stored]
        if not missing or not self.useful:
            return
        for study_pk, identity_id, person_id, authority_id, merged_into in self.session.execute(
            _STORED_IDENTITIES, {"study_pks": missing}
        ):
            self._stored[study_pk] = _StoredIdentity(
                identity_id, person_id, authority_id, merged_into is None
            )
        for pk in missing:
            self._stored.setdefault(pk, None)

    def for_study(self, study_pk: int) -> ShownIdentity | None:
        """The identifier to show for this study, or None to show the stored one."""
        if not self.useful:
            return None
        if study_pk not in self._stored:
            self.prefetch([study_pk])
        stored = self._stored[study_pk]
        if stored is None:
            return None
        named_person = self.named is not None and self.named.person_id == stored.person_id
        if not named_person and stored.active and stored.authority_id == self._own_authority_id():
            return None  # stored under an active identity of the asker's own authority: shown as stored
        target = self._target(stored.person_id)
        if target is None or target.id == stored.id:
            return None
        if stored.active and stored.authority_id == target.authority_id:
            return None  # two active identities of one authority: each study keeps its own
        authority = self._authority(target.authority_id)
        if authority is None:
            return None
        return ShownIdentity(target.local_id, authority.namespace, authority.oid or "")
