"""Index ↔ blob store consistency (DESIGN.md §3: orphans swept by ``simral check``).

With several stores (storage tiers) each indexed blob is checked in the store ``blob.store`` names;
a key found in a store while the index puts it in another is a superseded copy (a moved blob's
source waiting for its purge job): listed, deleted by ``--repair``, not a problem. The replica
store is left to the replication jobs and the fixity sweep (:mod:`simral.preservation`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from simral.archive.models import Blob
from simral.archive.service import recover_staged
from simral.context import AppContext
from simral.dmp import received as received_reports
from simral.reading import documents as request_documents
from simral.storage.base import BlobStore, sha256_of_stream
from simral.storage.filesystem import FilesystemStore


@dataclass
class CheckReport:
    """Problems found; empty lists mean the archive is consistent."""

    checked: int = 0
    missing: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    temporaries: list[str] = field(default_factory=list)
    #: ``store:key`` of copies whose blob the index puts in another store.
    superseded: list[str] = field(default_factory=list)
    repaired: int = 0

    @property
    def clean(self) -> bool:
        return not (self.missing or self.orphans or self.mismatches or self.temporaries)


def check(
    ctx: AppContext,
    *,
    repair: bool = False,
    verify_hashes: bool = True,
    progress: Callable[[], None] | None = None,
) -> CheckReport:
    """Compare every indexed blob with the store (presence, size, SHA-256) and list orphans.

    ``repair`` deletes orphan blobs and leftover temporary files; it never touches indexed data.
    """
    report = CheckReport()
    if repair:
        # Finish interrupted ingests first: indexed staged blobs are published, the rest dropped.
        published, deleted = recover_staged(ctx)
        report.repaired += published + deleted
    indexed: dict[str, str] = {}

    def verify(key: str, size: int, sha256: str, store_name: str) -> None:
        indexed[key] = store_name
        report.checked += 1
        if progress is not None:
            progress()
        try:
            with ctx.store_named(store_name).open(key) as stream:
                if verify_hashes:
                    actual_sha, actual_size = sha256_of_stream(stream)
                    if actual_sha != sha256 or actual_size != size:
                        report.mismatches.append(key)
        except FileNotFoundError:
            report.missing.append(key)
        except Exception as exc:
            if "NoSuchKey" in type(exc).__name__ or "NoSuchKey" in str(exc) or "404" in str(exc):
                report.missing.append(key)
            else:
                raise

    with ctx.db.reading() as session:
        for key, size, sha256, store_name in session.execute(
            select(Blob.key, Blob.size, Blob.sha256, Blob.store)
        ):
            verify(key, size, sha256, store_name)
        # Documents attached to imaging requests live in the default store (``documents/…``).
        for key, size, sha256 in request_documents.indexed_blobs(session):
            verify(key, size, sha256, ctx.store.name)
        # Reports received from a RIS for the DMP, as received (``documents/dmp/…``).
        for key, size, sha256 in received_reports.indexed_blobs(session):
            verify(key, size, sha256, ctx.store.name)
    stores = list(ctx.stores.values()) if ctx.stores else [ctx.store]
    unindexed: list[tuple[BlobStore, str]] = []
    for store in stores:
        if store.name == ctx.settings.replica_store:
            continue
        for key in store.iter_keys():
            if key.startswith(".scratch/") or indexed.get(key) == store.name:
                continue
            unindexed.append((store, key))
            if key in indexed:
                report.superseded.append(f"{store.name}:{key}")
            else:
                report.orphans.append(key if store is ctx.store else f"{store.name}:{key}")
    if not isinstance(ctx.store, FilesystemStore):
        report.temporaries = [str(p) for p in ctx.store.scratch_dir().iterdir() if p.is_file()]
    for store in stores:
        if isinstance(store, FilesystemStore):
            report.temporaries += [str(p) for p in store.leftover_temporaries()]
    if repair:
        for store, key in unindexed:
            store.delete(key)
            report.repaired += 1
        for name in report.temporaries:
            Path(name).unlink(missing_ok=True)
            report.repaired += 1
        report.orphans, report.temporaries, report.superseded = [], [], []
    return report
