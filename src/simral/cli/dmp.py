"""``simral dmp``: which organisations simral publishes to the DMP for, and where each document's
publication stands (DESIGN.md §8; IHE ITI-41)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from simral.cli.main import ConfigFile, DataDir, _open, app, cli_principal, out, reported

dmp_app = typer.Typer(
    help="DMP publication on behalf of organisations (IHE XDS.b ITI-41).", no_args_is_help=True
)
app.add_typer(dmp_app, name="dmp")


@dmp_app.command("enable")
def dmp_enable(
    organisation: str,
    auth_cert: Annotated[
        str, typer.Option("--auth-cert", help="PEM authentication certificate (mutual TLS).")
    ],
    auth_key: Annotated[str, typer.Option("--auth-key", help="Its PEM private key.")],
    signing_cert: Annotated[
        str, typer.Option("--signing-cert", help="PEM signing certificate (VIHF, XAdES).")
    ],
    signing_key: Annotated[str, typer.Option("--signing-key", help="Its PEM private key.")],
    structure_id: Annotated[
        str,
        typer.Option(
            "--structure-id", help="VIHF Identifiant_Structure (default: 1 + FINESS, else 3 + SIRET)."
        ),
    ] = "",
    activity_sector: Annotated[
        str, typer.Option("--activity-sector", help="VIHF Secteur_Activite (TRE_R02, e.g. SA01, SA07).")
    ] = "SA01",
    facility_type: Annotated[
        str, typer.Option("--facility-type", help="healthcareFacilityTypeCode (JDV_J02, e.g. SA01).")
    ] = "SA01",
    practice_setting: Annotated[
        str, typer.Option("--practice-setting", help="practiceSettingCode (JDV_J04, e.g. ETABLISSEMENT).")
    ] = "ETABLISSEMENT",
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Publish the organisation's signed reports and image manifests to the DMP on its behalf."""
    from simral.access.policy import AccessDenied
    from simral.dmp import service as dmp

    ctx = _open(config, data_dir)
    with reported(dmp.DmpError, AccessDenied), ctx.db.unit_of_work() as session:
        dmp.configure_organisation(
            session,
            code=organisation,
            principal=cli_principal(),
            auth_cert_file=auth_cert,
            auth_key_file=auth_key,
            signing_cert_file=signing_cert,
            signing_key_file=signing_key,
            structure_id=structure_id,
            activity_sector=activity_sector,
            facility_type_code=facility_type,
            practice_setting_code=practice_setting,
        )
    out.print(f"DMP publication enabled for {organisation}")


@dmp_app.command("disable")
def dmp_disable(organisation: str, data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Stop publishing for the organisation (documents already published stay in the DMP)."""
    from simral.access.policy import AccessDenied
    from simral.dmp import service as dmp

    ctx = _open(config, data_dir)
    with reported(dmp.DmpError, AccessDenied), ctx.db.unit_of_work() as session:
        dmp.configure_organisation(session, code=organisation, principal=cli_principal(), enabled=False)
    out.print(f"DMP publication disabled for {organisation}")


@dmp_app.command("status")
def dmp_status(
    organisation: Annotated[
        str, typer.Option("--organisation", help="Only this organisation's documents.")
    ] = "",
    state: Annotated[str, typer.Option("--state", help="Only documents in this state.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Each document entry: kind, version, state (pending, waiting, published, failed, replaced), reason."""
    from simral.dmp import service as dmp

    ctx = _open(config, data_dir)
    with ctx.db.reading() as session:
        rows = dmp.statuses(session, organisation=organisation or None, state=state or None)
    if as_json:
        out.print_json(
            json.dumps(
                [
                    {
                        **row.__dict__,
                        "published_at": row.published_at.isoformat() if row.published_at else None,
                        "updated_at": row.updated_at.isoformat(),
                    }
                    for row in rows
                ]
            )
        )
        return
    table = Table("id", "organisation", "kind", "version", "state", "entry", "replaces", "reason")
    for row in rows:
        table.add_row(
            str(row.id),
            row.organisation_code,
            row.kind,
            str(row.version),
            row.state,
            row.entry_uuid,
            row.replaces_entry_uuid,
            row.reason,
        )
    out.print(table)


@dmp_app.command("retry")
def dmp_retry(document: int, data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Queue a failed or waiting document again."""
    from simral.access.policy import AccessDenied
    from simral.dmp import service as dmp

    ctx = _open(config, data_dir)
    with reported(dmp.DmpError, AccessDenied), ctx.db.unit_of_work() as session:
        job = dmp.retry(session, document, principal=cli_principal())
    out.print(f"DMP document {document} queued (job {job})")


@dmp_app.command("withdraw")
def dmp_withdraw(
    document: int,
    mask: Annotated[
        bool, typer.Option("--mask", help="Mask it to professionals (MASQUE_PS) instead of deleting it.")
    ] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Withdraw a published entry from the DMP (ITI-57): logical deletion, or masking with --mask."""
    from simral.access.policy import AccessDenied
    from simral.dmp import service as dmp

    ctx = _open(config, data_dir)
    action = dmp.WITHDRAW_MASK if mask else dmp.WITHDRAW_DELETE
    with reported(dmp.DmpError, AccessDenied), ctx.db.unit_of_work() as session:
        job = dmp.request_withdrawal(session, document, action=action, principal=cli_principal())
    out.print(f"DMP document {document}: {action} queued (job {job})")
