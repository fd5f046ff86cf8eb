"""S3-compatible blob store (any server speaking the S3 API; tested against SeaweedFS).

Each write is a single PUT carrying ``Content-MD5`` (the server rejects a corrupted upload), or a
multipart upload above ``multipart_threshold``; the SHA-256 is computed while reading and kept in
the index and in the object's metadata. An object is visible only once its upload completed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from simral.storage.base import CHUNK, StoredBlob, StoreUnavailable

MULTIPART_THRESHOLD = 64 * 1024 * 1024


#: After a failure to reach the store, calls fail at once for this many seconds instead of each
#: waiting for its own connection retries (a C-STORE publish or a C-GET sub-operation per instance).
UNREACHABLE_HOLD = 3.0


class S3Store:
    """Blobs as objects in one bucket, under an optional key prefix."""

    def __init__(
        self,
        *,
        endpoint_url: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        prefix: str = "",
        scratch: Path,
        name: str = "s3",
    ) -> None:
        self.name = name
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url or None,
            aws_access_key_id=access_key or None,
            aws_secret_access_key=secret_key or None,
            region_name=region,
            config=Config(
                retries={"max_attempts": 3, "mode": "standard"},
                s3={"addressing_style": "path"},
                max_pool_connections=32,
                connect_timeout=5,
                read_timeout=60,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        self._scratch = scratch
        self._scratch.mkdir(parents=True, exist_ok=True)
        self._unreachable_until = 0.0
        self._transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, use_threads=False)

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        """Turn connection failures and 5xx answers into :class:`StoreUnavailable` (other client
        errors, 404 or 403, pass through); fail fast for :data:`UNREACHABLE_HOLD` after one."""
        if time.monotonic() < self._unreachable_until:
            raise StoreUnavailable(f"the {self.name} store was unreachable a moment ago")
        try:
            yield
        except ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if status >= 500:
                self._unreachable_until = time.monotonic() + UNREACHABLE_HOLD
                raise StoreUnavailable(f"the {self.name} store answered HTTP {status}") from exc
            raise
        except BotoCoreError as exc:
            self._unreachable_until = time.monotonic() + UNREACHABLE_HOLD
            raise StoreUnavailable(f"the {self.name} store is unreachable: {type(exc).__name__}") from exc

    def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist yet."""
        existing = {b["Name"] for b in self.client.list_buckets().get("Buckets", [])}
        if self.bucket not in existing:
            self.client.create_bucket(Bucket=self.bucket)

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid blob key {key!r}")
        return self.prefix + key

    def scratch_dir(self) -> Path:
        return self._scratch

    def put_file(self, key: str, source: Path, *, move: bool = False) -> StoredBlob:
        size = source.stat().st_size
        sha = hashlib.sha256()
        md5 = hashlib.md5(usedforsecurity=False)
        with open(source, "rb") as fh:
            while chunk := fh.read(CHUNK):
                sha.update(chunk)
                md5.update(chunk)
        digest = sha.hexdigest()
        with open(source, "rb") as fh, self._reachable():
            if size < MULTIPART_THRESHOLD:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    Body=fh,
                    ContentLength=size,
                    ContentMD5=base64.b64encode(md5.digest()).decode(),
                    Metadata={"sha256": digest},
                )
            else:
                self.client.upload_fileobj(
                    fh,
                    self.bucket,
                    self._key(key),
                    ExtraArgs={"Metadata": {"sha256": digest}},
                    Config=self._transfer,
                )
        if move:
            source.unlink(missing_ok=True)
        return StoredBlob(key=key, size=size, sha256=digest)

    def put_stream(self, key: str, stream: BinaryIO) -> StoredBlob:
        # Spool to scratch so the checksum is known before the PUT (and memory stays bounded).
        import tempfile

        with tempfile.NamedTemporaryFile(dir=self._scratch, prefix=".tmp-", delete=True) as tmp:
            while chunk := stream.read(CHUNK):
                tmp.write(chunk)
            tmp.flush()
            return self.put_file(key, Path(tmp.name))

    def open(self, key: str) -> BinaryIO:
        """The object's body; an absent key raises FileNotFoundError, as on a filesystem store."""
        try:
            with self._reachable():
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                raise FileNotFoundError(f"no object {key!r} in the {self.name} store") from exc
            raise
        return cast(BinaryIO, response["Body"])

    def local_path(self, key: str) -> Path | None:
        return None

    def delete(self, key: str) -> None:
        with self._reachable():
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def exists(self, key: str) -> bool:
        try:
            with self._reachable():
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise
        return True

    def iter_keys(self) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for item in page.get("Contents", []):
                yield item["Key"][len(self.prefix) :]
