"""Report templates per exam type (DESIGN.md §7): French skeletons of the Technique, Résultats and
Conclusion sections (ANS CR-IMG structure), the radiologist completing them.

Ionising exams (CT, radiography, fluoroscopy, mammography, nuclear medicine) carry a dose line in
the Technique section: the report of an exam using ionising radiation states the dose information
(Code de la santé publique, art. R1333-66; arrêté du 22 septembre 2006).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Modalities whose exams use ionising radiation (DICOM CS values).
IONISING_MODALITIES = frozenset({"CT", "CR", "DX", "RF", "XA", "MG", "IO", "PX", "NM", "PT", "DF", "RG"})


def is_ionising(modality: str) -> bool:
    """Whether exams of ``modality`` (DICOM CS, possibly ``CT\\SR``) use ionising radiation."""
    return any(part.strip().upper() in IONISING_MODALITIES for part in modality.split("\\"))


@dataclass(frozen=True)
class ReportTemplate:
    """A report skeleton for one exam type."""

    code: str
    title_fr: str
    title_en: str
    modality: str
    technique: str
    results: str
    conclusion: str
    #: Words of the request's anatomy or study description that suggest this template.
    keywords: tuple[str, ...] = ()

    @property
    def ionising(self) -> bool:
        return is_ionising(self.modality)

    def title(self, language: str) -> str:
        return self.title_en if language == "en" else self.title_fr


TEMPLATES: tuple[ReportTemplate, ...] = (
    ReportTemplate(
        code="ct-head",
        title_fr="Scanner cérébral",
        title_en="CT head",
        modality="CT",
        technique="Scanner cérébral en acquisition hélicoïdale, sans injection de produit de contraste.\n"
        "Reconstructions en fenêtres parenchymateuse et osseuse.",
        results="Pas d'hémorragie intra ou extra-axiale.\n"
        "Pas d'effet de masse ni de déviation de la ligne médiane.\n"
        "Bonne différenciation substance blanche – substance grise.\n"
        "Système ventriculaire de taille et de morphologie normales.\n"
        "Pas de lésion osseuse de la voûte ni de la base du crâne.",
        conclusion="Pas d'anomalie décelable sur ce scanner cérébral sans injection.",
        keywords=("tête", "tete", "crâne", "crane", "cérébral", "cerebral", "encéphale", "head", "brain"),
    ),
    ReportTemplate(
        code="ct-thorax",
        title_fr="Scanner thoracique",
        title_en="CT thorax",
        modality="CT",
        technique="Scanner thoracique en acquisition hélicoïdale, avec injection de produit de contraste "
        "iodé au temps artériel tardif.\nReconstructions en fenêtres médiastinale et parenchymateuse.",
        results="Parenchyme pulmonaire : pas de nodule ni de condensation.\n"
        "Pas d'épanchement pleural ni péricardique.\n"
        "Médiastin : pas d'adénomégalie.\n"
        "Pas d'embolie pulmonaire décelable jusqu'aux branches segmentaires.",
        conclusion="Scanner thoracique sans anomalie significative.",
        keywords=("thorax", "poumon", "pulmonaire", "chest", "lung"),
    ),
    ReportTemplate(
        code="mr-brain",
        title_fr="IRM cérébrale",
        title_en="MR brain",
        modality="MR",
        technique="IRM cérébrale : séquences T1, T2 FLAIR, diffusion, T2* et T1 après injection de "
        "chélate de gadolinium.",
        results="Pas d'anomalie de signal du parenchyme cérébral.\n"
        "Pas de restriction de la diffusion.\n"
        "Pas de prise de contraste anormale.\n"
        "Système ventriculaire et espaces sous-arachnoïdiens normaux.",
        conclusion="IRM cérébrale sans anomalie.",
        keywords=("tête", "tete", "cérébral", "cerebral", "encéphale", "head", "brain"),
    ),
    ReportTemplate(
        code="xr-thorax",
        title_fr="Radiographie thoracique",
        title_en="Chest X-ray",
        modality="DX",
        technique="Radiographie thoracique de face, en position debout, en inspiration.",
        results="Pas de foyer de condensation parenchymateuse.\n"
        "Pas d'épanchement pleural ni de pneumothorax.\n"
        "Silhouette cardio-médiastinale de taille normale.",
        conclusion="Radiographie thoracique normale.",
        keywords=("thorax", "poumon", "chest"),
    ),
    ReportTemplate(
        code="us-abdomen",
        title_fr="Échographie abdominale",
        title_en="Abdominal ultrasound",
        modality="US",
        technique="Échographie abdominale par voie sus-pubienne et intercostale, patient à jeun.",
        results="Foie de taille et d'échostructure normales, sans lésion focale.\n"
        "Vésicule biliaire alithiasique, voies biliaires non dilatées.\n"
        "Pancréas, rate et reins sans anomalie.\n"
        "Pas d'épanchement intra-péritonéal.",
        conclusion="Échographie abdominale normale.",
        keywords=("abdomen", "abdominal", "foie", "liver"),
    ),
)

BY_CODE = {template.code: template for template in TEMPLATES}


def get_template(code: str) -> ReportTemplate | None:
    """The template named ``code``."""
    return BY_CODE.get(code)


def suggest(modality: str, words: str) -> ReportTemplate | None:
    """The template of the exam's modality whose keywords the request or study mentions (the first
    of the modality when none does); None when no template has this modality."""
    text = words.lower()
    parts = {part.strip().upper() for part in modality.split("\\") if part.strip()}
    if parts & {"CR", "DX"}:
        parts |= {"CR", "DX"}
    candidates = [t for t in TEMPLATES if t.modality in parts or (t.modality == "DX" and "CR" in parts)]
    for template in candidates:
        if any(word in text for word in template.keywords):
            return template
    return candidates[0] if candidates else None


def dose_line(dose: dict[str, str], language: str = "fr") -> str:
    """The dose sentence of the Technique section, from the report's dose fields ("" when empty)."""
    fr = language != "en"
    parts = []
    if dose.get("ctdivol_mgy"):
        parts.append(f"IDSV (CTDIvol) {dose['ctdivol_mgy']} mGy")
    if dose.get("dlp_mgycm"):
        parts.append(f"{'PDL' if fr else 'DLP'} {dose['dlp_mgycm']} mGy·cm")
    if dose.get("dap_gycm2"):
        parts.append(f"{'PDS' if fr else 'DAP'} {dose['dap_gycm2']} Gy·cm²")
    if dose.get("fluoro_seconds"):
        parts.append(f"{'scopie' if fr else 'fluoroscopy'} {dose['fluoro_seconds']} s")
    if not parts:
        return ""
    return ("Dose délivrée : " if fr else "Dose delivered: ") + ", ".join(parts) + "."
