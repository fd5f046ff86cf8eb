"""OpenID Connect login against a real OpenID provider (npm oidc-provider on loopback, tests/oidc_peer.py).

Covers the relying party of simral.identity.oidc end to end over HTTP: discovery, authorization
code + PKCE (RFC 7636), state (RFC 6749 §10.12), nonce and ID token validation (OpenID Connect Core
1.0 §3.1.3.7), acr enforcement (Pro Santé Connect ``eidas1``), UserInfo as JSON and as a signed JWT,
and the PSC claim mapping (SubjectNameID, SubjectRefPro activities).
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Iterator

import httpx
import pytest
from tests.oidc_peer import ACCOUNT_FINESS, ACCOUNT_NATIONAL_ID, ACCOUNT_SUB, OidcProviderPeer

from simral.identity.oidc import (
    OIDC_ERROR_REASONS,
    STANDARD_DISCOVERY_PATH,
    OidcDiscovery,
    OidcError,
    OidcProvider,
    PendingLogin,
    begin_login,
    complete_login,
    discover,
    fetch_discovery,
    psc_activities,
)

# Nothing listens there: the user agent stops at the redirect and hands its query to complete_login.
REDIRECT_URI = "http://127.0.0.1:9/simral/auth/oidc/callback"


@pytest.fixture(scope="module")
def op() -> Iterator[OidcProviderPeer]:
    """The provider, issuing acr "eidas1", UserInfo as JSON, client_secret_basic."""
    with OidcProviderPeer(redirect_uri=REDIRECT_URI) as peer:
        yield peer


@pytest.fixture(scope="module")
def op_low() -> Iterator[OidcProviderPeer]:
    """A second provider (other signing key) whose logins only reach acr "low"."""
    with OidcProviderPeer(redirect_uri=REDIRECT_URI, acr="low") as peer:
        yield peer


@pytest.fixture()
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0, trust_env=False) as client:
        yield client


def psc(peer: OidcProviderPeer, **overrides: object) -> OidcProvider:
    """The Pro Santé Connect preset pointed at the test provider (standard discovery path)."""
    settings: dict[str, object] = {"discovery_path": STANDARD_DISCOVERY_PATH}
    settings.update(overrides)
    return OidcProvider.pro_sante_connect(
        peer.client_id, peer.client_secret, REDIRECT_URI, issuer=peer.issuer, **settings
    )


def user_agent(authorization_url: str) -> dict[str, str]:
    """Follow the provider's redirects like a browser (login and consent auto-complete) up to redirect_uri."""
    url = authorization_url
    with httpx.Client(timeout=10.0, trust_env=False, follow_redirects=False) as browser:
        for _ in range(20):
            response = browser.get(url)
            assert response.status_code in (302, 303), f"{url}: {response.status_code} {response.text[:500]}"
            url = urllib.parse.urljoin(url, response.headers["location"])
            if url.startswith(REDIRECT_URI):
                return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    raise AssertionError("the provider never redirected to redirect_uri")


def login(provider: OidcProvider, http: httpx.Client) -> tuple[OidcDiscovery, PendingLogin, dict[str, str]]:
    discovery = discover(provider, http)
    url, pending = begin_login(provider, discovery)
    return discovery, pending, user_agent(url)


def reason_of(excinfo: pytest.ExceptionInfo[OidcError]) -> str:
    assert excinfo.value.reason in OIDC_ERROR_REASONS
    return excinfo.value.reason


# --------------------------------------------------------------------------- the nominal flow


def test_psc_login_maps_national_id_and_activities(op: OidcProviderPeer, http: httpx.Client) -> None:
    provider = psc(op)
    discovery = discover(provider, http)
    url, pending = begin_login(provider, discovery)
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert query["scope"] == "openid scope_all"
    assert query["acr_values"] == "eidas1"
    assert query["code_challenge_method"] == "S256"
    assert query["code_challenge"] != pending.code_verifier
    assert query["state"] == pending.state and query["nonce"] == pending.nonce

    callback = user_agent(url)
    assert callback["iss"] == op.issuer and "code" in callback
    identity = complete_login(provider, discovery, pending, callback, http=http)

    assert identity.subject == ACCOUNT_SUB
    assert identity.acr == "eidas1"
    assert identity.national_id == ACCOUNT_NATIONAL_ID
    assert (identity.given_name, identity.family_name) == ("Camille", "TESTRADIO")
    [activity] = identity.activities
    assert activity.organisation_key == ("finess", ACCOUNT_FINESS)
    assert (activity.profession_code, activity.specialty_code, activity.practice_mode) == ("10", "SM44", "S")
    assert activity.finess_legal == "990000000"
    assert activity.organisation_name == "CENTRE HOSPITALIER DE TEST"
    assert identity.raw_claims["SubjectRole"] == ["10^1.2.250.1.213.1.1.5.5"]


def test_signed_userinfo_and_client_secret_post() -> None:
    """UserInfo as an RS256 JWT (Core §5.3.2) and client authentication in the form body."""
    seen: list[tuple[str, str, str]] = []  # (url path, request authorization scheme, response type)

    def record(response: httpx.Response) -> None:
        scheme = response.request.headers.get("authorization", " ").split(" ")[0]
        seen.append((response.request.url.path, scheme, response.headers.get("content-type", "")))

    with (
        OidcProviderPeer(
            redirect_uri=REDIRECT_URI, userinfo_jwt=True, token_auth_method="client_secret_post"
        ) as peer,
        httpx.Client(timeout=10.0, trust_env=False, event_hooks={"response": [record]}) as http,
    ):
        provider = psc(peer, token_auth_method="client_secret_post")
        discovery, pending, callback = login(provider, http)
        identity = complete_login(provider, discovery, pending, callback, http=http)
    assert identity.national_id == ACCOUNT_NATIONAL_ID
    assert identity.activities[0].finess_site == ACCOUNT_FINESS
    by_path = {path: (scheme, ctype) for path, scheme, ctype in seen}
    assert by_path["/token"][0] == ""  # no Authorization header: the secret went in the body
    assert by_path["/me"][1].startswith("application/jwt")


def test_generic_provider_uses_configured_claim(op: OidcProviderPeer, http: httpx.Client) -> None:
    provider = OidcProvider(
        issuer=op.issuer,
        client_id=op.client_id,
        client_secret=op.client_secret,
        redirect_uri=REDIRECT_URI,
        scope="openid scope_all",
    )
    discovery = discover(provider, http)
    url, pending = begin_login(provider, discovery)
    assert "acr_values" not in dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    identity = complete_login(provider, discovery, pending, user_agent(url), http=http)
    assert identity.national_id == ACCOUNT_NATIONAL_ID  # preferred_username
    assert identity.activities == []


# --------------------------------------------------------------------------- rejections


def test_tampered_or_missing_state_is_rejected_before_redeeming(
    op: OidcProviderPeer, http: httpx.Client
) -> None:
    provider = psc(op)
    discovery, pending, callback = login(provider, http)
    for bad in (
        {**callback, "state": callback["state"][:-2] + "xx"},
        {k: v for k, v in callback.items() if k != "state"},
    ):
        with pytest.raises(OidcError) as excinfo:
            complete_login(provider, discovery, pending, bad, http=http)
        assert reason_of(excinfo) == "state"
    # A pending login of another browser does not match either.
    _, other = begin_login(provider, discovery)
    with pytest.raises(OidcError) as excinfo:
        complete_login(provider, discovery, other, callback, http=http)
    assert reason_of(excinfo) == "state"
    # The code was not spent by the rejected attempts.
    assert complete_login(provider, discovery, pending, callback, http=http).subject == ACCOUNT_SUB


def test_acr_below_the_required_one_is_rejected(op_low: OidcProviderPeer, http: httpx.Client) -> None:
    provider = psc(op_low)  # requires eidas1; this provider authenticates at "low" only
    discovery, pending, callback = login(provider, http)
    with pytest.raises(OidcError) as excinfo:
        complete_login(provider, discovery, pending, callback, http=http)
    assert reason_of(excinfo) == "acr"
    # Control: the same provider is accepted by a client that asks for "low".
    lenient = psc(op_low, acr_values="low")
    discovery, pending, callback = login(lenient, http)
    assert complete_login(lenient, discovery, pending, callback, http=http).acr == "low"


def test_replayed_code_is_rejected(op: OidcProviderPeer, http: httpx.Client) -> None:
    provider = psc(op)
    discovery, pending, callback = login(provider, http)
    complete_login(provider, discovery, pending, callback, http=http)
    with pytest.raises(OidcError) as excinfo:
        complete_login(provider, discovery, pending, callback, http=http)
    assert reason_of(excinfo) == "token"
    assert "invalid_grant" in excinfo.value.detail


def test_pkce_verifier_mismatch_is_rejected(op: OidcProviderPeer, http: httpx.Client) -> None:
    provider = psc(op)
    discovery, pending, callback = login(provider, http)
    forged = dataclasses.replace(pending, code_verifier=pending.code_verifier[::-1])
    with pytest.raises(OidcError) as excinfo:
        complete_login(provider, discovery, forged, callback, http=http)
    assert reason_of(excinfo) == "token"
    assert "invalid_grant" in excinfo.value.detail


def test_nonce_mismatch_is_rejected(op: OidcProviderPeer, http: httpx.Client) -> None:
    provider = psc(op)
    discovery, pending, callback = login(provider, http)
    with pytest.raises(OidcError) as excinfo:
        complete_login(
            provider, discovery, dataclasses.replace(pending, nonce="not-the-nonce"), callback, http=http
        )
    assert reason_of(excinfo) == "nonce"


def test_id_token_signed_by_another_key_is_rejected(
    op: OidcProviderPeer, op_low: OidcProviderPeer, http: httpx.Client
) -> None:
    provider = psc(op)
    discovery, pending, callback = login(provider, http)
    foreign_keys = dataclasses.replace(discovery, jwks_uri=f"{op_low.issuer}/jwks")
    with pytest.raises(OidcError) as excinfo:
        complete_login(provider, foreign_keys, pending, callback, http=http)
    assert reason_of(excinfo) == "id-token"


def test_wrong_client_secret_is_rejected(op: OidcProviderPeer, http: httpx.Client) -> None:
    provider = psc(op)
    discovery, pending, callback = login(provider, http)
    with pytest.raises(OidcError) as excinfo:
        complete_login(
            dataclasses.replace(provider, client_secret="wrong"), discovery, pending, callback, http=http
        )
    assert reason_of(excinfo) == "token"


def test_callback_errors_issuer_and_age(op: OidcProviderPeer, http: httpx.Client) -> None:
    provider = psc(op)
    discovery = discover(provider, http)
    _, pending = begin_login(provider, discovery)
    denied = {"state": pending.state, "error": "access_denied", "iss": op.issuer}
    with pytest.raises(OidcError) as excinfo:
        complete_login(provider, discovery, pending, denied, http=http)
    assert reason_of(excinfo) == "provider-error"
    assert "access_denied" in excinfo.value.detail

    mixed_up = {"state": pending.state, "code": "x", "iss": "https://evil.example"}
    with pytest.raises(OidcError) as excinfo:
        complete_login(provider, discovery, pending, mixed_up, http=http)
    assert reason_of(excinfo) == "issuer"

    late = {"state": pending.state, "code": "x", "iss": op.issuer}
    with pytest.raises(OidcError) as excinfo:
        complete_login(provider, discovery, pending, late, http=http, now=pending.created_at + 601)
    assert reason_of(excinfo) == "expired"


def test_discovery_must_name_the_configured_issuer(op: OidcProviderPeer, http: httpx.Client) -> None:
    assert fetch_discovery(op.issuer, http).issuer == op.issuer
    with pytest.raises(OidcError) as excinfo:
        fetch_discovery(op.issuer + "/", http)
    assert reason_of(excinfo) == "discovery"
    with pytest.raises(OidcError) as excinfo:
        fetch_discovery(op.issuer, http, path=".well-known/wallet-openid-configuration")  # 404 here
    assert reason_of(excinfo) == "discovery"
    with pytest.raises(OidcError) as excinfo:
        fetch_discovery("http://auth.example.org", http)  # plain HTTP off loopback
    assert reason_of(excinfo) == "discovery"


# --------------------------------------------------------------------------- pieces


def test_psc_preset_and_pending_round_trip() -> None:
    provider = OidcProvider.pro_sante_connect("cid", "secret", "https://simral.example/cb")
    assert provider.issuer == "https://auth.esw.esante.gouv.fr/auth/realms/esante-wallet"
    assert (provider.scope, provider.acr_values, provider.national_id_claim) == (
        "openid scope_all",
        "eidas1",
        "SubjectNameID",
    )
    assert provider.discovery_path == ".well-known/wallet-openid-configuration"
    assert "secret" not in repr(provider)
    pending = PendingLogin(state="s", nonce="n", code_verifier="v", created_at=1.5)
    assert PendingLogin.from_dict(pending.to_dict()) == pending
    assert "'v'" not in repr(pending)


def test_psc_activities_accepts_a_json_string() -> None:
    ref = '{"exercices":[{"codeProfession":"10","activities":[{"numeroSiretSite":"12345678900011"}]}]}'
    [activity] = psc_activities({"SubjectRefPro": ref})
    assert activity.organisation_key == ("siret", "12345678900011")
    assert psc_activities({}) == []
