"""``simral hl7-sources``: the HL7 v2 senders admitted to the ADT identity feed and to PDQ queries
(the hospital's identity manager, a PDQ consumer), as ``simral nodes`` admits DICOM callers
(:mod:`simral.patients.service`, :func:`~simral.patients.service.hl7_sender_refusal`)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from simral.access.policy import AccessDenied
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

hl7_sources_app = typer.Typer(
    help="HL7 identity sources: senders admitted to the ADT feed and PDQ queries.", no_args_is_help=True
)
app.add_typer(hl7_sources_app, name="hl7-sources")


@hl7_sources_app.command("add")
def hl7_sources_add(
    name: str,
    application: Annotated[str, typer.Option("--application", help="Its MSH-3 sending application.")],
    facility: Hl7Facility = "",
    host: Annotated[str, typer.Option("--host", help="The host it sends from (with --check-host).")] = "",
    check_host: Hl7CheckHost = False,
    tls_subject: Hl7TlsSubject = "",
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Admit a sender of ADT messages or PDQ queries (MSH-3 APPLICATION, MSH-4 FACILITY)."""
    from simral.patients import service as patients

    ctx = _open(config, data_dir)
    with reported(patients.PatientError, AccessDenied), ctx.db.unit_of_work() as session:
        patients.add_hl7_source(
            session,
            name=name,
            application=application,
            facility=facility,
            host=host,
            check_host=check_host,
            tls_subject=tls_subject,
            principal=cli_principal(),
        )
    out.print(f"HL7 source {name} added ({application.strip()}^{facility.strip() or '*'})")


@hl7_sources_app.command("list")
def hl7_sources_list(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """List the registered HL7 sources."""
    from simral.patients import service as patients

    ctx = _open(config, data_dir)
    with ctx.db.reading() as session:
        rows = patients.list_hl7_sources(session)
        table = Table("name", "application", "facility", "host", "host checked", "certificate CN")
        for row in rows:
            table.add_row(
                row.name,
                row.application,
                row.facility or "*",
                row.host,
                "yes" if row.check_host else "no",
                row.tls_subject,
            )
    out.print(table)


@hl7_sources_app.command("remove")
def hl7_sources_remove(name: str, data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Forget an HL7 source: its messages are refused from now on."""
    from simral.patients import service as patients

    ctx = _open(config, data_dir)
    with reported(patients.PatientError, AccessDenied), ctx.db.unit_of_work() as session:
        patients.remove_hl7_source(session, name, principal=cli_principal())
    out.print(f"HL7 source {name} removed")
