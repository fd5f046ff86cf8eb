"""Importing files, folders, DICOMDIRs and ZIP archives through the common ingest path.

DICOMDIR: PS3.10 §8 / PS3.3 F.3 (referenced files are resolved relative to the DICOMDIR);
ZIP members are extracted one at a time to the store's scratch folder (never whole in memory).
"""

from __future__ import annotations

import contextlib
import functools
import lzma
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread

from simral.access.policy import Principal
from simral.archive.reconciliation import Reconciler, reconciled_file
from simral.archive.service import IngestResult, ingest_file
from simral.context import AppContext

MAX_ZIP_MEMBER = 4 * 1024**3


@dataclass
class ImportSummary:
    """Counts by outcome and the rejection reasons (by source name, no PHI)."""

    outcomes: Counter[str] = field(default_factory=Counter)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    #: Files stored under the receiving organisation's patient identifier (reconciliation), and
    #: files a reconciliation was asked for but which no receiving identifier was found for.
    reconciled: int = 0
    not_reconciled: int = 0

    def add(self, name: str, result: IngestResult) -> None:
        self.outcomes[result.outcome] += 1
        if result.outcome == "rejected":
            self.rejected.append((name, result.reason))

    def reject(self, name: str, reason: str) -> None:
        self.outcomes["rejected"] += 1
        self.rejected.append((name, reason))


@dataclass(frozen=True)
class Source:
    """One candidate file: a display name and a function yielding a local path for it; or, with
    ``error``, an entry that could not be read (a broken ZIP or DICOMDIR), counted as rejected."""

    name: str
    open_path: Callable[[], contextlib.AbstractContextManager[Path]]
    error: str = ""


#: What reading a damaged ZIP (APPNOTE.TXT) raises besides OSError: bad structure or CRC, a
#: compression method or encryption :mod:`zipfile` does not support, a truncated or corrupt stream,
#: a member name that does not decode.
ZIP_ERRORS = (
    OSError,
    ValueError,  # UnicodeDecodeError: a name flagged UTF-8 (APPNOTE 4.4.4 bit 11) that is not
    EOFError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    NotImplementedError,
    RuntimeError,
    zlib.error,
    lzma.LZMAError,
)


class UnreadableEntry(Exception):
    """A ZIP member that cannot be extracted (its reason is safe to show: no PHI)."""


def _unreadable(name: str, reason: str) -> Source:
    return Source(name, functools.partial(_as_is, Path(name)), error=reason)


@contextlib.contextmanager
def _as_is(path: Path) -> Iterator[Path]:
    yield path


def _referenced_file_ids(dicomdir: Dataset) -> Iterator[list[str]]:
    """The Referenced File IDs of a DICOMDIR's records, as path components (PS3.3 F.3.2.2).

    A component must be a PS3.10 §8.5 file ID component (upper-case letters, digits, underscore;
    lower case tolerated as media often differ in case): no ``..``, separators or other characters
    that would name a file outside the media. Records naming such files are left out.
    """
    for record in dicomdir.get("DirectoryRecordSequence", []):
        ref = record.get("ReferencedFileID")
        if ref:
            parts = [ref] if isinstance(ref, str) else [str(part) for part in ref]
            if all(_FILE_ID_COMPONENT.fullmatch(part) for part in parts):
                yield parts


_FILE_ID_COMPONENT = re.compile(r"[A-Za-z0-9_]{1,16}")


def _dicomdir_files(dicomdir: Path) -> list[Path]:
    root = dicomdir.parent
    files = []
    for parts in _referenced_file_ids(dcmread(dicomdir)):
        candidate = root.joinpath(*parts)
        if not candidate.exists():
            # Media often differ in case from the DICOMDIR (ISO 9660 upper case).
            lowered = (
                {p.name.lower(): p for p in candidate.parent.glob("*")} if candidate.parent.exists() else {}
            )
            candidate = lowered.get(candidate.name.lower(), candidate)
        files.append(candidate)
    return files


def _zip_dicomdir_members(archive: Path, members: list[zipfile.ZipInfo], scratch: Path) -> set[str] | None:
    """Upper-cased names of the members the ZIP's DICOMDIRs reference; None without a DICOMDIR.

    A ZIP of media (IHE PDI: DICOMDIR at the root, README.TXT, INDEX.HTM, a viewer...) is imported
    through its DICOMDIR, like the media folder itself: the companion files are not candidates.
    """
    referenced: set[str] | None = None
    for member in members:
        name = member.filename
        if name.upper().rsplit("/", 1)[-1] != "DICOMDIR" or member.file_size > MAX_ZIP_MEMBER:
            continue
        fd, temp = tempfile.mkstemp(prefix=".tmp-dicomdir-", dir=scratch)
        try:
            # The descriptor is owned by ``out`` first, so a member that cannot be opened does not leak it.
            with os.fdopen(fd, "wb") as out, zipfile.ZipFile(archive) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, out)
            ds = dcmread(temp)
        except Exception:
            continue
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        prefix = name[: -len("DICOMDIR")]
        referenced = referenced or set()
        referenced.update((prefix + "/".join(parts)).upper() for parts in _referenced_file_ids(ds))
    return referenced


def _is_zip(path: Path) -> bool:
    """Whether ``path`` ends as a ZIP does (an end of central directory record, APPNOTE.TXT 4.3.16).

    ``zipfile.is_zipfile`` lets :class:`zipfile.BadZipFile` out for a Zip64 end of central directory
    locator naming several disks (APPNOTE 4.3.15); such a file is a ZIP, an unreadable one, which
    :func:`_zip_sources` reports as such."""
    try:
        return zipfile.is_zipfile(path)
    except ZIP_ERRORS:
        return True


def _zip_sources(archive: Path, scratch: Path) -> Iterator[Source]:
    try:
        with zipfile.ZipFile(archive) as zf:
            # A member without a name is nothing to import (and ``ZipInfo.is_dir`` fails on it).
            members = [m for m in zf.infolist() if m.filename and not m.is_dir()]
    except ZIP_ERRORS as exc:
        yield _unreadable(str(archive), f"unreadable ZIP: {type(exc).__name__}: {exc}")
        return
    referenced = _zip_dicomdir_members(archive, members, scratch)
    for member in members:
        if member.file_size > MAX_ZIP_MEMBER or member.filename.upper().endswith("DICOMDIR"):
            continue
        if referenced is not None and member.filename.upper() not in referenced:
            continue

        @contextlib.contextmanager
        def extract(member: zipfile.ZipInfo = member) -> Iterator[Path]:
            fd, name = tempfile.mkstemp(prefix=".tmp-import-", suffix=".dcm", dir=scratch)
            try:
                try:
                    with os.fdopen(fd, "wb") as out, zipfile.ZipFile(archive) as zf, zf.open(member) as src:
                        shutil.copyfileobj(src, out, 1024 * 1024)
                except ZIP_ERRORS as exc:
                    raise UnreadableEntry(f"{type(exc).__name__}: {exc}") from None
                yield Path(name)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)

        yield Source(f"{archive.name}:{member.filename}", extract)


def iter_sources(paths: Iterable[Path], scratch: Path) -> Iterator[Source]:
    """Every candidate file under ``paths`` (folders walked, DICOMDIRs and ZIPs expanded)."""
    seen: set[Path] = set()
    for path in paths:
        if path.is_dir():
            dicomdir_refs: set[Path] = set()
            for dirpath, _dirs, files in os.walk(path):
                for filename in sorted(files):
                    if filename.upper() == "DICOMDIR":
                        with contextlib.suppress(Exception):
                            dicomdir_refs.update(
                                p.resolve() for p in _dicomdir_files(Path(dirpath, filename))
                            )
            for dirpath, dirs, files in os.walk(path):
                dirs.sort()
                for filename in sorted(files):
                    file = Path(dirpath, filename).resolve()
                    if filename.upper() == "DICOMDIR" or file in seen:
                        continue
                    seen.add(file)
                    if _is_zip(file) and file not in dicomdir_refs:
                        yield from _zip_sources(file, scratch)
                    else:
                        yield Source(str(file), functools.partial(_as_is, file))
        elif path.name.upper() == "DICOMDIR":
            try:
                referenced = _dicomdir_files(path)
            except Exception as exc:  # pydicom raises many kinds on a damaged DICOMDIR
                yield _unreadable(str(path), f"unreadable DICOMDIR: {type(exc).__name__}")
                continue
            for ref in referenced:
                if ref.resolve() not in seen:
                    seen.add(ref.resolve())
                    yield Source(str(ref), functools.partial(_as_is, ref))
        elif _is_zip(path):
            yield from _zip_sources(path, scratch)
        else:
            yield Source(str(path), functools.partial(_as_is, path))


def import_paths(
    ctx: AppContext,
    paths: Iterable[Path],
    *,
    principal: Principal,
    progress: Callable[[str], None] | None = None,
    reconciler: Reconciler | None = None,
) -> ImportSummary:
    """Ingest every file found under ``paths``; unreadable entries are counted as rejected.

    With a ``reconciler`` (media from another site, IHE IRWF.b), each instance is stored under the
    receiving organisation's patient identifier, the media's kept in Other Patient IDs Sequence.
    """
    summary = ImportSummary()
    scratch = ctx.store.scratch_dir()
    for source in iter_sources(paths, scratch):
        if source.error:
            summary.reject(source.name, source.error)
            continue
        try:
            with source.open_path() as local:
                if not local.is_file():
                    summary.reject(source.name, "file not found")
                elif reconciler is None:
                    summary.add(
                        source.name,
                        ingest_file(ctx, local, principal=principal, source="import", entry="import"),
                    )
                else:
                    with reconciled_file(local, reconciler, scratch) as (path, reconciled):
                        result = ingest_file(
                            ctx,
                            path,
                            principal=principal,
                            source="import-reconciled" if reconciled else "import",
                            entry="import",
                        )
                    summary.add(source.name, result)
                    if result.outcome != "rejected":
                        if reconciled:
                            summary.reconciled += 1
                        else:
                            summary.not_reconciled += 1
        except (OSError, UnreadableEntry) as exc:
            summary.reject(source.name, f"unreadable: {exc}")
        if progress is not None:
            progress(source.name)
    return summary
