"""Build the configured blob store."""

from __future__ import annotations

from simral.config import Settings
from simral.storage.base import BlobStore
from simral.storage.filesystem import FilesystemStore
from simral.storage.s3 import S3Store


def open_store(settings: Settings) -> BlobStore:
    """The blob store the settings name (filesystem under ``data_dir/blobs`` by default)."""
    if settings.storage == "s3":
        store = S3Store(
            endpoint_url=settings.s3_endpoint_url,
            bucket=settings.s3_bucket,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            region=settings.s3_region,
            prefix=settings.s3_prefix,
            scratch=settings.data_dir / "tmp",
        )
        store.ensure_bucket()
        return store
    return FilesystemStore(settings.data_dir / "blobs")
