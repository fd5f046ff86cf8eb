"""``simral retention``: retention policies (CSP R.1112-7), legal holds, reviewed deletion."""

from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from simral.cli.main import ConfigFile, DataDir, _open, app, cli_principal, out, reported

if TYPE_CHECKING:
    from simral.patients.service import AuthorityRef

retention_app = typer.Typer(
    help="Retention of records (CSP R.1112-7), legal holds and reviewed deletion.", no_args_is_help=True
)
hold_app = typer.Typer(help="Legal holds (litigation): held records are never deleted.", no_args_is_help=True)
retention_app.add_typer(hold_app, name="hold")
app.add_typer(retention_app, name="retention")

PatientId = Annotated[str, typer.Option("--patient-id", help="The patient's local identifier (IPP).")]
Issuer = Annotated[str, typer.Option("--issuer", help="Its assigning authority's namespace.")]
IssuerOid = Annotated[str, typer.Option("--issuer-oid", help="Its assigning authority's OID.")]
OrganisationOpt = Annotated[
    str, typer.Option("--organisation", help="The organisation whose IPP it is (instead of an issuer).")
]


def _authority(issuer: str, issuer_oid: str, organisation: str) -> AuthorityRef:
    from simral.patients.service import AuthorityRef

    if not (issuer or issuer_oid or organisation):
        raise typer.BadParameter("name the patient's authority: --issuer, --issuer-oid or --organisation")
    return AuthorityRef(namespace=issuer, oid=issuer_oid, organisation_code=organisation)


def _today(value: str) -> date:
    from simral.db.base import utcnow

    if not value:
        return utcnow().date()
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter("--today must be YYYY-MM-DD") from None


@retention_app.command("policy")
def retention_policy(
    organisation: str,
    years: Annotated[
        int | None, typer.Option("--years", help="Years after the last visit, instead of the law's 20.")
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Go back to the law's 20 years.")] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Set an organisation's retention term (the 28th-birthday and death rules still apply)."""
    from simral.access.policy import AccessDenied
    from simral.lifecycle import service as lifecycle

    if (years is None) != clear:
        raise typer.BadParameter("give --years N or --clear")
    ctx = _open(config, data_dir)
    with reported(lifecycle.LifecycleError, AccessDenied), ctx.db.unit_of_work() as session:
        lifecycle.set_policy(session, organisation=organisation, years=years, principal=cli_principal())
    out.print(
        f"{organisation}: " + (f"{years} years after the last visit" if years else "the law's 20 years")
    )


@retention_app.command("policies")
def retention_policies(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Organisations with their own retention term."""
    from simral.lifecycle import service as lifecycle

    ctx = _open(config, data_dir)
    with ctx.db.reading() as session:
        rows = lifecycle.policies(session)
    table = Table("organisation", "years after the last visit")
    for code, years in sorted(rows.items()):
        table.add_row(code, str(years))
    out.print(table)


@retention_app.command("show")
def retention_show(study_uid: str, data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """A study's retention date, the rule that gave it, and whether a legal hold covers it."""
    from simral.lifecycle import service as lifecycle

    ctx = _open(config, data_dir)
    with ctx.db.reading() as session:
        found = lifecycle.study_retention(session, study_uid)
        held = lifecycle.is_held(session, study_uid)
    if found is None:
        out.print(f"no study {study_uid}")
        raise typer.Exit(1)
    out.print(
        f"last visit {found.last_visit.isoformat()}, kept until {found.until.isoformat()} ({found.rule})"
        + (", legal hold" if held else "")
    )


@retention_app.command("death")
def retention_death(
    patient_id: PatientId,
    death_date: Annotated[str, typer.Option("--date", help="Date of death, YYYYMMDD (empty: undo).")],
    issuer: Issuer = "",
    issuer_oid: IssuerOid = "",
    organisation: OrganisationOpt = "",
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Record a patient's date of death (records are then kept ten years after it, R.1112-7)."""
    from simral.access.policy import AccessDenied
    from simral.lifecycle import service as lifecycle

    authority = _authority(issuer, issuer_oid, organisation)
    ctx = _open(config, data_dir)
    with reported(lifecycle.LifecycleError, AccessDenied), ctx.db.unit_of_work() as session:
        lifecycle.record_death(
            session,
            local_id=patient_id,
            authority=authority,
            death_date=death_date,
            principal=cli_principal(),
        )
    out.print("date of death recorded")


@hold_app.command("add")
def hold_add(
    reason: Annotated[
        str, typer.Option("--reason", help="The litigation (recours gracieux ou contentieux).")
    ],
    study: Annotated[str, typer.Option("--study", help="Hold this study (Study Instance UID).")] = "",
    patient_id: PatientId = "",
    issuer: Issuer = "",
    issuer_oid: IssuerOid = "",
    organisation: OrganisationOpt = "",
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Place a legal hold on a study, or on a patient (every study of the person)."""
    from simral.access.policy import AccessDenied
    from simral.lifecycle import service as lifecycle

    authority = _authority(issuer, issuer_oid, organisation) if patient_id else None
    ctx = _open(config, data_dir)
    with reported(lifecycle.LifecycleError, AccessDenied), ctx.db.unit_of_work() as session:
        hold = lifecycle.add_hold(
            session,
            reason=reason,
            principal=cli_principal(),
            study_uid=study,
            patient_id=patient_id,
            authority=authority,
        )
        hold_id = hold.id
    out.print(f"legal hold {hold_id} placed")


@hold_app.command("remove")
def hold_remove(
    hold_id: int,
    reason: Annotated[str, typer.Option("--reason", help="Why it is lifted (the litigation ended).")],
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Lift a legal hold."""
    from simral.access.policy import AccessDenied
    from simral.lifecycle import service as lifecycle

    ctx = _open(config, data_dir)
    with reported(lifecycle.LifecycleError, AccessDenied), ctx.db.unit_of_work() as session:
        lifecycle.remove_hold(session, hold_id, reason=reason, principal=cli_principal())
    out.print(f"legal hold {hold_id} lifted")


@hold_app.command("list")
def hold_list(
    include_released: Annotated[bool, typer.Option("--all", help="Lifted holds too.")] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Legal holds, newest first."""
    from simral.lifecycle import service as lifecycle

    ctx = _open(config, data_dir)
    with ctx.db.reading() as session:
        rows = lifecycle.list_holds(session, cli_principal(), include_released=include_released)
    table = Table("id", "target", "study / patient", "reason", "by", "since", "lifted")
    for row in rows:
        table.add_row(
            str(row.id),
            row.target,
            row.study_uid or row.patient,
            row.reason,
            row.created_by,
            row.created_at.date().isoformat(),
            row.released_at.date().isoformat() if row.released_at else "",
        )
    out.print(table)


@retention_app.command("review")
def retention_review(
    organisation: Annotated[
        str, typer.Option("--organisation", help="Only the studies this organisation alone holds.")
    ] = "",
    today: Annotated[str, typer.Option("--today", help="Compare with this day (YYYY-MM-DD).")] = "",
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """List the studies past their retention date (not held) into a deletion batch to approve."""
    from simral.access.policy import AccessDenied
    from simral.lifecycle import service as lifecycle

    day = _today(today)
    ctx = _open(config, data_dir)
    with reported(lifecycle.LifecycleError, AccessDenied), ctx.db.unit_of_work() as session:
        batch = lifecycle.review(session, principal=cli_principal(), today=day, organisation=organisation)
        found = (
            (batch.id, len(lifecycle.batch_items(session, batch.id, principal=cli_principal())))
            if batch
            else None
        )
    if found is None:
        out.print("nothing past its retention date")
        return
    out.print(f"deletion batch {found[0]}: {found[1]} items to approve (simral retention approve {found[0]})")


@retention_app.command("approve")
def retention_approve(batch: int, data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Approve a deletion batch: its deletion jobs are queued (run by simral serve, or retention run)."""
    from simral.access.policy import AccessDenied
    from simral.lifecycle import service as lifecycle

    ctx = _open(config, data_dir)
    with reported(lifecycle.LifecycleError, AccessDenied), ctx.db.unit_of_work() as session:
        queued = lifecycle.approve(session, batch, principal=cli_principal())
    out.print(f"deletion batch {batch} approved: {len(queued)} deletion jobs queued")


@retention_app.command("cancel")
def retention_cancel(batch: int, data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Reject a proposed deletion batch (nothing is deleted)."""
    from simral.access.policy import AccessDenied
    from simral.lifecycle import service as lifecycle

    ctx = _open(config, data_dir)
    with reported(lifecycle.LifecycleError, AccessDenied), ctx.db.unit_of_work() as session:
        lifecycle.cancel(session, batch, principal=cli_principal())
    out.print(f"deletion batch {batch} cancelled")


@retention_app.command("batches")
def retention_batches(
    organisation: Annotated[
        str | None, typer.Option("--organisation", help="Only this organisation's.")
    ] = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Deletion batches and their items' states."""
    from simral.lifecycle import service as lifecycle

    ctx = _open(config, data_dir)
    with ctx.db.reading() as session:
        rows = lifecycle.list_batches(session, principal=cli_principal(), organisation=organisation)
    table = Table("id", "organisation", "state", "reviewed on", "by", "approved by", "items")
    for row in rows:
        table.add_row(
            str(row.id),
            row.organisation_code or "(regional)",
            row.state,
            row.reviewed_on,
            row.created_by,
            row.approved_by,
            ", ".join(f"{state} {n}" for state, n in sorted(row.items.items())),
        )
    out.print(table)


@retention_app.command("batch")
def retention_batch(batch: int, data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """The items of a deletion batch."""
    from simral.access.policy import AccessDenied
    from simral.lifecycle import service as lifecycle

    ctx = _open(config, data_dir)
    with reported(lifecycle.LifecycleError, AccessDenied), ctx.db.reading() as session:
        items = lifecycle.batch_items(session, batch, principal=cli_principal())
        rows = [
            (
                str(i.id),
                i.study_uid,
                i.scope,
                str(len(i.sop_uids) or ""),
                i.retention_until,
                i.state,
                i.detail,
            )
            for i in items
        ]
    table = Table("item", "study", "scope", "instances", "kept until", "state", "detail")
    for row in rows:
        table.add_row(*row)
    out.print(table)


@retention_app.command("run")
def retention_run(data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Run the queued deletion jobs now (simral serve runs them too)."""
    from simral.jobs.runner import JobRunner
    from simral.lifecycle import service as lifecycle

    ctx = _open(config, data_dir)
    runner = JobRunner(ctx, {lifecycle.LIFECYCLE_DELETE: lifecycle.run_deletions})
    batches = 0
    while runner.run_once():
        batches += 1
    out.print(f"ran {batches} batches of deletion jobs")
