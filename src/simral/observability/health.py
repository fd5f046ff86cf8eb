"""Liveness and readiness of a ``simral serve`` process (the ``/healthz`` and ``/readyz`` probes).

Readiness (can this process take traffic now?) is four cheap checks:

- ``database``: a trivial query (``SELECT 1``) on a pooled connection;
- ``migrations``: the schema's Alembic revisions are the code's heads (a node running newer code
  than the database must not serve; read once per check from ``alembic_version``);
- ``blob_store``: the store answers — the filesystem store's folder and scratch folder exist and
  are writable (no I/O on the blobs), the S3 bucket answers a HEAD request;
- ``shutting_down``: the process has not been asked to stop (a load balancer drains it first).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import select

from simral.context import AppContext
from simral.db.migrate import alembic_config
from simral.storage.base import BlobStore
from simral.storage.filesystem import FilesystemStore
from simral.storage.s3 import S3Store

_STOPPING = "observability-stopping"
_HEADS = "observability-migration-heads"


@dataclass(frozen=True)
class Check:
    """One readiness check: its name, whether it passed, and why not."""

    name: str
    ok: bool
    detail: str = ""


def mark_stopping(ctx: AppContext) -> None:
    """Say this process is shutting down: readiness fails from now on."""
    _stopping(ctx).set()


def _stopping(ctx: AppContext) -> threading.Event:
    event: threading.Event = ctx.caches.setdefault(_STOPPING, threading.Event())
    return event


def _code_heads(ctx: AppContext) -> frozenset[str]:
    heads: frozenset[str] | None = ctx.caches.get(_HEADS)
    if heads is None:
        script = ScriptDirectory.from_config(alembic_config(ctx.db.engine))
        heads = ctx.caches[_HEADS] = frozenset(script.get_heads())
    return heads


def store_reachable(store: BlobStore) -> str:
    """Empty when ``store`` answers; otherwise why not (no blob is read or written)."""
    try:
        if isinstance(store, FilesystemStore):
            for folder in (store.root, store.scratch_dir()):
                if not folder.is_dir():
                    return f"folder {folder.name!r} of the store is missing"
                if not os.access(folder, os.W_OK | os.X_OK):
                    return f"folder {folder.name!r} of the store is not writable"
            return ""
        if isinstance(store, S3Store):
            store.client.head_bucket(Bucket=store.bucket)
            return ""
        scratch = store.scratch_dir()
        return "" if scratch.is_dir() else "the store's scratch folder is missing"
    except Exception as exc:  # any transport error means "not reachable"
        return f"{type(exc).__name__}"


def readiness(ctx: AppContext) -> list[Check]:
    """Run the readiness checks (see the module docstring)."""
    checks: list[Check] = []
    try:
        with ctx.db.reading() as session:
            session.execute(select(1))
            connection = session.connection()
            current = frozenset(MigrationContext.configure(connection).get_current_heads())
        checks.append(Check("database", True))
        heads = _code_heads(ctx)
        checks.append(
            Check(
                "migrations",
                current == heads,
                "" if current == heads else "the schema is not at the code's revision",
            )
        )
    except Exception as exc:
        checks.append(Check("database", False, type(exc).__name__))
        checks.append(Check("migrations", False, "database unreachable"))
    for store in list(ctx.stores.values()) if ctx.stores else [ctx.store]:
        problem = store_reachable(store)
        name = "blob_store" if store is ctx.store else f"blob_store_{store.name}"
        checks.append(Check(name, not problem, problem))
    stopping = _stopping(ctx).is_set()
    checks.append(Check("shutting_down", not stopping, "the process is stopping" if stopping else ""))
    return checks
