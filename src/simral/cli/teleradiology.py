"""``simral ris|contracts|oncall``: the sites' RIS (HL7 v2 over MLLP), the reading contracts that
route their imaging requests to teleradiology groups, and the groups' on-call schedules (DESIGN.md
§7, ANS Téléradiologie; the routing rules are in :mod:`simral.reading.routing`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table

from simral.cli.main import (
    ConfigFile,
    DataDir,
    Hl7CheckHost,
    Hl7Facility,
    Hl7TlsSubject,
    _open,
    app,
    cli_principal,
    out,
    reported,
)

ris_app = typer.Typer(
    help="Sites' RIS: HL7 senders of imaging requests, receivers of answers.", no_args_is_help=True
)
contracts_app = typer.Typer(
    help="Reading contracts: which group reads which site's exams.", no_args_is_help=True
)
oncall_app = typer.Typer(
    help="On-call schedule (tableau de garde) of teleradiology groups.", no_args_is_help=True
)
app.add_typer(ris_app, name="ris")
app.add_typer(contracts_app, name="contracts")
app.add_typer(oncall_app, name="oncall")


@ris_app.command("add")
def ris_add(
    name: str,
    organisation: Annotated[str, typer.Option("--organisation", help="The site (organisation code).")],
    host: Annotated[str, typer.Option("--host", help="Where the RIS receives HL7 (MLLP).")],
    port: Annotated[int, typer.Option("--port", help="Its MLLP port.")],
    application: Annotated[
        str, typer.Option("--application", help="Its MSH-3 sending application (default: NAME).")
    ] = "",
    facility: Hl7Facility = "",
    tls: Annotated[bool, typer.Option("--tls", help="MLLP over TLS.")] = False,
    check_host: Hl7CheckHost = False,
    tls_subject: Hl7TlsSubject = "",
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
            check_host=check_host,
            tls_subject=tls_subject,
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
    subspecialties: Annotated[
        str,
        typer.Option(
            "--subspecialties",
            help="Only exams needing these subspecialties, comma-separated, e.g. neuro,orl (default: all).",
        ),
    ] = "",
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """SITE's exams (of the given modalities and subspecialties) are read by the teleradiology group
    GROUP."""
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
            subspecialties=subspecialties,
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
        table = Table(
            "site", "group", "modalities", "subspecialties", "urgent (min)", "routine (min)", "active"
        )
        for row in rows:
            table.add_row(
                row.site_code,
                row.group_code,
                row.modalities or "*",
                row.subspecialties.replace("\\", ",") or "*",
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


def _moment(value: str, what: str) -> datetime:
    """An ISO 8601 date and time; without an offset, in the platform's wall clock (Europe/Paris)."""
    from simral.reading.worklist import local_timezone

    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise typer.BadParameter(f"{what}: {value!r} is not an ISO 8601 date and time") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=local_timezone())


@oncall_app.command("add")
def oncall_add(
    group: str,
    login: str,
    start: Annotated[
        str,
        typer.Option("--start", help="Start, ISO 8601 (e.g. 2026-12-05T20:00; local time without offset)."),
    ],
    end: Annotated[str, typer.Option("--end", help="End (excluded), ISO 8601.")],
    subspecialty: Annotated[
        str, typer.Option("--subspecialty", help="Only exams of this subspecialty (default: every exam).")
    ] = "",
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Put radiologist LOGIN on call for GROUP from --start to --end."""
    from simral.access.policy import AccessDenied
    from simral.reading import routing

    begins, ends = _moment(start, "--start"), _moment(end, "--end")
    ctx = _open(config, data_dir)
    with reported(routing.ScheduleError, AccessDenied), ctx.db.unit_of_work() as session:
        shift = routing.add_shift(
            session,
            group_code=group,
            login=login,
            start_at=begins,
            end_at=ends,
            subspecialty=subspecialty,
            principal=cli_principal(),
        )
        shift_id = shift.id
    out.print(f"on-call shift {shift_id} added: {login} for {group}")


@oncall_app.command("list")
def oncall_list(
    group: Annotated[str, typer.Option("--group", help="Only this group.")] = "",
    past: Annotated[bool, typer.Option("--past", help="Also the shifts already over.")] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """List the on-call shifts still running or to come (local time), by start."""
    from simral.db.base import as_utc, utcnow
    from simral.reading import routing
    from simral.reading.worklist import local_timezone

    ctx = _open(config, data_dir)
    now = utcnow()
    zone = local_timezone()
    with ctx.db.reading() as session:
        rows = routing.list_shifts(session, group_code=group, ending_after=None if past else now)
        table = Table("id", "group", "radiologist", "start", "end", "subspecialty", "now")
        for row in rows:
            start_at, end_at = as_utc(row.start_at), as_utc(row.end_at)
            table.add_row(
                str(row.id),
                row.group_code,
                row.login,
                f"{start_at.astimezone(zone):%Y-%m-%d %H:%M}" if start_at else "",
                f"{end_at.astimezone(zone):%Y-%m-%d %H:%M}" if end_at else "",
                row.subspecialty or "*",
                "on call" if start_at and end_at and start_at <= now < end_at else "",
            )
    out.print(table)


@oncall_app.command("remove")
def oncall_remove(shift_id: int, data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Take shift SHIFT_ID off the schedule."""
    from simral.access.policy import AccessDenied
    from simral.reading import routing

    ctx = _open(config, data_dir)
    with reported(routing.ScheduleError, AccessDenied), ctx.db.unit_of_work() as session:
        routing.remove_shift(session, shift_id, principal=cli_principal())
    out.print(f"on-call shift {shift_id} removed")
