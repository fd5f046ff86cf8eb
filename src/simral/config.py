"""Settings: built-in embedded defaults, then a TOML file, then ``SIMRAL_*`` variables, then CLI flags.

Every setting has a flat name (``dicom_port``); in TOML it may sit in a table (``[dicom] port``
maps to ``dicom_port``); in the environment it is ``SIMRAL_`` + the upper-cased name
(``SIMRAL_DICOM_PORT``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

DuplicatePolicy = Literal["keep-first", "replace", "reject"]


@dataclass
class Settings:
    """All of simral's configuration, with the embedded defaults."""

    data_dir: Path = field(default_factory=lambda: Path("./simral-data"))
    #: SQLAlchemy URL; empty means SQLite at ``data_dir/index.sqlite``.
    database_url: str = ""
    #: ``filesystem`` (under ``data_dir/blobs``) or ``s3``.
    storage: Literal["filesystem", "s3"] = "filesystem"
    s3_endpoint_url: str = ""
    s3_bucket: str = "simral"
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_region: str = "us-east-1"
    s3_prefix: str = ""
    # --- storage tiers, replication and fixity (simral.preservation) ---
    #: More named blob stores, from TOML tables ``[stores.NAME]`` (``SIMRAL_STORES``: the same as
    #: JSON): ``kind`` = ``filesystem`` (``root``, default ``data_dir/stores/NAME``) or ``s3``
    #: (``endpoint_url``, ``bucket``, ``access_key``, ``secret_key``, ``region``, ``prefix``), and
    #: ``tier`` (the label recorded in ``blob.tier``, default NAME). The store built from ``storage``
    #: and ``s3_*`` above is named ``hot`` unless ``[stores.hot]`` is given.
    stores: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Name of the store every blob is copied to (asynchronously, verified); "" = no replica.
    replica_store: str = ""
    #: Every blob is re-hashed at least this often by the background sweep; 0 = no sweep.
    fixity_interval_hours: float = 168.0
    #: Blobs re-hashed per look of the sweep (a look every 30 s while some are due).
    fixity_batch: int = 200
    #: Minutes between two evaluations of the tier rules in a serving process; 0 = only
    #: ``simral tiers run``.
    tier_check_minutes: float = 60.0
    #: Seconds a moved blob's source copy is kept after the switch (readers that took its
    #: filesystem path finish first).
    tier_purge_delay_seconds: float = 300.0

    ae_title: str = "SIMRAL"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = 11112
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    #: The URL clients reach the HTTP service at (behind a reverse proxy); empty: taken from each
    #: request's Host header. Retrieve URLs and bulk-data URIs are built on it.
    public_url: str = ""
    #: Accept associations from AE titles not in the node registry (for a lab only).
    allow_unknown_ae: bool = False
    #: Maximum PDU length offered and accepted (PS3.8 §9.3.1).
    max_pdu: int = 131072
    #: Seconds without traffic before an association is aborted (ARTIM / idle).
    network_timeout: float = 60.0
    duplicate_policy: DuplicatePolicy = "keep-first"
    #: When a C-MOVE/C-GET peer did not accept the stored transfer syntax, transcode (True) or fail.
    transcode_on_retrieve: bool = True
    log_level: str = "INFO"
    #: ``text`` or ``json`` (one JSON object per line: time, level, logger, message, worker).
    log_format: Literal["text", "json"] = "text"
    #: Seconds each process reuses the figures read from the index for ``/metrics`` (job queue,
    #: storage, fixity); 0 = read them at every scrape.
    metrics_cache_seconds: float = 15.0
    #: Worker processes of ``simral serve`` sharing the DICOM and HTTP ports; 0 = one per CPU (≤ 4).
    workers: int = 1
    # --- patient identity (DESIGN.md §6) and the HL7 v2 ADT feed (IHE PAM France over MLLP) ---
    #: MLLP listener port for HL7 v2.5 ADT messages (2575 is customary); 0 = off.
    hl7_port: int = 0
    #: Address the MLLP listener binds to (MSH-3/MSH-4 are claimed, not proven: keep it private).
    hl7_host: str = "127.0.0.1"
    #: Accept ADT and PDQ messages from senders that are neither a registered HL7 source
    #: (``simral hl7-sources add``) nor a registered RIS (for a lab only).
    allow_unknown_hl7_senders: bool = False
    #: MLLP over TLS with ``tls_cert_file`` / ``tls_key_file`` (client certificates as for DICOM TLS).
    hl7_tls: bool = False
    #: Accept the INS test and demonstration OIDs (1.2.250.1.213.1.4.10 / .11): test platforms only.
    ins_test_oids_allowed: bool = False
    # --- OpenID Connect login (Pro Santé Connect or another provider) ---
    #: Issuer URL; empty = no OpenID Connect login (local accounts only).
    oidc_issuer: str = ""
    oidc_client_id: str = ""
    oidc_client_secret: str = ""
    #: ``psc`` (Pro Santé Connect: scope ``openid scope_all``, acr ``eidas1``, ``SubjectNameID``) or
    #: ``generic``.
    oidc_preset: str = "psc"
    #: Where the provider sends the browser back; empty = ``public_url`` (or the request's origin)
    #: + ``/login/oidc/callback``.
    oidc_redirect_uri: str = ""
    #: Override the preset's discovery path (PSC: ``/.well-known/wallet-openid-configuration``).
    oidc_discovery_path: str = ""
    #: Override the preset's required acr values (space-separated).
    oidc_acr_values: str = ""
    #: Claim holding the national id for the generic preset.
    oidc_national_id_claim: str = "preferred_username"
    # --- exposure ---
    #: A TLS-terminating reverse proxy is in front: plain HTTP may bind a non-loopback address.
    behind_tls_proxy: bool = False
    # --- audit export (IHE ATNA: PS3.15 A.5 messages over RFC 5424 syslog on TLS, RFC 5425) ---
    #: The syslog collector (host name checked against its certificate); "" = no export.
    audit_syslog_host: str = ""
    audit_syslog_port: int = 6514
    #: PEM CA bundle verifying the collector ("" = the system CAs).
    audit_syslog_ca_file: str = ""
    #: Client certificate and key presented to the collector ("" = none).
    audit_syslog_cert_file: str = ""
    audit_syslog_key_file: str = ""
    #: Seconds between two looks for records to send.
    audit_syslog_interval: float = 2.0
    #: The prebuilt OHIF viewer (``dist/`` of npm ``@ohif/app``) served under ``/viewer``; ``make install``
    #: puts it in the virtualenv.
    viewer_dir: Path = field(default_factory=lambda: Path(sys.prefix) / "share/simral/ohif")
    # --- TLS (PS3.15 B.1, RFC 8446) ---
    #: PEM certificate (with its chain) and private key of this platform: the DICOM TLS listener,
    #: HTTPS, and the client certificate on associations to TLS nodes. "" = unset.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: PEM CA bundle verifying DICOM TLS client certificates and remote TLS nodes ("" = system CAs
    #: for remote nodes, no client certificate asked for).
    tls_ca_file: str = ""
    #: DICOM TLS listener port (IANA: 2762); 0 = no TLS listener.
    dicom_tls_port: int = 0
    #: Refuse TLS associations whose requestor presents no certificate signed by ``tls_ca_file``.
    dicom_tls_require_client_cert: bool = False
    #: Serve HTTP over TLS with ``tls_cert_file`` / ``tls_key_file``.
    https: bool = False
    #: ``Strict-Transport-Security`` max-age in seconds, sent when ``https`` is on (RFC 6797).
    hsts_max_age: int = 31536000
    # --- reading tasks (DESIGN.md §7, IHE SWF) ---
    #: A study without an MPPS COMPLETED is taken as complete (its task ready) once no instance
    #: arrived for this many seconds.
    reading_quiet_seconds: float = 120.0
    #: A task whose deadline is this close (or passed) is escalated: alert and audit for its group.
    reading_escalate_minutes: int = 30
    #: Seconds between two looks for arrived studies, ready tasks and deadlines.
    reading_check_seconds: float = 2.0
    # --- staging sweep (DESIGN.md §3; :mod:`simral.storage.staging`) ---
    #: Seconds between two sweeps of the staging folder; each publishes the indexed blobs the store
    #: could not take at ingest (a store outage) once they are this old.
    staging_sweep_seconds: float = 5.0
    #: Staged copies the index does not know (an ingest that failed or died) are deleted once
    #: untouched for this many seconds (longer than any ingest takes between staging and commit).
    staging_orphan_seconds: float = 30.0
    # --- jobs ---
    #: Seconds a claimed job stays reserved to the node that claimed it; a node that dies leaves its
    #: jobs to the others once this passes (DESIGN.md §5). Longer than the slowest job.
    job_lease_seconds: float = 300.0
    # --- DMP publication (DESIGN.md §8; IHE XDS.b ITI-41 / ITI-57, DMP TD0.2) ---
    #: The DMP's web services (production or the DMP test platform: only these URLs change);
    #: "" for ITI-41 = publication off (documents stay pending with a reason).
    dmp_iti41_url: str = ""
    dmp_iti57_url: str = ""
    dmp_td02_url: str = ""
    #: PEM CA bundle verifying the DMP's server certificate ("" = the system CAs).
    dmp_ca_file: str = ""
    #: Seconds to wait for the DMP's answer; no answer is retried later.
    dmp_timeout: float = 30.0
    #: The LPS (logiciel de professionnel de santé) as the VIHF names it: name, version and the
    #: homologation number the DMP gave.
    dmp_lps_name: str = "simral"
    dmp_lps_version: str = "0.1.0"
    dmp_lps_id: str = ""
    #: VIHF ``LPS_ID``: this installation of the software ("" = ``dmp_lps_name`` + ``-`` + the
    #: publishing organisation's code).
    dmp_lps_instance_id: str = ""
    #: OID of this installation as the sender device of HL7 v3 messages (TD0.2: message and query ids,
    #: ``sender/device/id``); "" = the publishing organisation's OID (its patient-id authority, else a
    #: UUID-derived OID of its code, as the SubmissionSet's sourceId).
    dmp_sender_oid: str = ""
    #: The WADO-RS root put in the KOS Retrieve URLs (what DRIM-M consumers call); "" = ``public_url``
    #: + ``/dicom-web``.
    dmp_retrieve_url: str = ""
    #: Seconds between two looks for documents waiting for a qualified INS that may now go.
    dmp_check_seconds: float = 30.0
    # --- DRIM-M source (DESIGN.md §8: WADO-RS for DRIM-M consumers, RFC 7662 introspection) ---
    #: Pro Santé Connect's token introspection endpoint (RFC 7662); "" = no DRIM-M consumer access.
    drimm_introspection_url: str = ""
    #: This platform's client id and secret at PSC (HTTP Basic client authentication, RFC 7662 §2.1).
    drimm_client_id: str = ""
    drimm_client_secret: str = ""
    #: PEM CA bundle verifying the introspection endpoint ("" = the system CAs).
    drimm_ca_file: str = ""
    #: Seconds an active introspection answer is reused (never beyond the token's ``exp``).
    drimm_cache_seconds: float = 60.0
    #: Largest document (request letter, prior report: PDF) attached to an imaging request, in bytes,
    #: from the RIS (HL7 OBX ED) or the portal form; larger ones are refused.
    request_document_max_bytes: int = 20 * 1024 * 1024
    # --- compression at rest (issue 9; rules: ``simral compression rule add``) ---
    #: Seconds between two looks for instances the compression rules want re-encoded (losslessly,
    #: verified); 0 = no background pass (``simral compression run`` only).
    compression_check_seconds: float = 300.0
    #: Instances queued per background pass (the next batch is queued once this one is done).
    compression_batch: int = 100

    @property
    def effective_database_url(self) -> str:
        """The database URL, defaulting to the embedded SQLite file."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'index.sqlite').resolve()}"


_NESTED_ALIASES = {"database_url": ("database", "url")}
#: Settings whose TOML table is kept whole (a mapping) rather than flattened into names.
_MAPPING_SETTINGS = ("stores",)


def _coerce(name: str, value: Any) -> Any:
    hint = get_type_hints(Settings)[name]
    if name in _MAPPING_SETTINGS:
        mapping = json.loads(value) if isinstance(value, str) else value
        if not isinstance(mapping, dict) or not all(isinstance(v, dict) for v in mapping.values()):
            raise ValueError(f"setting {name}: expected a table of tables, got {value!r}")
        return {str(k): dict(v) for k, v in mapping.items()}
    if hint is Path:
        return Path(value).expanduser()
    if hint is bool:
        if isinstance(value, str):
            if value.lower() in {"1", "true", "yes", "on"}:
                return True
            if value.lower() in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(f"setting {name}: not a boolean: {value!r}")
        return bool(value)
    if hint is int:
        return int(value)
    if hint is float:
        return float(value)
    return str(value)


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}".replace("-", "_")
        if isinstance(value, dict):
            flat.update(_flatten(value, prefix=f"{name}_"))
        else:
            flat[name] = value
    return flat


def load_settings(
    config_file: Path | None = None,
    *,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Build the settings from defaults, an optional TOML file, the environment and overrides."""
    environ = dict(os.environ if environ is None else environ)
    known = {f.name for f in dataclasses.fields(Settings)}
    values: dict[str, Any] = {}
    config_file = config_file or (Path(environ["SIMRAL_CONFIG"]) if environ.get("SIMRAL_CONFIG") else None)
    if config_file is not None:
        with open(config_file, "rb") as fh:
            document = tomllib.load(fh)
        for name in _MAPPING_SETTINGS:
            if name in document:
                values[name] = document.pop(name)
        for name, value in _flatten(document).items():
            if name not in known:
                raise ValueError(f"{config_file}: unknown setting {name!r}")
            values[name] = value
    for name in known:
        env_name = f"SIMRAL_{name.upper()}"
        if env_name in environ:
            values[name] = environ[env_name]
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    return Settings(**{name: _coerce(name, value) for name, value in values.items()})
