"""``simral compression``: rules for lossless compression at rest, and running them now."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from simral.cli.main import ConfigFile, DataDir, _open, app, cli_principal, out, reported

if TYPE_CHECKING:
    from simral.compression.service import Summary

compression_app = typer.Typer(
    help="Compression at rest: re-encode stored images losslessly (JPEG-LS, JPEG 2000) by rule.",
    no_args_is_help=True,
)
rule_app = typer.Typer(help="Which stored images are compressed, and in which syntax.", no_args_is_help=True)
app.add_typer(compression_app, name="compression")
compression_app.add_typer(rule_app, name="rule")


@rule_app.command("add")
def rule_add(
    syntax: Annotated[
        str, typer.Option("--syntax", help="jpeg-ls (JPEG-LS Lossless) or j2k (JPEG 2000 Lossless).")
    ] = "jpeg-ls",
    older_than_days: Annotated[
        int | None, typer.Option("--older-than-days", help="Only instances stored at least N days ago.")
    ] = None,
    modality: Annotated[
        str, typer.Option("--modality", help="Only series of these modalities, comma-separated (CT,MR).")
    ] = "",
    organisation: Annotated[
        str, typer.Option("--organisation", help="Only studies held by this organisation (its code).")
    ] = "",
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Compress the stored native images matching every given criterion (the first rule added wins)."""
    from simral.access.policy import AccessDenied
    from simral.compression import service as compression

    ctx = _open(config, data_dir)
    with reported(compression.CompressionError, AccessDenied), ctx.db.unit_of_work() as session:
        rule = compression.create_rule(
            session,
            syntax=syntax,
            older_than_days=older_than_days,
            modalities=modality,
            organisation=organisation,
            principal=cli_principal(),
        )
        rule_id = rule.id
    out.print(f"compression rule {rule_id} added ({syntax})")


@rule_app.command("list")
def rule_list(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """List the compression rules, in the order they apply."""
    from simral.compression import service as compression
    from simral.dicom.compression import LOSSLESS_SYNTAXES

    ctx = _open(config, data_dir)
    with ctx.db.reading() as session:
        rows = [
            {
                "id": rule.id,
                "syntax": rule.syntax,
                "transfer_syntax_uid": str(LOSSLESS_SYNTAXES.get(rule.syntax, "")),
                "older_than_days": rule.older_than_days,
                "modalities": rule.modalities.split("\\") if rule.modalities else [],
                "organisation": rule.organisation_code,
                "enabled": rule.enabled,
            }
            for rule in compression.list_rules(session)
        ]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("id", "syntax", "transfer syntax", "older than (days)", "modalities", "organisation")
    for row in rows:
        table.add_row(
            str(row["id"]),
            str(row["syntax"]),
            str(row["transfer_syntax_uid"]),
            "" if row["older_than_days"] is None else str(row["older_than_days"]),
            ",".join(row["modalities"]),  # type: ignore[arg-type]
            str(row["organisation"]),
        )
    out.print(table)


@rule_app.command("remove")
def rule_remove(rule_id: int, data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Remove a rule (instances already compressed stay compressed)."""
    from simral.access.policy import AccessDenied
    from simral.compression import service as compression

    ctx = _open(config, data_dir)
    with reported(compression.CompressionError, AccessDenied), ctx.db.unit_of_work() as session:
        compression.delete_rule(session, rule_id, principal=cli_principal())
    out.print(f"compression rule {rule_id} removed")


@compression_app.command("run")
def run(
    limit: Annotated[int, typer.Option("--limit", help="At most this many instances.")] = 100000,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Compress the instances the rules select now, in this process; print what was done."""
    from simral.compression import service as compression

    ctx = _open(config, data_dir)
    done = compression.run(ctx, limit=limit, batch=max(1, ctx.settings.compression_batch))
    with ctx.db.reading() as session:
        total = compression.summary(session)
    if as_json:
        out.print_json(json.dumps({"run": _summary_json(done), "total": _summary_json(total)}))
        return
    for label, item in (("this run", done), ("in total", total)):
        out.print(
            f"{label}: compressed {item.compressed} instances, {item.bytes_before} → {item.bytes_after} "
            f"bytes (ratio {item.ratio:.2f}); skipped {item.skipped}"
        )
    for reason, count in sorted(done.reasons.items()):
        out.print(f"skipped ({count}): {reason}")


def _summary_json(item: Summary) -> dict[str, object]:
    return {
        "compressed": item.compressed,
        "skipped": item.skipped,
        "bytes_before": item.bytes_before,
        "bytes_after": item.bytes_after,
        "ratio": round(item.ratio, 3),
        "reasons": item.reasons,
    }


@compression_app.command("status")
def status(
    state: Annotated[
        str, typer.Option("--state", help="Only outcomes in this state (compressed, skipped).")
    ] = "",
    limit: Annotated[int, typer.Option("--limit", help="Newest outcomes listed.")] = 50,
    data_dir: DataDir = None,
    config: ConfigFile = None,
) -> None:
    """Totals of compression at rest and the latest outcomes per instance."""
    from simral.compression import service as compression

    ctx = _open(config, data_dir)
    with ctx.db.reading() as session:
        total = compression.summary(session)
        latest = compression.outcomes(session, state=state, limit=limit)
        queued = compression.active_jobs(session)
    out.print(
        f"compressed {total.compressed} instances ({total.bytes_before} → {total.bytes_after} bytes, "
        f"ratio {total.ratio:.2f}); skipped {total.skipped}; jobs queued or running {queued}"
    )
    table = Table("when", "SOP Instance UID", "state", "syntax", "bytes before", "bytes after", "reason")
    for item in latest:
        table.add_row(
            item.at.isoformat(timespec="seconds"),
            item.sop_uid,
            item.state,
            item.target_syntax,
            str(item.size_before),
            "" if item.size_after is None else str(item.size_after),
            item.reason,
        )
    out.print(table)
