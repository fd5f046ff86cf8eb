"""Portal login through a real OpenID provider (npm oidc-provider on loopback) with the PSC preset.

A user agent (an httpx client keeping cookies, following redirects) starts at simral's
``/login/oidc``, goes through the provider (which logs the test account in by itself), comes back to
the callback and ends with a portal session. Negative cases: a tampered ``state``, a provider that
only reaches acr ``low`` while PSC requires ``eidas1``, and a national id without an account.
Each outcome is in the audit trail.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from tests.oidc_peer import ACCOUNT_FINESS, ACCOUNT_NATIONAL_ID, OidcProviderPeer
from tests.simral_proc import SimralProcess


@dataclass
class Setup:
    simral: SimralProcess
    provider: OidcProviderPeer


def _setup(base: Path, *, acr: str) -> tuple[SimralProcess, OidcProviderPeer]:
    simral = SimralProcess(base / "data")
    provider = OidcProviderPeer(redirect_uri=f"{simral.http_url}/login/oidc/callback", acr=acr)
    simral.env.update(
        {
            "SIMRAL_OIDC_ISSUER": provider.issuer,
            "SIMRAL_OIDC_CLIENT_ID": provider.client_id,
            "SIMRAL_OIDC_CLIENT_SECRET": provider.client_secret,
            "SIMRAL_OIDC_PRESET": "psc",
            # The test provider publishes its metadata at the standard path, not PSC's wallet path.
            "SIMRAL_OIDC_DISCOVERY_PATH": "/.well-known/openid-configuration",
        }
    )
    simral.cli("organisations", "add", "CHX", "--name", "CH X", "--finess", ACCOUNT_FINESS)
    simral.cli("organisations", "add", "AAA", "--name", "Autre", "--finess", "990000099")
    rpps = ACCOUNT_NATIONAL_ID[1:]  # national id = 8 + RPPS
    # Member of two organisations: the PSC activity's FINESS picks CHX (not AAA, the first by code).
    simral.cli(
        "users",
        "add",
        "dr_psc",
        "--organisation",
        "AAA",
        "--role",
        "radiologist",
        "--rpps",
        rpps,
        "--no-password",
    )
    simral.cli("users", "grant", "dr_psc", "--organisation", "CHX", "--role", "radiologist")
    return simral, provider


@pytest.fixture(scope="module")
def eidas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    simral, provider = _setup(tmp_path_factory.mktemp("oidc-eidas"), acr="eidas1")
    with provider, simral:
        yield Setup(simral, provider)


def _to_callback(client: httpx.Client, simral: SimralProcess) -> httpx.Response:
    """Follow redirects from /login/oidc through the provider until simral's callback URL."""
    response = client.get(f"{simral.http_url}/login/oidc?next=/", follow_redirects=False)
    for _ in range(20):
        assert response.status_code in (302, 303), (response.status_code, response.text[:500])
        location = urllib.parse.urljoin(str(response.url), response.headers["location"])
        if location.startswith(f"{simral.http_url}/login/oidc/callback"):
            return client.build_request("GET", location)  # type: ignore[return-value]
        response = client.get(location, follow_redirects=False)
    raise AssertionError("the provider never redirected back")


def _audit(simral: SimralProcess) -> str:
    return simral.cli("audit", "search", "--action", "login", "--limit", "50").stdout


def test_psc_login_opens_a_session_for_the_provisioned_account(eidas: Setup) -> None:
    with httpx.Client(timeout=30, trust_env=False) as client:
        callback = _to_callback(client, eidas.simral)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(str(callback.url)).query)
        assert "code" in query and "state" in query
        done = client.send(callback)
        assert done.status_code == 200 and done.headers["refresh"].startswith("0; url=/")
        assert "simral_session" in done.cookies
        home = client.get(f"{eidas.simral.http_url}/")
        assert home.status_code == 200
        # Acting for the organisation of the PSC activity (FINESS), not the account's other one.
        assert "dr_psc — CHX" in home.text
    audit = _audit(eidas.simral)
    assert "user:dr_psc" in audit and "success" in audit


def test_tampered_state_is_refused(eidas: Setup) -> None:
    with httpx.Client(timeout=30, trust_env=False) as client:
        callback = _to_callback(client, eidas.simral)
        url = urllib.parse.urlsplit(str(callback.url))
        params = dict(urllib.parse.parse_qsl(url.query))
        params["state"] = params["state"][:-2] + ("AA" if not params["state"].endswith("AA") else "BB")
        tampered = client.get(urllib.parse.urlunsplit(url._replace(query=urllib.parse.urlencode(params))))
        assert tampered.status_code == 401
        assert "simral_session" not in tampered.cookies
        assert client.get(f"{eidas.simral.http_url}/", follow_redirects=False).status_code == 303
        # The pending login was consumed: replaying the genuine callback does not work either.
        assert client.send(callback).status_code == 401
    assert "state" in _audit(eidas.simral)


def test_login_without_a_pending_session_is_refused(eidas: Setup) -> None:
    with httpx.Client(timeout=30, trust_env=False) as client:
        callback = _to_callback(client, eidas.simral)
    with httpx.Client(timeout=30, trust_env=False) as stranger:  # another browser: no pending cookie
        assert stranger.send(stranger.build_request("GET", str(callback.url))).status_code == 401


def test_acr_below_eidas1_is_refused(tmp_path: Path) -> None:
    simral, provider = _setup(tmp_path, acr="low")
    with provider, simral, httpx.Client(timeout=30, trust_env=False) as client:
        callback = _to_callback(client, simral)
        refused = client.send(callback)
        assert refused.status_code == 401
        assert "simral_session" not in refused.cookies
        audit = _audit(simral)
        assert "acr" in audit and "failure" in audit


def test_login_page_offers_pro_sante_connect(eidas: Setup) -> None:
    page = httpx.get(f"{eidas.simral.http_url}/login?next=/audit", timeout=30)
    assert "Pro Santé Connect" in page.text and "/login/oidc?next=%2Faudit" in page.text
