"""Probes, the Prometheus scrape and the administration's figures page.

- ``GET /healthz``: liveness (the process answers HTTP); no credentials, no database.
- ``GET /readyz``: readiness (:mod:`simral.observability.health`): 200 or 503 with each check in a
  JSON body; no credentials (it says nothing about the archive's content).
- ``GET /metrics``: the Prometheus text exposition format of the counters and
  histograms (:mod:`simral.observability.metrics`) and the figures read at scrape time
  (:mod:`simral.observability.service`). Access: a caller on the loopback interface connecting
  directly (the host's own Prometheus or agent) — not when ``behind_tls_proxy`` is set, nor a
  request carrying ``Forwarded``/``X-Forwarded-For``/``X-Real-IP``, since a reverse proxy on the
  host makes every client look local — or a bearer token (``simral tokens create``) of a regional
  administrator; otherwise 401 (no or bad credentials) or 403 (another principal).
- ``GET /admin/metrics``: the same figures for regional administrators, in French first.

:class:`RequestMetrics` times the DICOMweb and WADO-URI requests (whole response, streamed bodies
included) and counts them by protocol and outcome; its labels come from the route templates,
never from the request's path (which holds UIDs).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Mapping
from datetime import datetime
from html import escape
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from simral.access.policy import AccessDenied, Principal, may_read_metrics
from simral.context import AppContext
from simral.observability import health, metrics
from simral.observability import service as figures_service
from simral.observability.service import Figures, StorageRules
from simral.web.auth import LoginRequired, client_address, request_principal
from simral.web.layout import Language, page, request_language, table, text_rows

PREFIX = "/dicom-web"
#: QIDO-RS search resources (PS3.18 10.6), as route templates.
SEARCH_TEMPLATES = frozenset(
    {
        "/studies",
        "/series",
        "/instances",
        "/studies/{study}/series",
        "/studies/{study}/instances",
        "/studies/{study}/series/{series}/instances",
    }
)
_PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def http_protocol(method: str, template: str) -> tuple[str, str] | None:
    """(kind, protocol) of a request by its route template, or None when it is not measured."""
    if template == "/wado" and method == "GET":
        return "retrieve", "wado-uri"
    if method != "GET" or not template.startswith(PREFIX + "/"):
        return None
    rest = template[len(PREFIX) :]
    if rest in SEARCH_TEMPLATES:
        return "query", "qido"
    if not rest.startswith("/studies/{study}"):
        return None
    last = rest.rsplit("/", 1)[-1]
    if last in ("rendered", "thumbnail"):
        return "retrieve", "rendered"
    if "/frames/" in rest:
        return "retrieve", "frames"
    if "/bulkdata/" in rest:
        return "retrieve", "bulkdata"
    if last == "metadata":
        return "retrieve", "wado-rs-metadata"
    return "retrieve", "wado-rs"


class RequestMetrics:
    """ASGI middleware: time and count the DICOMweb and WADO-URI requests (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def watched_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            template = getattr(scope.get("route"), "path", "")
            measured = http_protocol(scope.get("method", ""), template) if template else None
            if measured is not None:
                kind, protocol = measured
                metrics.record_request(
                    kind, protocol, metrics.http_outcome(status), time.perf_counter() - started
                )


def direct_loopback(request: Request, *, behind_tls_proxy: bool) -> bool:
    """Whether the caller is this host, connecting directly (see the module docstring)."""
    if behind_tls_proxy or any(request.headers.get(h) for h in _PROXY_HEADERS):
        return False
    try:
        address = ipaddress.ip_address(client_address(request))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


class FiguresCollector(Collector):
    """The figures read from the index, as gauges of one scrape."""

    def __init__(self, figures: Figures) -> None:
        self.figures = figures

    def collect(self) -> Any:
        f = self.figures
        jobs = GaugeMetricFamily(
            "simral_jobs", "Jobs queued, running or dead-lettered, by kind.", labels=["kind", "state"]
        )
        retrying = GaugeMetricFamily(
            "simral_jobs_retrying", "Queued jobs that already failed at least once, by kind.", labels=["kind"]
        )
        for job in f.jobs:
            jobs.add_metric([job.kind, job.state], job.count)
            if job.state == "queued":
                retrying.add_metric([job.kind], job.retrying)
        yield jobs
        yield retrying
        yield GaugeMetricFamily(
            "simral_job_queue_depth",
            "Jobs waiting or running, all kinds.",
            value=sum(j.count for j in f.jobs if j.state in ("queued", "running")),
        )
        yield GaugeMetricFamily("simral_jobs_dead", "Dead-lettered jobs, all kinds.", value=f.dead_jobs)
        size = GaugeMetricFamily(
            "simral_storage_bytes",
            "Bytes stored, by tier and producing organisation.",
            labels=["tier", "organisation"],
        )
        count = GaugeMetricFamily(
            "simral_storage_instances",
            "Instances stored, by tier and producing organisation.",
            labels=["tier", "organisation"],
        )
        for use in f.storage:
            size.add_metric([use.tier, use.organisation], use.bytes)
            count.add_metric([use.tier, use.organisation], use.instances)
        yield size
        yield count
        fixity = f.fixity
        yield GaugeMetricFamily("simral_fixity_blobs", "Blobs in the index.", value=fixity.blobs)
        yield GaugeMetricFamily(
            "simral_fixity_verified_blobs",
            "Blobs whose bytes were re-hashed and found right.",
            value=fixity.verified,
        )
        yield GaugeMetricFamily(
            "simral_fixity_mismatches", "Fixity alarms raised (checksum mismatches).", value=fixity.mismatches
        )
        yield GaugeMetricFamily(
            "simral_fixity_unrepaired",
            "Blobs found missing or altered that no intact copy could repair.",
            value=fixity.unrepaired,
        )
        for name, moment, text in (
            ("simral_fixity_last_verified_timestamp_seconds", fixity.last_verified_at, "newest"),
            ("simral_fixity_oldest_verified_timestamp_seconds", fixity.oldest_verified_at, "oldest"),
        ):
            if moment is not None:
                yield GaugeMetricFamily(
                    name, f"Unix time of the {text} blob verification.", value=moment.timestamp()
                )
        yield GaugeMetricFamily(
            "simral_figures_timestamp_seconds",
            "Unix time the figures above were read from the index.",
            value=f.measured_at.timestamp(),
        )


TEXT: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        "title": "Supervision : activité, files, stockage, intégrité",
        "denied": "Réservé aux administrateurs régionaux.",
        "readiness": "État du service",
        "check": "Contrôle",
        "state": "État",
        "ok": "disponible",
        "ko": "indisponible",
        "database": "Base de données",
        "migrations": "Schéma à jour",
        "blob_store": "Stockage des images",
        "shutting_down": "Service non en arrêt",
        "activity": "Activité depuis le démarrage (tous les processus de ce nœud)",
        "flow": "Flux",
        "protocol": "Protocole",
        "count": "Nombre",
        "failures": "Échecs",
        "mean": "Durée moyenne",
        "p95": "95 % en moins de",
        "ingest": "Réception",
        "retrieve": "Récupération",
        "query": "Recherche",
        "hl7": "Messages HL7",
        "none": "Aucune activité depuis le démarrage.",
        "jobs": "File des tâches",
        "kind": "Type",
        "queued": "en attente",
        "running": "en cours",
        "dead": "en échec définitif",
        "retrying": "dont relancées",
        "no_jobs": "Aucune tâche en attente, en cours ou en échec.",
        "storage": "Stockage par niveau et par structure productrice",
        "tier": "Niveau",
        "organisation": "Structure",
        "instances": "Instances",
        "size": "Volume",
        "fixity": "Intégrité des fichiers (fixité)",
        "blobs": "Fichiers indexés",
        "verified": "Fichiers vérifiés",
        "last_verified": "Dernière vérification (UTC)",
        "oldest_verified": "Plus ancienne vérification (UTC)",
        "mismatches": "Alertes d'intégrité",
        "never": "jamais",
        "measured": "Chiffres lus dans l'index à {at} UTC ; données brutes pour Prometheus : /metrics.",
        "tier_rules": "Règles de hiérarchisation du stockage",
        "compression_rules": "Règles de compression sans perte",
        "rule": "N°",
        "criteria": "Critères",
        "target": "Destination",
        "syntax": "Syntaxe de transfert",
        "older_than": "plus de {days} jours",
        "modality": "modalité {value}",
        "of_organisation": "structure {value}",
        "everything": "toutes les études",
        "enabled": "Active",
        "yes": "oui",
        "no": "non",
        "no_rules": "Aucune règle (simral tiers rule add, simral compression rule add).",
        "compressed": "Compression : {count} instances, {before} → {after} (gain ×{ratio}) ; "
        "{skipped} laissées telles quelles.",
    },
    "en": {
        "title": "Monitoring: activity, queues, storage, integrity",
        "denied": "Regional administrators only.",
        "readiness": "Service state",
        "check": "Check",
        "state": "State",
        "ok": "available",
        "ko": "unavailable",
        "database": "Database",
        "migrations": "Schema up to date",
        "blob_store": "Image store",
        "shutting_down": "Not shutting down",
        "activity": "Activity since start (all processes of this node)",
        "flow": "Flow",
        "protocol": "Protocol",
        "count": "Count",
        "failures": "Failures",
        "mean": "Mean duration",
        "p95": "95 % under",
        "ingest": "Ingest",
        "retrieve": "Retrieve",
        "query": "Query",
        "hl7": "HL7 messages",
        "none": "No activity since start.",
        "jobs": "Job queue",
        "kind": "Kind",
        "queued": "queued",
        "running": "running",
        "dead": "dead",
        "retrying": "of which retried",
        "no_jobs": "No job queued, running or dead.",
        "storage": "Storage by tier and producing organisation",
        "tier": "Tier",
        "organisation": "Organisation",
        "instances": "Instances",
        "size": "Size",
        "fixity": "File integrity (fixity)",
        "blobs": "Indexed files",
        "verified": "Verified files",
        "last_verified": "Last verification (UTC)",
        "oldest_verified": "Oldest verification (UTC)",
        "mismatches": "Integrity alarms",
        "never": "never",
        "measured": "Figures read from the index at {at} UTC; raw data for Prometheus: /metrics.",
        "tier_rules": "Storage tier rules",
        "compression_rules": "Lossless compression rules",
        "rule": "No.",
        "criteria": "Criteria",
        "target": "Target",
        "syntax": "Transfer syntax",
        "older_than": "older than {days} days",
        "modality": "modality {value}",
        "of_organisation": "organisation {value}",
        "everything": "every study",
        "enabled": "Enabled",
        "yes": "yes",
        "no": "no",
        "no_rules": "No rule (simral tiers rule add, simral compression rule add).",
        "compressed": "Compression: {count} instances, {before} → {after} (×{ratio} smaller); "
        "{skipped} left as they were.",
    },
}


def _number(value: float, language: Language) -> str:
    text = f"{value:,.0f}"
    return text.replace(",", "\u202f") if language == "fr" else text


def _size(value: int, language: Language) -> str:
    units = ("o", "Ko", "Mo", "Go", "To") if language == "fr" else ("B", "KB", "MB", "GB", "TB")
    amount = float(value)
    for unit in units:
        if amount < 1000 or unit == units[-1]:
            text = f"{amount:.0f} {unit}" if unit == units[0] else f"{amount:.1f} {unit}"
            return text.replace(".", ",") if language == "fr" else text
        amount /= 1000
    return str(value)


def _seconds(value: float | None, language: Language) -> str:
    if value is None:
        return "—"
    text = f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"
    return text.replace(".", ",") if language == "fr" else text


def _moment(value: datetime | None, text: Mapping[str, str]) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else text["never"]


def _check_label(name: str, text: Mapping[str, str]) -> str:
    """A readiness check's label; ``blob_store_NAME`` is the store of tier NAME."""
    if name.startswith("blob_store_"):
        return f"{text['blob_store']} ({name.removeprefix('blob_store_')})"
    return text.get(name, name)


def _figures_page(
    request: Request,
    figures: Figures,
    activity: list[metrics.Activity],
    checks: list[health.Check],
    rules: StorageRules,
) -> str:
    language = request_language(request)
    text = TEXT[language]
    body = f"<h2>{escape(text['readiness'])}</h2>" + table(
        [text["check"], text["state"]],
        text_rows([[_check_label(c.name, text), text["ok"] if c.ok else text["ko"]] for c in checks]),
    )
    body += f"<h2>{escape(text['activity'])}</h2>"
    if activity:
        body += table(
            [text["flow"], text["protocol"], text["count"], text["failures"], text["mean"], text["p95"]],
            text_rows(
                [
                    [
                        text[a.flow],
                        a.name,
                        _number(a.count, language),
                        _number(a.failures, language),
                        _seconds(a.mean_seconds, language),
                        _seconds(a.quantile_bound(0.95), language),
                    ]
                    for a in activity
                ]
            ),
        )
    else:
        body += f"<p>{escape(text['none'])}</p>"
    body += f"<h2>{escape(text['jobs'])}</h2>"
    if figures.jobs:
        body += table(
            [text["kind"], text["state"], text["count"], text["retrying"]],
            text_rows(
                [
                    [
                        j.kind,
                        text.get(j.state, j.state),
                        _number(j.count, language),
                        _number(j.retrying, language),
                    ]
                    for j in figures.jobs
                ]
            ),
        )
    else:
        body += f"<p>{escape(text['no_jobs'])}</p>"
    body += f"<h2>{escape(text['storage'])}</h2>" + table(
        [text["tier"], text["organisation"], text["instances"], text["size"]],
        text_rows(
            [
                [u.tier, u.organisation, _number(u.instances, language), _size(u.bytes, language)]
                for u in figures.storage
            ]
        ),
    )
    fixity = figures.fixity
    body += f"<h2>{escape(text['fixity'])}</h2>" + table(
        [text["blobs"], text["verified"], text["last_verified"], text["oldest_verified"], text["mismatches"]],
        text_rows(
            [
                [
                    _number(fixity.blobs, language),
                    _number(fixity.verified, language),
                    _moment(fixity.last_verified_at, text),
                    _moment(fixity.oldest_verified_at, text),
                    _number(fixity.mismatches, language),
                ]
            ]
        ),
    )
    body += _rules_section(rules, language)
    measured = figures.measured_at.strftime("%Y-%m-%d %H:%M:%S")
    body += f'<p class="hint">{escape(text["measured"].format(at=measured))}</p>'
    return body


def _criteria(text: Mapping[str, str], *, days: int | None, modalities: str, organisation: str) -> str:
    parts = [text["older_than"].format(days=days)] if days else []
    parts += [text["modality"].format(value=modalities)] if modalities else []
    parts += [text["of_organisation"].format(value=organisation)] if organisation else []
    return ", ".join(parts) or text["everything"]


def _rules_section(rules: StorageRules, language: Language) -> str:
    text = TEXT[language]
    tables = (
        (
            "tier_rules",
            "target",
            [
                (r.id, r.older_than_days, r.modality, r.organisation_code, r.target_store, r.enabled)
                for r in rules.tier_rules
            ],
        ),
        (
            "compression_rules",
            "syntax",
            [
                (r.id, r.older_than_days, r.modalities, r.organisation_code, r.syntax, r.enabled)
                for r in rules.compression_rules
            ],
        ),
    )
    body = ""
    for heading, outcome, described in tables:
        rows = [
            [
                str(rule_id),
                _criteria(text, days=days, modalities=modalities, organisation=organisation),
                result,
                text["yes"] if enabled else text["no"],
            ]
            for rule_id, days, modalities, organisation, result, enabled in described
        ]
        body += f"<h2>{escape(text[heading])}</h2>" + (
            table([text["rule"], text["criteria"], text[outcome], text["enabled"]], text_rows(rows))
            if rows
            else f"<p>{escape(text['no_rules'])}</p>"
        )
    done = rules.compressed
    if done.compressed or done.skipped:
        ratio = f"{done.ratio:.2f}"
        line = text["compressed"].format(
            count=_number(done.compressed, language),
            before=_size(done.bytes_before, language),
            after=_size(done.bytes_after, language),
            ratio=ratio.replace(".", ",") if language == "fr" else ratio,
            skipped=_number(done.skipped, language),
        )
        body += f"<p>{escape(line)}</p>"
    return body


def mount_observability(web: FastAPI, ctx: AppContext) -> None:
    """Add ``/healthz``, ``/readyz``, ``/metrics``, ``/admin/metrics`` and the request timing."""
    web.add_middleware(RequestMetrics)

    @web.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @web.get("/readyz")
    def readyz() -> Response:
        """Readiness: database, schema, blob store, not stopping (200, or 503 naming what fails)."""
        checks = health.readiness(ctx)
        ready = all(c.ok for c in checks)
        body = {
            "status": "ready" if ready else "unavailable",
            "checks": {c.name: {"ok": c.ok, **({"detail": c.detail} if c.detail else {})} for c in checks},
        }
        return JSONResponse(body, status_code=200 if ready else 503, headers={"Cache-Control": "no-store"})

    @web.get("/metrics", include_in_schema=False)
    def scrape(request: Request) -> Response:
        """The Prometheus exposition (see the module docstring for who may read it)."""
        if direct_loopback(request, behind_tls_proxy=ctx.settings.behind_tls_proxy):
            principal = Principal(
                kind="system", name="metrics-scraper", address=client_address(request), via="loopback"
            )
        else:
            try:
                principal = request_principal(request)
            except LoginRequired:
                return JSONResponse(
                    {"detail": "authentication required"},
                    status_code=401,
                    headers={"WWW-Authenticate": 'Bearer realm="simral"'},
                )
        try:
            figures = figures_service.current(ctx, principal=principal)
        except AccessDenied:
            return JSONResponse({"detail": "regional administrators only"}, status_code=403)
        registry = metrics.scrape_registry(FiguresCollector(figures))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @web.get("/admin/metrics", response_class=HTMLResponse)
    def figures_page(request: Request) -> HTMLResponse:
        """The administration's monitoring page (regional administrators)."""
        principal = request_principal(request)
        text = TEXT[request_language(request)]
        if not may_read_metrics(principal):
            body = f'<p class="error" role="alert">{escape(text["denied"])}</p>'
            return page(request, text["title"], body, principal=principal, status=403)
        figures = figures_service.current(ctx, principal=principal)
        activity = metrics.activity(metrics.scrape_registry())
        with ctx.db.reading() as session:
            rules = figures_service.storage_rules(session, principal=principal)
        body = _figures_page(request, figures, activity, health.readiness(ctx), rules)
        return page(request, text["title"], body, principal=principal)
