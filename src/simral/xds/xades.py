"""The signature document of an XDS submission: IHE DSG detached signature (ITI TF-3 §5.5.2-5.5.3),
XAdES (ETSI EN 319 132-1) with a ``ds:Manifest`` holding one ``ds:Reference`` per signed document
(URI ``urn:oid:<uniqueId>``, SHA-256 of its bytes) and the signature purpose as
``CommitmentTypeIndication`` (ASTM E1762, DSG Table 5.5.2-1). Signed with signxml.

Deviation from DSG §5.5.3.1, on purpose: the SubmissionSet uniqueId is not listed in the manifest with
the digest "0" DSG asks for, because "0" is not a valid ``ds:DigestValue`` (xmldsig-core schema,
base64Binary) and schema-checking verifiers (signxml among them) reject the whole signature. The
submission is bound by the ``signs`` association from the signature entry to the SubmissionSet, as in
the DRIM-M ``XDS.xml`` sample, and every document of the submission is in the manifest.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from lxml import etree
from signxml import CanonicalizationMethod, DigestAlgorithm, SignatureConstructionMethod, SignatureMethod
from signxml.util import SigningSettings
from signxml.xades import XAdESDataObjectFormat, XAdESSigner

DS = "http://www.w3.org/2000/09/xmldsig#"
XADES = "http://uri.etsi.org/01903/v1.3.2#"
MANIFEST_ID = "IHEManifest"
MANIFEST_TYPE = "http://www.w3.org/2000/09/xmldsig#Manifest"
SHA256 = "http://www.w3.org/2001/04/xmlenc#sha256"
#: The signature purpose (ASTM E1762-95(2013), OID arc 1.2.840.10065.1.12.1): "Source Signature".
PURPOSE_SOURCE = "1.2.840.10065.1.12.1.14"


@dataclass(frozen=True)
class SigningIdentity:
    """The organisation's signing certificate (PEM, leaf first, then its chain) and private key (PEM)."""

    certificate_pem: bytes
    key_pem: bytes
    key_password: bytes | None = None

    @classmethod
    def from_files(
        cls, certificate: Path, key: Path, *, chain: Path | None = None, key_password: bytes | None = None
    ) -> SigningIdentity:
        pem = certificate.read_bytes() + (chain.read_bytes() if chain is not None else b"")
        return cls(certificate_pem=pem, key_pem=key.read_bytes(), key_password=key_password)

    def certificates(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.certificate_pem)

    def private_key(self) -> rsa.RSAPrivateKey:
        """The RSA key (IGC-Santé organisation certificates are RSA; signatures are RSA-SHA256)."""
        key = serialization.load_pem_private_key(self.key_pem, password=self.key_password)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise TypeError("the DMP signing identity must be an RSA key")
        return key

    def subject_dn(self) -> str:
        """The leaf certificate's subject, most specific RDN first (``CN=…, OU=…, O=…, C=FR``)."""
        rdns = self.certificates()[0].subject.rdns
        return ", ".join(rdn.rfc4514_string() for rdn in reversed(rdns))


def digest(content: bytes) -> str:
    """Base64 SHA-256 of a document, as in its manifest ``ds:Reference``."""
    return base64.b64encode(hashlib.sha256(content).digest()).decode()


def _manifest(documents: Sequence[tuple[str, bytes]]) -> etree._Element:
    # Inclusive C14N renders every in-scope namespace: declare those of the enclosing ds:Signature now,
    # so the manifest digests the same alone (when signed) and inside the signature (when verified).
    manifest = etree.Element(f"{{{DS}}}Manifest", nsmap={"ds": DS, "xades": XADES}, Id=MANIFEST_ID)
    for unique_id, content in documents:
        reference = etree.SubElement(manifest, f"{{{DS}}}Reference", URI=f"urn:oid:{unique_id}")
        etree.SubElement(reference, f"{{{DS}}}DigestMethod", Algorithm=SHA256)
        etree.SubElement(reference, f"{{{DS}}}DigestValue").text = digest(content)
    return manifest


class _DsgSigner(XAdESSigner):
    """signxml's XAdES signer, with the DSG manifest as the signed object and the commitment type."""

    def __init__(self, manifest: etree._Element, purpose: str, **kwargs: Any) -> None:
        super().__init__(
            data_object_format=XAdESDataObjectFormat(Description="IHE DSG manifest", MimeType="text/xml"),
            **kwargs,
        )
        self._manifest = manifest
        self._purpose = purpose
        self.signed_data_object_properties_annotators.append(self._add_commitment_type)
        self.signature_annotators.append(self._embed_manifest)

    def _add_commitment_type(
        self,
        signed_data_object_properties: etree._Element,
        sig_root: etree._Element,
        signing_settings: SigningSettings,
    ) -> None:
        indication = etree.SubElement(signed_data_object_properties, f"{{{XADES}}}CommitmentTypeIndication")
        type_id = etree.SubElement(indication, f"{{{XADES}}}CommitmentTypeId")
        etree.SubElement(
            type_id, f"{{{XADES}}}Identifier", Qualifier="OIDAsURN"
        ).text = f"urn:oid:{self._purpose}"
        etree.SubElement(type_id, f"{{{XADES}}}Description").text = "Source Signature"
        etree.SubElement(indication, f"{{{XADES}}}AllSignedDataObjects")

    def _embed_manifest(self, sig_root: etree._Element, signing_settings: SigningSettings) -> None:
        """Put the (already digested) manifest in a ds:Object and type its reference."""
        ds_object = etree.SubElement(sig_root, f"{{{DS}}}Object")
        ds_object.append(self._manifest)
        signed_info = sig_root.find(f"{{{DS}}}SignedInfo")
        assert signed_info is not None
        for reference in signed_info.iterfind(f"{{{DS}}}Reference"):
            if reference.get("URI") == f"#{MANIFEST_ID}":
                reference.set("Type", MANIFEST_TYPE)


def sign_documents(
    documents: Sequence[tuple[str, bytes]], signer: SigningIdentity, *, purpose: str = PURPOSE_SOURCE
) -> bytes:
    """The XAdES detached signature document over ``documents`` (uniqueId, content), serialised."""
    manifest = _manifest(documents)
    xades = _DsgSigner(
        manifest,
        purpose,
        method=SignatureConstructionMethod.detached,
        signature_algorithm=SignatureMethod.RSA_SHA256,
        digest_algorithm=DigestAlgorithm.SHA256,
        # DSG §5.5.2: Canonical XML 1.1 with comments.
        c14n_algorithm=CanonicalizationMethod.CANONICAL_XML_1_1_WITH_COMMENTS,
    )
    signature = xades.sign(
        manifest,
        key=signer.private_key(),
        cert=signer.certificates(),
        reference_uri=f"#{MANIFEST_ID}",
        always_add_key_value=False,
    )
    return etree.tostring(signature, xml_declaration=True, encoding="UTF-8")


def signing_time(signature_document: bytes) -> dt.datetime | None:
    """The XAdES SigningTime of a signature document, if present."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    root = etree.fromstring(signature_document, parser)
    text = root.findtext(f".//{{{XADES}}}SigningTime")
    return dt.datetime.fromisoformat(text) if text else None
