"""The signed report as a CDA R2 document, CI-SIS volet "Compte rendu d'imagerie médicale"
CR-IMG 2024.01 (templateId 1.2.250.1.213.1.1.1.45), built with lxml.

Header (CI-SIS "Volet Structuration minimale" and DICOM PS3.20 §7 Imaging Report header):
document id = the version's ``document_uid``, ``setId`` / ``versionNumber`` across versions and a
``relatedDocument`` of type ``RPLC`` naming the version an addendum replaces (the DMP keeps only
the newest version of a set, each version carries the whole report), LOINC 18748-4, the patient by
INS only when the identity is qualified (``QUAL``, Référentiel INS §4) else by IPP, the signing
radiologist (national id ``8``+RPPS in 1.2.250.1.71.4.2.1) as author and legal authenticator, the
reading group as custodian, the order (placer number and ``ps3-20:accessionNumber``), the exam
(serviceEvent: Study Instance UID, LOINC exam code with modality and anatomy translations) and the
encounter at the requesting site.

Body (CR-IMG 2024.01 §3.2, PS3.20 §8): FR-DICOM-Addendum (addenda), FR-DICOM-Acte-imagerie with
the indication and the technique, its FR-DICOM-Technique-imagerie entry, the FR-DICOM-Object-
Catalog subsection listing the study's series and, for ionising exams with a reported dose,
FR-DICOM-Exposition-aux-radiations; FR-DICOM-Resultats; FR-DICOM-Conclusion.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from lxml import etree

from simral.identity.models import ACTIVITY_SECTORS, PRACTICE_SETTINGS
from simral.patients.models import STATUS_QUAL

CDA_NS = "urn:hl7-org:v3"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
PS320_NS = "urn:dicom-org:ps3-20"
NSMAP = {None: CDA_NS, "xsi": XSI_NS, "ps3-20": PS320_NS}

LOINC = "2.16.840.1.113883.6.1"
SNOMED = "2.16.840.1.113883.6.96"
DCM = "1.2.840.10008.2.16.4"
CCAM = "1.2.250.1.215.300.1"
#: National ids of professionals (PS_IdNat, "8" + RPPS) and of structures (Struct_IdNat).
PS_ROOT = "1.2.250.1.71.4.2.1"
STRUCTURE_ROOT = "1.2.250.1.71.4.2.2"
#: Secteur d'activité (TRE_R02, healthcare facility types of JDV_J02) and practice settings (JDV_J04).
SECTOR_SYSTEM = "1.2.250.1.71.4.2.4"
PRACTICE_SETTING_SYSTEM = "1.2.250.1.213.1.1.4.9"
#: Nomenclature des professions de santé (TRE_G15 / R38 specialities, JDV J01).
PROFESSION_SYSTEM = "1.2.250.1.213.1.1.4.5"
RADIOLOGIST_CODE = ("G15_10/SM44", "Médecin - Radio-diagnostic (SM)")
#: Header templateIds of a CR-IMG 2024.01 document (HL7 France, CI-SIS, PS3.20 imaging report).
HEADER_TEMPLATES = (
    ("2.16.840.1.113883.2.8.2.1", ""),
    ("1.2.250.1.213.1.1.1.1", ""),
    ("1.2.840.10008.9.1", ""),
    ("1.2.840.10008.9.20", ""),
    ("1.2.840.10008.9.21", ""),
    ("1.2.250.1.213.1.1.1.45", "2024.01"),
)
#: HL7 v2 / free coding-system names to OIDs.
CODE_SYSTEMS = {
    "LN": LOINC,
    "LOINC": LOINC,
    "SCT": SNOMED,
    "SNM": SNOMED,
    "SNOMED": SNOMED,
    "SNOMED CT": SNOMED,
    "CCAM": CCAM,
    "DCM": DCM,
}
#: Modalities of JDV_ModaliteAcquisition_CISIS (1.2.250.1.213.1.1.5.618) by their French name.
MODALITY_NAMES = {
    "CT": "Tomodensitométrie",
    "MR": "Imagerie par résonance magnétique",
    "US": "Échographie",
    "CR": "Radiographie numérisée",
    "DX": "Radiographie numérique",
    "MG": "Mammographie",
    "XA": "Angiographie par rayons X",
    "RF": "Radiofluoroscopie",
    "NM": "Médecine nucléaire",
    "PT": "Tomographie par émission de positons",
    "OT": "Autre",
}
IONISING_MODALITIES = frozenset({"CT", "CR", "DX", "MG", "XA", "RF", "NM", "PT", "IO", "PX", "RG", "BMD"})
#: Dose quantities (JDV_QuantiteExpositionRayonnements_CISIS, DCM codes) by report dose field.
DOSE_QUANTITIES = (
    ("dlp_mgycm", "113813", "PDL Total : Produit Dose Longueur Total", "mGy.cm"),
    ("ctdivol_mgy", "113830", "IDSV Moyen : Indice de Dose Scanographique Volumique", "mGy"),
    ("dap_gycm2", "113722", "PDS Total : Produit Dose Surface Total", "Gy.cm2"),
    ("fluoro_seconds", "113730", "Temps total de scopie", "s"),
)


#: Anatomic regions of the request (JDV_RegionAnatomique_CISIS 1.2.250.1.213.1.1.5.695, SNOMED CT
#: "structure" concepts) to the anatomic localisations the Technique-imagerie entry and the dose
#: quantities take (JDV_LocalisationAnatomique_CISIS 1.2.250.1.213.1.1.5.694, the "entire" concepts
#: of the SNOMED CT structure / entire pairs). A region not listed is used as given.
REGION_TO_LOCALISATION: dict[str, tuple[tuple[str, str], ...]] = {
    "51185008": (("302551006", "thorax entier"),),
    "69536005": (("302548004", "tête entière"),),
    "45048000": (("302550007", "cou entier"),),
    "774007": (("302548004", "tête entière"), ("302550007", "cou entier")),
    "12738006": (("258335003", "encéphale entier"),),
    "76752008": (("181131000", "sein entier"),),
    "818983003": (("302553009", "abdomen entier"),),
    "113345001": (("302553009", "abdomen entier"),),
    "12921003": (("229765004", "pelvis entier"),),
    "421060004": (("44300000", "colonne vertébrale entière"),),
    "122494005": (("361684008", "colonne vertébrale cervicale entière"),),
    "122495006": (("243931006", "colonne thoracique entière"),),
    "122496007": (("361686005", "colonne vertébrale lombaire entière"),),
    "72696002": (("361291001", "région entière du genou"),),
    "16982005": (("361103004", "région entière de l'épaule"),),
    "29836001": (("302543008", "région entière de la hanche"),),
}


#: Pregnancy status answers (Y / N / UNK) in JDV_StatutGrossesse_CISIS (SNOMED CT).
PREGNANCY_STATUS = {
    "Y": ("77386006", "enceinte"),
    "N": ("60001007", "absence de grossesse"),
    "UNK": ("261665006", "inconnu"),
}


@dataclass(frozen=True)
class Organisation:
    """An organisation named in the document (FINESS géographique, else SIRET), with its secteur
    d'activité (TRE_R02, JDV_J02: healthCareFacility/code) and practice setting (JDV_J04:
    representedOrganization/standardIndustryClassCode)."""

    code: str
    name: str
    finess: str = ""
    siret: str = ""
    activity_sector: str = "SA01"
    practice_setting: str = "ETABLISSEMENT"


@dataclass(frozen=True)
class SeriesSummary:
    """One series of the study, for the object catalog."""

    series_uid: str
    modality: str
    description: str
    instances: int


@dataclass
class ReportDocument:
    """Everything the CDA says, gathered from the report, its request and the stored study."""

    document_uid: str
    set_id: str
    version: int
    signed_at: datetime
    author_name: str
    author_national_id: str
    indications: str
    technique: str
    results: str
    conclusion: str
    addendum: str = ""
    previous_document_uid: str = ""
    dose: dict[str, Any] = field(default_factory=dict)
    #: The patient snapshot of the request (INS, IPP, traits, identity status).
    patient: dict[str, Any] = field(default_factory=dict)
    study_uid: str = ""
    exam_at: datetime | None = None
    modality: str = ""
    exam_codes: list[dict[str, str]] = field(default_factory=list)
    anatomy: list[dict[str, str]] = field(default_factory=list)
    requested_procedure: str = ""
    placer_number: str = ""
    placer_authority: str = ""
    accession_number: str = ""
    accession_authority: str = ""
    series: list[SeriesSummary] = field(default_factory=list)
    group: Organisation = field(default_factory=lambda: Organisation("", ""))
    site: Organisation = field(default_factory=lambda: Organisation("", ""))
    #: Title of the exam for the document title (e.g. the study description).
    exam_title: str = ""
    #: Pregnancy status of the request (LOINC 82810-3 answer: Y / N / UNK; empty when not asked).
    pregnancy: str = ""


_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")


def is_oid(value: str) -> bool:
    """Whether ``value`` is an ISO OID usable as an II root."""
    return bool(_OID.fullmatch(value or "")) and len(value) <= 64


def ts(moment: datetime) -> str:
    """An HL7 v3 TS with seconds and UTC offset (CI-SIS: time zone required with the time)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.strftime("%Y%m%d%H%M%S%z")


def _el(parent: etree._Element, tag: str, text: str | None = None, **attrs: str) -> etree._Element:
    element = etree.SubElement(parent, f"{{{CDA_NS}}}{tag}", {k: v for k, v in attrs.items() if v != ""})
    if text is not None:
        element.text = text
    return element


def _code(
    parent: etree._Element, tag: str, code: str, system: str, display: str = "", **extra: str
) -> etree._Element:
    return _el(parent, tag, code=code, codeSystem=system, displayName=display, **extra)


def _template(parent: etree._Element, root: str, extension: str = "") -> None:
    _el(parent, "templateId", root=root, extension=extension)


def _uuid_id(parent: etree._Element) -> None:
    _el(parent, "id", root=str(uuid.uuid4()).upper())


def _narrative(parent: etree._Element, text: str) -> None:
    """Plain text as CDA narrative: one paragraph per block, line breaks kept (CDA R2 §4.3.5)."""
    blocks = [block for block in re.split(r"\n\s*\n", (text or "").strip()) if block.strip()]
    for block in blocks or ["Néant."]:
        paragraph = _el(parent, "paragraph")
        lines = block.strip().splitlines()
        paragraph.text = lines[0]
        for line in lines[1:]:
            br = _el(paragraph, "br")
            br.tail = line


def _structure_id(parent: etree._Element, organisation: Organisation, *, required: bool = False) -> None:
    """Struct_IdNat: "1" + FINESS or "3" + SIRET (CI-SIS "Identifiants nationaux des structures");
    an unknown id (nullFlavor) where CDA requires one and the organisation has neither."""
    if organisation.finess:
        _el(parent, "id", root=STRUCTURE_ROOT, extension="1" + organisation.finess)
    elif organisation.siret:
        _el(parent, "id", root=STRUCTURE_ROOT, extension="3" + organisation.siret)
    elif required:
        _el(parent, "id", nullFlavor="UNK")


def _organisation(parent: etree._Element, tag: str, organisation: Organisation) -> etree._Element:
    """A representedOrganization (with its JDV_J04 practice setting as standardIndustryClassCode,
    CI-SIS Structuration minimale) or a representedCustodianOrganization (which has none)."""
    element = _el(parent, tag)
    _structure_id(element, organisation, required=tag == "representedCustodianOrganization")
    _el(element, "name", organisation.name or organisation.code)
    if tag == "representedOrganization":
        setting = organisation.practice_setting
        _code(
            element,
            "standardIndustryClassCode",
            setting,
            PRACTICE_SETTING_SYSTEM,
            PRACTICE_SETTINGS.get(setting, setting),
        )
    return element


#: Titles a display name may start with, as the CI-SIS ``suffix`` codes (JDV_J246-Titre-CISIS: DR
#: Docteur, PR Professeur). The ``prefix`` is the civilité (JDV_J245: M, MME), which accounts do
#: not record: none is written.
NAME_TITLES = {"dr": "DR", "dr.": "DR", "docteur": "DR", "pr": "PR", "pr.": "PR", "professeur": "PR"}


def _person_name(parent: etree._Element, display_name: str) -> None:
    """A professional's name (accounts keep one display name): a leading title (Dr, Pr, Docteur,
    Professeur) as the ``suffix`` code (CI-SIS Structuration minimale, JDV_J246), then the first
    word as given name and the rest as family name when there are several, else the one word as
    family name."""
    name = _el(parent, "name")
    words = display_name.split()
    title = NAME_TITLES.get(words[0].lower()) if len(words) > 1 else None
    if title:
        words.pop(0)
    if len(words) > 1:
        _el(name, "given", words[0])
        _el(name, "family", " ".join(words[1:]))
    else:
        _el(name, "family", " ".join(words) or "Radiologue")
    if title:
        _el(name, "suffix", title)


def _professional(
    parent: etree._Element, tag: str, doc: ReportDocument, *, with_code: bool = True
) -> etree._Element:
    entity = _el(parent, tag)
    if doc.author_national_id:
        _el(entity, "id", root=PS_ROOT, extension=doc.author_national_id)
    else:
        _el(entity, "id", nullFlavor="UNK")
    if with_code:
        _code(entity, "code", RADIOLOGIST_CODE[0], PROFESSION_SYSTEM, RADIOLOGIST_CODE[1])
    person = _el(entity, "assignedPerson")
    _person_name(person, doc.author_name)
    _organisation(entity, "representedOrganization", doc.group)
    return entity


def _coding_system(entry: dict[str, str]) -> str:
    system = (entry.get("system") or "").strip()
    return system if is_oid(system) else CODE_SYSTEMS.get(system.upper(), "")


def _exam_code(doc: ReportDocument) -> dict[str, str] | None:
    """The LOINC exam code (JDV_CodesDocumentImagerie 1.2.250.1.213.1.1.5.687) of the complement."""
    for entry in doc.exam_codes:
        if _coding_system(entry) == LOINC and entry.get("code"):
            return entry
    return None


def _ccam_code(doc: ReportDocument) -> dict[str, str] | None:
    for entry in doc.exam_codes:
        if _coding_system(entry) == CCAM and entry.get("code"):
            return entry
    return None


def _anatomy(doc: ReportDocument) -> list[dict[str, str]]:
    return [a for a in doc.anatomy if a.get("code") and _coding_system(a) == SNOMED]


def _localisations(doc: ReportDocument) -> list[dict[str, str]]:
    """The anatomic localisations (JDV 1.2.250.1.213.1.1.5.694) of the exam's regions; the whole
    body (38266002) when the request named none."""
    found: dict[str, str] = {}
    for region in _anatomy(doc):
        for code, display in REGION_TO_LOCALISATION.get(
            region["code"], ((region["code"], region.get("display", "")),)
        ):
            found.setdefault(code, display)
    if not found:
        found["38266002"] = "corps entier"
    return [{"code": code, "display": display} for code, display in found.items()]


def modality_name(modality: str) -> str:
    return MODALITY_NAMES.get(modality, modality)


def is_ionising(modality: str) -> bool:
    return modality.upper() in IONISING_MODALITIES


def _header(root: etree._Element, doc: ReportDocument) -> None:
    _el(root, "realmCode", code="FR")
    _el(root, "typeId", root="2.16.840.1.113883.1.3", extension="POCD_HD000040")
    for template_root, extension in HEADER_TEMPLATES:
        _template(root, template_root, extension)
    _el(root, "id", root=doc.document_uid)
    _code(root, "code", "18748-4", LOINC, "CR d'imagerie médicale", codeSystemName="LOINC")
    title = "CR d'imagerie médicale"
    if doc.exam_title:
        title += f" - {doc.exam_title}"
    if doc.version > 1:
        title += f" (addendum, version {doc.version})"
    _el(root, "title", title)
    _el(root, "effectiveTime", value=ts(doc.signed_at))
    _code(root, "confidentialityCode", "N", "2.16.840.1.113883.5.25", "Normal")
    _el(root, "languageCode", code="fr-FR")
    _el(root, "setId", root=doc.set_id)
    _el(root, "versionNumber", value=str(doc.version))
    _record_target(root, doc.patient)

    author = _el(root, "author")
    _el(author, "time", value=ts(doc.signed_at))
    _professional(author, "assignedAuthor", doc)

    custodian = _el(root, "custodian")
    assigned = _el(custodian, "assignedCustodian")
    _organisation(assigned, "representedCustodianOrganization", doc.group)

    legal = _el(root, "legalAuthenticator")
    _el(legal, "time", value=ts(doc.signed_at))
    _el(legal, "signatureCode", code="S")
    _professional(legal, "assignedEntity", doc)

    if doc.accession_number:
        order = _el(_el(root, "inFulfillmentOf"), "order")
        if doc.placer_number and is_oid(doc.placer_authority):
            _el(order, "id", root=doc.placer_authority, extension=doc.placer_number)
        elif doc.placer_number:
            _el(order, "id", nullFlavor="UNK", extension=doc.placer_number)
        else:
            _el(order, "id", nullFlavor="UNK")
        accession = etree.SubElement(order, f"{{{PS320_NS}}}accessionNumber")
        if is_oid(doc.accession_authority):
            accession.set("root", doc.accession_authority)
        else:
            accession.set("nullFlavor", "UNK")
        accession.set("extension", doc.accession_number)

    event = _el(_el(root, "documentationOf"), "serviceEvent", classCode="ACT")
    if doc.study_uid:
        _el(event, "id", root=doc.study_uid)
    _service_code(event, doc)
    when = _el(event, "effectiveTime")
    _el(when, "low", value=ts(doc.exam_at or doc.signed_at))
    performer = _el(event, "performer", typeCode="PRF")
    _professional(performer, "assignedEntity", doc)

    if doc.previous_document_uid:
        related = _el(root, "relatedDocument", typeCode="RPLC")
        _el(_el(related, "parentDocument"), "id", root=doc.previous_document_uid)

    encounter = _el(_el(root, "componentOf"), "encompassingEncounter")
    when = _el(encounter, "effectiveTime")
    _el(when, "low", value=ts(doc.exam_at or doc.signed_at))
    facility = _el(_el(encounter, "location"), "healthCareFacility")
    _structure_id(facility, doc.site)
    sector = doc.site.activity_sector
    _code(facility, "code", sector, SECTOR_SYSTEM, ACTIVITY_SECTORS.get(sector, sector))
    place = _el(facility, "location")
    _el(place, "name", doc.site.name or doc.site.code)


def _record_target(root: etree._Element, patient: dict[str, Any]) -> None:
    """The patient: INS (NIR / NIA OID) only for a qualified identity, the IPP otherwise or as well
    (CI-SIS "Volet Structuration minimale" §2.3.1, Référentiel INS)."""
    role = _el(_el(root, "recordTarget"), "patientRole")
    identified = False
    if patient.get("status") == STATUS_QUAL and patient.get("ins") and is_oid(patient.get("ins_oid", "")):
        _el(role, "id", root=patient["ins_oid"], extension=patient["ins"])
        identified = True
    if patient.get("ipp") and is_oid(patient.get("ipp_oid", "")):
        _el(role, "id", root=patient["ipp_oid"], extension=patient["ipp"])
        identified = True
    if not identified:
        _el(role, "id", nullFlavor="UNK", extension=patient.get("ipp", ""))
    person = _el(role, "patient", classCode="PSN")
    name = _el(person, "name")
    if patient.get("birth_name"):
        _el(name, "family", patient["birth_name"], qualifier="BR")
    if patient.get("birth_given_names"):
        _el(name, "given", patient["birth_given_names"])
    if patient.get("first_birth_given_name"):
        _el(name, "given", patient["first_birth_given_name"], qualifier="BR")
    if patient.get("used_name"):
        _el(name, "family", patient["used_name"], qualifier="SP")
    if patient.get("used_given_name"):
        _el(name, "given", patient["used_given_name"], qualifier="CL")
    sex = {"M": ("M", "Masculin"), "F": ("F", "Féminin")}.get(str(patient.get("sex", "")).upper())
    if sex:
        _code(person, "administrativeGenderCode", sex[0], "2.16.840.1.113883.5.1", sex[1])
    else:
        _code(person, "administrativeGenderCode", "UN", "2.16.840.1.113883.5.1", "Inconnu")
    birth = re.sub(r"[^0-9]", "", str(patient.get("birth_date", "")))[:8]
    if len(birth) == 8:
        _el(person, "birthTime", value=birth)
    else:
        _el(person, "birthTime", nullFlavor="UNK")
    if patient.get("birth_place_code"):  # INS trait: birth place as its INSEE (COG) code
        address = _el(_el(_el(person, "birthplace"), "place"), "addr")
        _el(address, "county", str(patient["birth_place_code"]))


def with_record_target(data: bytes, patient: dict[str, Any]) -> bytes:
    """The CDA ``data`` with its recordTarget rebuilt from ``patient`` (the shape of
    :attr:`ReportDocument.patient`), every other node as it was: the DMP's copy of a report signed
    before the patient's INS was qualified (:mod:`simral.dmp.publication`)."""
    root = etree.fromstring(data, etree.XMLParser(resolve_entities=False, no_network=True))
    old = root.find(f"{{{CDA_NS}}}recordTarget")
    if old is None:
        raise ValueError("not a CDA document: no recordTarget")
    scratch = etree.Element(f"{{{CDA_NS}}}ClinicalDocument", nsmap=NSMAP)  # type: ignore[arg-type]
    _record_target(scratch, patient)
    new = scratch[0]
    new.tail = old.tail
    old.addprevious(new)
    root.remove(old)
    etree.cleanup_namespaces(root)
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))


def _modality_translation(parent: etree._Element, modality: str) -> None:
    translation = _code(parent, "translation", modality, DCM, modality_name(modality), codeSystemName="DCM")
    qualifier = _el(translation, "qualifier")
    _code(qualifier, "name", "121139", DCM, "Modalité d'imagerie", codeSystemName="DCM")


def _service_code(event: etree._Element, doc: ReportDocument) -> None:
    """serviceEvent/code: the LOINC exam code with CCAM, modality ([1..*], qualifier 121139) and
    anatomy (qualifier 39111-0) translations (CR-IMG 2024.01 entête, PS3.20 §7.3)."""
    exam = _exam_code(doc)
    if exam is not None:
        code = _code(event, "code", exam["code"], LOINC, exam.get("display", ""), codeSystemName="LOINC")
    else:  # OTH: not coded in LOINC; originalText and translations allowed (CI-SIS dtr1-1)
        code = _el(event, "code", nullFlavor="OTH")
        _el(code, "originalText", doc.requested_procedure or doc.exam_title or "Examen d'imagerie")
    ccam = _ccam_code(doc)
    if ccam is not None:
        _code(code, "translation", ccam["code"], CCAM, ccam.get("display", ""), codeSystemName="CCAM")
    if doc.modality:
        _modality_translation(code, doc.modality)
    for region in _anatomy(doc):
        translation = _code(code, "translation", region["code"], SNOMED, region.get("display", ""))
        _code(_el(translation, "qualifier"), "name", "39111-0", LOINC, "localisation anatomique")


def _section(
    parent: etree._Element, templates: tuple[str, ...], code: tuple[str, str, str], title: str
) -> etree._Element:
    section = _el(_el(parent, "component"), "section")
    for root in templates:
        _template(section, root)
    _uuid_id(section)
    _code(section, "code", code[0], code[2], code[1])
    _el(section, "title", title)
    return section


def _technique_entry(section: etree._Element, doc: ReportDocument) -> None:
    """FR-DICOM-Technique-imagerie (1.2.250.1.213.1.1.3.153, PS3.20 Procedure Technique 9.14)."""
    procedure = _el(_el(section, "entry"), "procedure", classCode="PROC", moodCode="EVN")
    _template(procedure, "1.2.840.10008.9.14")
    _template(procedure, "1.2.250.1.213.1.1.3.153")
    _uuid_id(procedure)
    exam = _exam_code(doc)
    if exam is not None:
        code = _code(procedure, "code", exam["code"], LOINC, exam.get("display", ""), codeSystemName="LOINC")
        _el(_el(code, "originalText"), "reference", value="#acte-1")
        ccam = _ccam_code(doc)
        if ccam is not None:
            _code(code, "translation", ccam["code"], CCAM, ccam.get("display", ""), codeSystemName="CCAM")
    else:
        code = _el(procedure, "code", nullFlavor="UNK")
        _el(_el(code, "originalText"), "reference", value="#acte-1")
    _el(_el(procedure, "text"), "reference", value="#acte-1-technique")
    _el(procedure, "effectiveTime", value=ts(doc.exam_at or doc.signed_at))
    if doc.modality:
        _code(procedure, "methodCode", doc.modality, DCM, modality_name(doc.modality), codeSystemName="DCM")
    for region in _localisations(doc):
        site = _code(procedure, "targetSiteCode", region["code"], SNOMED, region["display"])
        site.set(f"{{{XSI_NS}}}type", "CD")


def _catalog(parent: etree._Element, doc: ReportDocument) -> None:
    """FR-DICOM-Object-Catalog (1.2.250.1.213.1.1.2.217, PS3.20 §8.4): the study's series."""
    section = _section(
        parent,
        ("2.16.840.1.113883.10.20.6.1.1", "1.2.250.1.213.1.1.2.217"),
        ("121181", "Catalogue d'objets DICOM", DCM),
        "Catalogue d'objets DICOM",
    )
    text = _el(section, "text")
    table = _el(text, "table", border="0")
    head = _el(_el(table, "thead"), "tr")
    for label in ("Série", "Modalité", "Description", "Instances"):
        _el(head, "th", label)
    body = _el(table, "tbody")
    for series in doc.series:
        row = _el(body, "tr")
        _el(row, "td", series.series_uid)
        _el(row, "td", modality_name(series.modality))
        _el(row, "td", series.description)
        _el(row, "td", str(series.instances))
    if not doc.series:
        _el(_el(body, "tr"), "td", f"Examen {doc.study_uid}")


def _exposure(parent: etree._Element, doc: ReportDocument) -> None:
    """FR-DICOM-Exposition-aux-radiations (1.2.250.1.213.1.1.2.215, PS3.20 Radiation Exposure
    9.8): the dose quantities the report gives, and who justified the irradiation."""
    quantities = [
        (field_, code, label, unit) for field_, code, label, unit in DOSE_QUANTITIES if doc.dose.get(field_)
    ]
    section = _section(
        parent,
        ("1.2.840.10008.9.8", "1.2.250.1.213.1.1.2.215"),
        ("73569-6", "Exposition aux rayonnements et informations de radioprotection", LOINC),
        "Exposition aux rayonnements et informations de radioprotection",
    )
    text = _el(section, "text")
    paragraph = _el(text, "paragraph")
    _el(paragraph, "content", "Exposition du patient aux rayonnements ionisants", ID="exposition")
    if doc.dose.get("equipment"):
        _el(text, "paragraph", f"Appareil : {doc.dose['equipment']}")
    if doc.pregnancy:
        _el(
            text,
            "paragraph",
            f"Statut de grossesse : {PREGNANCY_STATUS.get(doc.pregnancy.upper(), ('', 'inconnu'))[1]}",
        )
    table = _el(text, "table", border="0")
    head = _el(_el(table, "thead"), "tr")
    for label in ("Mesure", "Quantité"):
        _el(head, "th", label)
    body = _el(table, "tbody")
    for index, (field_, _code_value, label, unit) in enumerate(quantities, start=1):
        row = _el(body, "tr")
        _el(_el(row, "td"), "content", label, ID=f"mesure-{index}")
        _el(row, "td", f"{doc.dose[field_]} {unit}")
    if not quantities:
        _el(_el(body, "tr"), "td", "Non renseignée")

    procedure = _el(_el(section, "entry"), "procedure", classCode="PROC", moodCode="EVN")
    _template(procedure, "1.2.250.1.213.1.1.3.165")
    code = _code(
        procedure,
        "code",
        "121290",
        DCM,
        "Exposition du patient aux rayonnements ionisants",
        codeSystemName="DCM",
    )
    _el(_el(code, "originalText"), "reference", value="#exposition")
    role = _el(_el(procedure, "participant", typeCode="RESP"), "participantRole")
    if doc.author_national_id:
        _el(role, "id", root=PS_ROOT, extension=doc.author_national_id)
    _code(role, "code", "113850", DCM, "Autorisation d'irradiation", codeSystemName="DCM")
    _person_name(_el(role, "playingEntity"), doc.author_name)

    pregnancy = PREGNANCY_STATUS.get(doc.pregnancy.upper()) or (
        PREGNANCY_STATUS["N"] if str(doc.patient.get("sex", "")).upper() == "M" else PREGNANCY_STATUS["UNK"]
    )
    observation = _el(_el(section, "entry"), "observation", classCode="OBS", moodCode="EVN")
    _template(observation, "2.16.840.1.113883.10.20.6.2.13")
    _template(observation, "1.2.250.1.213.1.1.3.150")
    _uuid_id(observation)
    _code(observation, "code", "364320009", SNOMED, "statut de grossesse", codeSystemName="SNOMED CT")
    _el(observation, "statusCode", code="completed")
    _el(observation, "effectiveTime", value=ts(doc.exam_at or doc.signed_at))
    status = _code(observation, "value", pregnancy[0], SNOMED, pregnancy[1])
    status.set(f"{{{XSI_NS}}}type", "CD")
    _el(observation, "targetSiteCode", nullFlavor="NA")

    sites = _localisations(doc)
    for index, (field_, code_value, label, unit) in enumerate(quantities, start=1):
        value = str(doc.dose[field_]).replace(",", ".").strip()
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)?", value):
            continue
        observation = _el(_el(section, "entry"), "observation", classCode="OBS", moodCode="EVN")
        _template(observation, "2.16.840.1.113883.10.20.6.2.14")
        _template(observation, "1.2.250.1.213.1.1.3.154")
        _uuid_id(observation)
        _code(observation, "code", code_value, DCM, label, codeSystemName="DCM")
        _el(_el(observation, "text"), "reference", value=f"#mesure-{index}")
        _el(observation, "statusCode", code="completed")
        _el(observation, "effectiveTime", value=ts(doc.exam_at or doc.signed_at))
        quantity = _el(observation, "value", value=value, unit=unit)
        quantity.set(f"{{{XSI_NS}}}type", "PQ")
        site = _code(observation, "targetSiteCode", sites[0]["code"], SNOMED, sites[0].get("display", ""))
        site.set(f"{{{XSI_NS}}}type", "CD")


def _body(root: etree._Element, doc: ReportDocument) -> None:
    body = _el(_el(root, "component"), "structuredBody")
    if doc.addendum:
        section = _section(
            body, ("1.2.840.10008.9.6", "1.2.250.1.213.1.1.2.210"), ("55107-7", "Addendum", LOINC), "Addendum"
        )
        _narrative(_el(section, "text"), doc.addendum)
        author = _el(section, "author")
        _el(author, "time", value=ts(doc.signed_at))
        _professional(author, "assignedAuthor", doc)

    section = _section(
        body,
        ("1.2.840.10008.9.3", "1.2.250.1.213.1.1.2.206"),
        ("55111-9", "Description de l'acte d'imagerie", LOINC),
        "Indication et technique",
    )
    text = _el(section, "text")
    exam = _exam_code(doc)
    label = (
        f"[LOINC : {exam['code']}] {exam.get('display', '')}"
        if exam
        else doc.requested_procedure or doc.exam_title or "Examen d'imagerie"
    )
    _el(_el(text, "paragraph"), "content", label.strip(), ID="acte-1")
    if doc.modality:
        _el(text, "paragraph", f"Modalité : {modality_name(doc.modality)}")
    indication = _el(text, "paragraph")
    _el(indication, "caption", "Indication")
    _narrative(text, doc.indications)
    technique = _el(text, "paragraph")
    _el(technique, "caption", "Technique")
    _el(_el(text, "paragraph"), "content", doc.technique.strip() or "Non précisée.", ID="acte-1-technique")
    _technique_entry(section, doc)
    _catalog(section, doc)
    if is_ionising(doc.modality) and any(doc.dose.get(f) for f, *_ in DOSE_QUANTITIES):
        _exposure(section, doc)

    section = _section(
        body,
        ("2.16.840.1.113883.10.20.6.1.2", "1.2.250.1.213.1.1.2.208"),
        ("59776-5", "Résultats de l'acte", LOINC),
        "Résultats",
    )
    _narrative(_el(section, "text"), doc.results)
    section = _section(
        body,
        ("1.2.840.10008.9.5", "1.2.250.1.213.1.1.2.209"),
        ("19005-8", "Conclusions", LOINC),
        "Conclusion",
    )
    _narrative(_el(section, "text"), doc.conclusion)


def build_cda(doc: ReportDocument) -> bytes:
    """The CR-IMG 2024.01 document as UTF-8 XML bytes."""
    root = etree.Element(f"{{{CDA_NS}}}ClinicalDocument", nsmap=NSMAP)  # type: ignore[arg-type]
    _header(root, doc)
    _body(root, doc)
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True))
