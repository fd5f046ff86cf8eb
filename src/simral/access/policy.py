"""The single access policy: who may do what on which study (DESIGN.md §2).

Every adapter builds a :class:`Principal` and every service query goes through
:func:`visible_studies`. The archive core knows two kinds of principal: the platform itself
(CLI, local administrator) and a registered DICOM node. Organisation-scoped rules for
professionals come with the organisations and roles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeVar

from sqlalchemy import Select

PrincipalKind = Literal["system", "dicom-node", "http-client", "user", "token"]

S = TypeVar("S", bound=Select)  # type: ignore[type-arg]


@dataclass(frozen=True)
class Principal:
    """Who is asking: kind, a display name for the audit trail, and an organisation."""

    kind: PrincipalKind
    name: str
    organisation: str = ""

    @property
    def audit_name(self) -> str:
        return f"{self.kind}:{self.name}"


SYSTEM = Principal(kind="system", name="simral")


class AccessDenied(PermissionError):
    """The principal may not perform this action."""


#: Principals that see and feed the whole archive: the platform itself, registered DICOM nodes and,
#: until login exists, the loopback-only HTTP client (see :mod:`simral.web.auth`).
ARCHIVE_WIDE = frozenset({"system", "dicom-node", "http-client"})


def may_store(principal: Principal) -> bool:
    """Whether ``principal`` may add instances to the archive."""
    return principal.kind in ARCHIVE_WIDE


def may_query(principal: Principal) -> bool:
    """Whether ``principal`` may run queries (C-FIND, QIDO-RS)."""
    return principal.kind in ARCHIVE_WIDE


def visible_studies(principal: Principal, query: S) -> S:
    """Restrict ``query`` (which must involve the ``study`` table) to the studies ``principal`` may see.

    Registered nodes, the platform and the local HTTP client see the whole archive; any other
    principal sees nothing until the organisation rules apply to it.
    """
    from simral.archive.models import Study

    if principal.kind in ARCHIVE_WIDE:
        return query
    return query.where(Study.id.is_(None))
