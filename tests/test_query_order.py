"""Result order of study queries (C-FIND and QIDO-RS share ``archive.query``): a StudyDate range
is paged in StudyDate order, the order its index gives without reading the whole range (bench:
index_scale_bench.py); other queries in the order studies were indexed. Both are deterministic,
so limit/offset pages never overlap."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from tests.corpus import ct_series

from simral.access.policy import Principal
from simral.archive import query
from simral.archive import service as archive
from simral.context import AppContext

OPERATOR = Principal(kind="system", name="cli:test", archive_wide=True, via="cli")


def _store(ctx: AppContext, folder: Path, study_date: str, seed: int) -> str:
    paths = ct_series(folder, slices=1, rows=8, cols=8, patient_id=f"ORD{seed}", seed=seed)
    for path in paths:
        ds = dcmread(path)
        ds.StudyDate = ds.SeriesDate = study_date
        ds.save_as(path, enforce_file_format=True)
        assert archive.ingest_file(ctx, path, principal=OPERATOR, source="TEST").outcome == "stored"
    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def _uids(ctx: AppContext, study_date: str = "", *, limit: int | None = None, offset: int = 0) -> list[str]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    identifier.StudyDate = study_date
    with ctx.db.reading() as session:
        plan = query.plan(identifier)
        return [
            r.study.study_uid
            for r in query.run(session, plan, principal=OPERATOR, limit=limit, offset=offset)
            if r.study is not None
        ]


def test_a_date_range_is_paged_in_study_date_order(ctx: AppContext, tmp_path: Path) -> None:
    # Indexed in this order: March, January, February (ties: two studies on one day).
    march = _store(ctx, tmp_path / "a", "20240310", 1)
    january = _store(ctx, tmp_path / "b", "20240115", 2)
    february = _store(ctx, tmp_path / "c", "20240220", 3)
    february_too = _store(ctx, tmp_path / "d", "20240220", 4)
    outside = _store(ctx, tmp_path / "e", "20230101", 5)

    assert _uids(ctx) == [march, january, february, february_too, outside]  # no range: as indexed
    in_range = _uids(ctx, "20240101-20241231")
    assert in_range == [january, february, february_too, march]
    assert [
        u for offset in range(4) for u in _uids(ctx, "20240101-20241231", limit=1, offset=offset)
    ] == in_range
    assert _uids(ctx, "20240101-20241231", limit=2, offset=1) == [february, february_too]
