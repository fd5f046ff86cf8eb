"""Who an HTTP request acts for.

Until organisations and login land (access issue), the HTTP service has no accounts: it listens on
loopback only (see :func:`check_http_exposure`) and every request acts as the
local ``http-client`` principal, which the access policy lets read and store.
"""

from __future__ import annotations

import ipaddress

from fastapi import Request

from simral.access.policy import Principal

LOCAL_HTTP_CLIENT = Principal(kind="http-client", name="local")


def request_principal(request: Request) -> Principal:
    """The principal of ``request`` (the local HTTP client until login exists)."""
    return LOCAL_HTTP_CLIENT


class UnsafeExposure(RuntimeError):
    """The HTTP service would be reachable from other hosts without any login."""


def check_http_exposure(http_host: str) -> None:
    """Refuse to serve HTTP on a non-loopback address while the service has no login."""
    if http_host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(http_host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UnsafeExposure(
            f"http_host {http_host!r} is not a loopback address: the HTTP service has no login yet, "
            "so it only listens on 127.0.0.1 / ::1 (put an authenticating reverse proxy in front)"
        )
