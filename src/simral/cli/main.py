"""The ``simral`` command line: serve, nodes, import, check (directory and audit in :mod:`.directory`)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from simral.access.policy import Principal
from simral.app import configure_logging, open_app
from simral.config import Settings, load_settings
from simral.context import AppContext

app = typer.Typer(
    help="simral — regional tele-imaging platform.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
nodes_app = typer.Typer(help="Registry of remote DICOM nodes.", no_args_is_help=True)
app.add_typer(nodes_app, name="nodes")
console = Console(stderr=True)
#: Tables printed to a pipe or a file keep every column whole (a terminal gets its own width).
out = Console() if sys.stdout.isatty() else Console(width=240)

DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="Data folder (index + blobs). Default ./simral-data.")
]
ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="TOML configuration file (also SIMRAL_CONFIG).", exists=True)
]
#: The binding of a registered HL7 sender (a RIS, an identity source): see access.peer_binding_refusal.
Hl7Facility = Annotated[str, typer.Option("--facility", help="Its MSH-4 sending facility (default: any).")]
Hl7CheckHost = Annotated[bool, typer.Option("--check-host", help="Accept its messages from HOST only.")]
Hl7TlsSubject = Annotated[
    str,
    typer.Option(
        "--tls-subject", help="Accept its messages over TLS with a client certificate of this CN only."
    ),
]


def _settings(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, overrides=overrides)
    except (ValueError, OSError) as exc:
        console.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from None


@contextlib.contextmanager
def reported(*errors: type[Exception]) -> Iterator[None]:
    """Report the given service errors as ``error: …`` on stderr and exit with status 1."""
    try:
        yield
    except errors as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None


def cli_principal(organisation: str = "") -> Principal:
    """The operator running the command (audited as ``system:cli:<OS user>``)."""
    import getpass

    return Principal(
        kind="system",
        name=f"cli:{getpass.getuser()}",
        archive_wide=True,
        via="cli",
        organisation=organisation,
    )


def _open(config: Path | None, data_dir: Path | None) -> AppContext:
    settings = _settings(config, data_dir=data_dir)
    configure_logging("ERROR")
    return open_app(settings)


@app.command()
def serve(
    data_dir: DataDir = None,
    dicom_port: Annotated[int | None, typer.Option(help="DICOM port (default 11112).")] = None,
    http_port: Annotated[int | None, typer.Option(help="HTTP port (default 8080).")] = None,
    ae_title: Annotated[str | None, typer.Option(help="Our AE title (default SIMRAL).")] = None,
    dicom_host: Annotated[str | None, typer.Option(help="Address the DICOM port binds to.")] = None,
    http_host: Annotated[str | None, typer.Option(help="Address the HTTP port binds to.")] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Worker processes sharing the ports (default 1; 0: one per CPU, up to 4)."),
    ] = None,
    hl7_port: Annotated[
        int | None, typer.Option(help="HL7 v2 ADT feed over MLLP on this port (default 0: off).")
    ] = None,
    hl7_host: Annotated[str | None, typer.Option(help="Address the HL7 port binds to.")] = None,
    config: ConfigFile = None,
) -> None:
    """Run the platform in the foreground (Ctrl-C or SIGTERM stops it cleanly)."""
    settings = _settings(
        config,
        data_dir=data_dir,
        dicom_port=dicom_port,
        http_port=http_port,
        ae_title=ae_title,
        dicom_host=dicom_host,
        http_host=http_host,
        workers=workers,
        hl7_port=hl7_port,
        hl7_host=hl7_host,
    )
    configure_logging(settings.log_level, settings.log_format)
    from simral.server import PortInUse, run_server
    from simral.web.auth import UnsafeExposure

    try:
        sys.exit(run_server(settings))
    except (UnsafeExposure, PortInUse) as exc:
        console.print(f"[red]refusing to start:[/red] {exc}")
        raise typer.Exit(2) from None


@nodes_app.command("add")
def nodes_add(
    name: str,
    ae: Annotated[str, typer.Option("--ae", help="The node's AE title.")],
    host: Annotated[str, typer.Option("--host", help="Host name or address.")],
    port: Annotated[int, typer.Option("--port", help="DICOM port.")],
    check_host: Annotated[bool, typer.Option(help="Accept this AE only from this host.")] = False,
    organisation: Annotated[
        str,
        typer.Option(
            help="Code of the organisation the node belongs to (it sees that organisation's studies)."
        ),
    ] = "",
    archive_wide: Annotated[
        bool,
        typer.Option("--archive-wide", help="A platform node that sees the whole archive (regional PACS)."),
    ] = False,
    tls: Annotated[
        bool, typer.Option("--tls", help="Open associations to this node over DICOM TLS.")
    ] = False,
    tls_subject: Annotated[
        str,
        typer.Option(
            "--tls-subject",
            help="Accept this AE only over DICOM TLS with a verified client certificate of this subject CN.",
        ),
    ] = "",
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Register a remote DICOM node (of one organisation, or archive-wide)."""
    from simral.nodes import service as nodes

    ctx = _open(config, data_dir)
    with reported(nodes.NodeError), ctx.db.unit_of_work() as session:
        nodes.create(
            session,
            name=name,
            ae_title=ae,
            host=host,
            port=port,
            check_host=check_host,
            organisation=organisation,
            archive_wide=archive_wide,
            tls=tls,
            tls_subject=tls_subject,
            principal=cli_principal(),
        )
    out.print(f"node {name} added ({ae.strip()} at {host}:{port})")


@nodes_app.command("list")
def nodes_list(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """List registered nodes."""
    from simral.nodes import service as nodes

    ctx = _open(config, data_dir)
    with ctx.db.reading() as session:
        rows = nodes.list_all(session)
    table = Table("name", "AE title", "host", "port", "host checked", "TLS", "certificate CN", "organisation")
    for node in rows:
        table.add_row(
            node.name,
            node.ae_title,
            node.host,
            str(node.port),
            "yes" if node.check_host else "no",
            "yes" if node.tls else "no",
            node.tls_subject,
            node.organisation or ("(archive-wide)" if node.archive_wide else ""),
        )
    out.print(table)


@nodes_app.command("remove")
def nodes_remove(name: str, data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Remove a registered node."""
    from simral.nodes import service as nodes

    ctx = _open(config, data_dir)
    with reported(nodes.NodeError), ctx.db.unit_of_work() as session:
        nodes.delete(session, name=name, principal=cli_principal())
    out.print(f"node {name} removed")


@app.command("import")
def import_(
    paths: Annotated[
        list[Path], typer.Argument(help="Files, folders, DICOMDIRs or ZIP archives.", exists=True)
    ],
    organisation: Annotated[
        str, typer.Option(help="Organisation the imported studies belong to (its members see them).")
    ] = "",
    reconcile: Annotated[
        bool,
        typer.Option(
            help="Media from another site: store each study under the organisation's identifier of "
            "the patient (found by the media's linked identifier or INS), the media's kept in "
            "Other Patient IDs Sequence (IHE IRWF.b)."
        ),
    ] = False,
    patient_id: Annotated[
        str,
        typer.Option(help="With --reconcile: the organisation's patient identifier for every file imported."),
    ] = "",
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Import DICOM files through the same ingest path as C-STORE and STOW-RS."""
    from simral.archive.importing import import_paths
    from simral.archive.reconciliation import Reconciler, ReconciliationError
    from simral.identity.service import get_organisation

    ctx = _open(config, data_dir)
    if organisation:
        with ctx.db.reading() as session:
            if get_organisation(session, organisation) is None:
                console.print(f"[red]error:[/red] no organisation with code {organisation!r}")
                raise typer.Exit(1)
    if (reconcile or patient_id) and not organisation:
        console.print("[red]error:[/red] reconciliation needs the receiving --organisation")
        raise typer.Exit(1)
    reconciler = Reconciler(ctx, organisation, patient_id=patient_id) if reconcile or patient_id else None
    with Progress(
        TextColumn("importing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("import", total=None)
        with reported(ReconciliationError):
            summary = import_paths(
                ctx,
                paths,
                principal=cli_principal(organisation),
                progress=lambda _name: progress.advance(task),
                reconciler=reconciler,
            )
    table = Table("outcome", "count")
    labels = {
        "stored": "stored",
        "replaced": "replaced",
        "duplicate": "duplicate (identical)",
        "duplicate-conflict": "duplicate (different content, first kept)",
        "rejected": "rejected",
    }
    for outcome, label in labels.items():
        table.add_row(label, str(summary.outcomes.get(outcome, 0)))
    if reconciler is not None:
        table.add_row("reconciled to the organisation's patient", str(summary.reconciled))
        table.add_row("kept as on the media (no identifier found)", str(summary.not_reconciled))
    out.print(table)
    for name, reason in summary.rejected:
        out.print(f"rejected: {name}: {reason}")
    if summary.outcomes.get("rejected"):
        raise typer.Exit(1)


@app.command()
def check(
    repair: Annotated[
        bool, typer.Option(help="Delete orphan blobs and finish or undo interrupted ingests.")
    ] = False,
    quick: Annotated[bool, typer.Option(help="Skip re-hashing (presence and orphans only).")] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Check index ↔ blob store consistency; exit 1 on any problem."""
    from simral.archive.consistency import check as run_check

    ctx = _open(config, data_dir)
    report = run_check(ctx, repair=repair, verify_hashes=not quick)
    out.print(f"checked {report.checked} indexed blobs")
    for label, items in (
        ("missing blob", report.missing),
        ("checksum mismatch", report.mismatches),
        ("orphan blob", report.orphans),
        ("leftover temporary file", report.temporaries),
        ("superseded copy (moved blob, source not purged yet)", report.superseded),
    ):
        for item in items:
            out.print(f"{label}: {item}")
    if repair:
        out.print(f"repaired {report.repaired}")
    if report.clean:
        out.print("[green]consistent[/green]")
    else:
        out.print(
            f"[red]problems:[/red] {len(report.missing)} missing, {len(report.mismatches)} mismatched, "
            f"{len(report.orphans)} orphans, {len(report.temporaries)} temporaries"
        )
        raise typer.Exit(1)


# The directory and audit commands register themselves on ``app``.
from simral.cli import compression as _compression  # noqa: E402, F401
from simral.cli import directory as _directory  # noqa: E402, F401
from simral.cli import dmp as _dmp  # noqa: E402, F401
from simral.cli import exchange as _exchange  # noqa: E402, F401
from simral.cli import patients as _patients  # noqa: E402, F401
from simral.cli import retention as _retention  # noqa: E402, F401
from simral.cli import storage as _storage  # noqa: E402, F401
from simral.cli import teleradiology as _teleradiology  # noqa: E402, F401
