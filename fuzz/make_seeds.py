"""Write the seed corpora of the harnesses (``fuzz/corpus/NAME``) and the import media files.

Deterministic: the same pydicom and simral give the same bytes. Sources: files shipped by pydicom
for its own tests (re-encoded small), synthetic instances, HL7 messages shaped like the ANS
Téléradiologie samples and the PAM France ADT feed with the ANS test INS, hand-built
multipart bodies, ZIPs and a DICOMDIR (pydicom's FileSet). ``python -m fuzz.make_seeds``.
"""

from __future__ import annotations

import base64
import io
import shutil
import zipfile
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)

from fuzz import harness

CORPUS = harness.CORPUS_DIR
#: Files of the import harness's fixed media (referenced by the seed DICOMDIR).
MEDIA = harness.FUZZ_DIR / "media"
INS_TEST_OID = "1.2.250.1.213.1.4.10"
NIR = "279035121518989"  # ANS test NIR
UID_ROOT = "1.2.826.0.1.3680043.8.498.4242."  # pydicom's root, simral fuzz seeds


def _uid(n: int) -> str:
    return f"{UID_ROOT}{n}"


def _instance(n: int, *, transfer_syntax: str = ExplicitVRLittleEndian, with_ins: bool = False) -> bytes:
    """A small synthetic MR image (4×4, 16 bit) of the ANS test patient."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = _uid(1000 + n)
    ds.StudyInstanceUID = _uid(1)
    ds.SeriesInstanceUID = _uid(10 + n % 2)
    ds.Modality = "MR"
    ds.PatientName = "PAT-TROIS^DOMINIQUE"
    ds.PatientID = "IPP-CHX-1"
    ds.IssuerOfPatientID = "CHX"
    ds.PatientBirthDate = "19790328"
    ds.PatientSex = "F"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20260106", "134418.5", "ACC-1"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1 + n % 2, n
    ds.ReferringPhysicianName = "HODA^ADAM"
    if with_ins:
        qualifiers = Dataset()
        qualifiers.UniversalEntityID = INS_TEST_OID
        qualifiers.UniversalEntityIDType = "ISO"
        other = Dataset()
        other.PatientID = NIR
        other.IssuerOfPatientID = "ASIP-SANTE-INS-NIR"
        other.IssuerOfPatientIDQualifiersSequence = Sequence([qualifiers])
        other.TypeOfPatientID = "TEXT"
        ds.OtherPatientIDsSequence = Sequence([other])
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(range(32))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _pydicom_file(name: str) -> bytes:
    return Path(str(get_testdata_file(name))).read_bytes()


def dicom_seeds() -> dict[str, bytes]:
    """Part 10 files: every native transfer syntax, deflate, RLE, JPEG, RT objects, sequences."""
    seeds = {
        "synthetic-explicit-le.dcm": _instance(1),
        "synthetic-implicit-le.dcm": _instance(2, transfer_syntax=ImplicitVRLittleEndian),
        "synthetic-explicit-be.dcm": _instance(3, transfer_syntax=ExplicitVRBigEndian),
        "synthetic-deflated.dcm": _instance(4, transfer_syntax=DeflatedExplicitVRLittleEndian),
        "synthetic-ins.dcm": _instance(5, with_ins=True),
    }
    for name in (
        "image_dfl.dcm",
        "rtplan.dcm",
        "rtstruct.dcm",
        "SC_rgb_small_odd.dcm",
        "SC_rgb_rle.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "nested_priv_SQ.dcm",
        "MR_small_bigendian.dcm",
    ):
        seeds[f"pydicom-{name}"] = _pydicom_file(name)
    return seeds


# ------------------------------------------------------------------------------------------ HL7

MSH_TLR = (
    "MSH|^~\\&|StructureApp|StructureFacility|TLRapp|TLRfacility|20260106134418||{type}|{id}|P|2.5.1"
    "|||||FRA|UNICODE UTF-8|||1.0^CISIS_TLR_HL7_V2"
)
PID_TLR = (
    f"PID|||{NIR}^^^ASIP-SANTE-INS-NIR&{INS_TEST_OID}&ISO^INS^^20101207~IPP-CHX-1^^^CHX&"
    f"{harness.SITE_IPP_OID}&ISO^PI||PAT-TROIS^DOMINIQUE^DOMINIQUE^^^^L||19790328|F|||"
    "28 Av de Breteuil^^PARIS^^75007^FRA^H~^^^^^^BDL^^63220|||||||||||||||||||||VALI"
)
PV1 = "PV1||O|||||||||||||||||000897406^^^CHU-X&000897406&M^VN^^20210409"
ORC = (
    "ORC|{control}|PL-{placer}^^1.2.250.1.748.12345678.12^ISO|||||^^^20260107080000^20260107200000^R||"
    "20260106134418|||801234567897^Hoda^Adam^^^DR^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^D^^^IDNPS||"
    "^PRN^CP^^^^^^^^^+3360708091||{reason}|STRUCTURE_IMAGERIE^^TLR_TYPE_ORGANISATION||||"
    "Structure-Y^^^^^ASIP-SANTE-ST&1.2.250.1.71.4.2.2&ISO^FINEG^^^300017985"
)


def _tiny_pdf() -> bytes:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=10)
    pdf.cell(text="Demande d'examen")
    pdf.set_creation_date(__import__("datetime").datetime(2026, 1, 6))
    return bytes(pdf.output())


def hl7_seeds() -> dict[str, bytes]:
    """ADT (PAM France), PDQ, and the Téléradiologie flux 1, 2, 4 and CDA document messages."""
    adt_msh = (
        "MSH|^~\\&|GAM_CHA|CHA|SIMRAL|GRADES|20260106134418||ADT^{event}^{structure}|{id}|P|2.5"
        "|||||FRA|UNICODE UTF-8"
    )
    pid = (
        f"PID|||IPP-{{ipp}}^^^CHA&1.2.250.1.999.1.1&ISO^PI~{NIR}^^^ASIP-SANTE-INS-NIR&{INS_TEST_OID}&ISO^INS||"
        "PAT-TROIS^DOMINIQUE^DOMINIQUE^^^^L~MARTIN^DOMI^^^^^D||19790328|F|||^^^^^^BDL^^63220"
        "|||||||||||||||||||||QUAL"
    )
    messages = {
        "adt-a28.hl7": [adt_msh.format(event="A28", structure="ADT_A05", id="A28-1"), pid.format(ipp=1)],
        "adt-a31.hl7": [adt_msh.format(event="A31", structure="ADT_A05", id="A31-1"), pid.format(ipp=1)],
        "adt-a40.hl7": [
            adt_msh.format(event="A40", structure="ADT_A39", id="A40-1"),
            pid.format(ipp=2),
            "MRG|IPP-1^^^CHA&1.2.250.1.999.1.1&ISO^PI",
        ],
        "adt-a47.hl7": [
            adt_msh.format(event="A47", structure="ADT_A30", id="A47-1"),
            pid.format(ipp=3),
            "MRG|IPP-2^^^CHA&1.2.250.1.999.1.1&ISO^PI",
        ],
        "adt-a24.hl7": [
            adt_msh.format(event="A24", structure="ADT_A24", id="A24-1"),
            pid.format(ipp=4),
            pid.format(ipp=5).replace("CHA&1.2.250.1.999.1.1", "CHB&1.2.250.1.999.2.1"),
        ],
        "pdq-q22.hl7": [
            "MSH|^~\\&|PDQ_CONS|CHA|SIMRAL|GRADES|20260106134418||QBP^Q22^QBP_Q21|Q22-1|P|2.5",
            "QPD|IHE PDQ Query|Q-1|@PID.5.1.1^PAT-TROIS~@PID.7^19790328",
            "RCP|I|10^RD",
        ],
        "tlr-flux1-orm-nw.hl7": [
            MSH_TLR.format(type="ORM^O01^ORM_O01", id="TLR-1"),
            PID_TLR,
            PV1,
            ORC.format(control="NW", placer=1, reason=""),
            "OBR||PL-1^^1.2.250.1.748.12345678.12^ISO||TRANSMISSION_DEMANDE^Transmission^TLR_OBR_PROCEDURE"
            "|||||||||Céphalées brutales|||801234567897^Hoda^Adam",
            "NTE|||Bilan étiologique|FINALITE_EXAMEN^^HL70364",
            "OBX|1|CE|MODALITE_IMAGERIE^Modalité^TLR_OBSERVATION||MR^IRM^DCM||||||O",
            "OBX|2|CE|REGION_ANATOMIQUE^Localisation^TLR_OBSERVATION|1.1|774007^tête et/ou cou^SCT||||||O",
            "OBX|3|FT|11322-5^History^LN||HTA traitée\\.br\\diabète||||MAJEUR|||O",
            "OBX|4|NM|8302-2^Body height^LN||1,70|m|||||O",
            "OBX|5|NM|29463-7^Body weight^LN||68000|g|||||O",
            "OBX|6|CE|82810-3^Pregnancy status^LN||N^^expandedYes-NoIndicator||||||O",
            "OBX|7|ED|55115-0^Demande d'examen^LN||^APPLICATION^PDF^Base64^"
            + base64.b64encode(_tiny_pdf()).decode()
            + "||||||O|||20260106",
        ],
        "tlr-flux2-orm-ca.hl7": [
            MSH_TLR.format(type="ORM^O01^ORM_O01", id="TLR-2"),
            PID_TLR,
            ORC.format(control="CA", placer=1, reason="^Patient transféré"),
            "OBR||PL-1^^1.2.250.1.748.12345678.12^ISO||ANNULATION_DEMANDE^Annulation^TLR_OBR_PROCEDURE",
        ],
        "tlr-flux4-omi-sr.hl7": [
            MSH_TLR.format(type="OMI^O23^OMI_O23", id="TLR-4"),
            PID_TLR,
            "ORC|SR|PL-1^^1.2.250.1.748.12345678.12^ISO",
            "TQ1||||||730^jours|20260106184418+0100",
            "OBR||PL-1^^1.2.250.1.748.12345678.12^ISO||COMPLEMENT_POST_ACTE^Complément^TLR_OBR_PROCEDURE",
            "OBX|1|ED|URL_PARTIELLE_VIEWER^URL^TLR_OBSERVATION||^TEXT^^Base64^"
            + base64.b64encode(b"https://drimbox.chx.example/ohif/viewer?StudyInstanceUIDs=").decode()
            + "||||||F",
            "OBX|2|CE|CODE_ACTE_IMAGERIE^Code^TLR_OBSERVATION||24590-2^IRM cerveau^LN||||||F",
            "OBX|3|CE|PRODUIT_ADMINISTRE^Produit^TLR_OBSERVATION|1.1|V09^^ATC||||||F",
            "OBX|4|NM|PRODUIT_ADMINISTRE^Produit^TLR_OBSERVATION|1.3|15|ml|||||F",
            "OBX|5|TX|APPAREIL_IMAGERIE^Appareil^TLR_OBSERVATION|1.2|Modèle X||||||F",
            f"IPC|ACC-1^^1.2.250.1.925.994044.27^ISO|24590-2^^2.16.840.1.113883.6.1^ISO|{_uid(1)}|",
        ],
        "ihe-omi-nw.hl7": [
            MSH_TLR.format(type="OMI^O23^OMI_O23", id="OMI-1").replace("2.5.1|", "2.5|"),
            PID_TLR,
            ORC.format(control="NW", placer=2, reason=""),
            "TQ1|||||||20260107080000|20260107200000|S",
            "OBR||PL-2^^1.2.250.1.748.12345678.12^ISO||CT-THORAX^Scanner thorax^L",
            f"IPC|ACC-2^^1.2.250.1.925.994044.27^ISO|RP-2|{_uid(2)}|SPS-2|CT",
        ],
        "cda-oru-r01.hl7": [
            "MSH|^~\\&|StructureApp|StructureFacility|TLRapp|TLRfacility|20260106134418||ORU^R01^ORU_R01|DOC-1"
            "|P|2.5.1|||||FRA|UNICODE UTF-8|||2.1^CISIS_CDA_HL7_V2",
            PID_TLR,
            "ORC|RE|PL-1^^1.2.250.1.748.12345678.12^ISO",
            "OBR|1|PL-1^^1.2.250.1.748.12345678.12^ISO||11488-4^Compte rendu^LN",
            "OBX|1|ED|11488-4^Compte rendu^LN||^TEXT^XML^Hex^3c3f786d6c3f3e||||||F",
        ],
    }
    vt, fs, cr = b"\x0b", b"\x1c", b"\r"
    seeds = {name: vt + "\r".join(segments).encode() + cr + fs + cr for name, segments in messages.items()}
    # Two messages in one stream, one sent bare (the harness frames unframed input itself).
    seeds["adt-two-frames.hl7"] = seeds["adt-a28.hl7"] + seeds["adt-a31.hl7"]
    seeds["adt-bare-latin1.hl7"] = (
        "\r".join(messages["adt-a28.hl7"])
        .replace("UNICODE UTF-8", "8859/1")
        .replace("PAT-TROIS", "PAT-TRÖIS")
    ).encode("latin-1")
    return seeds


# ----------------------------------------------------------------------------------------- STOW


def _multipart(boundary: str, parts: list[tuple[str, bytes]], *, closing: bool = True) -> bytes:
    body = b""
    for index, (content_type, data) in enumerate(parts):
        body += (b"\r\n" if index else b"") + f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
        body += data
    return body + (f"\r\n--{boundary}--\r\n".encode() if closing else b"")


def stow_seeds() -> dict[str, bytes]:
    """``Content-Type`` line, then the body (see ``fuzz_stow``)."""
    one, two, ins = (
        _instance(1),
        _instance(2, transfer_syntax=ImplicitVRLittleEndian),
        _instance(5, with_ins=True),
    )
    typed = 'multipart/related; type="application/dicom"; boundary=B0UND'
    return {
        "stow-one.txt": typed.encode() + b"\n" + _multipart("B0UND", [("application/dicom", one)]),
        "stow-two-quoted.txt": b'multipart/related; type="application/dicom"; boundary="q b"\n'
        + _multipart("q b", [("application/dicom", one), ("application/dicom; transfer-syntax=*", two)]),
        "stow-untyped.txt": b"multipart/related; boundary=x\n" + _multipart("x", [("", ins)]),
        "stow-json-part.txt": typed.encode()
        + b"\n"
        + _multipart("B0UND", [("application/dicom+json", b"[{}]")]),
        "stow-truncated.txt": typed.encode()
        + b"\n"
        + _multipart("B0UND", [("application/dicom", one)], closing=False),
        "stow-preamble.txt": typed.encode()
        + b"\npreamble text\r\n"
        + _multipart("B0UND", [("application/dicom", one)])
        + b"epilogue",
    }


# --------------------------------------------------------------------------------------- import


def _fileset() -> tuple[bytes, dict[str, bytes]]:
    """A DICOMDIR and its two referenced files (PS3.10 §8, pydicom's FileSet)."""
    work = harness.WORK_DIR / "fileset"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sources = []
    for n in (11, 12):
        source = work / f"src{n}.dcm"
        source.write_bytes(_instance(n))
        sources.append(source)
    fs = FileSet()
    for source in sources:
        fs.add(dcmread(source))
    out = work / "media"
    fs.write(out)
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    dicomdir = files.pop("DICOMDIR")
    shutil.rmtree(work, ignore_errors=True)
    return dicomdir, files


def _zip(members: dict[str, bytes], *, method: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=method) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 6, 13, 44, 18))
            info.compress_type = method
            zf.writestr(info, data)
    return out.getvalue()


def import_seeds() -> tuple[dict[str, bytes], dict[str, bytes]]:
    """``fuzz_import`` inputs (mode byte: 0 ZIP upload, 1 DICOMDIR of the fixed media) and the
    fixed media files."""
    dicomdir, media = _fileset()
    pdi = {"DICOMDIR": dicomdir, **media, "README.TXT": b"Examens du CH X\r\n"}
    seeds = {
        "zip-two-instances.bin": b"\x00" + _zip({"a/one.dcm": _instance(1), "b/two.dcm": _instance(2)}),
        "zip-stored.bin": b"\x00" + _zip({"one.dcm": _instance(3)}, method=zipfile.ZIP_STORED),
        "zip-pdi-media.bin": b"\x00" + _zip(pdi),
        "dicomdir.bin": b"\x01" + dicomdir,
    }
    return seeds, media


def _write(folder: Path, files: dict[str, bytes]) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def main() -> None:
    _write(CORPUS / "ingest", dicom_seeds())
    _write(CORPUS / "hl7", hl7_seeds())
    _write(CORPUS / "stow", stow_seeds())
    seeds, media = import_seeds()
    _write(CORPUS / "import", seeds)
    _write(MEDIA, media)
    from fuzz import fuzz_dimse

    _write(CORPUS / "dimse", fuzz_dimse.seeds(dicom_seeds()))
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    print(f"seed corpora written: {total} bytes")


if __name__ == "__main__":
    main()
