"""Import reconciliation of media from another site (IHE RAD TF-1 Import Reconciliation Workflow,
IRWF.b; RAD-61 / the Importer's patient reconciliation).

Studies on a CD, a USB stick or a ZIP from another site carry that site's patient identifier. On
import for a receiving organisation, each instance is stored under the receiving organisation's
identifier for the patient: PatientID, Issuer of Patient ID (with its ISO qualifier) and the
identity's names, birth date and sex replace the media's, and the media's identifiers are kept in
Other Patient IDs Sequence (0010,1002) so that nothing of the source is lost (PS3.3 C.7.1.1).

The receiving identifier is the one the operator names, or the one the identity service finds: the
media identifier (with its issuer) or the INS it carries is linked to a person the receiving
organisation knows. Without either, the instance is imported as it is (and counted as such).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from simral.context import AppContext
from simral.patients import crossref
from simral.patients import service as patients
from simral.patients.models import AssigningAuthority, PatientIdentity


class ReconciliationError(ValueError):
    """The named receiving identifier cannot be used."""


@dataclass(frozen=True)
class LocalPatient:
    """The receiving organisation's identification of the patient (what the instances get)."""

    patient_id: str
    issuer: str
    issuer_oid: str
    name: str = ""
    birth_date: str = ""
    sex: str = ""


@dataclass
class Reconciler:
    """Finds, per media patient, the receiving organisation's identifier (cached per patient)."""

    ctx: AppContext
    organisation: str
    #: The receiving organisation's identifier the operator named for every patient of the media.
    patient_id: str = ""
    _targets: dict[tuple[str, str, str], LocalPatient | None] = field(default_factory=dict)

    def target(self, dataset: Dataset) -> LocalPatient | None:
        """The receiving identification for this instance's patient, or None to keep it as is."""
        media = patients.dicom_patient(dataset)
        key = (media.patient_id, media.issuer, media.issuer_oid)
        if key not in self._targets:
            with self.ctx.db.reading() as session:
                self._targets[key] = self._find(session, media)
        return self._targets[key]

    def _find(self, session: Session, media: patients.DicomPatient) -> LocalPatient | None:
        authority_id = patients.organisation_authority_id(session, self.organisation)
        authority = session.get(AssigningAuthority, authority_id) if authority_id is not None else None
        if self.patient_id:
            if authority is None:
                raise ReconciliationError(
                    f"organisation {self.organisation!r} has no patient-id authority yet"
                )
            named = session.scalar(
                select(PatientIdentity).where(
                    PatientIdentity.authority_id == authority.id, PatientIdentity.local_id == self.patient_id
                )
            )
            if named is None:
                # A patient the receiving site registers now: its identifier, the media's traits.
                return LocalPatient(self.patient_id, authority.namespace, authority.oid or "")
            return _local(named, authority)
        candidates: list[PatientIdentity] = []
        if media.patient_id and (media.issuer or media.issuer_oid):
            found = crossref.named_identity(
                session,
                patient_id=media.patient_id,
                issuer=media.issuer,
                issuer_oid=media.issuer_oid,
                organisation="",
            )
            if found is not None:
                candidates.append(found)
        for matricule, oid in media.ins:
            candidates.extend(patients.identities_by_ins(session, patients.Ins(matricule, oid)))
        for candidate in candidates:
            person = patients.effective_identity(session, candidate).person_id
            local = patients.identity_for_organisation(
                session, person_id=person, organisation_code=self.organisation
            )
            if local is not None and authority is not None:
                return _local(local, authority)
        return None


def _local(identity: PatientIdentity, authority: AssigningAuthority) -> LocalPatient:
    family = identity.used_name or identity.birth_name
    given = identity.used_given_name or identity.first_birth_given_name
    return LocalPatient(
        patient_id=identity.local_id,
        issuer=authority.namespace,
        issuer_oid=authority.oid or "",
        name=f"{family}^{given}" if given else family,
        birth_date=identity.birth_date,
        sex={"U": "O"}.get(identity.sex, identity.sex),
    )


def _identifier_item(dataset: Dataset) -> Dataset:
    """The media's identifier as an Other Patient IDs Sequence item (PS3.3 Table 10-18)."""
    item = Dataset()
    item.PatientID = dataset.get("PatientID", "")
    if dataset.get("IssuerOfPatientID"):
        item.IssuerOfPatientID = dataset.IssuerOfPatientID
    if dataset.get("IssuerOfPatientIDQualifiersSequence"):
        item.IssuerOfPatientIDQualifiersSequence = dataset.IssuerOfPatientIDQualifiersSequence
    item.TypeOfPatientID = "TEXT"
    return item


def reconcile(dataset: Dataset, local: LocalPatient) -> Dataset:
    """Put ``dataset`` under ``local``; the media's identifier goes to Other Patient IDs Sequence."""
    original = _identifier_item(dataset)
    others = list(dataset.get("OtherPatientIDsSequence", None) or [])
    if not any(
        str(item.get("PatientID", "")) == str(original.PatientID)
        and str(item.get("IssuerOfPatientID", "")) == str(original.get("IssuerOfPatientID", ""))
        for item in others
    ):
        others.append(original)
    dataset.OtherPatientIDsSequence = others
    dataset.PatientID = local.patient_id
    dataset.IssuerOfPatientID = local.issuer
    if local.issuer_oid:
        qualifier = Dataset()
        qualifier.UniversalEntityID = local.issuer_oid
        qualifier.UniversalEntityIDType = "ISO"
        dataset.IssuerOfPatientIDQualifiersSequence = [qualifier]
    elif "IssuerOfPatientIDQualifiersSequence" in dataset:
        del dataset.IssuerOfPatientIDQualifiersSequence
    if local.name:
        dataset.PatientName = local.name
    if local.birth_date:
        dataset.PatientBirthDate = local.birth_date
    if local.sex:
        dataset.PatientSex = local.sex
    return dataset


@contextlib.contextmanager
def reconciled_file(path: Path, reconciler: Reconciler, scratch: Path) -> Iterator[tuple[Path, bool]]:
    """``path`` as it is to be ingested: a reconciled copy in ``scratch`` (True), or ``path``
    itself (False) when the patient has no receiving identifier or the file is not DICOM."""
    try:
        dataset = dcmread(path)
    except Exception:
        yield path, False
        return
    local = reconciler.target(dataset)
    if local is None:
        yield path, False
        return
    fd, name = tempfile.mkstemp(prefix=".tmp-reconciled-", suffix=".dcm", dir=scratch)
    os.close(fd)
    try:
        reconcile(dataset, local).save_as(name, enforce_file_format=True)
        yield Path(name), True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
