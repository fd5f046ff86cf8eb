"""Identity services in-process: password rules, lockout, TOTP, bearer tokens, break-glass, policy.

RFC 9106 (argon2id), RFC 6238 (TOTP), RFC 7519/7515 (JWT, JWS ES256), DESIGN.md §2 and §9.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pyotp
import pytest

from simral.access.policy import AccessDenied, Principal, may_manage, may_store
from simral.app import open_app
from simral.config import load_settings
from simral.context import AppContext
from simral.db.base import utcnow
from simral.identity import service as identity
from simral.identity.models import AdminAlert, Professional

OPERATOR = Principal(kind="system", name="test", archive_wide=True)
PASSWORD = "Correct-Cheval-2026"


@pytest.fixture()
def ctx(tmp_path: Path) -> Iterator[AppContext]:
    context = open_app(load_settings(environ={"SIMRAL_DATA_DIR": str(tmp_path / "data")}))
    with context.db.unit_of_work() as session:
        identity.create_organisation(session, code="CHA", name="CH A", finess="990000011", principal=OPERATOR)
        identity.create_organisation(
            session, code="CLINB", name="Cabinet B", kind="practice", principal=OPERATOR
        )
        identity.create_organisation(
            session, code="REGION", name="R", kind="regional-operator", principal=OPERATOR
        )
        identity.create_professional(
            session,
            login="alice",
            organisation="CHA",
            role="technologist",
            password=PASSWORD,
            national_id="810001234567",
            principal=OPERATOR,
        )
        identity.create_professional(
            session, login="bob", organisation="CHA", role="site-admin", password=PASSWORD, principal=OPERATOR
        )
    yield context
    context.db.dispose()


def _alice(ctx: AppContext) -> Principal:
    with ctx.db.reading() as session:
        professional = identity.get_professional(session, "alice")
        assert professional is not None
        return identity.principal_for(session, professional)


@pytest.mark.parametrize(
    "password",
    ["short-1A", "alllowercaseletters", "alice-Password-2026", "Azerty-Azerty-2026", "Motdepasse-2026-x"],
)
def test_weak_passwords_are_refused(password: str) -> None:
    with pytest.raises(identity.IdentityError):
        identity.check_password_rules(password, login="alice")


def test_long_passwords_of_three_classes_are_accepted() -> None:
    identity.check_password_rules("UPPER-lower-word", login="alice")
    identity.check_password_rules("TROIS-CLASSES-987", login="alice")


def test_lockout_with_backoff_and_no_reset_before_the_second_factor(ctx: AppContext) -> None:
    for attempt in range(identity.LOCKOUT_THRESHOLD):
        with ctx.db.unit_of_work() as session, pytest.raises(identity.AuthenticationFailed):
            identity.check_password(session, login="alice", password=f"wrong-{attempt}")
    with ctx.db.unit_of_work() as session, pytest.raises(identity.AuthenticationFailed, match="locked"):
        identity.check_password(session, login="alice", password=PASSWORD)
    with ctx.db.unit_of_work() as session:
        alice = identity.get_professional(session, "alice")
        assert alice is not None and alice.locked_until is not None
        first_lock = alice.locked_until
        alice.locked_until = utcnow() - timedelta(seconds=1)  # the lock ran out
    with ctx.db.unit_of_work() as session:
        alice = identity.check_password(session, login="alice", password=PASSWORD)
        # The right password alone does not clear the count: a wrong TOTP code locks again, longer.
        identity.record_failure(alice)
        assert identity.is_locked(alice)
        assert alice.locked_until is not None
        assert alice.locked_until - utcnow() > timedelta(seconds=90)
        identity.record_success(alice)
        assert not identity.is_locked(alice) and alice.failed_logins == 0
    assert first_lock is not None


def test_unknown_login_fails_like_a_wrong_password(ctx: AppContext) -> None:
    with ctx.db.unit_of_work() as session, pytest.raises(identity.AuthenticationFailed, match="unknown"):
        identity.check_password(session, login="nobody", password=PASSWORD)


def test_totp_enrolment_and_replay(ctx: AppContext) -> None:
    with ctx.db.unit_of_work() as session:
        alice = identity.get_professional(session, "alice")
        assert alice is not None
        uri = identity.start_totp_enrolment(alice)
        assert uri.startswith("otpauth://totp/simral:alice?secret=")
        totp = pyotp.TOTP(alice.totp_secret)
        assert not identity.confirm_totp_enrolment(alice, "123456" if totp.now() != "123456" else "654321")
        code = totp.now()
        assert identity.confirm_totp_enrolment(alice, code)
        assert alice.totp_enrolled_at is not None
        assert not identity.check_totp(alice, code)  # the same code twice: refused (RFC 6238 §5.2)
        assert not identity.check_totp(alice, "abcdef")


def test_bearer_tokens_verify_rotate_and_revoke(ctx: AppContext) -> None:
    alice = _alice(ctx)
    with ctx.db.unit_of_work() as session:
        holder = identity.get_professional(session, "alice")
        assert holder is not None
        token = identity.issue_token(
            session, professional=holder, lifetime=timedelta(hours=1), principal=alice
        )
        short = identity.issue_token(
            session, professional=holder, lifetime=timedelta(seconds=1), principal=OPERATOR
        )
        bob = identity.get_professional(session, "bob")
        assert bob is not None
        with pytest.raises(AccessDenied):  # nobody mints tokens for someone else, but the operator
            identity.issue_token(session, professional=bob, lifetime=timedelta(hours=1), principal=alice)
    with ctx.db.reading() as session:
        professional, organisation = identity.verify_token(session, token)
        assert professional.login == "alice" and organisation == "CHA"
        header, payload, signature = token.split(".")
        flipped = signature[:-2] + ("AA" if not signature.endswith("AA") else "BB")
        with pytest.raises(identity.AuthenticationFailed):
            identity.verify_token(session, f"{header}.{payload}.{flipped}")
    import time

    time.sleep(2.1)
    with ctx.db.reading() as session, pytest.raises(identity.AuthenticationFailed):
        identity.verify_token(session, short)  # expired
    with ctx.db.unit_of_work() as session:
        identity.rotate_signing_key(session)
    with ctx.db.reading() as session:
        assert identity.verify_token(session, token)[0].login == "alice"  # older key still verifies
    import base64
    import json

    jti = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))["jti"]
    with ctx.db.unit_of_work() as session:
        identity.revoke_token(session, jti=jti, principal=OPERATOR)
    with ctx.db.reading() as session, pytest.raises(identity.AuthenticationFailed, match="revoked"):
        identity.verify_token(session, token)


def test_break_glass_needs_a_reason_is_time_boxed_and_alerts(ctx: AppContext) -> None:
    alice = _alice(ctx)
    study = "1.2.826.0.1.3680043.8.498.77"
    with ctx.db.unit_of_work() as session:
        with pytest.raises(identity.IdentityError, match="reason"):
            identity.open_break_glass(
                session, principal=alice, study_uid=study, reason="vite", holders=["CLINB"]
            )
        with pytest.raises(identity.IdentityError, match="at most"):
            identity.open_break_glass(
                session,
                principal=alice,
                study_uid=study,
                reason="Urgence vitale au bloc opératoire",
                duration=timedelta(hours=5),
                holders=["CLINB"],
            )
        identity.open_break_glass(
            session,
            principal=alice,
            study_uid=study,
            reason="Urgence vitale au bloc opératoire",
            holders=["CLINB"],
        )
    with ctx.db.reading() as session:
        alerts = identity.alerts_for(session, frozenset({"CLINB"}))
        assert (
            len(alerts) == 1 and isinstance(alerts[0], AdminAlert) and "Urgence vitale" in alerts[0].message
        )
        assert identity.alerts_for(session, frozenset({"CHA"})) == []
        holder = session.get(Professional, alice.user_id)
        assert holder is not None
        assert study in identity.principal_for(session, holder).break_glass


def test_policy_rules() -> None:
    tech = Principal(
        kind="user", name="t", organisation="CHA", memberships=frozenset({("CHA", "technologist")})
    )
    referrer = Principal(
        kind="user", name="r", organisation="CHA", memberships=frozenset({("CHA", "referring-physician")})
    )
    site_admin = Principal(
        kind="user", name="s", organisation="CHA", memberships=frozenset({("CHA", "site-admin")})
    )
    node = Principal(kind="dicom-node", name="CT", organisation="CHA")
    assert may_store(tech) and may_store(node) and not may_store(referrer) and not may_store(site_admin)
    assert (
        may_manage(site_admin, "CHA") and not may_manage(site_admin, "CLINB") and not may_manage(site_admin)
    )
    assert not may_manage(tech, "CHA")


def test_services_enforce_management_rights(ctx: AppContext) -> None:
    with ctx.db.reading() as session:
        bob = identity.get_professional(session, "bob")
        assert bob is not None
        site_admin = identity.principal_for(session, bob)
    with ctx.db.unit_of_work() as session:
        identity.create_professional(
            session, login="carol", organisation="CHA", role="radiologist", principal=site_admin
        )
        with pytest.raises(AccessDenied):
            identity.create_professional(
                session, login="dave", organisation="CLINB", role="radiologist", principal=site_admin
            )
        with pytest.raises(AccessDenied):
            identity.create_organisation(session, code="X", name="X", principal=site_admin)


def test_cached_token_principal_carries_each_callers_address(ctx: AppContext) -> None:
    # The verified principal of a token is cached (web.auth); the audit trail's source address
    # is still the address of each request, whichever client filled the cache.
    from sqlalchemy import event

    from simral.web.auth import _token_principal

    with ctx.db.unit_of_work() as session:
        holder = identity.get_professional(session, "alice")
        assert holder is not None
        token = identity.issue_token(
            session, professional=holder, lifetime=timedelta(hours=1), principal=_alice(ctx)
        )
    statements: list[str] = []

    def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    first = _token_principal(ctx, token, "10.0.0.1")
    event.listen(ctx.db.read_engine, "before_cursor_execute", seen)
    try:
        again = _token_principal(ctx, token, "10.0.0.1")
        other = _token_principal(ctx, token, "10.0.0.2")
        back = _token_principal(ctx, token, "10.0.0.1")
    finally:
        event.remove(ctx.db.read_engine, "before_cursor_execute", seen)
    assert statements == []  # served from the cache
    assert first.address == again.address == back.address == "10.0.0.1"
    assert other.address == "10.0.0.2" and other.name == first.name == "alice"
    assert again is first  # same address: the cached principal itself
