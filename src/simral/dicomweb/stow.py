"""STOW-RS (PS3.18 §10.5): stream the request parts to files, ingest each, build the response.

Each part goes through :func:`simral.archive.service.ingest_file`, the same path as C-STORE; the
response lists every instance in ReferencedSOPSequence (stored, with WarningReason when the
archive kept something other than what was sent) or FailedSOPSequence (with FailureReason).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from simral.access.policy import Principal
from simral.archive.service import IngestItem, IngestResult, ingest_files
from simral.context import AppContext
from simral.dicomweb.multipart import ReceivedPart

#: PS3.18 Table 10.5.3-2 / PS3.4 B.2.3 failure and warning reasons used here.
PROCESSING_FAILURE = 0x0110
MEDIA_TYPE_REFUSED = 0x0122  # SOP class (here: part media type) not supported
OUT_OF_RESOURCES = 0xA700  # the archive could not write the part (PS3.4 B.2.3)


@dataclass
class StowOutcome:
    """The per-instance results of one STOW-RS request."""

    dicomweb_root: str
    referenced: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    warnings: int = 0
    study_uids: set[str] = field(default_factory=set)

    def add(self, result: IngestResult) -> None:
        item: dict[str, Any] = {}
        if result.sop_class_uid:
            item["00081150"] = {"vr": "UI", "Value": [result.sop_class_uid]}
        if result.sop_uid:
            item["00081155"] = {"vr": "UI", "Value": [result.sop_uid]}
        if not result.ok:
            item["00081197"] = {"vr": "US", "Value": [result.status]}
            self.failed.append(item)
            return
        self.study_uids.add(result.study_uid)
        item["00081190"] = {
            "vr": "UR",
            "Value": [f"{self.dicomweb_root}/studies/{result.study_uid}/instances/{result.sop_uid}"],
        }
        if result.status != 0:
            item["00081196"] = {"vr": "US", "Value": [result.status]}
            self.warnings += 1
        self.referenced.append(item)

    def fail(self, status: int) -> None:
        """A failure that names no instance (e.g. the body broke off)."""
        self.failed.append({"00081197": {"vr": "US", "Value": [status]}})

    @property
    def http_status(self) -> int:
        """200 all stored, 202 some failed or warnings, 409 none stored (PS3.18 Table 10.5.3-1)."""
        if not self.referenced:
            return 409
        return 202 if self.failed or self.warnings else 200

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if len(self.study_uids) == 1:
            out["00081190"] = {
                "vr": "UR",
                "Value": [f"{self.dicomweb_root}/studies/{next(iter(self.study_uids))}"],
            }
        if self.failed:
            out["00081198"] = {"vr": "SQ", "Value": self.failed}
        if self.referenced:
            out["00081199"] = {"vr": "SQ", "Value": self.referenced}
        return out


def store_parts(
    ctx: AppContext, parts: list[ReceivedPart], *, principal: Principal, study_uid: str | None, source: str
) -> list[IngestResult]:
    """Ingest received parts as one batch (their files are moved into the store, or removed).

    The batch shares one staging fsync and one index transaction: the response acknowledges the
    whole request at its end anyway (PS3.18 10.5.3).
    """
    try:
        results: list[IngestResult | None] = [None] * len(parts)
        items: list[IngestItem] = []
        positions: list[int] = []
        for index, part in enumerate(parts):
            media_type = part.content_type.split(";")[0].strip().lower()
            if media_type not in {"application/dicom", ""}:
                results[index] = IngestResult(
                    "rejected", MEDIA_TYPE_REFUSED, reason=f"part of type {media_type}"
                )
                continue
            items.append(
                IngestItem(part.path, study_uid or "", known_digest=(part.digest.hexdigest(), part.size))
            )
            positions.append(index)
        for index, result in zip(
            positions,
            ingest_files(ctx, items, principal=principal, source=source, move=True, entry="stow"),
            strict=True,
        ):
            results[index] = result
        return [r for r in results if r is not None]
    finally:
        for part in parts:
            part.path.unlink(missing_ok=True)
