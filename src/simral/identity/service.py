"""Organisations, professionals and their credentials: passwords, TOTP, sessions, tokens, break-glass.

- Passwords: argon2id (RFC 9106) with the rules of our reading of the PGSSI-S "Référentiel
  d'authentification des acteurs de santé" (long passwords, several character classes, no login
  inside, lockout with backoff after repeated failures).
- Second factor: TOTP (RFC 6238, 30 s, 6 digits), enrolment mandatory for professionals, a code is
  accepted once (the last accepted time step is kept).
- Bearer tokens: JWT (RFC 7519) signed ES256 with our own keys (JWK, RFC 7517, ``kid`` header);
  keys rotate; each token's ``jti`` is kept so it can be revoked.
- Sessions: server-side rows; the browser holds a random secret whose SHA-256 is the row id.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from simral.access.policy import AccessDenied, Principal, may_break_glass, may_issue_token, may_manage
from simral.audit import service as audit
from simral.db.base import as_utc, utcnow
from simral.identity.models import (
    ACTIVITY_SECTORS,
    DEFAULT_SECTORS,
    ORGANISATION_KINDS,
    PRACTICE_SETTINGS,
    ROLES,
    AdminAlert,
    ApiToken,
    BreakGlass,
    Membership,
    Organisation,
    Professional,
    SigningKey,
    WebSession,
)
from simral.sharing import service as sharing


class IdentityError(ValueError):
    """An identity operation that cannot be done (duplicate, unknown, invalid)."""


class AuthenticationFailed(PermissionError):
    """Credentials were not accepted; ``reason`` goes to the audit trail, never to the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------- organisations

_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


def _check_oid(value: str, what: str) -> str:
    if value and (len(value) > 64 or not _OID.match(value)):
        raise IdentityError(f"{what}: {value!r} is not an OID (PS3.5 §9.1)")
    return value


def create_organisation(
    session: Session,
    *,
    code: str,
    name: str,
    kind: str = "hospital",
    finess: str = "",
    siret: str = "",
    patient_id_oid: str = "",
    accession_oid: str = "",
    activity_sector: str = "",
    practice_setting: str = "",
    principal: Principal,
) -> Organisation:
    """Register an organisation with its national ids, the OIDs of its ID authorities and its
    secteur d'activité / practice setting (regional administrators and the platform operator only)."""
    if not may_manage(principal):
        raise AccessDenied(f"{principal.audit_name} may not create organisations")
    if not _CODE.match(code):
        raise IdentityError(f"invalid organisation code {code!r} (letters, digits, . _ -; up to 32)")
    if kind not in ORGANISATION_KINDS:
        raise IdentityError(f"unknown organisation kind {kind!r} (one of {', '.join(ORGANISATION_KINDS)})")
    _check_national_ids(finess, siret)
    _check_oid(patient_id_oid, "patient ID authority")
    _check_oid(accession_oid, "accession number authority")
    _check_sector(activity_sector, practice_setting)
    if get_organisation(session, code) is not None:
        raise IdentityError(f"an organisation with code {code!r} already exists")
    organisation = Organisation(
        code=code,
        name=name,
        kind=kind,
        finess=finess,
        siret=siret,
        patient_id_oid=patient_id_oid,
        accession_oid=accession_oid,
        activity_sector=activity_sector.upper(),
        practice_setting=practice_setting.upper(),
    )
    session.add(organisation)
    audit.record(
        session,
        action="organisation.create",
        principal=principal,
        detail={"code": code, "name": name, "kind": kind, "finess": finess},
    )
    return organisation


_SECTOR = re.compile(r"^SA[0-9]{2}$")


def _check_sector(activity_sector: str, practice_setting: str) -> None:
    """TRE_R02 secteur d'activité (``SAnn``) and JDV_J04 practice setting codes, when given."""
    if activity_sector and not _SECTOR.match(activity_sector.upper()):
        raise IdentityError(
            f"activity sector {activity_sector!r} is not a TRE_R02 code (SA01, SA08…; "
            f"JDV_J02: {', '.join(ACTIVITY_SECTORS)})"
        )
    if practice_setting and practice_setting.upper() not in PRACTICE_SETTINGS:
        raise IdentityError(
            f"practice setting {practice_setting!r} is not in JDV_J04 ({', '.join(PRACTICE_SETTINGS)})"
        )


def organisation_sector(organisation: Organisation) -> tuple[str, str]:
    """The organisation's secteur d'activité (TRE_R02, JDV_J02) and practice setting (JDV_J04): as
    set, else the default of its kind (:data:`simral.identity.models.DEFAULT_SECTORS`)."""
    sector, setting = DEFAULT_SECTORS.get(organisation.kind, DEFAULT_SECTORS["hospital"])
    return organisation.activity_sector or sector, organisation.practice_setting or setting


def _check_national_ids(finess: str, siret: str) -> None:
    if finess and not re.fullmatch(r"[0-9][0-9AB][0-9]{7}", finess):
        raise IdentityError(f"FINESS {finess!r} is not 9 characters (2A/2B allowed for Corsica)")
    if siret and not re.fullmatch(r"[0-9]{14}", siret):
        raise IdentityError(f"SIRET {siret!r} is not 14 digits")


def update_organisation(
    session: Session,
    code: str,
    *,
    name: str | None = None,
    finess: str | None = None,
    siret: str | None = None,
    activity_sector: str | None = None,
    practice_setting: str | None = None,
    principal: Principal,
) -> Organisation:
    """Change an organisation's name, FINESS, SIRET, secteur d'activité or practice setting
    (``None`` keeps it; ``""`` clears an identifier, returns a code to its kind's default);
    regional administrators and the operator only."""
    if not may_manage(principal):
        raise AccessDenied(f"{principal.audit_name} may not change organisations")
    organisation = get_organisation(session, code)
    if organisation is None:
        raise IdentityError(f"unknown organisation {code!r}")
    _check_sector(activity_sector or "", practice_setting or "")
    _check_national_ids(finess or "", siret or "")
    changed: dict[str, str] = {}
    if name is not None and name.strip():
        organisation.name = changed["name"] = name.strip()[:200]
    if finess is not None:
        organisation.finess = changed["finess"] = finess
    if siret is not None:
        organisation.siret = changed["siret"] = siret
    if activity_sector is not None:
        organisation.activity_sector = changed["activity_sector"] = activity_sector.upper()
    if practice_setting is not None:
        organisation.practice_setting = changed["practice_setting"] = practice_setting.upper()
    audit.record(session, action="organisation.update", principal=principal, detail={"code": code, **changed})
    return organisation


def get_organisation(session: Session, code: str) -> Organisation | None:
    """The organisation with this code."""
    return session.scalar(select(Organisation).where(Organisation.code == code))


def list_organisations(session: Session) -> list[Organisation]:
    """Every organisation, by code."""
    return list(session.scalars(select(Organisation).order_by(Organisation.code)))


# ----------------------------------------------------------------------------- passwords

_HASHER = PasswordHasher()  # argon2id, RFC 9106 "second recommended option" parameters
MIN_PASSWORD_LENGTH = 12
_COMMON = {"password", "motdepasse", "azerty", "qwerty", "123456", "simral", "admin", "bonjour", "soleil"}


def check_password_rules(password: str, *, login: str) -> None:
    """Reject weak passwords: ≥ 12 characters, ≥ 3 of 4 character classes, no login, not common."""
    problems = []
    if len(password) < MIN_PASSWORD_LENGTH:
        problems.append(f"at least {MIN_PASSWORD_LENGTH} characters")
    classes = sum(
        bool(re.search(pattern, password)) for pattern in (r"[a-z]", r"[A-Z]", r"[0-9]", r"[^A-Za-z0-9]")
    )
    if classes < 3:
        problems.append("three of: lower case, upper case, digits, symbols")
    lowered = password.lower()
    if login and login.lower() in lowered:
        problems.append("must not contain the login")
    if any(word in lowered for word in _COMMON):
        problems.append("must not contain a common word")
    if problems:
        raise IdentityError("password rejected: " + "; ".join(problems))


def hash_password(password: str) -> str:
    """argon2id PHC string."""
    return _HASHER.hash(password)


# ----------------------------------------------------------------------------- professionals


def get_professional(session: Session, login: str) -> Professional | None:
    """The professional with this login."""
    return session.scalar(select(Professional).where(Professional.login == login))


def create_professional(
    session: Session,
    *,
    login: str,
    organisation: str,
    role: str,
    password: str = "",
    display_name: str = "",
    national_id: str = "",
    profession: str = "",
    principal: Principal,
) -> Professional:
    """Create an account with its first role; a password is optional (OpenID Connect only)."""
    if not may_manage(principal, organisation):
        raise AccessDenied(f"{principal.audit_name} may not create accounts in {organisation}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", login):
        raise IdentityError(f"invalid login {login!r}")
    if national_id and not re.fullmatch(r"[0-9]{1,2}[0-9A-Za-z]{8,30}", national_id):
        raise IdentityError(
            f"national id {national_id!r} is not an RPPS-based id (8 + RPPS) or an ADELI-based one"
        )
    if get_professional(session, login) is not None:
        raise IdentityError(f"a user with login {login!r} already exists")
    professional = Professional(
        login=login, display_name=display_name or login, national_id=national_id, profession=profession
    )
    if password:
        check_password_rules(password, login=login)
        professional.password_hash = hash_password(password)
        professional.password_changed_at = utcnow()
    session.add(professional)
    session.flush()
    add_role(session, professional=professional, organisation=organisation, role=role, principal=principal)
    audit.record(
        session,
        action="user.create",
        principal=principal,
        detail={"login": login, "national_id": national_id, "organisation": organisation, "role": role},
    )
    return professional


def add_role(
    session: Session, *, professional: Professional, organisation: str, role: str, principal: Principal
) -> Membership:
    """Give ``professional`` ``role`` in ``organisation`` (its site administrators, regional ones)."""
    if not may_manage(principal, organisation) or (role == "regional-admin" and not may_manage(principal)):
        raise AccessDenied(f"{principal.audit_name} may not grant roles in {organisation}")
    if role not in ROLES:
        raise IdentityError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
    org = get_organisation(session, organisation)
    if org is None:
        raise IdentityError(f"no organisation with code {organisation!r}")
    if role == "regional-admin" and org.kind != "regional-operator":
        raise IdentityError("the regional-admin role belongs to the regional operator's organisation")
    membership = Membership(professional_id=professional.id, organisation_id=org.id, role=role)
    session.add(membership)
    session.flush()
    if membership not in professional.memberships:
        professional.memberships.append(membership)
    audit.record(
        session,
        action="user.role-add",
        principal=principal,
        detail={"login": professional.login, "organisation": organisation, "role": role},
    )
    return membership


def set_password(
    session: Session, *, professional: Professional, password: str, principal: Principal
) -> None:
    """Replace a password (rules checked) and clear any lockout."""
    check_password_rules(password, login=professional.login)
    professional.password_hash = hash_password(password)
    professional.password_changed_at = utcnow()
    professional.failed_logins = 0
    professional.locked_until = None
    audit.record(
        session, action="user.password-set", principal=principal, detail={"login": professional.login}
    )


def list_professionals(session: Session, *, organisation: str | None = None) -> list[Professional]:
    """Accounts, by login; only the members of ``organisation`` when given."""
    query = select(Professional).order_by(Professional.login)
    if organisation is not None:
        query = query.where(
            Professional.id.in_(
                select(Membership.professional_id)
                .join(Organisation, Organisation.id == Membership.organisation_id)
                .where(Organisation.code == organisation)
            )
        )
    return list(session.scalars(query))


#: Failures before the account locks; each further failure doubles the lock (1 min … 1 h).
LOCKOUT_THRESHOLD = 5
LOCKOUT_BASE = timedelta(minutes=1)
LOCKOUT_MAX = timedelta(hours=1)


def check_password(session: Session, *, login: str, password: str) -> Professional:
    """First factor: the password, with lockout and backoff. Raises :class:`AuthenticationFailed`."""
    professional = get_professional(session, login)
    if professional is None:
        _HASHER.hash(password)  # same work as for a real account: no user enumeration by timing
        raise AuthenticationFailed("unknown login")
    if is_locked(professional):
        raise AuthenticationFailed("account locked")
    if not professional.active:
        raise AuthenticationFailed("account disabled")
    try:
        if not professional.password_hash:
            raise VerificationError("no password")
        _HASHER.verify(professional.password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        record_failure(professional)
        raise AuthenticationFailed("wrong password") from None
    if _HASHER.check_needs_rehash(professional.password_hash):
        professional.password_hash = hash_password(password)
    # The failure count is cleared only once the second factor passed too (see record_success):
    # otherwise a stolen password would give unlimited TOTP guesses, a few per login.
    return professional


def is_locked(professional: Professional) -> bool:
    """Whether the account is in a lockout period."""
    locked_until = as_utc(professional.locked_until)
    return locked_until is not None and locked_until > utcnow()


def record_failure(professional: Professional) -> None:
    """Count a failed factor (password or TOTP); from the fifth, lock for 1 min, 2, 4 … up to 1 h."""
    professional.failed_logins += 1
    if professional.failed_logins >= LOCKOUT_THRESHOLD:
        extra = professional.failed_logins - LOCKOUT_THRESHOLD
        professional.locked_until = utcnow() + min(LOCKOUT_BASE * (2**extra), LOCKOUT_MAX)


def record_success(professional: Professional) -> None:
    """A complete login (both factors, or an eidas1 OpenID Connect login): clear the failures."""
    professional.failed_logins = 0
    professional.locked_until = None


# ----------------------------------------------------------------------------- TOTP (RFC 6238)

TOTP_ISSUER = "simral"


def start_totp_enrolment(professional: Professional) -> str:
    """Give the account a new secret (not yet active) and return its ``otpauth://`` URI."""
    professional.totp_secret = pyotp.random_base32()
    professional.totp_enrolled_at = None
    return pyotp.TOTP(professional.totp_secret).provisioning_uri(
        name=professional.login, issuer_name=TOTP_ISSUER
    )


def totp_uri(professional: Professional) -> str:
    """The ``otpauth://`` URI of the account's (pending or active) secret, for the enrolment QR code."""
    return pyotp.TOTP(professional.totp_secret).provisioning_uri(
        name=professional.login, issuer_name=TOTP_ISSUER
    )


def check_totp(professional: Professional, code: str) -> bool:
    """Accept a 6-digit code of the current step ±1, once (RFC 6238 §5.2)."""
    code = code.strip().replace(" ", "")
    if not professional.totp_secret or not re.fullmatch(r"[0-9]{6}", code):
        return False
    totp = pyotp.TOTP(professional.totp_secret)
    step_now = int(time.time()) // totp.interval
    for step in (step_now, step_now - 1, step_now + 1):
        if step <= professional.totp_last_step:
            continue
        if secrets.compare_digest(totp.at(step * totp.interval), code):
            professional.totp_last_step = step
            return True
    return False


def confirm_totp_enrolment(professional: Professional, code: str) -> bool:
    """Activate the pending secret once the user proved they hold it."""
    if check_totp(professional, code):
        professional.totp_enrolled_at = utcnow()
        return True
    return False


# ----------------------------------------------------------------------------- principals


def principal_for(
    session: Session,
    professional: Professional,
    *,
    organisation: str = "",
    address: str = "",
    via: str = "",
) -> Principal:
    """The policy's view of a professional acting for ``organisation`` (default: their first one)."""
    memberships = frozenset((m.organisation.code, m.role) for m in professional.memberships)
    codes = sorted({code for code, _ in memberships})
    if organisation and organisation not in codes:
        raise IdentityError(f"{professional.login} is not a member of {organisation!r}")
    regional = any(m.organisation.kind == "regional-operator" for m in professional.memberships)
    now = utcnow()
    grants = session.scalars(
        select(BreakGlass.study_uid).where(
            BreakGlass.professional_id == professional.id, BreakGlass.expires_at > now
        )
    )
    acting = organisation or (codes[0] if codes else "")
    return Principal(
        kind="user",
        name=professional.login,
        organisation=acting,
        national_id=professional.national_id,
        display_name=professional.display_name,
        user_id=professional.id,
        memberships=memberships,
        break_glass=frozenset(grants),
        shared=sharing.shared_study_uids(session, login=professional.login, organisation=acting),
        regional=regional,
        address=address,
        via=via,
    )


# ----------------------------------------------------------------------------- sessions

SESSION_IDLE = timedelta(minutes=30)
SESSION_MAX = timedelta(hours=12)
#: A login between the password and the second factor must finish quickly.
SESSION_PENDING = timedelta(minutes=5)


def _session_id(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def open_session(
    session: Session,
    *,
    professional: Professional | None,
    stage: str,
    address: str,
    pending: dict[str, Any] | None = None,
) -> tuple[str, WebSession]:
    """Create a session row; return the cookie secret (never stored) and the row."""
    secret = secrets.token_urlsafe(32)
    now = utcnow()
    row = WebSession(
        id=_session_id(secret),
        professional_id=professional.id if professional is not None else None,
        csrf_token=secrets.token_urlsafe(32),
        stage=stage,
        pending=pending or {},
        source_address=address[:64],
        created_at=now,
        last_seen_at=now,
        expires_at=now + (SESSION_MAX if stage in ("mfa", "oidc") else SESSION_PENDING),
    )
    session.add(row)
    return secret, row


def find_session(session: Session, secret: str) -> WebSession | None:
    """The live session for a cookie secret (idle and absolute timeouts applied), or None."""
    if not secret or len(secret) > 128:
        return None
    row = session.get(WebSession, _session_id(secret))
    if row is None or row.revoked_at is not None:
        return None
    now = utcnow()
    expires_at = as_utc(row.expires_at)
    last_seen = as_utc(row.last_seen_at)
    assert expires_at is not None and last_seen is not None
    if expires_at <= now or now - last_seen > SESSION_IDLE:
        return None
    return row


def touch_session(session: Session, row: WebSession) -> None:
    """Record activity (at most once a minute, to spare writes)."""
    now = utcnow()
    last_seen = as_utc(row.last_seen_at)
    if last_seen is None or now - last_seen > timedelta(minutes=1):
        session.execute(update(WebSession).where(WebSession.id == row.id).values(last_seen_at=now))


def promote_session(row: WebSession, *, stage: str, organisation: str = "") -> None:
    """After the second factor (or an eidas1 OIDC login): full session lifetime."""
    now = utcnow()
    row.stage = stage
    row.organisation_code = organisation
    row.pending = {}
    row.expires_at = now + SESSION_MAX
    row.last_seen_at = now


def renew_session(
    session: Session, row: WebSession, *, stage: str, organisation: str = ""
) -> tuple[str, WebSession]:
    """Close the pending session ``row`` and open a full one in its place, with a new cookie secret
    and CSRF token (OWASP Session Management: renew the session id when privileges change, so a
    session id planted or seen before the second factor is worth nothing after it)."""
    professional = session.get(Professional, row.professional_id) if row.professional_id else None
    close_session(row)
    secret, fresh = open_session(session, professional=professional, stage=stage, address=row.source_address)
    promote_session(fresh, stage=stage, organisation=organisation)
    return secret, fresh


def switch_session_organisation(
    session: Session, row: WebSession, professional: Professional, *, organisation: str, principal: Principal
) -> Principal:
    """Act for another of the professional's organisations for the rest of the session.

    The access policy then grants what that organisation's roles allow (DESIGN.md §2); the change
    is audited (who, from which organisation to which).
    """
    acting = principal_for(
        session, professional, organisation=organisation, address=principal.address, via=principal.via
    )
    previous = row.organisation_code
    row.organisation_code = organisation
    audit.record(
        session,
        action="session.switch-organisation",
        principal=acting,
        detail={"from": previous, "to": organisation},
    )
    return acting


def close_session(row: WebSession) -> None:
    """Log out."""
    row.revoked_at = utcnow()


# ----------------------------------------------------------------------------- bearer tokens (JWT)

TOKEN_ISSUER = "simral"
MAX_TOKEN_LIFETIME = timedelta(days=90)


def _active_key(session: Session) -> tuple[str, ECKey]:
    row = session.scalar(
        select(SigningKey)
        .where(SigningKey.retired_at.is_(None))
        .order_by(SigningKey.created_at.desc())
        .limit(1)
    )
    if row is None:
        return rotate_signing_key(session)
    return row.kid, cast(ECKey, ECKey.import_key(row.private_jwk))


def rotate_signing_key(session: Session) -> tuple[str, ECKey]:
    """Create a new P-256 signing key and retire the previous ones (they keep verifying)."""
    now = utcnow()
    session.execute(update(SigningKey).where(SigningKey.retired_at.is_(None)).values(retired_at=now))
    key = ECKey.generate_key("P-256", private=True)
    kid = secrets.token_hex(8)
    session.add(SigningKey(kid=kid, private_jwk=key.as_dict(private=True), created_at=now))
    session.flush()
    return kid, key


def issue_token(
    session: Session,
    *,
    professional: Professional,
    organisation: str = "",
    lifetime: timedelta,
    label: str = "",
    principal: Principal,
) -> str:
    """A signed bearer token for the DICOMweb and REST APIs (RFC 6750), recorded for revocation.

    Who may: :func:`simral.access.policy.may_issue_token` (oneself from a portal session; the
    platform operator, CLI, for anyone).
    """
    if not may_issue_token(principal, professional.id):
        hint = ": sign in to the portal to create one" if principal.via == "token" else ""
        raise AccessDenied(f"{principal.audit_name} may not issue tokens for {professional.login}{hint}")
    if lifetime <= timedelta(0) or lifetime > MAX_TOKEN_LIFETIME:
        raise IdentityError(f"token lifetime must be between 1 s and {MAX_TOKEN_LIFETIME.days} days")
    acting = principal_for(session, professional, organisation=organisation)
    kid, key = _active_key(session)
    now = utcnow()
    jti = secrets.token_hex(16)
    claims = {
        "iss": TOKEN_ISSUER,
        "sub": professional.login,
        "org": acting.organisation,
        "jti": jti,
        "iat": int(now.timestamp()),
        "exp": int((now + lifetime).timestamp()),
    }
    token = jwt.encode({"alg": "ES256", "kid": kid, "typ": "JWT"}, claims, key)
    session.add(
        ApiToken(
            jti=jti,
            professional_id=professional.id,
            organisation_code=acting.organisation,
            label=label,
            created_at=now,
            expires_at=now + lifetime,
        )
    )
    audit.record(
        session,
        action="token.create",
        principal=principal,
        detail={
            "login": professional.login,
            "jti": jti,
            "expires": claims["exp"],
            "organisation": acting.organisation,
        },
    )
    return token


@dataclass
class _KeyCache:
    keys: KeySet | None = None
    loaded_at: float = 0.0


_key_cache = _KeyCache()
_key_lock = threading.Lock()
KEY_CACHE_SECONDS = 60.0


def _verification_keys(session: Session, kid: str) -> KeySet:
    with _key_lock:
        cached = _key_cache.keys
        fresh = time.monotonic() - _key_cache.loaded_at < KEY_CACHE_SECONDS
        if cached is not None and fresh and any(k.kid == kid for k in cached.keys):
            return cached
        keys = [
            ECKey.import_key({**ECKey.import_key(row.private_jwk).as_dict(private=False), "kid": row.kid})
            for row in session.scalars(select(SigningKey))
        ]
        _key_cache.keys = KeySet(keys)  # type: ignore[arg-type]
        _key_cache.loaded_at = time.monotonic()
        return _key_cache.keys


def verify_token(session: Session, token: str) -> tuple[Professional, str]:
    """Check a bearer token's signature, issuer, expiry and revocation; return its holder and
    organisation. Raises :class:`AuthenticationFailed`."""
    try:
        kid = str(jws.extract_compact(token.encode()).headers().get("kid", ""))
        claims = jwt.decode(token, _verification_keys(session, kid), algorithms=["ES256"]).claims
        jwt.JWTClaimsRegistry(
            iss={"essential": True, "value": TOKEN_ISSUER}, exp={"essential": True}
        ).validate(claims)
    except (JoseError, ValueError) as exc:
        raise AuthenticationFailed(f"invalid token: {type(exc).__name__}") from None
    row = session.get(ApiToken, str(claims.get("jti", "")))
    if row is None or row.revoked_at is not None:
        raise AuthenticationFailed("token revoked or unknown")
    professional = session.get(Professional, row.professional_id)
    if professional is None or not professional.active or professional.login != claims.get("sub"):
        raise AuthenticationFailed("token holder unknown or disabled")
    return professional, row.organisation_code


def revoke_token(session: Session, *, jti: str, principal: Principal) -> None:
    """Revoke a token by its id."""
    row = session.get(ApiToken, jti)
    if row is None:
        raise IdentityError(f"no token {jti!r}")
    row.revoked_at = utcnow()
    audit.record(session, action="token.revoke", principal=principal, detail={"jti": jti})


# ----------------------------------------------------------------------------- break-glass

MAX_BREAK_GLASS = timedelta(hours=4)


def open_break_glass(
    session: Session,
    *,
    principal: Principal,
    study_uid: str,
    reason: str,
    duration: timedelta = timedelta(hours=1),
    holders: list[str],
    patient_id: str = "",
) -> BreakGlass:
    """Grant ``principal`` emergency access to one study: stated reason, time limit, alert, audit.

    ``holders`` are the codes of the organisations holding the study; each gets an alert for its
    administrators.
    """
    if not may_break_glass(principal) or principal.user_id is None:
        raise IdentityError("break-glass is for professionals with a clinical or administrative role")
    reason = reason.strip()
    if len(reason) < 10:
        raise IdentityError("state the reason for the emergency access (at least 10 characters)")
    if duration <= timedelta(0) or duration > MAX_BREAK_GLASS:
        raise IdentityError(f"break-glass lasts at most {int(MAX_BREAK_GLASS.total_seconds() // 3600)} h")
    now = utcnow()
    grant = BreakGlass(
        professional_id=principal.user_id,
        study_uid=study_uid,
        reason=reason[:2000],
        started_at=now,
        expires_at=now + duration,
    )
    session.add(grant)
    for code in holders:
        session.add(
            AdminAlert(
                organisation_code=code,
                kind="break-glass",
                message=f"{principal.display_name or principal.name} "
                f"({principal.national_id or 'no national id'}, "
                f"{principal.organisation}) opened emergency access: {reason[:500]}",
                study_uid=study_uid,
                created_at=now,
            )
        )
    audit.record(
        session,
        action="break-glass.open",
        principal=principal,
        outcome="warning",
        study_uid=study_uid,
        patient_id=patient_id,
        detail={"reason": reason[:2000], "until": grant.expires_at.isoformat(), "alerted": holders},
    )
    return grant


def alerts_for(session: Session, organisations: frozenset[str] | None) -> list[AdminAlert]:
    """Unacknowledged alerts of these organisations (None: all), newest first."""
    query = select(AdminAlert).where(AdminAlert.acknowledged_at.is_(None))
    if organisations is not None:
        query = query.where(AdminAlert.organisation_code.in_(sorted(organisations)))
    return list(session.scalars(query.order_by(AdminAlert.id.desc()).limit(200)))


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``1h``, ``7d`` → timedelta."""
    match = re.fullmatch(r"\s*([0-9]+)\s*([smhd])\s*", text)
    if not match:
        raise IdentityError(f"not a duration: {text!r} (e.g. 30m, 1h, 7d)")
    value, unit = int(match.group(1)), match.group(2)
    return timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[unit]: value})


# ----------------------------------------------------------------------------- OpenID Connect


def professional_for_login(
    session: Session, *, national_id: str, organisation_ids: list[tuple[str, str]]
) -> tuple[Professional, str]:
    """The account behind a verified OpenID Connect login, and the organisation it acts for.

    Accounts are provisioned by administrators (no account is created on the fly): the national id
    (PSC ``SubjectNameID``) must be a known, active professional's. The acting organisation is the
    first of the login's places of practice (``("finess", N)`` or ``("siret", N)``) the professional
    is a member of, else their first membership.
    """
    professional = session.scalar(
        select(Professional).where(Professional.national_id == national_id, Professional.active.is_(True))
    )
    if professional is None:
        raise AuthenticationFailed("no account with this national id")
    members = {m.organisation.code: m.organisation for m in professional.memberships}
    for kind, value in organisation_ids:
        for code, org in members.items():
            if (kind == "finess" and org.finess == value) or (kind == "siret" and org.siret == value):
                return professional, code
    if not members:
        raise AuthenticationFailed("account has no role in any organisation")
    return professional, sorted(members)[0]


# ----------------------------------------------------------------------------- first start

BOOTSTRAP_ORGANISATION = "REGION"
BOOTSTRAP_LOGIN = "admin"


def ensure_first_administrator(session: Session, *, password_file: Path) -> bool:
    """On a platform without any account: create the regional operator and its administrator.

    The one-time password goes to ``password_file`` (mode 0600, never to a log); the administrator
    enrols a TOTP device at first login and should then change it. Returns True if created.
    """
    if session.scalar(select(Professional.id).limit(1)) is not None:
        return False
    system = Principal(kind="system", name="first-start", archive_wide=True, via="serve")
    if get_organisation(session, BOOTSTRAP_ORGANISATION) is None:
        create_organisation(
            session,
            code=BOOTSTRAP_ORGANISATION,
            name="Opérateur régional",
            kind="regional-operator",
            principal=system,
        )
    password = "-".join(secrets.token_urlsafe(6) for _ in range(3)) + "-A1"
    create_professional(
        session,
        login=BOOTSTRAP_LOGIN,
        organisation=BOOTSTRAP_ORGANISATION,
        role="regional-admin",
        password=password,
        display_name="Administrateur régional",
        principal=system,
    )
    password_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    return True
