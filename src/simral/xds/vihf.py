"""The VIHF 3.0 token (ANS CI-SIS "Volet Gestion de l'identité et de l'authentification",
"Vecteur d'Identification et d'Habilitation Formelles"): a SAML 2.0 assertion signed with the
organisation's certificate, carried in the WS-Security header of every DMP call (DMP integration guide,
"authentification indirecte": the structure authenticates, the professional is named in the token).

Shape as in the DRIM-M ``XDS.xml`` sample: Issuer = the signing certificate's subject DN
(X509SubjectName), NameID = the professional's national id, AuthnStatement (TLSClient), attributes
VIHF_Version, Identifiant_Structure, Secteur_Activite, subject-id, subject:role (profession + specialty,
HL7 CE), resource-id (INS), purposeofuse (HL7 CE), Ressource_URN, Authentification_Mode and the LPS
fields. Enveloped XML signature (exclusive C14N, RSA-SHA256) by signxml, placed after Issuer
(SAML 2.0 core §2.3.3 sequence).
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from lxml import etree
from signxml import (
    CanonicalizationMethod,
    DigestAlgorithm,
    SignatureConstructionMethod,
    SignatureMethod,
    XMLSigner,
)

from simral.xds.metadata import Code
from simral.xds.xades import DS, SigningIdentity

SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
HL7 = "urn:hl7-org:v3"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
X509_SUBJECT_NAME = "urn:oasis:names:tc:SAML:1.1:nameid-format:X509SubjectName"
AUTHN_TLS_CLIENT = "urn:oasis:names:tc:SAML:2.0:ac:classes:TLSClient"

ATTR_SUBJECT_ID = "urn:oasis:names:tc:xspa:1.0:subject:subject-id"
ATTR_ROLE = "urn:oasis:names:tc:xacml:2.0:subject:role"
ATTR_RESOURCE_ID = "urn:oasis:names:tc:xacml:2.0:resource:resource-id"
ATTR_PURPOSE_OF_USE = "urn:oasis:names:tc:xspa:1.0:subject:purposeofuse"

#: PurposeOfUse "normal" access (JDV mode d'accès VIHF, 1.2.250.1.213.1.1.4.248).
PURPOSE_NORMAL = Code("normal", "1.2.250.1.213.1.1.4.248", "Acces normal")


@dataclass(frozen=True)
class VihfContext:
    """Who calls the DMP, for which patient and how (the VIHF attributes)."""

    professional_id: str  # NameID: national id, "8" + RPPS
    professional_name: str  # subject-id: "Prénom NOM"
    profession: Code  # role: profession (G15, 1.2.250.1.71.1.2.7), e.g. 10 "Médecin"
    specialty: Code | None  # role: specialty (R38/SM, 1.2.250.1.71.4.2.5), e.g. SM44 "Radio-diagnostic"
    structure_id: str  # Identifiant_Structure (IDNST of the structure)
    sector: Code  # Secteur_Activite (1.2.250.1.71.4.2.4), e.g. SA01 "Établissement public de santé"
    patient_ins: str  # resource-id: "matricule^^^&OID&ISO^NH"
    lps_name: str
    lps_version: str
    lps_id: str  # LPS_ID: the software instance id
    lps_homologation_id: str  # LPS_ID_HOMOLOGATION_DMP
    purpose_of_use: Code = PURPOSE_NORMAL
    authentication_mode: str = "INDIRECTE"
    resource_urn: str = "urn:dmp"
    issuer_dn: str | None = None  # default: the signing certificate's subject DN


def _saml(tag: str) -> str:
    return f"{{{SAML}}}{tag}"


def _instant(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _attribute(statement: etree._Element, name: str, *values: str | etree._Element) -> None:
    attribute = etree.SubElement(statement, _saml("Attribute"), Name=name)
    for value in values:
        holder = etree.SubElement(attribute, _saml("AttributeValue"))
        if isinstance(value, str):
            holder.text = value
        else:
            holder.append(value)


def _ce(tag: str, code: Code, system_name: str) -> etree._Element:
    """An HL7 v3 CE element (``Role``, ``PurposeOfUse``) as VIHF carries it."""
    element = etree.Element(f"{{{HL7}}}{tag}", nsmap={None: HL7, "xsi": XSI})
    element.set("code", code.code)
    element.set("codeSystem", code.scheme)
    element.set("codeSystemName", system_name)
    element.set("displayName", code.display)
    element.set(f"{{{XSI}}}type", "CE")
    return element


def vihf_assertion(
    context: VihfContext, signer: SigningIdentity, *, now: dt.datetime | None = None
) -> etree._Element:
    """The signed VIHF 3.0 SAML 2.0 assertion."""
    issued = now or dt.datetime.now(dt.UTC)
    assertion_id = f"_{uuid.uuid4()}"
    assertion = etree.Element(
        _saml("Assertion"),
        nsmap={"saml2": SAML},
        ID=assertion_id,
        IssueInstant=_instant(issued),
        Version="2.0",
    )
    issuer = etree.SubElement(assertion, _saml("Issuer"), Format=X509_SUBJECT_NAME)
    issuer.text = context.issuer_dn or signer.subject_dn()
    # signxml replaces this placeholder by the signature, keeping the SAML element order.
    etree.SubElement(assertion, f"{{{DS}}}Signature", nsmap={"ds": DS}, Id="placeholder")
    subject = etree.SubElement(assertion, _saml("Subject"))
    etree.SubElement(subject, _saml("NameID")).text = context.professional_id
    authn = etree.SubElement(assertion, _saml("AuthnStatement"), AuthnInstant=_instant(issued))
    authn_context = etree.SubElement(authn, _saml("AuthnContext"))
    etree.SubElement(authn_context, _saml("AuthnContextClassRef")).text = AUTHN_TLS_CLIENT
    statement = etree.SubElement(assertion, _saml("AttributeStatement"))
    _attribute(statement, "VIHF_Version", "3.0")
    _attribute(statement, "Secteur_Activite", f"{context.sector.code}^{context.sector.scheme}")
    _attribute(statement, "Ressource_URN", context.resource_urn)
    _attribute(statement, ATTR_SUBJECT_ID, context.professional_name)
    _attribute(statement, "Identifiant_Structure", context.structure_id)
    _attribute(statement, "LPS_ID", context.lps_id)
    _attribute(statement, "LPS_Nom", context.lps_name)
    _attribute(statement, "LPS_ID_HOMOLOGATION_DMP", context.lps_homologation_id)
    _attribute(statement, "LPS_Version", context.lps_version)
    _attribute(statement, ATTR_RESOURCE_ID, context.patient_ins)
    _attribute(statement, "Authentification_Mode", context.authentication_mode)
    _attribute(
        statement, ATTR_PURPOSE_OF_USE, _ce("PurposeOfUse", context.purpose_of_use, "mode acces VIHF 1.0")
    )
    roles = [_ce("Role", context.profession, "G15")]
    if context.specialty is not None:
        roles.append(_ce("Role", context.specialty, "R38"))
    _attribute(statement, ATTR_ROLE, *roles)
    signed: etree._Element = XMLSigner(
        method=SignatureConstructionMethod.enveloped,
        signature_algorithm=SignatureMethod.RSA_SHA256,
        digest_algorithm=DigestAlgorithm.SHA256,
        c14n_algorithm=CanonicalizationMethod.EXCLUSIVE_XML_CANONICALIZATION_1_0,
    ).sign(assertion, key=signer.private_key(), cert=signer.certificates(), id_attribute="ID")
    return signed


def attributes(assertion: etree._Element) -> dict[str, list[str | etree._Element]]:
    """The VIHF attributes by name: text values, or the HL7 CE element for roles / purpose of use."""
    found: dict[str, list[str | etree._Element]] = {}
    for attribute in assertion.iterfind(f"{_saml('AttributeStatement')}/{_saml('Attribute')}"):
        values: list[str | etree._Element] = []
        for holder in attribute.iterfind(_saml("AttributeValue")):
            child = next(iter(holder), None)
            values.append(child if child is not None else (holder.text or ""))
        found[attribute.get("Name", "")] = values
    return found
