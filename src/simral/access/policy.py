"""The single access policy: who may do what on which study (DESIGN.md §2, §9).

Every adapter builds a :class:`Principal` (a professional through a session or a bearer token, a
registered DICOM node, the platform itself) and every service asks this module. The rules:

- an organisation's clinical members (technologist, radiologist, referring physician) and its
  nodes see the studies the organisation produced or received (``study_organisation``);
- a professional also sees a study for which they opened a break-glass grant (stated reason,
  time limit, alert to the organisation's administrators, audit record);
- site and regional administrators manage configuration and see no images without break-glass;
- auditors read the audit trail (all of it for the regional operator's auditors, their own
  organisation's otherwise) and see no images;
- archive-wide nodes (registered explicitly) and the platform itself see and feed everything;
- a DRIM-M consumer (a professional of another platform holding a Pro Santé Connect token, DESIGN.md
  §8) reads, for one request, the series of one study that the manifest (KOS) it presented
  references, and nothing else.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from sqlalchemy import ColumnElement, Select, false, or_, select

PrincipalKind = Literal["system", "dicom-node", "user", "share-link", "drimm"]

S = TypeVar("S", bound=Select)  # type: ignore[type-arg]

#: Roles whose holders see and work on their organisation's studies.
CLINICAL_ROLES = frozenset({"technologist", "radiologist", "referring-physician"})
#: Roles that may add images (C-STORE from a workstation, STOW-RS, upload).
STORING_ROLES = frozenset({"technologist", "radiologist"})
ADMIN_ROLES = frozenset({"site-admin", "regional-admin"})


@dataclass(frozen=True)
class Principal:
    """Who is asking, for the policy and the audit trail.

    ``organisation`` is the organisation the principal acts for (a node's organisation, the one a
    professional chose at login or the token was issued for); ``memberships`` lists every
    (organisation code, role) a professional holds; ``break_glass`` the study UIDs of their active
    emergency grants; ``shared`` those shared with them. A ``share-link`` principal is a visitor
    holding a capability link: it reads the link's studies and nothing else.
    """

    kind: PrincipalKind
    name: str
    organisation: str = ""
    national_id: str = ""
    display_name: str = ""
    user_id: int | None = None
    memberships: frozenset[tuple[str, str]] = field(default_factory=frozenset)
    break_glass: frozenset[str] = field(default_factory=frozenset)
    #: Study UIDs shared with the principal (with the professional, their acting organisation, the
    #: node's organisation) or opened by the capability link the principal holds.
    shared: frozenset[str] = field(default_factory=frozenset)
    archive_wide: bool = False
    #: A member of the regional operator (an organisation of kind ``regional-operator``).
    regional: bool = False
    #: Network address the request or association came from (for the audit trail).
    address: str = ""
    #: How the principal was authenticated (session, token, ae-title, tls-certificate, cli).
    via: str = ""
    #: For a ``drimm`` principal: the only series it may read (those its manifest references, in
    #: the study named by ``shared``); see :func:`visible_series`.
    series: frozenset[str] = field(default_factory=frozenset)

    @property
    def audit_name(self) -> str:
        return f"{self.kind}:{self.name}"

    def roles(self, organisation: str | None = None) -> frozenset[str]:
        """The roles held in ``organisation`` (default: the one acted for)."""
        code = self.organisation if organisation is None else organisation
        return frozenset(role for org, role in self.memberships if org == code)

    def has_role(self, role: str) -> bool:
        """Whether any membership carries ``role``."""
        return any(r == role for _, r in self.memberships)


SYSTEM = Principal(kind="system", name="simral", archive_wide=True, via="cli")


class AccessDenied(PermissionError):
    """The principal may not perform this action."""


def _sees_everything(principal: Principal) -> bool:
    return principal.kind == "system" or (principal.kind == "dicom-node" and principal.archive_wide)


def clinical_organisations(principal: Principal) -> frozenset[str]:
    """The organisations whose studies ``principal`` sees through its normal rights.

    A professional acts for one organisation at a time (the one chosen at login, by the portal's
    organisation switch, or the one a token was issued for) and sees that organisation's studies
    if they hold a clinical role there: membership of a second site does not widen every session.
    """
    if principal.kind == "dicom-node":
        return frozenset({principal.organisation}) if principal.organisation else frozenset()
    if principal.kind == "user" and principal.roles() & CLINICAL_ROLES:
        return frozenset({principal.organisation})
    return frozenset()


def may_store(principal: Principal) -> bool:
    """Whether ``principal`` may add instances (C-STORE, STOW-RS, import)."""
    if _sees_everything(principal):
        return True
    if principal.kind == "dicom-node":
        return bool(principal.organisation)
    return principal.kind == "user" and bool(principal.roles() & STORING_ROLES)


def may_query(principal: Principal) -> bool:
    """Whether ``principal`` may run queries (C-FIND, QIDO-RS, the study list).

    Every authenticated principal may ask; :func:`visible_studies` decides what matches, so an
    administrator or an auditor simply finds nothing without break-glass.
    """
    return principal.kind in ("system", "dicom-node", "user", "share-link")


def storing_organisation(principal: Principal) -> str:
    """The organisation a stored study is attached to ("produced" relation); empty for archive-wide
    nodes, or an import the operator did not assign to an organisation."""
    return principal.organisation


@functools.lru_cache(maxsize=256)
def _organisations_studies(organisations: tuple[str, ...]) -> ColumnElement[bool]:
    """``study.id IN (the studies of these organisations)``, built once per set of organisations
    (an immutable expression; the grants of a principal are added per query, never cached)."""
    from simral.archive.models import Study, StudyOrganisation

    return Study.id.in_(
        select(StudyOrganisation.study_pk).where(StudyOrganisation.organisation_code.in_(organisations))
    )


def visible_studies(principal: Principal, query: S) -> S:
    """Restrict ``query`` (which must involve the ``study`` table) to the studies ``principal`` may see."""
    from simral.archive.models import Study

    if _sees_everything(principal):
        return query
    organisations = clinical_organisations(principal)
    conditions = []
    if organisations:
        conditions.append(_organisations_studies(tuple(sorted(organisations))))
    granted = principal.break_glass | principal.shared
    if granted:
        conditions.append(Study.study_uid.in_(sorted(granted)))
    if not conditions:
        return query.where(false())
    return query.where(or_(*conditions))


def visible_series(principal: Principal, query: S) -> S:
    """Restrict ``query`` (which must involve the ``series`` table) to the series ``principal`` may
    see: a DRIM-M consumer sees only the series of its manifest; anyone else every series of the
    studies :func:`visible_studies` lets through (apply both)."""
    from simral.archive.models import Series

    if principal.kind != "drimm":
        return query
    if not principal.series:
        return query.where(false())
    return query.where(Series.series_uid.in_(sorted(principal.series)))


def may_manage(principal: Principal, organisation: str | None = None) -> bool:
    """Whether ``principal`` may change configuration: of ``organisation``, or platform-wide (None)."""
    if principal.kind == "system":
        return True
    if principal.kind != "user":
        return False
    if principal.has_role("regional-admin"):
        return True
    return organisation is not None and "site-admin" in principal.roles(organisation)


def may_issue_token(principal: Principal, user_id: int) -> bool:
    """Whether ``principal`` may issue a bearer token to the professional ``user_id``: the platform
    (CLI) to anyone; a professional to themself, signed in to the portal (second factor or OpenID),
    never with a bearer token, or a stolen token would outlive its own expiry and revocation (OWASP
    ASVS V3.5)."""
    if principal.kind == "system":
        return True
    return principal.user_id == user_id and principal.via != "token"


def may_manage_retention(principal: Principal, organisation: str = "") -> bool:
    """Whether ``principal`` may set retention policies, place or lift legal holds, review and
    approve deletions of ``organisation``'s records (CSP R.1112-7): its site administrators,
    regional administrators and the platform itself; regional records (``""``) only the latter two."""
    return may_manage(principal, organisation or None)


def may_read_metrics(principal: Principal) -> bool:
    """Whether ``principal`` may read the platform's operating figures (``/metrics``, the
    administration's figures page): aggregates without patient data, for the platform itself (the
    monitoring scraper on the host, the CLI) and regional administrators."""
    if principal.kind == "system":
        return True
    return principal.kind == "user" and principal.has_role("regional-admin")


def may_manage_identities(principal: Principal) -> bool:
    """Whether ``principal`` may merge, link, unlink or rename patient identities and resolve
    identity-vigilance cases: the platform itself (CLI, the HL7 identity feed) and administrators."""
    if principal.kind == "system":
        return True
    return principal.kind == "user" and any(role in ADMIN_ROLES for _, role in principal.memberships)


def may_share(principal: Principal) -> bool:
    """Whether ``principal`` may share studies it sees and make viewer-only or patient links."""
    return principal.kind == "user"


def is_patient_visitor(principal: Principal) -> bool:
    """Whether ``principal`` is a patient holding the link to their own studies (the patient page)."""
    return principal.kind == "share-link" and principal.via == "patient-link"


def may_read_audit(principal: Principal) -> bool:
    """Whether ``principal`` may search the audit trail."""
    return principal.kind == "system" or (principal.kind == "user" and principal.has_role("auditor"))


def audit_scope(principal: Principal) -> frozenset[str] | None:
    """Organisations whose audit records ``principal`` sees; None means the whole trail."""
    if principal.kind == "system":
        return None
    if principal.regional:
        return None
    return frozenset(org for org, role in principal.memberships if role == "auditor")


def may_break_glass(principal: Principal) -> bool:
    """Whether ``principal`` may open an emergency access: professionals with a clinical role."""
    return principal.kind == "user" and any(
        role in CLINICAL_ROLES | ADMIN_ROLES for _, role in principal.memberships
    )


def may_review_requests(principal: Principal, group_code: str) -> bool:
    """Whether ``principal`` may read and answer the imaging requests routed to the teleradiology
    group ``group_code`` (ANS Téléradiologie flux 3): the group's radiologists, acting for it."""
    if principal.kind == "system":
        return True
    return (
        principal.kind == "user"
        and bool(group_code)
        and principal.organisation == group_code
        and "radiologist" in principal.roles()
    )


def may_request_exam(principal: Principal, site_code: str) -> bool:
    """Whether ``principal`` may send, follow and cancel imaging requests of the site ``site_code``
    (ANS Téléradiologie flux 1 and 2): the site's clinical members acting for it, the site's RIS."""
    if principal.kind == "system":
        return not principal.organisation or principal.organisation == site_code or principal.archive_wide
    return (
        principal.kind == "user"
        and bool(site_code)
        and principal.organisation == site_code
        and bool(principal.roles() & CLINICAL_ROLES)
    )


def may_search_patients(principal: Principal) -> bool:
    """Whether ``principal`` may search the regional patient index by demographics and identifiers
    (IHE PDQ ITI-21, PDQm ITI-78, PIXm ITI-83): the platform itself and the systems feeding it
    (the HL7 feed, archive-wide nodes and organisations' nodes), and professionals holding a
    clinical or administrative role in the organisation they act for. Not auditors (they read the
    trail, not the index) and not capability-link visitors (they see one link's studies only).

    A search covers the whole index: finding a patient across the region is what PDQ is for; the
    studies of a found patient stay behind :func:`visible_studies`.
    """
    if principal.kind == "system":
        return True
    if principal.kind == "dicom-node":
        return principal.archive_wide or bool(principal.organisation)
    return principal.kind == "user" and bool(principal.roles() & (CLINICAL_ROLES | ADMIN_ROLES))


def may_perform_procedures(principal: Principal, site_code: str) -> bool:
    """Whether ``principal`` may query the Modality Worklist of the site ``site_code`` and report its
    Modality Performed Procedure Steps (PS3.4 K.6, F.7): the site's registered DICOM nodes (a
    modality acts for the organisation it is registered with) and the platform itself."""
    if principal.kind == "system":
        return True
    return principal.kind == "dicom-node" and bool(site_code) and principal.organisation == site_code


def may_assign_reading(principal: Principal, group_code: str) -> bool:
    """Whether ``principal`` may hand the reading tasks of the teleradiology group ``group_code`` to
    one of its radiologists or take them back: the group's administrators, regional
    administrators, the platform."""
    return bool(group_code) and may_manage(principal, group_code)


def may_schedule_on_call(principal: Principal, group_code: str) -> bool:
    """Whether ``principal`` may change the on-call schedule ("tableau de garde") of the
    teleradiology group ``group_code``: whoever may assign its reading tasks (its administrators,
    regional administrators, the platform)."""
    return may_assign_reading(principal, group_code)


def may_read_on_call(principal: Principal, group_code: str) -> bool:
    """Whether ``principal`` may read the on-call schedule of the teleradiology group
    ``group_code``: its radiologists (a membership, whichever organisation they act for) and whoever
    may change it (:func:`may_schedule_on_call`)."""
    if may_schedule_on_call(principal, group_code):
        return True
    return principal.kind == "user" and bool(group_code) and "radiologist" in principal.roles(group_code)


def dashboard_scope(principal: Principal) -> tuple[frozenset[str], frozenset[str]] | None:
    """Whose teleradiology turnaround figures ``principal`` sees: None for everything (the platform,
    regional administrators), else (sites, reading groups) — the organisation acted for, as a site
    and as a group, for its clinical members and site administrators; nothing for anyone else."""
    if principal.kind == "system" or (principal.kind == "user" and principal.has_role("regional-admin")):
        return None
    if principal.kind == "user" and principal.roles() & (CLINICAL_ROLES | {"site-admin"}):
        own = frozenset({principal.organisation})
        return own, own
    return frozenset(), frozenset()


def peer_binding_refusal(
    *, bound_host: str, check_host: bool, bound_subject: str, address: str, subject: str | None
) -> str:
    """Why a registered peer (a DICOM node, a RIS, an HL7 source) is not believed on this
    connection, or "": bound to its host (``check_host``), it must connect from ``bound_host``;
    bound to a client certificate (``bound_subject``), the connection must carry a verified one
    of that subject CN (``subject``, None without TLS client authentication)."""
    if check_host and bound_host != address:
        return "sends from its registered host only"
    if bound_subject and subject != bound_subject:
        if subject is None:
            return "sends over TLS with its client certificate only"
        return "sends with a client certificate of another subject"
    return ""
