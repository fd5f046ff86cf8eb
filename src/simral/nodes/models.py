"""Registry of remote DICOM application entities (PS3.8 §7.1: AE title, host, port)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from simral.db.base import Base, utcnow


class RemoteNode(Base):
    """A peer simral may accept associations from and send to (C-MOVE destination, forwarding)."""

    __tablename__ = "remote_node"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    ae_title: Mapped[str] = mapped_column(String(16), unique=True)
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    #: When set, associations from this AE are accepted only from this host address.
    check_host: Mapped[bool] = mapped_column(Boolean, default=False)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Subject CN of the node's client certificate. When set, associations from this AE title are
    #: accepted only over DICOM TLS with a certificate verified against ``tls_ca_file`` and bearing
    #: this CN (PS3.15 B.1 peer authentication): a copied AE title alone no longer gets in.
    tls_subject: Mapped[str] = mapped_column(String(255), default="")
    #: Code of the organisation the node belongs to; what it stores is that organisation's and it
    #: sees that organisation's studies.
    organisation: Mapped[str] = mapped_column(String(64), default="")
    #: A platform-level node (a regional PACS, a migration source) that sees the whole archive; set
    #: only explicitly (``simral nodes add --archive-wide``).
    archive_wide: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DicomWebPeer(Base):
    """A DICOMweb server simral sends to with STOW-RS (PS3.18 §10.5): a PACS, another platform."""

    __tablename__ = "dicomweb_peer"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    #: The service root, e.g. ``https://pacs.example/dicom-web`` (``/studies`` is appended).
    url: Mapped[str] = mapped_column(String(1024))
    #: Sent as ``Authorization: Bearer …`` when set (a token the peer issued to simral).
    bearer_token: Mapped[str] = mapped_column(String(4096), default="")
    organisation: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
