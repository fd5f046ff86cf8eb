"""dcmtk clients for tests (Debian's ``findscu -W`` and ``storescu``) against a ``simral serve``."""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from tests.simral_proc import SimralProcess

FINDSCU = "/usr/bin/findscu"
STORESCU = "/usr/bin/storescu"
#: The return keys of a Modality Worklist query (PS3.4 K.6.1.2).
WORKLIST_KEYS = {
    "PatientName": "",
    "PatientID": "",
    "IssuerOfPatientID": "",
    "PatientBirthDate": "",
    "PatientSex": "",
    "OtherPatientIDsSequence": "",
    "AccessionNumber": "",
    "RequestedProcedureID": "",
    "RequestedProcedureDescription": "",
    "StudyInstanceUID": "",
    "ScheduledProcedureStepSequence[0].Modality": "",
    "ScheduledProcedureStepSequence[0].ScheduledStationAETitle": "",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate": "",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime": "",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID": "",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepDescription": "",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus": "",
}
_runs = itertools.count()


def _env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def findscu_worklist(
    simral: SimralProcess, workdir: Path, calling_ae: str, **values: str
) -> dict[str, Dataset]:
    """dcmtk ``findscu -W`` (Modality Worklist) as ``calling_ae``; the answers by Study Instance UID.
    ``values`` set or add keys (``__`` stands for ``.`` in a key path)."""
    out = workdir / f"findscu-{next(_runs)}"
    out.mkdir(parents=True)
    keys = dict(WORKLIST_KEYS)
    for key, value in values.items():
        keys[key.replace("__", ".")] = value
    argv = [FINDSCU, "-W", "-aet", calling_ae, "-aec", simral.ae_title, "-X", "-od", str(out)]
    for key, value in keys.items():
        argv += ["-k", f"{key}={value}" if value else key]
    argv += ["127.0.0.1", str(simral.dicom_port)]
    result = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    answers = [dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]
    return {str(answer.StudyInstanceUID): answer for answer in answers}


def storescu(simral: SimralProcess, calling_ae: str, paths: list[Path]) -> None:
    """dcmtk ``storescu`` of ``paths`` as ``calling_ae``, on one association; every store must succeed."""
    result = subprocess.run(
        [STORESCU, "-aet", calling_ae, "-aec", simral.ae_title, "127.0.0.1", str(simral.dicom_port)]
        + [str(p) for p in paths],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
