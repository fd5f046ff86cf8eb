"""The DMP client: TD0.2, ITI-41 Provide and Register Document Set-b (ITI TF-2b §3.41) and ITI-57
Update Document Set (ITI TF-2b §3.57) over SOAP 1.2 + WS-Addressing + MTOM, mutual TLS with the
organisation's certificate, the VIHF in WS-Security.

Endpoints, certificates and the LPS identifiers are the caller's configuration (:class:`DmpEndpoint`,
:class:`~simral.xds.vihf.VihfContext`): the DMP test platform is targeted by configuration alone.
Outcomes: a :class:`~simral.xds.soap.RegistryResponse` on success (warnings kept), :class:`XdsRegistryError`
when the DMP answers with a failure (registry errors or SOAP fault, codes kept so the caller can tell
permanent from transient), :class:`XdsUnavailable` when there is no usable answer (timeout, TLS or
connection failure, HTTP error without a SOAP body).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from lxml import etree

from simral.xds.metadata import (
    STATUS_APPROVED,
    ProvideAndRegister,
    SubmissionSet,
    availability_status_update,
)
from simral.xds.soap import (
    ACTION_ITI41,
    ACTION_ITI57,
    ACTION_TD02,
    STATUS_FAILURE,
    DmpPatientStatus,
    RegistryError,
    RegistryResponse,
    SoapFormatError,
    body_of,
    envelope,
    mtom_encode,
    parse_message,
    registry_response,
    soap_fault,
    td02_request,
    td02_status,
)
from simral.xds.vihf import VihfContext, vihf_assertion
from simral.xds.xades import SigningIdentity


class XdsRegistryError(Exception):
    """The DMP answered and refused: its RegistryErrors (or the SOAP fault as one error)."""

    def __init__(self, status: str, errors: Sequence[RegistryError]) -> None:
        self.status = status
        self.errors = tuple(errors)
        summary = ", ".join(e.code for e in self.errors) or status
        super().__init__(f"DMP registry failure: {summary}")

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(e.code for e in self.errors)


class XdsUnavailable(Exception):
    """No usable answer from the DMP (timeout, connection or TLS failure, non-SOAP HTTP error)."""


@dataclass(frozen=True)
class DmpEndpoint:
    """Where and how to reach the DMP (production or the test platform), from configuration."""

    iti41_url: str
    iti57_url: str
    td02_url: str
    tls_certificate: Path  # the organisation's TLS client certificate (PEM, chain may follow)
    tls_key: Path
    ca_bundle: Path | None  # CAs trusted for the DMP's server certificate; None: the system's
    #: The sender device's OID in HL7 v3 messages (TD0.2 message, query and device ids): configuration.
    sender_oid: str
    timeout: float = 60.0
    sender_name: str = "simral"


class DmpClient:
    """One DMP connection (httpx over mutual TLS). Use as a context manager or call :meth:`close`."""

    def __init__(self, endpoint: DmpEndpoint, signer: SigningIdentity) -> None:
        self.endpoint = endpoint
        self.signer = signer
        cafile = str(endpoint.ca_bundle) if endpoint.ca_bundle is not None else None
        context = ssl.create_default_context(cafile=cafile)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(endpoint.tls_certificate), str(endpoint.tls_key))
        self._http = httpx.Client(verify=context, timeout=endpoint.timeout, trust_env=False)

    def __enter__(self) -> DmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ transport

    def _call(
        self,
        url: str,
        action: str,
        body: etree._Element,
        context: VihfContext,
        attachments: dict[str, bytes] | None = None,
    ) -> etree._Element:
        """POST one SOAP request, return the answer's envelope (a SOAP fault raises XdsRegistryError)."""
        env = envelope(action=action, to=url, body=body, assertion=vihf_assertion(context, self.signer))
        if attachments is not None:
            message = mtom_encode(env, attachments, action=action)
            content_type, payload = message.content_type, message.body
        else:
            content_type = f'application/soap+xml; charset=UTF-8; action="{action}"'
            payload = etree.tostring(env, xml_declaration=True, encoding="UTF-8")
        try:
            response = self._http.post(url, content=payload, headers={"Content-Type": content_type})
        except httpx.HTTPError as exc:  # timeouts, refused connections, TLS handshake failures
            raise XdsUnavailable(f"{action}: {type(exc).__name__}: {exc}") from exc
        try:
            answer, _ = parse_message(response.headers.get("content-type", ""), response.content)
        except SoapFormatError as exc:
            raise XdsUnavailable(f"{action}: HTTP {response.status_code}, no SOAP answer ({exc})") from exc
        fault = soap_fault(answer)
        if fault is not None:
            code = fault.subcode or fault.code
            raise XdsRegistryError(STATUS_FAILURE, [RegistryError(code, "SOAPFault", fault.reason, "")])
        return answer

    def _registry_call(
        self,
        url: str,
        action: str,
        body: etree._Element,
        context: VihfContext,
        attachments: dict[str, bytes] | None = None,
    ) -> RegistryResponse:
        answer = self._call(url, action, body, context, attachments)
        try:
            response = registry_response(body_of(answer))
        except SoapFormatError as exc:
            raise XdsUnavailable(f"{action}: unexpected answer ({exc})") from exc
        if not response.success:
            raise XdsRegistryError(response.status, response.errors)
        return response

    # ------------------------------------------------------------------ transactions

    def check_patient(self, context: VihfContext, *, ins: str, ins_oid: str) -> DmpPatientStatus:
        """TD0.2: does the patient's DMP exist and is access authorised (to call before ITI-41)."""
        request = td02_request(
            ins=ins,
            ins_oid=ins_oid,
            sender_oid=self.endpoint.sender_oid,
            sender_name=self.endpoint.sender_name,
        )
        answer = self._call(self.endpoint.td02_url, ACTION_TD02, request, context)
        try:
            return td02_status(body_of(answer))
        except SoapFormatError as exc:
            raise XdsUnavailable(f"TD0.2: unexpected answer ({exc})") from exc

    def provide_and_register(self, request: ProvideAndRegister, context: VihfContext) -> RegistryResponse:
        """ITI-41 with the request built by :func:`simral.xds.metadata.provide_and_register`."""
        return self._registry_call(
            self.endpoint.iti41_url, ACTION_ITI41, request.request, context, request.attachments
        )

    def update_status(
        self,
        submission: SubmissionSet,
        context: VihfContext,
        *,
        patient_id: str,
        entry_uuid: str,
        new_status: str,
        original_status: str = STATUS_APPROVED,
    ) -> RegistryResponse:
        """ITI-57 availability status change (deletion ``STATUS_DELETED``, archiving ``STATUS_ARCHIVED``)."""
        body = availability_status_update(
            submission, patient_id, entry_uuid, original_status=original_status, new_status=new_status
        )
        return self._registry_call(self.endpoint.iti57_url, ACTION_ITI57, body, context)

    def update_metadata(self, body: etree._Element, context: VihfContext) -> RegistryResponse:
        """ITI-57 with a body from :func:`simral.xds.metadata.metadata_update` (masking / visibility)."""
        return self._registry_call(self.endpoint.iti57_url, ACTION_ITI57, body, context)
