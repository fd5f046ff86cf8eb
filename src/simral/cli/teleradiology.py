"""``simral ris|contracts``: the sites' RIS (HL7 v2 over MLLP) and the reading contracts that route
their imaging requests to teleradiology groups (DESIGN.md §7, ANS Téléradiologie)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from simral.cli.main import ConfigFile, DataDir, _open, app, cli_principal, out, reported

ris_app = typer.Typer(
    help="Sites' RIS: HL7 senders of imaging requests, receivers of answers.", no_args_is_help=True
)
contracts_app = typer.Typer(
    help="Reading contracts: which group reads which site's exams.", no_args_is_help=True
)
app.add_typer(ris_app, name="ris")
app.add_typer(contracts_app, name="contracts")


@ris_app.command("add")
def ris_add(
    name: str,
    organisation: Annotated[str, typer.Option("--organisation", help="The site (organisation code).")],
    host: Annotated[str, typer.Option("--host", help="Where the RIS receives HL7 (MLLP).")],
    port: Annotated[int, typer.Option("--port", help="Its MLLP port.")],
    application: Annotated[
        str, typer.Option("--application", help="Its MSH-3 sending application (default: NAME).")
    ] = "",
    facility: Annotated[
        str, typer.Option("--facility", help="Its MSH-4 sending facility (default: any).")
    ] = "",
    tls: Annotated[bool, typer.Option("--tls", help="MLLP over TLS.")] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Register a site's RIS: messages it sends are the site's; answers go back to HOST:PORT."""
    from simral.reading import service as reading

    ctx = _open(config, data_dir)
    with reported(reading.ReadingError), ctx.db.unit_of_work() as session:
        reading.add_ris_endpoint(
            session,
            name=name,
            site_code=organisation,
            host=host,
            port=port,
            application=application,
            facility=facility,
            tls=tls,
            principal=cli_principal(),
        )
    out.print(f"RIS {name} added for {organisation}")


@ris_app.command("list")
def ris_list(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """List the registered RIS."""
    from simral.reading import service as reading

    ctx = _open(config, data_dir)
    with ctx.db.reading() as session:
        rows = reading.list_ris_endpoints(session)
        table = Table("name", "site", "application", "facility", "host", "port", "TLS")
        for row in rows:
            table.add_row(
                row.name,
                row.site_code,
                row.application,
                row.facility or "*",
                row.host,
                str(row.port),
                "yes" if row.tls else "no",
            )
    out.print(table)


@ris_app.command("remove")
def ris_remove(name: str, data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Forget a RIS."""
    from simral.reading import service as reading

    ctx = _open(config, data_dir)
    with reported(reading.ReadingError), ctx.db.unit_of_work() as session:
        reading.remove_ris_endpoint(session, name, principal=cli_principal())
    out.print(f"RIS {name} removed")


@contracts_app.command("add")
def contracts_add(
    site: str,
    group: str,
    modalities: Annotated[
        str, typer.Option("--modalities", help="Modalities read, e.g. CT\\\\MR (default: all).")
    ] = "",
    urgent_minutes: Annotated[int, typer.Option("--urgent-minutes", help="Deadline of urgent exams.")] = 60,
    routine_minutes: Annotated[int, typer.Option("--routine-minutes", help="Deadline of routine exams.")] = 24
    * 60,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """SITE's exams (of the given modalities) are read by the teleradiology group GROUP."""
    from simral.reading import service as reading

    ctx = _open(config, data_dir)
    with reported(reading.ReadingError), ctx.db.unit_of_work() as session:
        reading.add_contract(
            session,
            site_code=site,
            group_code=group,
            modalities=modalities,
            urgent_minutes=urgent_minutes,
            routine_minutes=routine_minutes,
            principal=cli_principal(),
        )
    out.print(f"contract added: {site} read by {group}")


@contracts_app.command("list")
def contracts_list(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """List the reading contracts."""
    from simral.reading import service as reading

    ctx = _open(config, data_dir)
    with ctx.db.reading() as session:
        rows = reading.list_contracts(session)
        table = Table("site", "group", "modalities", "urgent (min)", "routine (min)", "active")
        for row in rows:
            table.add_row(
                row.site_code,
                row.group_code,
                row.modalities or "*",
                str(row.urgent_minutes),
                str(row.routine_minutes),
                "yes" if row.active else "no",
            )
    out.print(table)


@contracts_app.command("remove")
def contracts_remove(site: str, group: str, data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """End the contract between SITE and GROUP."""
    from simral.reading import service as reading

    ctx = _open(config, data_dir)
    with reported(reading.ReadingError), ctx.db.unit_of_work() as session:
        reading.remove_contract(session, site_code=site, group_code=group, principal=cli_principal())
    out.print(f"contract removed: {site} / {group}")
