"""An identical instance sent again is answered "success, nothing new" (DESIGN.md §3) only when
the archive really holds its bytes.

A cluster node killed between its index commit and the publication of the blob leaves the blob
staged on its own disk (``simral.storage.staging``): the instance is indexed, the sender was not
acknowledged and sends it again, often to another node. Found by ``test_cluster.py``, where a
WADO-RS retrieve of such an acknowledged instance answered 500.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.corpus import ct_series

from simral.access.policy import Principal
from simral.archive import service as archive
from simral.context import AppContext
from simral.storage.staging import Staging

OPERATOR = Principal(kind="system", name="cli:test", archive_wide=True, via="cli")


def _key(ctx: AppContext, path: Path) -> str:
    from pydicom import dcmread

    sop_uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    with ctx.db.reading() as session:
        found = archive.existing_blob(session, sop_uid)
    assert found is not None
    return found[1]


def _read(ctx: AppContext, key: str) -> bytes:
    with archive.open_blob(ctx, key) as stream:
        return bytes(stream.read())


def test_resent_instance_restores_a_blob_its_first_node_never_published(
    ctx: AppContext, tmp_path: Path
) -> None:
    path = ct_series(tmp_path / "ct", slices=1, rows=16, cols=16, patient_id="RESEND1", seed=41)[0]
    assert archive.ingest_file(ctx, path, principal=OPERATOR, source="TEST").outcome == "stored"
    key = _key(ctx, path)
    # What the surviving nodes see: the index holds the instance, the shared store has no bytes.
    archive.blob_store(ctx, key).delete(key)
    assert not archive.blob_exists(ctx, key)

    again = archive.ingest_file(ctx, path, principal=OPERATOR, source="TEST")

    assert (again.outcome, again.status) == ("duplicate", 0x0000)
    assert archive.blob_exists(ctx, key), "acknowledged as stored, so its bytes must be there"
    assert not Staging(ctx.store).staged_path(key).exists()
    assert _read(ctx, key) == path.read_bytes()
    assert archive.ingest_file(ctx, path, principal=OPERATOR, source="TEST").outcome == "duplicate"


def test_losing_a_race_on_identical_bytes_does_not_delete_the_winners_staged_blob(
    ctx: AppContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ingests of the same bytes stage under one name; the one whose commit loses must not
    delete that file before the winner has published it."""
    path = ct_series(tmp_path / "ct", slices=1, rows=16, cols=16, patient_id="RESEND2", seed=42)[0]
    # The winner commits and has not published yet (killed, or simply slower).
    with monkeypatch.context() as patch:
        patch.setattr(Staging, "publish", lambda self, key: None)
        assert archive.ingest_file(ctx, path, principal=OPERATOR, source="TEST").outcome == "stored"
    key = _key(ctx, path)
    assert Staging(ctx.store).staged_path(key).exists()
    # The loser read the index before the winner's commit, so it stages and meets the unique key.
    real = archive.existing_blob
    calls = {"n": 0}

    def before_the_winners_commit(session: object, sop_uid: str) -> tuple[str, str] | None:
        calls["n"] += 1
        return None if calls["n"] == 1 else real(session, sop_uid)  # type: ignore[arg-type]

    monkeypatch.setattr(archive, "existing_blob", before_the_winners_commit)

    loser = archive.ingest_file(ctx, path, principal=OPERATOR, source="TEST")

    assert calls["n"] >= 2, "the loser went through the unique-key fallback"
    assert (loser.outcome, loser.status) == ("duplicate", 0x0000)
    assert archive.blob_exists(ctx, key)
    assert _read(ctx, key) == path.read_bytes()
