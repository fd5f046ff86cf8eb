"""OpenID Connect relying party: authorization code flow with PKCE, and the Pro Santé Connect preset.

Framework-independent building blocks for professional login (DESIGN.md §9: MFA through Pro Santé
Connect, acr ``eidas1``; national ids of §6):

* :func:`fetch_discovery` reads the provider metadata (OpenID Connect Discovery 1.0 §4) and checks
  that it names the configured issuer (§4.3).
* :func:`begin_login` builds the authentication request (OpenID Connect Core 1.0 §3.1.2.1) with
  ``state`` (RFC 6749 §10.12), ``nonce``, a PKCE S256 challenge (RFC 7636 §4.2) and ``acr_values``,
  and returns the :class:`PendingLogin` that the caller keeps server-side, single use.
* :func:`complete_login` checks the callback (state, provider error, RFC 9207 ``iss``), redeems the
  code with the PKCE verifier (RFC 6749 §4.1.3, RFC 7636 §4.5), validates the ID token (Core
  §3.1.3.7: signature from the provider's JWKS, iss, aud/azp, exp, iat, nonce, acr), reads UserInfo
  (Core §5.3, JSON or signed JWT) and maps the claims to an :class:`OidcIdentity`.

Every failure raises :class:`OidcError` whose ``reason`` (one of :data:`OIDC_ERROR_REASONS`) is fit
for the audit trail; ``detail`` never carries a secret or a token.

Pro Santé Connect (PSC, ANS) specifics, from the PSC documentation and published PSC UserInfo samples:
its discovery document is served at ``.well-known/wallet-openid-configuration`` (the authorization
endpoint lives on ``wallet.esw.esante.gouv.fr``); scope ``openid scope_all``; ``acr_values=eidas1``;
UserInfo (JSON, or a JWT signed with the realm's keys) carries ``SubjectNameID`` (national id:
``8`` + RPPS, or an ADELI-based id), ``SubjectRole``, ``SubjectOrganization(ID)`` and
``SubjectRefPro.exercices[]`` (``codeProfession``, ``codeSavoirFaire``…), each exercice with
``activities[]`` (``numeroFinessSite``, ``numeroFinessetablissementJuridique``, ``numeroSiretSite``,
``numeroSirenSite``, ``identifiantTechniqueDeLaStructure``, ``raisonSocialeSite``, ``codeRole``,
``codeModeExercice``, ``codeSecteurDactivite``…).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import httpx
from authlib.common.urls import add_params_to_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

__all__ = [
    "OIDC_ERROR_REASONS",
    "PSC_ISSUER",
    "PSC_SANDBOX_ISSUER",
    "OidcActivity",
    "OidcDiscovery",
    "OidcError",
    "OidcIdentity",
    "OidcProvider",
    "PendingLogin",
    "begin_login",
    "complete_login",
    "discover",
    "fetch_discovery",
]

#: Pro Santé Connect production issuer (Keycloak realm ``esante-wallet``).
PSC_ISSUER = "https://auth.esw.esante.gouv.fr/auth/realms/esante-wallet"
#: Pro Santé Connect sandbox ("bac à sable") issuer, for integration tests with test CPS / e-CPS.
PSC_SANDBOX_ISSUER = "https://auth.bas.esw.esante.gouv.fr/auth/realms/esante-wallet"
#: PSC serves its discovery document under a non-standard name.
PSC_DISCOVERY_PATH = ".well-known/wallet-openid-configuration"
STANDARD_DISCOVERY_PATH = ".well-known/openid-configuration"

OidcErrorReason = Literal[
    "discovery",  # provider metadata unreachable, malformed, or naming another issuer
    "state",  # callback state missing or not the one we issued (CSRF, RFC 6749 §10.12)
    "expired",  # the pending login is older than OidcProvider.max_login_age
    "provider-error",  # the provider answered with an error (RFC 6749 §4.1.2.1)
    "issuer",  # callback ``iss`` is not our provider (mix-up defence, RFC 9207)
    "code",  # callback carries no authorization code
    "token",  # token endpoint refused the code / verifier / client, or answered nonsense
    "jwks",  # provider keys unreachable or unusable
    "id-token",  # ID token signature or standard claims invalid (Core §3.1.3.7)
    "nonce",  # ID token nonce missing or not ours (replay)
    "acr",  # authentication context class not the required one
    "userinfo",  # UserInfo unreachable, invalid, or for another subject (Core §5.3.2)
    "claims",  # the national id claim is missing
]
OIDC_ERROR_REASONS: tuple[str, ...] = get_args(OidcErrorReason)

#: Asymmetric algorithms accepted on ID tokens and signed UserInfo ("none" and HS* never are).
ALLOWED_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)


class OidcError(Exception):
    """A failed OpenID Connect login; ``reason`` is a short stable code for the audit trail."""

    def __init__(self, reason: OidcErrorReason, detail: str = "") -> None:
        self.reason: OidcErrorReason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class OidcProvider:
    """A configured OpenID provider and this platform's client registration there."""

    issuer: str
    client_id: str
    client_secret: str = field(repr=False)
    redirect_uri: str
    scope: str = "openid"
    #: space-separated acr values to request; the ID token ``acr`` must be one of them. "" = none.
    acr_values: str = ""
    #: claim (ID token or UserInfo) holding the professional's national id.
    national_id_claim: str = "preferred_username"
    #: Pro Santé Connect semantics: SubjectRefPro activities are mapped to OidcIdentity.activities.
    is_pro_sante_connect: bool = False
    discovery_path: str = STANDARD_DISCOVERY_PATH
    #: "client_secret_basic" or "client_secret_post"; "" picks from discovery (basic first).
    token_auth_method: str = ""
    #: seconds a pending login (and an ID token's ``iat``) may age before completion.
    max_login_age: int = 600
    #: clock skew tolerated on exp / iat, in seconds.
    leeway: int = 60

    @classmethod
    def pro_sante_connect(
        cls,
        client_id: str,
        client_secret: str,
        redirect_uri: str,
        issuer: str = PSC_ISSUER,
        **overrides: Any,
    ) -> OidcProvider:
        """Pro Santé Connect: scope ``openid scope_all``, acr ``eidas1``, national id ``SubjectNameID``."""
        settings: dict[str, Any] = {
            "scope": "openid scope_all",
            "acr_values": "eidas1",
            "national_id_claim": "SubjectNameID",
            "is_pro_sante_connect": True,
            "discovery_path": PSC_DISCOVERY_PATH,
        }
        settings.update(overrides)
        return cls(
            issuer=issuer,
            client_id=client_id,
            client_secret=client_secret,
            redirect_uri=redirect_uri,
            **settings,
        )

    @property
    def required_acrs(self) -> tuple[str, ...]:
        return tuple(self.acr_values.split())


@dataclass(frozen=True)
class OidcDiscovery:
    """The provider metadata this client relies on (OpenID Connect Discovery 1.0 §3)."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str = ""
    token_endpoint_auth_methods_supported: tuple[str, ...] = ()
    id_token_signing_alg_values_supported: tuple[str, ...] = ()
    userinfo_signing_alg_values_supported: tuple[str, ...] = ()
    code_challenge_methods_supported: tuple[str, ...] = ()
    acr_values_supported: tuple[str, ...] = ()
    authorization_response_iss_parameter_supported: bool = False
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class PendingLogin:
    """Secrets of one login attempt, kept server-side (never in a client-readable cookie), used once."""

    state: str = field(repr=False)
    nonce: str = field(repr=False)
    code_verifier: str = field(repr=False)
    #: Unix time the login began.
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, for a server-side session store."""
        return {
            "state": self.state,
            "nonce": self.nonce,
            "code_verifier": self.code_verifier,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PendingLogin:
        return cls(
            state=str(data["state"]),
            nonce=str(data["nonce"]),
            code_verifier=str(data["code_verifier"]),
            created_at=float(data["created_at"]),
        )


@dataclass(frozen=True)
class OidcActivity:
    """One place of practice: a PSC ``SubjectRefPro.exercices[].activities[]`` entry with its exercice."""

    profession_code: str = ""  # exercice.codeProfession (e.g. "10" médecin)
    profession_category: str = ""  # exercice.codeCategorieProfessionnelle
    specialty_code: str = ""  # exercice.codeSavoirFaire (e.g. "SM44" radio-diagnostic)
    practice_mode: str = ""  # codeModeExercice (L libéral, S salarié, B bénévole)
    sector_code: str = ""  # codeSecteurDactivite
    role_code: str = ""  # codeRole
    finess_site: str = ""  # numeroFinessSite (geographical entity)
    finess_legal: str = ""  # numeroFinessetablissementJuridique
    siret: str = ""  # numeroSiretSite
    siren: str = ""  # numeroSirenSite
    structure_id: str = ""  # identifiantTechniqueDeLaStructure (Annuaire Santé technical id)
    organisation_name: str = ""  # raisonSocialeSite
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def organisation_key(self) -> tuple[str, str] | None:
        """The most specific national organisation id: ("finess", …), ("siret", …) or ("structure", …)."""
        for kind, value in (
            ("finess", self.finess_site),
            ("finess", self.finess_legal),
            ("siret", self.siret),
            ("structure", self.structure_id),
        ):
            if value:
                return (kind, value)
        return None


@dataclass(frozen=True)
class OidcIdentity:
    """A verified login: ID token ``sub`` and ``acr`` plus the mapped UserInfo claims."""

    subject: str
    acr: str
    national_id: str
    given_name: str
    family_name: str
    activities: list[OidcActivity]
    #: ID-token claims overlaid with UserInfo claims (protocol claims from the ID token win).
    raw_claims: Mapping[str, Any] = field(repr=False, compare=False)


# --------------------------------------------------------------------------- discovery

_PROTOCOL_CLAIMS = ("iss", "sub", "aud", "exp", "iat", "nonce", "acr", "amr", "azp", "auth_time", "at_hash")


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_endpoint(name: str, url: object) -> str:
    """Endpoints must be HTTPS (DESIGN.md §9); plain HTTP only on loopback (tests)."""
    if not isinstance(url, str) or not url:
        raise OidcError("discovery", f"metadata has no {name}")
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme != "https" and not (scheme == "http" and _is_loopback(url)):
        raise OidcError("discovery", f"{name} is not an https URL: {url}")
    return url


def _str_tuple(value: object) -> tuple[str, ...]:
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def fetch_discovery(issuer: str, http: httpx.Client, *, path: str = STANDARD_DISCOVERY_PATH) -> OidcDiscovery:
    """Read ``{issuer}/{path}`` and check it (OpenID Connect Discovery 1.0 §4, §4.3).

    The document's ``issuer`` must be exactly the configured one, PKCE S256 must not be excluded,
    and every endpoint must be HTTPS (loopback excepted).
    """
    _check_endpoint("issuer", issuer)
    url = issuer.rstrip("/") + "/" + path.lstrip("/")
    try:
        response = http.get(url, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        raise OidcError("discovery", f"{url}: {type(exc).__name__}") from exc
    if response.status_code != 200:
        raise OidcError("discovery", f"{url}: HTTP {response.status_code}")
    try:
        meta = response.json()
    except ValueError as exc:
        raise OidcError("discovery", f"{url}: not JSON") from exc
    if not isinstance(meta, dict):
        raise OidcError("discovery", f"{url}: not a JSON object")
    if meta.get("issuer") != issuer:
        raise OidcError("discovery", f"metadata issuer {meta.get('issuer')!r} is not {issuer!r}")
    pkce = _str_tuple(meta.get("code_challenge_methods_supported"))
    if pkce and "S256" not in pkce:
        raise OidcError("discovery", "provider does not support PKCE S256")
    userinfo = meta.get("userinfo_endpoint") or ""
    return OidcDiscovery(
        issuer=issuer,
        authorization_endpoint=_check_endpoint("authorization_endpoint", meta.get("authorization_endpoint")),
        token_endpoint=_check_endpoint("token_endpoint", meta.get("token_endpoint")),
        jwks_uri=_check_endpoint("jwks_uri", meta.get("jwks_uri")),
        userinfo_endpoint=_check_endpoint("userinfo_endpoint", userinfo) if userinfo else "",
        token_endpoint_auth_methods_supported=_str_tuple(meta.get("token_endpoint_auth_methods_supported")),
        id_token_signing_alg_values_supported=_str_tuple(meta.get("id_token_signing_alg_values_supported")),
        userinfo_signing_alg_values_supported=_str_tuple(meta.get("userinfo_signing_alg_values_supported")),
        code_challenge_methods_supported=pkce,
        acr_values_supported=_str_tuple(meta.get("acr_values_supported")),
        authorization_response_iss_parameter_supported=meta.get(
            "authorization_response_iss_parameter_supported"
        )
        is True,
        raw=meta,
    )


def discover(provider: OidcProvider, http: httpx.Client) -> OidcDiscovery:
    """:func:`fetch_discovery` at the provider's configured issuer and discovery path."""
    return fetch_discovery(provider.issuer, http, path=provider.discovery_path)


# --------------------------------------------------------------------------- authentication request


def begin_login(
    provider: OidcProvider, discovery: OidcDiscovery, *, now: float | None = None
) -> tuple[str, PendingLogin]:
    """Authentication request URL (OpenID Connect Core 1.0 §3.1.2.1) and its pending secrets.

    ``state`` and ``nonce`` are 32 random bytes (RFC 6749 §10.12); the PKCE verifier is 64 random
    bytes sent as an S256 challenge (RFC 7636 §4.1-4.3). Store the :class:`PendingLogin` server-side
    and hand it to :func:`complete_login` once.
    """
    pending = PendingLogin(
        state=secrets.token_urlsafe(32),
        nonce=secrets.token_urlsafe(32),
        code_verifier=secrets.token_urlsafe(64),  # 86 unreserved characters (RFC 7636 §4.1: 43-128)
        created_at=time.time() if now is None else now,
    )
    params: list[tuple[str, str]] = [
        ("response_type", "code"),
        ("client_id", provider.client_id),
        ("redirect_uri", provider.redirect_uri),
        ("scope", provider.scope),
        ("state", pending.state),
        ("nonce", pending.nonce),
        ("code_challenge", create_s256_code_challenge(pending.code_verifier)),
        ("code_challenge_method", "S256"),
    ]
    if provider.acr_values:
        params.append(("acr_values", provider.acr_values))
    return add_params_to_uri(discovery.authorization_endpoint, params), pending


# --------------------------------------------------------------------------- callback


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _token_auth_method(provider: OidcProvider, discovery: OidcDiscovery) -> str:
    if provider.token_auth_method:
        return provider.token_auth_method
    supported = discovery.token_endpoint_auth_methods_supported
    if not supported or "client_secret_basic" in supported:  # Discovery §3: basic is the default
        return "client_secret_basic"
    if "client_secret_post" in supported:
        return "client_secret_post"
    raise OidcError("discovery", f"no supported client authentication among {list(supported)}")


def _redeem_code(
    provider: OidcProvider, discovery: OidcDiscovery, code: str, verifier: str, http: httpx.Client
) -> dict[str, Any]:
    """Token request (RFC 6749 §4.1.3) with the PKCE verifier (RFC 7636 §4.5)."""
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": provider.redirect_uri,
        "code_verifier": verifier,
    }
    headers = {"Accept": "application/json"}
    method = _token_auth_method(provider, discovery)
    if method == "client_secret_basic":
        # RFC 6749 §2.3.1: id and secret are form-urlencoded before the Basic encoding.
        pair = (
            f"{urllib.parse.quote_plus(provider.client_id)}:{urllib.parse.quote_plus(provider.client_secret)}"
        )
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    elif method == "client_secret_post":
        form.update(client_id=provider.client_id, client_secret=provider.client_secret)
    else:
        raise OidcError("token", f"unsupported token_auth_method {method!r}")
    try:
        response = http.post(discovery.token_endpoint, data=form, headers=headers)
    except httpx.HTTPError as exc:
        raise OidcError("token", f"token endpoint: {type(exc).__name__}") from exc
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200 or not isinstance(body, dict):
        error = body.get("error", "") if isinstance(body, dict) else ""
        raise OidcError("token", f"token endpoint HTTP {response.status_code} {error}".rstrip())
    if not isinstance(body.get("id_token"), str) or not isinstance(body.get("access_token"), str):
        raise OidcError("token", "token response lacks id_token or access_token")
    if str(body.get("token_type", "")).lower() != "bearer":
        raise OidcError("token", f"unexpected token_type {body.get('token_type')!r}")
    return body


def _fetch_keys(discovery: OidcDiscovery, http: httpx.Client) -> KeySet:
    try:
        response = http.get(discovery.jwks_uri, headers={"Accept": "application/json"})
        if response.status_code != 200:
            raise OidcError("jwks", f"jwks_uri HTTP {response.status_code}")
        return KeySet.import_key_set(response.json())
    except OidcError:
        raise
    except (httpx.HTTPError, ValueError, TypeError, KeyError, JoseError) as exc:
        raise OidcError("jwks", f"jwks_uri: {type(exc).__name__}") from exc


def _algorithms(advertised: tuple[str, ...]) -> list[str]:
    allowed = [alg for alg in advertised if alg in ALLOWED_ALGORITHMS]
    return allowed or ["RS256"]  # Core §3.1.3.7 step 7: RS256 is the default


def _at_hash(access_token: str, alg: str) -> str:
    """Core §3.1.3.8 / §3.2.2.9: left half of the access token hash, base64url."""
    if alg == "EdDSA":
        digest = hashlib.sha512(access_token.encode()).digest()
    else:
        bits = {"256": hashlib.sha256, "384": hashlib.sha384, "512": hashlib.sha512}[alg[-3:]]
        digest = bits(access_token.encode()).digest()
    return base64.urlsafe_b64encode(digest[: len(digest) // 2]).rstrip(b"=").decode("ascii")


def _validate_id_token(
    provider: OidcProvider,
    discovery: OidcDiscovery,
    pending: PendingLogin,
    tokens: Mapping[str, Any],
    keys: KeySet,
    now: float,
) -> dict[str, Any]:
    """ID token validation, OpenID Connect Core 1.0 §3.1.3.7 (steps 1-13) and §3.1.3.8 (at_hash)."""
    algorithms = _algorithms(discovery.id_token_signing_alg_values_supported)
    try:
        token = jwt.decode(tokens["id_token"], keys, algorithms=algorithms)
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise OidcError("id-token", f"signature rejected: {type(exc).__name__}") from exc
    claims = dict(token.claims)
    registry = jwt.JWTClaimsRegistry(
        now=int(now),
        leeway=provider.leeway,
        iss={"essential": True, "value": discovery.issuer},
        aud={"essential": True, "value": provider.client_id},
        sub={"essential": True},
        exp={"essential": True},
        iat={"essential": True},
    )
    try:
        registry.validate(claims)
    except JoseError as exc:
        raise OidcError("id-token", f"claims rejected: {exc}") from exc
    aud = claims["aud"]
    azp = claims.get("azp")
    if isinstance(aud, list) and len(aud) > 1 and azp is None:
        raise OidcError("id-token", "several audiences and no azp")
    if azp is not None and azp != provider.client_id:
        raise OidcError("id-token", "azp is not this client")
    iat = claims["iat"]
    if not isinstance(iat, int | float) or iat > now + provider.leeway:
        raise OidcError("id-token", "iat in the future")
    if iat < now - provider.max_login_age - provider.leeway:
        raise OidcError("id-token", "iat too old")
    nonce = claims.get("nonce")
    if not isinstance(nonce, str) or not _same(nonce, pending.nonce):
        raise OidcError("nonce", "ID token nonce is not the one of this login")
    at_hash = claims.get("at_hash")
    alg = str(token.header.get("alg", ""))
    if at_hash is not None and not _same(str(at_hash), _at_hash(tokens["access_token"], alg)):
        raise OidcError("id-token", "at_hash does not match the access token")
    required = provider.required_acrs
    if required:
        acr = claims.get("acr")
        if not isinstance(acr, str) or acr not in required:
            raise OidcError("acr", f"acr {acr!r} is not one of {list(required)}")
    return claims


def _fetch_userinfo(
    provider: OidcProvider,
    discovery: OidcDiscovery,
    access_token: str,
    subject: str,
    keys: KeySet,
    http: httpx.Client,
) -> dict[str, Any]:
    """UserInfo request (Core §5.3.1); the response may be JSON or a signed JWT (Core §5.3.2)."""
    if not discovery.userinfo_endpoint:
        return {}
    try:
        response = http.get(
            discovery.userinfo_endpoint,
            headers={
                "Authorization": f"Bearer {access_token}",
                "Accept": "application/json, application/jwt",
            },
        )
    except httpx.HTTPError as exc:
        raise OidcError("userinfo", f"userinfo endpoint: {type(exc).__name__}") from exc
    if response.status_code != 200:
        raise OidcError("userinfo", f"userinfo endpoint HTTP {response.status_code}")
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    claims: Any
    if content_type == "application/jwt":
        algorithms = _algorithms(discovery.userinfo_signing_alg_values_supported)
        try:
            claims = dict(jwt.decode(response.text.strip(), keys, algorithms=algorithms).claims)
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise OidcError("userinfo", f"signed UserInfo rejected: {type(exc).__name__}") from exc
        # Core §5.3.2: a signed response carries iss and aud; check them when present.
        if "iss" in claims and claims["iss"] != discovery.issuer:
            raise OidcError("userinfo", "signed UserInfo from another issuer")
        aud = claims.get("aud")
        if aud is not None and provider.client_id not in (aud if isinstance(aud, list) else [aud]):
            raise OidcError("userinfo", "signed UserInfo for another client")
    else:
        try:
            claims = response.json()
        except ValueError as exc:
            raise OidcError("userinfo", f"UserInfo is neither JSON nor a JWT ({content_type})") from exc
    if not isinstance(claims, dict):
        raise OidcError("userinfo", "UserInfo is not a JSON object")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not _same(sub, subject):
        raise OidcError("userinfo", "UserInfo sub differs from the ID token sub")
    return claims


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


def psc_activities(claims: Mapping[str, Any]) -> list[OidcActivity]:
    """Activities from PSC ``SubjectRefPro`` (``exercices[].activities[]``); tolerant of a JSON string."""
    ref = claims.get("SubjectRefPro")
    if isinstance(ref, str):
        try:
            ref = json.loads(ref)
        except ValueError:
            return []
    if not isinstance(ref, Mapping):
        return []
    out: list[OidcActivity] = []
    for exercice in ref.get("exercices") or []:
        if not isinstance(exercice, Mapping):
            continue
        for activity in exercice.get("activities") or []:
            if not isinstance(activity, Mapping):
                continue
            out.append(
                OidcActivity(
                    profession_code=_text(exercice.get("codeProfession")),
                    profession_category=_text(exercice.get("codeCategorieProfessionnelle")),
                    specialty_code=_text(exercice.get("codeSavoirFaire")),
                    practice_mode=_text(activity.get("codeModeExercice")),
                    sector_code=_text(activity.get("codeSecteurDactivite")),
                    role_code=_text(activity.get("codeRole")),
                    finess_site=_text(activity.get("numeroFinessSite")),
                    finess_legal=_text(activity.get("numeroFinessetablissementJuridique")),
                    siret=_text(activity.get("numeroSiretSite")),
                    siren=_text(activity.get("numeroSirenSite")),
                    structure_id=_text(activity.get("identifiantTechniqueDeLaStructure")),
                    organisation_name=_text(activity.get("raisonSocialeSite")),
                    raw=dict(activity),
                )
            )
    return out


def complete_login(
    provider: OidcProvider,
    discovery: OidcDiscovery,
    pending: PendingLogin,
    callback_params: Mapping[str, str],
    *,
    http: httpx.Client | None = None,
    now: float | None = None,
) -> OidcIdentity:
    """Finish the login from the redirect_uri query parameters (OpenID Connect Core 1.0 §3.1.2.5-§3.1.3.7).

    Order: state (RFC 6749 §10.12) → age of the pending login → provider error → ``iss`` (RFC 9207)
    → code redemption with the PKCE verifier (RFC 7636 §4.5) → ID token (§3.1.3.7, acr) → UserInfo.
    The caller must discard ``pending`` whatever the outcome: it is single use.
    """
    now = time.time() if now is None else now
    state = callback_params.get("state")
    if not state or not _same(state, pending.state):
        raise OidcError("state", "missing" if not state else "does not match the pending login")
    if now - pending.created_at > provider.max_login_age:
        raise OidcError("expired", f"login began {int(now - pending.created_at)} s ago")
    if "error" in callback_params:
        description = callback_params.get("error_description", "")
        raise OidcError("provider-error", f"{callback_params['error']} {description}"[:300].rstrip())
    iss = callback_params.get("iss")
    if iss is not None and iss != discovery.issuer:
        raise OidcError("issuer", f"callback iss {iss!r} is not {discovery.issuer!r}")
    if iss is None and discovery.authorization_response_iss_parameter_supported:
        raise OidcError("issuer", "callback lacks the iss parameter the provider announces")
    code = callback_params.get("code")
    if not code:
        raise OidcError("code", "callback carries no code")

    own_client = http is None
    client = http if http is not None else httpx.Client(timeout=10.0)
    try:
        tokens = _redeem_code(provider, discovery, code, pending.code_verifier, client)
        keys = _fetch_keys(discovery, client)
        id_claims = _validate_id_token(provider, discovery, pending, tokens, keys, now)
        userinfo = _fetch_userinfo(
            provider, discovery, tokens["access_token"], id_claims["sub"], keys, client
        )
    finally:
        if own_client:
            client.close()

    claims: dict[str, Any] = {**id_claims, **userinfo}
    claims.update({k: id_claims[k] for k in _PROTOCOL_CLAIMS if k in id_claims})
    national_id = _text(claims.get(provider.national_id_claim))
    if not national_id:
        raise OidcError("claims", f"no {provider.national_id_claim} claim")
    return OidcIdentity(
        subject=id_claims["sub"],
        acr=_text(id_claims.get("acr")),
        national_id=national_id,
        given_name=_text(claims.get("given_name")),
        family_name=_text(claims.get("family_name")),
        activities=psc_activities(claims) if provider.is_pro_sante_connect else [],
        raw_claims=claims,
    )
