"""The DRIM-M contextual call ("appel contextuel"): open the viewer on a patient's studies.

A professional's software (DPI, RIS, another DRIMbox) sends the browser to
``/drimm/appel-contextuel`` with the DRIM-M parameters (see :mod:`simral.dmp.drimm`), either as a
query (GET) or as a form (POST, as the ANS DRIMbox receives it; it is answered with a 303 to the
GET form, so the login page can bring the professional back). A logged-in professional is then
redirected to OHIF on the patient's studies they may see, or gets a page saying, in French first,
why not. Every call is audited by the service.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from simral.access.policy import Principal
from simral.context import AppContext
from simral.dmp import drimm
from simral.web.auth import request_principal
from simral.web.layout import Language, explicit_language, page, request_language
from simral.web.pages import viewer_url

CONTEXTUAL_CALL_PATH = "/drimm/appel-contextuel"

TEXT: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        "title": "Appel contextuel DRIM-M",
        "missing": "Appel contextuel incomplet : paramètre(s) manquant(s) : {names}.",
        "no-consent": (
            "Le patient n'a pas été informé ou n'a pas donné son consentement "
            "(InformationEtConsentement) : les images ne sont pas affichées."
        ),
        "situation": (
            "La situation d'exercice transmise ne correspond pas à l'organisation pour laquelle vous "
            "agissez. Changez d'organisation dans le portail, puis relancez l'appel."
        ),
        "ins-system": "Le système d'identification transmis n'est pas celui de l'INS.",
        "ins-invalid": "L'INS transmis n'est pas valide (matricule ou clé).",
        "unknown-patient": "Aucun patient ne correspond à cet INS qualifié ni à cet identifiant local.",
        "identity-conflict": (
            "L'identifiant local transmis désigne un patient dont l'INS est différent : "
            "vérifiez l'identité du patient (identitovigilance)."
        ),
        "traits": (
            "Les traits d'identité transmis ne correspondent pas au patient connu ({traits}) : "
            "les images ne sont pas affichées (identitovigilance)."
        ),
        "no-study": "Aucun examen de ce patient ne vous est accessible.",
        "not-professional": "L'appel contextuel est réservé aux professionnels connectés.",
        "family": "nom",
        "given": "prénom",
        "gender": "sexe",
        "birth_date": "date de naissance",
        "birth_place": "lieu de naissance",
    },
    "en": {
        "title": "DRIM-M contextual call",
        "missing": "Incomplete contextual call: missing parameter(s): {names}.",
        "no-consent": (
            "The patient was not informed or did not consent (InformationEtConsentement): "
            "the images are not shown."
        ),
        "situation": (
            "The practice situation sent is not the organisation you act for. Switch organisation in "
            "the portal, then call again."
        ),
        "ins-system": "The identifier system sent is not the INS.",
        "ins-invalid": "The INS sent is not valid (number or key).",
        "unknown-patient": "No patient matches this qualified INS or this local identifier.",
        "identity-conflict": (
            "The local identifier sent names a patient with another INS: check the patient's identity."
        ),
        "traits": (
            "The identity traits sent do not match the known patient ({traits}): the images are not shown."
        ),
        "no-study": "None of this patient's studies is available to you.",
        "not-professional": "The contextual call is for logged-in professionals.",
        "family": "name",
        "given": "first name",
        "gender": "sex",
        "birth_date": "birth date",
        "birth_place": "birth place",
    },
}


def _refusal_text(language: Language, outcome: drimm.PatientContext) -> str:
    text = TEXT[language]
    if outcome.refusal == "missing":
        return text["missing"].format(names=", ".join(outcome.detail.get("missing", [])))
    if outcome.refusal == "traits":
        names = ", ".join(text[name] for name in outcome.detail.get("mismatched", []))
        return text["traits"].format(traits=names)
    return text[outcome.refusal]


def _refused(request: Request, message: str, *, status: int, principal: Principal | None = None) -> Response:
    language = request_language(request)
    body = f'<p class="error" role="alert">{escape(message)}</p>'
    return page(request, TEXT[language]["title"], body, status=status, principal=principal)


def mount_drimm(web: FastAPI, ctx: AppContext) -> None:
    """Add the DRIM-M contextual call to ``web``."""

    @web.get(CONTEXTUAL_CALL_PATH)
    def contextual_call(request: Request) -> Response:
        """Check the call for the logged-in professional and open the viewer (or say why not)."""
        principal = request_principal(request)
        language = request_language(request)
        if principal.kind != "user":
            return _refused(request, TEXT[language]["not-professional"], status=403)
        call = drimm.parse_contextual_call(dict(request.query_params))
        with ctx.db.unit_of_work() as session:
            outcome = drimm.open_patient_context(
                session, principal=principal, call=call, allow_test_ins=ctx.settings.ins_test_oids_allowed
            )
        if outcome.refusal:
            status = 400 if outcome.refusal == "missing" else 403
            return _refused(request, _refusal_text(language, outcome), status=status, principal=principal)
        first, *priors = outcome.study_uids
        return RedirectResponse(viewer_url(first, explicit_language(request), priors=priors), status_code=303)

    @web.post(CONTEXTUAL_CALL_PATH)
    async def contextual_call_form(request: Request) -> Response:
        """The call posted as a form (the DRIMbox's way): the same call as a GET (RFC 9110 §15.4.4),
        so that a professional who must log in first comes back to it."""
        form = await request.form()
        known = {
            name: str(value)[:200]
            for name, value in form.multi_items()
            if name.strip().lower() in drimm.CONTEXT_PARAMETERS or name == "lang"
        }
        return RedirectResponse(f"{CONTEXTUAL_CALL_PATH}?{urlencode(known)}", status_code=303)
