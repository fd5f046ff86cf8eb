"""Build the configured blob stores.

The store built from ``storage`` and ``s3_*`` is the default one, named :data:`DEFAULT_STORE`
(``hot``): ingest writes there. ``[stores.NAME]`` tables add named stores (tiers such as ``cold``,
or the ``replica_store``); ``[stores.hot]`` replaces the default one. ``blob.store`` names the store
holding each blob and reads go there (:func:`simral.archive.service.open_blob`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simral.config import Settings
from simral.storage.base import BlobStore
from simral.storage.filesystem import FilesystemStore
from simral.storage.s3 import S3Store

#: Name of the store ingest writes to.
DEFAULT_STORE = "hot"
STORE_KINDS = ("filesystem", "s3")


class StoreConfigError(ValueError):
    """A ``[stores.NAME]`` table that does not describe a usable store."""


def _s3(name: str, settings: Settings, options: dict[str, Any]) -> S3Store:
    store = S3Store(
        endpoint_url=str(options.get("endpoint_url", "")),
        bucket=str(options.get("bucket", "simral")),
        access_key=str(options.get("access_key", "")),
        secret_key=str(options.get("secret_key", "")),
        region=str(options.get("region", "us-east-1")),
        prefix=str(options.get("prefix", "")),
        scratch=settings.data_dir / "tmp",
        name=name,
    )
    store.ensure_bucket()
    return store


def _named(name: str, settings: Settings, options: dict[str, Any]) -> BlobStore:
    kind = str(options.get("kind", "filesystem"))
    if kind not in STORE_KINDS:
        raise StoreConfigError(f"[stores.{name}] kind {kind!r}: one of {', '.join(STORE_KINDS)}")
    if len(name) > 32 or not name.replace("-", "").replace("_", "").isalnum():
        raise StoreConfigError(f"store name {name!r}: letters, digits, '-' and '_', at most 32")
    if kind == "s3":
        return _s3(name, settings, options)
    root = Path(str(options.get("root", ""))).expanduser() if options.get("root") else None
    return FilesystemStore(root or settings.data_dir / "stores" / name, name=name)


def open_stores(settings: Settings) -> dict[str, BlobStore]:
    """Every configured store by name; :data:`DEFAULT_STORE` is always there."""
    stores = {name: _named(name, settings, options) for name, options in settings.stores.items()}
    if DEFAULT_STORE not in stores:
        if settings.storage == "s3":
            stores[DEFAULT_STORE] = _s3(
                DEFAULT_STORE,
                settings,
                {
                    "endpoint_url": settings.s3_endpoint_url,
                    "bucket": settings.s3_bucket,
                    "access_key": settings.s3_access_key,
                    "secret_key": settings.s3_secret_key,
                    "region": settings.s3_region,
                    "prefix": settings.s3_prefix,
                },
            )
        else:
            stores[DEFAULT_STORE] = FilesystemStore(settings.data_dir / "blobs", name=DEFAULT_STORE)
    _check_disjoint(stores)
    if settings.replica_store:
        if settings.replica_store not in stores:
            raise StoreConfigError(f"replica_store {settings.replica_store!r} is not a configured store")
        if settings.replica_store == DEFAULT_STORE:
            raise StoreConfigError("the replica store must be another store than the default one")
    return stores


def _check_disjoint(stores: dict[str, BlobStore]) -> None:
    """Refuse two stores sharing keys (same bucket with nested prefixes, nested folders): the
    consistency check would take one's blobs for the other's orphans."""
    places: list[tuple[str, str, str]] = []
    for name, store in stores.items():
        if isinstance(store, S3Store):
            endpoint = str(store.client.meta.endpoint_url)
            places.append((name, f"s3:{endpoint}/{store.bucket}", store.prefix))
        elif isinstance(store, FilesystemStore):
            places.append((name, "fs", store.root.as_posix().rstrip("/") + "/"))
    for index, (name, where, prefix) in enumerate(places):
        for other, other_where, other_prefix in places[index + 1 :]:
            if where == other_where and (prefix.startswith(other_prefix) or other_prefix.startswith(prefix)):
                raise StoreConfigError(
                    f"stores {name!r} and {other!r} overlap: give each its own bucket or prefix"
                )


def open_store(settings: Settings) -> BlobStore:
    """The default store (ingest writes there)."""
    return open_stores(settings)[DEFAULT_STORE]


def tier_of(settings: Settings, store: str) -> str:
    """The tier label of a store (``blob.tier``): its ``tier`` option, else its name."""
    return str(settings.stores.get(store, {}).get("tier", store))[:16]
