"""CLI of the exchange machinery: routing rules, DICOMweb peers, durable jobs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from simral.cli.main import ConfigFile, DataDir, _open, app, cli_principal, console, out, reported

routes_app = typer.Typer(
    help="Routing rules: forward new images to DICOM nodes or DICOMweb peers.", no_args_is_help=True
)
peers_app = typer.Typer(help="DICOMweb peers simral sends to with STOW-RS.", no_args_is_help=True)
jobs_app = typer.Typer(help="Durable jobs (forwarding and other follow-up work).", no_args_is_help=True)
app.add_typer(routes_app, name="routes")
app.add_typer(peers_app, name="dicomweb-peers")
app.add_typer(jobs_app, name="jobs")


@routes_app.command("add")
def routes_add(
    name: str,
    to: Annotated[str, typer.Option("--to", help="Name of a registered DICOM node (C-STORE).")] = "",
    to_dicomweb: Annotated[
        str, typer.Option("--to-dicomweb", help="Name of a DICOMweb peer (STOW-RS).")
    ] = "",
    from_organisation: Annotated[str, typer.Option(help="Only studies of this organisation.")] = "",
    from_ae: Annotated[str, typer.Option(help="Only instances sent by this calling AE title.")] = "",
    modality: Annotated[str, typer.Option(help="Only series of this modality (CT, MR...).")] = "",
    description: Annotated[str, typer.Option(help="Study description pattern (* and ?, any case).")] = "",
    prefetch_for: Annotated[
        str,
        typer.Option(
            help="A prefetch rule for this reading group: when one of its reading tasks becomes ready, "
            "send the study and the patient's priors from the requesting site (instead of new instances)."
        ),
    ] = "",
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Forward every new instance matching all the given criteria to one destination (or, with
    --prefetch-for, each ready reading task's study and priors)."""
    from simral.access.policy import AccessDenied
    from simral.sharing import service as sharing

    ctx = _open(config, data_dir)
    with reported(sharing.RoutingError, AccessDenied), ctx.db.unit_of_work() as session:
        sharing.create_rule(
            session,
            name=name,
            destination_node=to,
            destination_dicomweb=to_dicomweb,
            source_organisation=from_organisation,
            source=from_ae,
            modality=modality,
            study_description=description,
            reading_group=prefetch_for,
            principal=cli_principal(),
        )
    out.print(f"route {name} added (to {to or to_dicomweb})")


@routes_app.command("list")
def routes_list(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """List routing rules."""
    from simral.sharing import service as sharing

    ctx = _open(config, data_dir)
    with ctx.db.reading() as session:
        rules = sharing.list_rules(session)
        table = Table(
            "name", "organisation", "from AE", "modality", "description", "prefetch for", "to", "protocol"
        )
        for rule in rules:
            table.add_row(
                rule.name,
                rule.source_organisation,
                rule.source,
                rule.modality,
                rule.study_description,
                rule.reading_group,
                rule.destination_node or rule.destination_dicomweb,
                "C-STORE" if rule.destination_node else "STOW-RS",
            )
    out.print(table)


@routes_app.command("remove")
def routes_remove(name: str, data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Remove a routing rule (jobs already queued still run: cancel them with `simral jobs cancel`)."""
    from simral.sharing import service as sharing

    ctx = _open(config, data_dir)
    with reported(sharing.RoutingError), ctx.db.unit_of_work() as session:
        sharing.delete_rule(session, name=name, principal=cli_principal())
    out.print(f"route {name} removed")


@peers_app.command("add")
def peers_add(
    name: str,
    url: Annotated[str, typer.Option("--url", help="DICOMweb service root, e.g. https://pacs/dicom-web.")],
    token_stdin: Annotated[bool, typer.Option("--token-stdin", help="Read a bearer token on stdin.")] = False,
    organisation: Annotated[str, typer.Option(help="Organisation the peer belongs to.")] = "",
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Register a DICOMweb server to send to (the token never appears on the command line)."""
    import sys

    from simral.nodes import service as nodes

    token = sys.stdin.readline().strip() if token_stdin else ""
    ctx = _open(config, data_dir)
    with reported(nodes.NodeError), ctx.db.unit_of_work() as session:
        nodes.create_dicomweb_peer(
            session,
            name=name,
            url=url,
            bearer_token=token,
            organisation=organisation,
            principal=cli_principal(),
        )
    out.print(f"DICOMweb peer {name} added ({url})")


@peers_app.command("list")
def peers_list(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """List DICOMweb peers."""
    from simral.nodes import service as nodes

    ctx = _open(config, data_dir)
    with ctx.db.reading() as session:
        table = Table("name", "URL", "authenticated", "organisation")
        for peer in nodes.list_dicomweb_peers(session):
            table.add_row(peer.name, peer.url, "yes" if peer.bearer_token else "no", peer.organisation)
    out.print(table)


@jobs_app.command("list")
def jobs_list(
    state: Annotated[str, typer.Option(help="queued, running, done, dead or cancelled.")] = "",
    kind: Annotated[str, typer.Option(help="Job kind, e.g. forward.dimse.")] = "",
    limit: Annotated[int, typer.Option(help="At most this many jobs.")] = 50,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """List jobs, newest first, with a count per state."""
    from simral.jobs import service as jobs

    ctx = _open(config, data_dir)
    with reported(jobs.JobError), ctx.db.reading() as session:
        rows = jobs.list_jobs(session, state=state, kind=kind, limit=limit)
        totals = jobs.counts(session)
        table = Table(
            "id", "kind", "state", "tries", "destination", "instance", "next try (UTC)", "last error"
        )
        for job in rows:
            table.add_row(
                str(job.id),
                job.kind,
                job.state,
                f"{job.attempts}/{job.max_attempts}",
                str(job.payload.get("destination", "")),
                str(job.payload.get("sop_uid", "")),
                job.run_after.strftime("%Y-%m-%d %H:%M:%S") if job.state == "queued" else "",
                job.last_error[:80],
            )
    out.print(table)
    out.print(
        ", ".join(
            f"{name}: {totals.get(name, 0)}" for name in ("queued", "running", "done", "dead", "cancelled")
        )
    )


@jobs_app.command("retry")
def jobs_retry(job_ids: list[int], data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Put dead or cancelled jobs back in the queue."""
    _act(job_ids, "retry", data_dir, config)


@jobs_app.command("cancel")
def jobs_cancel(job_ids: list[int], data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Cancel queued or dead jobs."""
    _act(job_ids, "cancel", data_dir, config)


def _act(job_ids: list[int], verb: str, data_dir: DataDir, config: ConfigFile) -> None:
    from simral.jobs import service as jobs

    ctx = _open(config, data_dir)
    operation = jobs.retry if verb == "retry" else jobs.cancel
    failed = False
    for job_id in job_ids:
        try:
            with ctx.db.unit_of_work() as session:
                operation(session, job_id, principal=cli_principal())
            out.print(f"job {job_id}: {'queued again' if verb == 'retry' else 'cancelled'}")
        except jobs.JobError as exc:
            console.print(f"[red]error:[/red] {exc}")
            failed = True
    if failed:
        raise typer.Exit(1)


@app.command("export")
def export(
    study_uids: list[str],
    output: Annotated[Path, typer.Option("--output", "-o", help="ZIP file to write (IHE PDI layout).")],
    iso: Annotated[
        bool, typer.Option("--iso", help="Write a CD image (ISO 9660, PS3.12 Annex F) instead of a ZIP.")
    ] = False,
    deidentify: Annotated[
        bool,
        typer.Option(
            "--deidentify",
            help="De-identify for teaching or research (PS3.15 Annex E Basic Profile); the "
            "pseudonym map is kept (see `simral deidentified-exports show`).",
        ),
    ] = False,
    retain_dates: Annotated[
        bool, typer.Option("--retain-dates", help="With --deidentify: keep full dates and times (E.3.6).")
    ] = False,
    retain_uids: Annotated[
        bool, typer.Option("--retain-uids", help="With --deidentify: keep the original UIDs (E.3.9).")
    ] = False,
    clean_descriptors: Annotated[
        bool,
        typer.Option(
            "--clean-descriptors",
            help="With --deidentify: keep descriptions and comments, cleaned of identifiers (E.3.5).",
        ),
    ] = False,
    retain_patient_characteristics: Annotated[
        bool,
        typer.Option(
            "--retain-patient-characteristics", help="With --deidentify: keep sex, age, size, weight (E.3.7)."
        ),
    ] = False,
    retain_device_identity: Annotated[
        bool,
        typer.Option("--retain-device-identity", help="With --deidentify: keep device identifiers (E.3.8)."),
    ] = False,
    retain_institution_identity: Annotated[
        bool,
        typer.Option(
            "--retain-institution-identity", help="With --deidentify: keep the institution's identity."
        ),
    ] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Export studies as a ZIP or a CD image with a DICOMDIR (IHE PDI), as the CLI operator (audited)."""
    from simral.sharing import media
    from simral.sharing.deidentify import Deidentifier, DeidentifyOptions

    options = DeidentifyOptions(
        retain_dates=retain_dates,
        retain_uids=retain_uids,
        clean_descriptors=clean_descriptors,
        retain_patient_characteristics=retain_patient_characteristics,
        retain_device_identity=retain_device_identity,
        retain_institution_identity=retain_institution_identity,
    )
    if options.chosen() and not deidentify:
        console.print("[red]error:[/red] the de-identification options need --deidentify")
        raise typer.Exit(2)
    ctx = _open(config, data_dir)
    deidentifier = Deidentifier(options) if deidentify else None
    with reported(media.ExportError):
        result = media.export_pdi(
            ctx, cli_principal(), study_uids, output, deidentifier=deidentifier, image="iso" if iso else "zip"
        )
    out.print(f"{output}: {result.instances} instances of {len(result.studies)} studies")
    if result.deidentified_export is not None:
        out.print(f"de-identified export {result.deidentified_export} (pseudonym map kept)")
    for uid, reason in result.skipped:
        console.print(f"[yellow]not exported:[/yellow] {uid}: {reason}")


deidentified_app = typer.Typer(
    help="De-identified exports and their pseudonym maps (exporter and administrators only).",
    no_args_is_help=True,
)
app.add_typer(deidentified_app, name="deidentified-exports")


@deidentified_app.command("show")
def deidentified_show(export_id: int, data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Print a de-identified export and its pseudonym map as JSON (audited)."""
    import orjson

    from simral.access.policy import AccessDenied
    from simral.sharing import media

    ctx = _open(config, data_dir)
    with reported(media.ExportError, AccessDenied), ctx.db.unit_of_work() as session:
        row = media.get_deidentified_export(session, principal=cli_principal(), export_id=export_id)
        document = media.deidentified_export_document(row)
    sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
