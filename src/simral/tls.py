"""TLS contexts for every flow: DICOM TLS (PS3.15 B.1 Basic TLS Secure Transport Connection
Profile), HTTPS, MLLP over TLS and the audit export to the syslog collector (RFC 5425).

PS3.15 B.1 asks for TLS 1.2 or later with the BCP 195 (RFC 9325) recommendations: simral offers
TLS 1.2 with forward-secret AEAD cipher suites only (RFC 9325 §4.2) and TLS 1.3 (RFC 8446). The
same certificate and key identify simral as association acceptor, as HTTPS server, and as client
(its certificate is presented on associations it opens to TLS nodes).
"""

from __future__ import annotations

import functools
import os
import ssl
from typing import Any

from simral.config import Settings

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
#: TLS 1.2 suites kept: ECDHE/DHE key exchange with AES-GCM or ChaCha20-Poly1305 (RFC 9325 §4.2).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"
#: The IANA port for DICOM over TLS (PS3.15 B.1, "dicom-tls").
IANA_DICOM_TLS_PORT = 2762


class TlsConfigError(RuntimeError):
    """The TLS settings cannot produce a usable context (missing or unreadable file, bad key)."""


def _file(setting: str, value: str, *, purpose: str) -> str:
    """The path in ``value`` after checking it names a readable file."""
    if not value:
        raise TlsConfigError(f"{setting} is not set: it is needed for {purpose}")
    path = os.path.expanduser(value)
    if not os.path.isfile(path):
        raise TlsConfigError(f"{setting}: no such file: {path}")
    if not os.access(path, os.R_OK):
        raise TlsConfigError(f"{setting}: file not readable: {path}")
    return path


def _new_context(protocol: int) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def _load_identity(context: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"tls_cert_file / tls_key_file: cannot load {cert} with {key}: {exc}") from None


def _load_ca(context: ssl.SSLContext, ca: str) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"tls_ca_file: cannot load {ca}: {exc}") from None


def server_context(settings: Settings, *, client_certificates: bool = True) -> ssl.SSLContext:
    """The acceptor's context (PS3.15 B.1): our certificate and key, TLS 1.2 or later.

    With ``client_certificates`` (DICOM): when ``dicom_tls_require_client_cert`` is set a client
    certificate signed by ``tls_ca_file`` is required; otherwise, when ``tls_ca_file`` is set, one
    is asked for and verified if presented. Without (HTTPS) none is asked for.
    """
    purpose = "the DICOM TLS listener and HTTPS"
    cert = _file("tls_cert_file", settings.tls_cert_file, purpose=purpose)
    key = _file("tls_key_file", settings.tls_key_file, purpose=purpose)
    context = _new_context(ssl.PROTOCOL_TLS_SERVER)
    _load_identity(context, cert, key)
    if client_certificates and (settings.dicom_tls_require_client_cert or settings.tls_ca_file):
        ca = _file("tls_ca_file", settings.tls_ca_file, purpose="verifying DICOM TLS client certificates")
        _load_ca(context, ca)
        context.verify_mode = (
            ssl.CERT_REQUIRED if settings.dicom_tls_require_client_cert else ssl.CERT_OPTIONAL
        )
    return context


def https_context(settings: Settings) -> ssl.SSLContext:
    """The HTTPS server context (RFC 9110 §4.2.2 over RFC 8446): no client certificate asked for."""
    context = server_context(settings, client_certificates=False)
    context.set_alpn_protocols(["http/1.1"])
    return context


def client_context(settings: Settings) -> ssl.SSLContext:
    """The requestor's context: verify the peer against ``tls_ca_file`` (else the system CAs) and
    its name, present our certificate when one is configured (PS3.15 B.1 mutual authentication)."""
    return client_context_from(settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file)


@functools.lru_cache(maxsize=8)
def client_context_from(cert_file: str, key_file: str, ca_file: str) -> ssl.SSLContext:
    """A requestor's context verifying the peer against ``ca_file`` (else the system CAs) and its
    name, presenting ``cert_file``/``key_file`` when given; built once per process."""
    context = _new_context(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    if ca_file:
        _load_ca(context, _file("tls_ca_file", ca_file, purpose="verifying the remote peer"))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file or key_file:
        purpose = "presenting a client certificate"
        cert = _file("tls_cert_file", cert_file, purpose=purpose)
        key = _file("tls_key_file", key_file, purpose=purpose)
        _load_identity(context, cert, key)
    return context


def tls_args(settings: Settings, *, tls: bool, host: str) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for an association to a node (``None``: plain TCP)."""
    if not tls:
        return None
    return client_context(settings), host


def check(settings: Settings) -> None:
    """Build every context the settings call for, so that a mistake stops start-up, not a request."""
    if settings.dicom_tls_port:
        server_context(settings)
    if settings.https:
        https_context(settings)
    if settings.audit_syslog_host:
        client_context_from(
            settings.audit_syslog_cert_file, settings.audit_syslog_key_file, settings.audit_syslog_ca_file
        )


def peer_common_name(sock: Any) -> str | None:
    """The subject CN of the verified certificate the peer presented on ``sock``, if any."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        certificate: dict[str, Any] = dict(sock.getpeercert() or {})
    except (ValueError, OSError):
        return None
    for rdn in certificate.get("subject", ()):
        for attribute in rdn:
            if attribute[0] == "commonName":
                return str(attribute[1])
    return None
