"""``simral tiers`` and ``simral fixity``: storage tier rules and moves, the fixity sweep
(:mod:`simral.preservation`)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from simral.cli.main import ConfigFile, DataDir, _open, app, cli_principal, out, reported
from simral.context import AppContext

tiers_app = typer.Typer(
    help="Storage tiers: rules moving blobs between stores, verified moves.", no_args_is_help=True
)
rule_app = typer.Typer(help="Tier rules.", no_args_is_help=True)
fixity_app = typer.Typer(
    help="Fixity: re-hash blobs, alarm on mismatch, repair from the replica.", no_args_is_help=True
)
tiers_app.add_typer(rule_app, name="rule")
app.add_typer(tiers_app, name="tiers")
app.add_typer(fixity_app, name="fixity")


def _run_moves(ctx: AppContext) -> int:
    """Run the due tier-move jobs in this process; how many batches ran."""
    from simral.jobs.runner import JobRunner
    from simral.preservation import tiers

    runner = JobRunner(ctx, {tiers.TIER_MOVE: tiers.move_blobs, tiers.TIER_PURGE: tiers.purge_sources})
    batches = 0
    while runner.run_once():
        batches += 1
    return batches


@rule_app.command("add")
def rule_add(
    to: Annotated[str, typer.Option("--to", help="Name of the store the blobs go to (e.g. cold).")],
    older_than_days: Annotated[
        int, typer.Option("--older-than-days", help="Blobs received more than this many days ago.")
    ],
    modality: Annotated[str, typer.Option(help="Only series of this modality (e.g. CT).")] = "",
    organisation: Annotated[str, typer.Option(help="Only studies this organisation holds.")] = "",
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Add a tier rule (the rule with the largest age wins when several match)."""
    from simral.access.policy import AccessDenied
    from simral.preservation import tiers

    ctx = _open(config, data_dir)
    with reported(tiers.TierError, AccessDenied), ctx.db.unit_of_work() as session:
        rule = tiers.add_rule(
            session,
            target_store=to,
            older_than_days=older_than_days,
            modality=modality,
            organisation=organisation,
            known_stores=ctx.stores,
            replica_store=ctx.settings.replica_store,
            principal=cli_principal(),
        )
        rule_id = rule.id
    out.print(f"tier rule {rule_id} added: older than {older_than_days} days → {to}")


@rule_app.command("list")
def rule_list(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """List the tier rules."""
    from simral.preservation import tiers

    ctx = _open(config, data_dir)
    table = Table("id", "to", "older than (days)", "modality", "organisation", "enabled")
    with ctx.db.reading() as session:
        for rule in tiers.list_rules(session):
            table.add_row(
                str(rule.id),
                rule.target_store,
                str(rule.older_than_days),
                rule.modality,
                rule.organisation_code,
                "yes" if rule.enabled else "no",
            )
    out.print(table)


@rule_app.command("remove")
def rule_remove(rule_id: int, data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Remove a tier rule (blobs already moved stay where they are)."""
    from simral.access.policy import AccessDenied
    from simral.preservation import tiers

    ctx = _open(config, data_dir)
    with reported(tiers.TierError, AccessDenied), ctx.db.unit_of_work() as session:
        tiers.remove_rule(session, rule_id, principal=cli_principal())
    out.print(f"tier rule {rule_id} removed")


@tiers_app.command("run")
def tiers_run(
    wait: Annotated[
        bool, typer.Option(help="Run the moves in this process (else the serving process's runner does).")
    ] = True,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Evaluate the tier rules now and queue (and by default run) the moves they call for."""
    from simral.preservation import tiers

    ctx = _open(config, data_dir)
    with ctx.db.unit_of_work() as session:
        plan = tiers.plan_moves(session, known_stores=ctx.stores, replica_store=ctx.settings.replica_store)
    out.print(f"queued {plan.blobs} blobs in {plan.jobs} move jobs")
    if wait and plan.jobs:
        _run_moves(ctx)
        _print_stores(ctx)


@tiers_app.command("move")
def tiers_move(
    study_uid: str,
    to: Annotated[str, typer.Option("--to", help="Name of the store the study's blobs go to.")],
    wait: Annotated[bool, typer.Option(help="Run the moves in this process.")] = True,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Move one study's blobs to a store now, whatever the rules say."""
    from simral.preservation import tiers

    ctx = _open(config, data_dir)
    if to not in ctx.stores or to == ctx.settings.replica_store:
        out.print(f"[red]error:[/red] no tier store named {to!r}")
        raise typer.Exit(1)
    with ctx.db.unit_of_work() as session:
        blob_ids = tiers.study_blob_ids(session, study_uid)
        blobs, _ = tiers.enqueue_move(session, study_uid=study_uid, blob_ids=blob_ids, target=to)
    if not blob_ids:
        out.print(f"[red]error:[/red] no study {study_uid}")
        raise typer.Exit(1)
    out.print(f"queued {blobs} blobs")
    if wait:
        _run_moves(ctx)
        _print_stores(ctx)


def _print_stores(ctx: AppContext) -> None:
    from simral.preservation import fixity, replication, tiers

    table = Table("store", "tier", "blobs", "bytes")
    with ctx.db.reading() as session:
        for store, tier, count, size in tiers.store_counts(session):
            table.add_row(store, tier, str(count), str(size))
        counts = fixity.fixity_counts(session)
        replica = (
            replication.replica_counts(session, ctx.settings.replica_store)
            if ctx.settings.replica_store
            else None
        )
    out.print(table)
    if replica is not None:
        out.print(
            f"replica {ctx.settings.replica_store}: {replica.replicated} of {replica.blobs} blobs copied"
        )
    out.print(
        f"fixity: {counts.verified} blobs verified, {counts.alarms} alarms "
        f"({counts.repaired} repaired, {counts.unrepaired} unrepaired)"
    )


@tiers_app.command("status")
def tiers_status(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Blobs per store and tier, replication progress, fixity counters."""
    _print_stores(_open(config, data_dir))


@fixity_app.command("run")
def fixity_run(
    limit: Annotated[int, typer.Option(help="Blobs to verify, oldest-verified first.")] = 1000,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Re-hash blobs and their replica copies now (oldest-verified first), repair each from the
    other; exit 1 if one is unrepaired."""
    from simral.preservation import fixity

    ctx = _open(config, data_dir)
    report = fixity.sweep(ctx, limit=limit)
    out.print(f"verified {report.checked} blobs: {report.intact} intact")
    if report.replicas_checked:
        out.print(f"verified {report.replicas_checked} replica copies: {report.replicas_intact} intact")
    for alarm in report.alarms:
        out.print(f"{alarm.problem}: {alarm.store}:{alarm.key} → {alarm.outcome}")
    if report.unrepaired:
        out.print(f"[red]{report.unrepaired} blob(s) could not be repaired[/red]")
        raise typer.Exit(1)
