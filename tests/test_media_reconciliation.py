"""Import of another site's media under the receiving site's patient (issue 7 item 4; IHE RAD
Import Reconciliation Workflow, IRWF.b).

CLINB burns a CD (a folder with a DICOMDIR written by pydicom's FileSet) of its study, under its
IPP with its issuer and the patient's INS (ANS test identity). CHA imports it with
``simral import DICOMDIR --organisation CHA --reconcile``: the instances are stored under CHA's IPP
for the same INS (issuer and qualifiers of CHA, names from CHA's identity), CLINB's identifier is
kept in Other Patient IDs Sequence next to the INS, the pixel data is unchanged, and the study is
linked to CHA's identity. A CD with no issuer and no INS is reconciled only to an identifier the
operator names (``--patient-id``); without one, it is imported as it is and counted so.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet
from sqlalchemy import select
from tests.corpus import ct_series, set_test_ins
from tests.simral_proc import SIMRAL, SimralProcess

from simral.app import open_app
from simral.archive.models import Instance, Series, Study
from simral.archive.service import open_blob
from simral.config import load_settings
from simral.context import AppContext
from simral.patients import service as patients

OID_CHA = "1.2.250.1.999.1.1"
OID_CLINB = "1.2.250.1.999.2.1"
NIR = "279035121518989"  # ANS test NIR


@dataclass
class Sites:
    simral: SimralProcess
    base: Path

    def ctx(self) -> AppContext:
        return open_app(
            load_settings(
                environ={"SIMRAL_DATA_DIR": str(self.simral.data_dir), "SIMRAL_INS_TEST_OIDS_ALLOWED": "true"}
            )
        )


def _patient(paths: list[Path], *, name: str, issuer: tuple[str, str] | None, ins: bool) -> None:
    for path in paths:
        ds = dcmread(path)
        ds.PatientName = name
        ds.PatientBirthDate = "19790328"
        ds.PatientSex = "F"
        if issuer is not None:
            ds.IssuerOfPatientID = issuer[0]
            qualifier = Dataset()
            qualifier.UniversalEntityID = issuer[1]
            qualifier.UniversalEntityIDType = "ISO"
            ds.IssuerOfPatientIDQualifiersSequence = [qualifier]
        if ins:
            set_test_ins(ds, NIR)
        ds.save_as(path)


def _burn(files: list[Path], media: Path) -> Path:
    """A CD image folder: the files in a PS3.10 layout with their DICOMDIR (pydicom FileSet)."""
    fileset = FileSet()
    for path in files:
        fileset.add(path)
    fileset.write(media)
    return media / "DICOMDIR"


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    base = tmp_path_factory.mktemp("reconcile")
    simral = SimralProcess(base / "data", extra_env={"SIMRAL_INS_TEST_OIDS_ALLOWED": "true"})
    simral.cli("organisations", "add", "CHA", "--name", "CH A", "--patient-id-oid", OID_CHA)
    simral.cli(
        "organisations",
        "add",
        "CLINB",
        "--name",
        "Cabinet B",
        "--kind",
        "practice",
        "--patient-id-oid",
        OID_CLINB,
    )
    # CHA knows the patient as IPP-A1 (with her INS) from a study of its own.
    own = ct_series(base / "own", slices=1, rows=32, cols=32, patient_id="IPP-A1", seed=91)
    _patient(own, name="MARTIN^DOMI", issuer=None, ins=True)
    simral.cli("import", str(base / "own"), "--organisation", "CHA")
    yield Sites(simral, base)


def _stored(sites: Sites, study_uid: str) -> list[Dataset]:
    ctx = sites.ctx()
    try:
        with ctx.db.reading() as session:
            keys = list(
                session.scalars(
                    select(Instance.sop_uid)
                    .join(Series, Series.id == Instance.series_pk)
                    .join(Study, Study.id == Series.study_pk)
                    .where(Study.study_uid == study_uid)
                )
            )
            from simral.archive.models import Blob

            blob_keys = list(
                session.scalars(
                    select(Blob.key)
                    .join(Instance, Instance.id == Blob.instance_pk)
                    .where(Instance.sop_uid.in_(keys))
                )
            )
        datasets = []
        for key in blob_keys:
            with open_blob(ctx, key) as stream:
                datasets.append(dcmread(stream))
        return datasets
    finally:
        ctx.db.dispose()


def _linked_ipp(sites: Sites, study_uid: str) -> str:
    ctx = sites.ctx()
    try:
        with ctx.db.reading() as session:
            pk = session.scalar(select(Study.id).where(Study.study_uid == study_uid))
            assert pk is not None
            identity = patients.study_identity(session, pk)
            assert identity is not None
            return identity.local_id
    finally:
        ctx.db.dispose()


def test_media_with_another_sites_ids_ends_under_the_receiving_sites_patient(sites: Sites) -> None:
    files = ct_series(sites.base / "clinb", slices=2, rows=32, cols=32, patient_id="B-777", seed=92)
    _patient(files, name="PAT-TROIS^DOMINIQUE", issuer=("CLINB", OID_CLINB), ins=True)
    source = {str(dcmread(p).SOPInstanceUID): dcmread(p) for p in files}
    study_uid = str(next(iter(source.values())).StudyInstanceUID)
    dicomdir = _burn(files, sites.base / "cd-clinb")

    result = sites.simral.cli("import", str(dicomdir), "--organisation", "CHA", "--reconcile")
    assert "reconciled to the organisation's patient" in result.stdout
    assert "│ 2" in result.stdout.split("reconciled to the organisation's patient")[1].splitlines()[0]

    stored = _stored(sites, study_uid)
    assert len(stored) == 2
    for ds in stored:
        assert ds.PatientID == "IPP-A1"
        assert ds.IssuerOfPatientID == "CHA"
        assert ds.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == OID_CHA
        assert str(ds.PatientName) == "MARTIN^DOMI"  # CHA's identity, not the CD's spelling
        others = {(str(i.PatientID), str(i.get("IssuerOfPatientID", ""))) for i in ds.OtherPatientIDsSequence}
        assert others == {(NIR, "ASIP-SANTE-INS-NIR"), ("B-777", "CLINB")}
        original = next(i for i in ds.OtherPatientIDsSequence if i.PatientID == "B-777")
        assert original.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == OID_CLINB
        assert ds.PixelData == source[str(ds.SOPInstanceUID)].PixelData
    assert _linked_ipp(sites, study_uid) == "IPP-A1"


def test_media_without_issuer_or_ins_needs_the_operators_identifier(sites: Sites) -> None:
    files = ct_series(sites.base / "bare", slices=1, rows=32, cols=32, patient_id="12345", seed=93)
    _patient(files, name="AUTRE^PATIENT", issuer=None, ins=False)
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    dicomdir = _burn(files, sites.base / "cd-bare")

    # Nothing links "12345" (no issuer, no INS) to a CHA patient: kept as on the media.
    kept = sites.simral.cli("import", str(dicomdir), "--organisation", "CHA", "--reconcile")
    assert "kept as on the media" in kept.stdout
    assert [ds.PatientID for ds in _stored(sites, study_uid)] == ["12345"]

    # A second CD of the same patient, reconciled by the operator to CHA's IPP-A9.
    files = ct_series(sites.base / "bare2", slices=1, rows=32, cols=32, patient_id="12345", seed=94)
    _patient(files, name="AUTRE^PATIENT", issuer=None, ins=False)
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    dicomdir = _burn(files, sites.base / "cd-bare2")
    sites.simral.cli("import", str(dicomdir), "--organisation", "CHA", "--patient-id", "IPP-A9")
    (ds,) = _stored(sites, study_uid)
    assert (ds.PatientID, ds.IssuerOfPatientID) == ("IPP-A9", "CHA")
    assert [(i.PatientID, i.get("IssuerOfPatientID", "")) for i in ds.OtherPatientIDsSequence] == [
        ("12345", "")
    ]
    assert str(ds.PatientName) == "AUTRE^PATIENT"  # a new CHA patient: the CD's traits
    assert _linked_ipp(sites, study_uid) == "IPP-A9"


def test_reconciliation_needs_a_receiving_organisation(sites: Sites) -> None:
    result = subprocess.run(
        [
            SIMRAL,
            "import",
            str(sites.base / "cd-clinb" / "DICOMDIR"),
            "--reconcile",
            "--data-dir",
            str(sites.simral.data_dir),
        ],
        env=sites.simral.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "needs the receiving --organisation" in result.stdout + result.stderr
