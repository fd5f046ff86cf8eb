"""Operations on the remote node registry."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from simral.access.policy import AccessDenied, Principal, may_manage
from simral.audit import service as audit
from simral.nodes.models import DicomWebPeer, RemoteNode


class NodeError(ValueError):
    """A registry operation that cannot be done (duplicate, unknown, invalid)."""


def _check_ae_title(ae_title: str) -> str:
    # PS3.5 §6.2 AE VR: up to 16 characters, no backslash or control characters, not all spaces.
    value = ae_title.strip()
    if not value or len(value) > 16 or "\\" in value or any(ord(c) < 32 for c in value):
        raise NodeError(f"invalid AE title {ae_title!r} (1-16 characters, no backslash)")
    return value


def create(
    session: Session,
    *,
    name: str,
    ae_title: str,
    host: str,
    port: int,
    check_host: bool = False,
    organisation: str = "",
    archive_wide: bool = False,
    tls: bool = False,
    tls_subject: str = "",
    principal: Principal,
) -> RemoteNode:
    """Register a node; names and AE titles are unique.

    A node belongs to exactly one organisation (it stores that organisation's studies and sees
    them), or is explicitly archive-wide (a regional PACS, a migration source).
    """
    from simral.identity.service import get_organisation

    if not may_manage(principal, organisation or None):
        raise AccessDenied(
            f"{principal.audit_name} may not register nodes for {organisation or 'the platform'}"
        )
    ae_title = _check_ae_title(ae_title)
    if bool(organisation) == archive_wide:
        raise NodeError("a node belongs to one organisation (--organisation CODE) or is --archive-wide")
    if organisation and get_organisation(session, organisation) is None:
        raise NodeError(f"no organisation with code {organisation!r}")
    if not 0 < port < 65536:
        raise NodeError(f"invalid port {port}")
    if session.scalar(select(RemoteNode).where(RemoteNode.name == name)) is not None:
        raise NodeError(f"a node named {name!r} already exists")
    if get_by_ae(session, ae_title=ae_title) is not None:
        raise NodeError(f"AE title {ae_title!r} is already registered")
    node = RemoteNode(
        name=name,
        ae_title=ae_title,
        host=host,
        port=port,
        check_host=check_host,
        organisation=organisation,
        archive_wide=archive_wide,
        tls=tls,
        tls_subject=tls_subject.strip(),
    )
    session.add(node)
    audit.record(
        session,
        action="node.create",
        principal=principal,
        detail={
            "name": name,
            "ae_title": ae_title,
            "host": host,
            "port": port,
            "organisation": organisation,
            "archive_wide": archive_wide,
            "tls": tls,
            "tls_subject": tls_subject.strip(),
        },
    )
    return node


def list_all(session: Session) -> list[RemoteNode]:
    """Every registered node, by name."""
    return list(session.scalars(select(RemoteNode).order_by(RemoteNode.name)))


def get_by_ae(session: Session, *, ae_title: str) -> RemoteNode | None:
    """The node registered with this AE title (trailing spaces ignored)."""
    return session.scalar(select(RemoteNode).where(RemoteNode.ae_title == ae_title.strip()))


def delete(session: Session, *, name: str, principal: Principal) -> None:
    """Remove a node from the registry."""
    node = session.scalar(select(RemoteNode).where(RemoteNode.name == name))
    if node is None:
        raise NodeError(f"no node named {name!r}")
    if not may_manage(principal, node.organisation or None):
        raise AccessDenied(f"{principal.audit_name} may not remove node {name}")
    session.delete(node)
    audit.record(session, action="node.delete", principal=principal, detail={"name": name})


def create_dicomweb_peer(
    session: Session,
    *,
    name: str,
    url: str,
    bearer_token: str = "",
    organisation: str = "",
    principal: Principal,
) -> DicomWebPeer:
    """Register a DICOMweb server to send to with STOW-RS (PS3.18 §10.5); audited without the token."""
    if not may_manage(principal, organisation or None):
        raise AccessDenied(f"{principal.audit_name} may not register DICOMweb peers")
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise NodeError(f"invalid DICOMweb URL {url!r} (http:// or https://)")
    if session.scalar(select(DicomWebPeer).where(DicomWebPeer.name == name)) is not None:
        raise NodeError(f"a DICOMweb peer named {name!r} already exists")
    peer = DicomWebPeer(name=name, url=url, bearer_token=bearer_token, organisation=organisation)
    session.add(peer)
    audit.record(
        session,
        action="dicomweb-peer.create",
        principal=principal,
        detail={"name": name, "url": url, "organisation": organisation, "authenticated": bool(bearer_token)},
    )
    return peer


def list_dicomweb_peers(session: Session) -> list[DicomWebPeer]:
    """Every registered DICOMweb peer, by name."""
    return list(session.scalars(select(DicomWebPeer).order_by(DicomWebPeer.name)))


def get_dicomweb_peer(session: Session, name: str) -> DicomWebPeer | None:
    """The DICOMweb peer registered under ``name``."""
    return session.scalar(select(DicomWebPeer).where(DicomWebPeer.name == name))


def get_by_name(session: Session, name: str) -> RemoteNode | None:
    """The DICOM node registered under ``name``."""
    return session.scalar(select(RemoteNode).where(RemoteNode.name == name))
