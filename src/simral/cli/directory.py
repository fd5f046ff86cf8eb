"""``simral organisations|users|tokens|audit``: the regional directory and the audit trail."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from simral.cli.main import ConfigFile, DataDir, _open, app, cli_principal, console, out, reported

organisations_app = typer.Typer(
    help="Organisations (hospitals, practices, groups, regional operator).", no_args_is_help=True
)
users_app = typer.Typer(help="Professionals' accounts and roles.", no_args_is_help=True)
tokens_app = typer.Typer(help="Bearer tokens for the DICOMweb and REST APIs.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit trail.", no_args_is_help=True)
app.add_typer(organisations_app, name="organisations")
app.add_typer(users_app, name="users")
app.add_typer(tokens_app, name="tokens")
app.add_typer(audit_app, name="audit")


SECTOR_HELP = (
    "Secteur d'activité (TRE_R02, JDV_J02 healthcare facility type of its CDA documents: SA01 public "
    "hospital, SA04 private, SA07/SA08 individual/group practice…); default by kind."
)
SETTING_HELP = "Practice setting (JDV_J04: ETABLISSEMENT, AMBULATOIRE…); default by kind."


def _fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


@organisations_app.command("add")
def organisations_add(
    code: str,
    name: Annotated[str, typer.Option("--name", help="Display name.")],
    kind: Annotated[
        str, typer.Option(help="hospital, practice, teleradiology-group or regional-operator.")
    ] = "hospital",
    finess: Annotated[str, typer.Option(help="FINESS number (9 characters).")] = "",
    siret: Annotated[str, typer.Option(help="SIRET number (14 digits).")] = "",
    patient_id_oid: Annotated[str, typer.Option(help="OID of the authority assigning its patient IDs.")] = "",
    accession_oid: Annotated[
        str, typer.Option(help="OID of the authority assigning its accession numbers.")
    ] = "",
    activity_sector: Annotated[str, typer.Option(help=SECTOR_HELP)] = "",
    practice_setting: Annotated[str, typer.Option(help=SETTING_HELP)] = "",
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Register an organisation."""
    from simral.identity import service as identity

    ctx = _open(config, data_dir)
    with reported(identity.IdentityError), ctx.db.unit_of_work() as session:
        identity.create_organisation(
            session,
            code=code,
            name=name,
            kind=kind,
            finess=finess,
            siret=siret,
            patient_id_oid=patient_id_oid,
            accession_oid=accession_oid,
            activity_sector=activity_sector,
            practice_setting=practice_setting,
            principal=cli_principal(),
        )
    out.print(f"organisation {code} added")
    if kind == "teleradiology-group" and not (finess or siret):
        # The CI-SIS structure profile (ASIP-STRUCT-MIN) wants the custodian's national identifier.
        console.print(
            f"warning: {code} has no FINESS or SIRET: the reports its radiologists sign name their "
            "custodian without a national identifier (validate.py cda --profiles refuses that); "
            "set one with `simral organisations update`"
        )


@organisations_app.command("update")
def organisations_update(
    code: str,
    name: Annotated[str | None, typer.Option("--name", help="Display name.")] = None,
    finess: Annotated[str | None, typer.Option(help="FINESS number (9 characters; '' clears).")] = None,
    siret: Annotated[str | None, typer.Option(help="SIRET number (14 digits; '' clears).")] = None,
    activity_sector: Annotated[str | None, typer.Option(help=SECTOR_HELP)] = None,
    practice_setting: Annotated[str | None, typer.Option(help=SETTING_HELP)] = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Change an organisation's name, FINESS, SIRET, secteur d'activité or practice setting."""
    from simral.identity import service as identity

    ctx = _open(config, data_dir)
    with reported(identity.IdentityError), ctx.db.unit_of_work() as session:
        organisation = identity.update_organisation(
            session,
            code,
            name=name,
            finess=finess,
            siret=siret,
            activity_sector=activity_sector,
            practice_setting=practice_setting,
            principal=cli_principal(),
        )
        sector, setting = identity.organisation_sector(organisation)
    out.print(f"organisation {code} updated (activity sector {sector}, practice setting {setting})")


@organisations_app.command("list")
def organisations_list(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """List organisations."""
    from simral.identity import service as identity

    ctx = _open(config, data_dir)
    with ctx.db.reading() as session:
        rows = identity.list_organisations(session)
    table = Table("code", "name", "kind", "FINESS", "SIRET", "patient ID OID", "sector", "setting")
    for org in rows:
        sector, setting = identity.organisation_sector(org)
        table.add_row(
            org.code, org.name, org.kind, org.finess, org.siret, org.patient_id_oid, sector, setting
        )
    out.print(table)


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    if os.environ.get("SIMRAL_NEW_PASSWORD"):
        return os.environ["SIMRAL_NEW_PASSWORD"]
    import getpass

    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise _fail("the two passwords differ")
    return first


@users_app.command("add")
def users_add(
    login: str,
    organisation: Annotated[str, typer.Option("--organisation", help="Organisation code.")],
    role: Annotated[
        str,
        typer.Option(
            "--role",
            help="technologist, radiologist, referring-physician, site-admin, regional-admin or auditor.",
        ),
    ],
    rpps: Annotated[
        str, typer.Option("--rpps", help="RPPS number (11 digits); national id = 8 + RPPS.")
    ] = "",
    name: Annotated[str, typer.Option("--name", help="Display name.")] = "",
    profession: Annotated[
        str, typer.Option(help="Profession (e.g. 10 = médecin, G15_10/SM26 = radiologie).")
    ] = "",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin.")
    ] = False,
    no_password: Annotated[
        bool, typer.Option("--no-password", help="Log in only through OpenID Connect (Pro Santé Connect).")
    ] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Create an account with a role in an organisation (asks for a password unless --no-password).

    The user enrols their TOTP second factor at first login.
    """
    from simral.identity import service as identity

    if rpps and not (rpps.isdigit() and len(rpps) == 11):
        raise _fail("an RPPS number has 11 digits")
    password = "" if no_password else _read_password(password_stdin)
    ctx = _open(config, data_dir)
    with reported(identity.IdentityError), ctx.db.unit_of_work() as session:
        identity.create_professional(
            session,
            login=login,
            organisation=organisation,
            role=role,
            password=password,
            display_name=name,
            national_id=f"8{rpps}" if rpps else "",
            profession=profession,
            principal=cli_principal(),
        )
    out.print(f"user {login} added ({role} at {organisation})")


@users_app.command("grant")
def users_grant(
    login: str,
    organisation: Annotated[str, typer.Option("--organisation", help="Organisation code.")],
    role: Annotated[str, typer.Option("--role", help="Role to add.")],
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Give an existing user one more role."""
    from simral.identity import service as identity

    ctx = _open(config, data_dir)
    with reported(identity.IdentityError), ctx.db.unit_of_work() as session:
        professional = identity.get_professional(session, login)
        if professional is None:
            raise identity.IdentityError(f"no user {login!r}")
        identity.add_role(
            session,
            professional=professional,
            organisation=organisation,
            role=role,
            principal=cli_principal(),
        )
    out.print(f"{login}: {role} at {organisation}")


@users_app.command("set-password")
def users_set_password(
    login: str,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin.")
    ] = False,
    reset_totp: Annotated[
        bool, typer.Option("--reset-totp", help="Make the user enrol a new TOTP device.")
    ] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Set a user's password (clears a lockout); optionally reset their second factor."""
    from simral.identity import service as identity

    password = _read_password(password_stdin)
    ctx = _open(config, data_dir)
    with reported(identity.IdentityError), ctx.db.unit_of_work() as session:
        professional = identity.get_professional(session, login)
        if professional is None:
            raise identity.IdentityError(f"no user {login!r}")
        identity.set_password(
            session, professional=professional, password=password, principal=cli_principal()
        )
        if reset_totp:
            professional.totp_secret = ""
            professional.totp_enrolled_at = None
    out.print(f"password of {login} set")


@users_app.command("list")
def users_list(
    organisation: Annotated[str | None, typer.Option(help="Only this organisation's members.")] = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """List accounts and their roles."""
    from simral.identity import service as identity

    ctx = _open(config, data_dir)
    with ctx.db.reading() as session:
        rows = identity.list_professionals(session, organisation=organisation)
        table = Table("login", "name", "national id", "roles", "TOTP", "locked")
        for p in rows:
            roles = ", ".join(sorted(f"{m.role}@{m.organisation.code}" for m in p.memberships))
            table.add_row(
                p.login,
                p.display_name,
                p.national_id,
                roles,
                "enrolled" if p.totp_enrolled_at else "not yet",
                "yes" if p.locked_until else "",
            )
    out.print(table)


@tokens_app.command("create")
def tokens_create(
    login: str,
    expires: Annotated[str, typer.Option(help="Lifetime: 30m, 1h, 7d (at most 90d).")] = "1h",
    organisation: Annotated[
        str, typer.Option(help="Organisation the token acts for (default: the first).")
    ] = "",
    label: Annotated[str, typer.Option(help="What the token is for.")] = "",
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Print a bearer token (RFC 6750) acting as LOGIN on the DICOMweb and REST APIs."""
    from simral.identity import service as identity

    ctx = _open(config, data_dir)
    with reported(identity.IdentityError):
        lifetime = identity.parse_duration(expires)
        with ctx.db.unit_of_work() as session:
            professional = identity.get_professional(session, login)
            if professional is None:
                raise identity.IdentityError(f"no user {login!r}")
            token = identity.issue_token(
                session,
                professional=professional,
                organisation=organisation,
                lifetime=lifetime,
                label=label,
                principal=cli_principal(),
            )
    print(token)


@tokens_app.command("revoke")
def tokens_revoke(jti: str, data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Revoke a token by its id (the ``jti`` claim)."""
    from simral.identity import service as identity

    ctx = _open(config, data_dir)
    with reported(identity.IdentityError), ctx.db.unit_of_work() as session:
        identity.revoke_token(session, jti=jti, principal=cli_principal())
    out.print(f"token {jti} revoked")


@tokens_app.command("rotate-key")
def tokens_rotate_key(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Start signing with a new key; tokens signed with older keys stay valid until they expire."""
    from simral.audit import service as audit
    from simral.identity import service as identity

    ctx = _open(config, data_dir)
    with ctx.db.unit_of_work() as session:
        kid, _key = identity.rotate_signing_key(session)
        audit.record(session, action="token.rotate-key", principal=cli_principal(), detail={"kid": kid})
    out.print(f"signing key {kid} active")


@audit_app.command("verify")
def audit_verify(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Check the audit trail's hash chain; exit 1 and name the first broken record on any alteration."""
    from simral.audit import service as audit

    ctx = _open(config, data_dir)
    with ctx.db.reading() as session:
        report = audit.verify(session)
    if report.problem is not None:
        out.print(
            f"[red]audit trail broken at record {report.problem.record_id}:[/red] {report.problem.reason}"
        )
        raise typer.Exit(1)
    legacy = f" ({report.legacy_records} written before the chain)" if report.legacy_records else ""
    out.print(f"[green]audit trail intact:[/green] {report.records} records{legacy}")


@audit_app.command("export")
def audit_export(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Send the records the syslog collector has not received yet, now (audit_syslog_* settings)."""
    import ssl

    from simral import tls
    from simral.audit.export import SyslogExporter

    ctx = _open(config, data_dir)
    if not ctx.settings.audit_syslog_host:
        raise _fail("no collector configured (audit_syslog_host)")
    exporter = SyslogExporter(ctx)
    try:
        sent = exporter.push()
    except (OSError, ssl.SSLError, tls.TlsConfigError) as exc:
        raise _fail(
            f"collector {ctx.settings.audit_syslog_host}:{ctx.settings.audit_syslog_port}: {exc}"
        ) from None
    finally:
        exporter.close()
    out.print(
        f"{sent} audit records sent to {ctx.settings.audit_syslog_host}:{ctx.settings.audit_syslog_port}"
    )


@audit_app.command("search")
def audit_search(
    patient_id: Annotated[str, typer.Option(help="Patient ID.")] = "",
    actor: Annotated[str, typer.Option(help="Login, national id or kind:name.")] = "",
    study: Annotated[str, typer.Option(help="Study Instance UID.")] = "",
    action: Annotated[str, typer.Option(help="Action (e.g. login, study.read, break-glass.open).")] = "",
    limit: Annotated[int, typer.Option(help="At most this many records.")] = 50,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Search the audit trail, newest first."""
    from simral.audit import service as audit

    ctx = _open(config, data_dir)
    with ctx.db.reading() as session:
        rows = audit.search(
            session,
            organisations=None,
            patient_id=patient_id,
            actor=actor,
            study_uid=study,
            action=action,
            limit=limit,
        )
        table = Table(
            "id", "time (UTC)", "action", "actor", "organisation", "outcome", "from", "patient", "study"
        )
        for r in rows:
            table.add_row(
                str(r.id),
                r.at.strftime("%Y-%m-%d %H:%M:%S"),
                r.action,
                r.actor,
                r.actor_organisation,
                r.outcome,
                r.source_address,
                r.patient_id,
                r.study_uid,
                json.dumps(r.detail, ensure_ascii=False)[:160],
            )
    # Audit lines are long: never truncate them when the output is not a terminal.
    (out if out.is_terminal else Console(width=240)).print(table)
