"""Identity-vigilance pages of the portal (DESIGN.md §6: never merge silently; RNIV).

- ``/identities/vigilance`` — the worklist of open cases (suspected duplicate, conflicting traits,
  change of INS status): the identities side by side with what differs marked, and the decisions
  a person takes on each (merge, link, "not the same patient", apply or keep traits, acknowledge);
- ``/identities/changes`` — recent merges, links, unlinks and changes of identifier, each with an
  undo form;
- ``/identities/{id}`` — one identity, the identities linked to it (other organisations' IPPs,
  INS, status) and the person's studies the viewer may see (the access policy filters them: an
  administrator without break-glass sees none).

Administrators only (:func:`simral.access.policy.may_manage_identities`). Every decision is a POST
carrying the session's CSRF token and a stated reason; the patients service makes the change and
audits it; the page then redirects back with a confirmation. Wording is French first, English with
``?lang=en`` (as the other portal pages).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from datetime import datetime
from html import escape
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from simral.access.policy import AccessDenied, Principal, may_manage_identities
from simral.archive import service as archive
from simral.context import AppContext
from simral.patients import service as patients
from simral.patients import views
from simral.patients.models import (
    CASE_CONFLICTING_TRAITS,
    CASE_INS_STATUS_CHANGE,
    CASE_KINDS,
    CASE_OPEN,
    CASE_SUSPECTED_DUPLICATE,
    CHANGE_IDENTIFIER,
    CHANGE_LINK,
    CHANGE_MERGE,
    CHANGE_UNLINK,
    PatientIdentity,
    VigilanceCase,
)
from simral.web.auth import check_form_csrf, request_principal
from simral.web.layout import (
    Language,
    csrf_field,
    display_date,
    lang_param,
    page,
    request_language,
    table,
)
from simral.web.pages import viewer_url
from simral.web.params import RowId

#: A stated reason is required for every decision; shorter than this is not a reason.
REASON_MIN = 5
REASON_MAX = 500
#: Changes listed on the changes page.
CHANGES_SHOWN = 100

TEXT: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        "title": "Identitovigilance",
        "changes_title": "Modifications d'identité",
        "identity_title": "Identité patient",
        "denied": "Réservé aux administrateurs (gestion des identités).",
        "worklist_intro": "Cas ouverts : chaque décision demande un motif, est tracée, "
        "et les fusions et liens restent annulables.",
        "see_changes": "Modifications d'identité récentes (annulation)",
        "see_worklist": "Retour aux cas d'identitovigilance",
        "kind": "Type de cas",
        "all": "Tous",
        "filter": "Filtrer",
        "no_case": "Aucun cas ouvert.",
        "no_case_kind": "Aucun cas ouvert de ce type.",
        "case": "cas n° {id}",
        "opened": "Ouvert le {when} (UTC)",
        "source": "Origine",
        "detected": "Détection",
        "trait": "Trait",
        "identity_a": "Identité A",
        "identity_b": "Identité B",
        "known": "Connus",
        "received": "Reçus",
        "differs": "diffère",
        "authority": "Autorité d'affectation",
        "organisation": "Structure",
        "ipp": "IPP",
        "ins": "INS",
        "status": "Statut de l'identité",
        "status_source": "Source du statut",
        "state": "État",
        "active": "active",
        "merged_into": "fusionnée dans {target}",
        "reason": "Motif (obligatoire)",
        "reason_short": "Motif",
        "survivor": "En cas de fusion, identité conservée",
        "merge": "Fusionner",
        "link": "Lier (même patient, les deux identités restent)",
        "distinct": "Ce ne sont pas les mêmes patients",
        "keep_separate": "Conserver séparées",
        "apply": "Appliquer les traits reçus",
        "keep": "Conserver les traits connus",
        "acknowledge": "Prendre acte",
        "status_change": "Statut : {before} → {after}",
        "merge_not_possible": "Fusion impossible : les deux IPP ne sont pas de la même autorité "
        "(lier les identités à la place).",
        "done_merge": "Fusion effectuée. Elle reste annulable depuis « Modifications d'identité ».",
        "done_link": "Identités liées (même patient). Lien annulable depuis « Modifications d'identité ».",
        "done_distinct": "Cas clos : les identités restent distinctes.",
        "done_apply": "Traits reçus appliqués ; cas clos.",
        "done_keep": "Traits connus conservés ; cas clos.",
        "done_acknowledge": "Changement de statut pris en compte ; cas clos.",
        "done_undo": "Modification annulée.",
        "no_reason": "Indiquez un motif (au moins {n} caractères).",
        "no_survivor": "Choisissez l'identité conservée pour fusionner.",
        "no_such_case": "Ce cas n'existe pas ou a déjà été traité.",
        "not_done": "L'opération n'a pas été faite : {error}",
        "bad_action": "Action inconnue pour ce type de cas.",
        "when": "Date (UTC)",
        "change": "Modification",
        "identity": "Identité",
        "other_identity": "Autre identité",
        "actor": "Par",
        "undo": "Annuler",
        "undo_reason": "Motif de l'annulation",
        "undone": "annulée le {when} par {who}",
        "in_force": "en vigueur",
        "no_change": "Aucune modification d'identité.",
        "portal_case": "portail, cas n° {id}",
        "reason_ins": "même INS (lien automatique)",
        "colon": " : ",
        "linked": "Identités de la même personne",
        "this_one": "cette identité",
        "studies": "Examens du patient",
        "no_identity": "Cette identité n'existe pas.",
        "studies_none": "Aucun examen de ce patient ne vous est accessible. Les examens ne sont visibles "
        "que des professionnels des structures qui les détiennent, ou par accès d'urgence "
        "(bris de glace).",
        "studies_filtered": "Seuls les examens auxquels vous avez accès sont affichés.",
        "name": "Nom du patient",
        "date": "Date",
        "modalities": "Modalités",
        "description": "Description",
        "accession": "N° d'accession",
        "holders": "Structures",
        "open": "Ouvrir dans le visualiseur",
        "merged_notice": "Cette identité a été fusionnée dans {target} : elle n'est plus active.",
    },
    "en": {
        "title": "Identity vigilance",
        "changes_title": "Identity changes",
        "identity_title": "Patient identity",
        "denied": "Administrators only (identity management).",
        "worklist_intro": "Open cases: every decision needs a reason, is audited, "
        "and merges and links can be undone.",
        "see_changes": "Recent identity changes (undo)",
        "see_worklist": "Back to the identity-vigilance cases",
        "kind": "Kind of case",
        "all": "All",
        "filter": "Filter",
        "no_case": "No open case.",
        "no_case_kind": "No open case of this kind.",
        "case": "case no. {id}",
        "opened": "Opened {when} (UTC)",
        "source": "Source",
        "detected": "Detection",
        "trait": "Trait",
        "identity_a": "Identity A",
        "identity_b": "Identity B",
        "known": "Known",
        "received": "Received",
        "differs": "differs",
        "authority": "Assigning authority",
        "organisation": "Organisation",
        "ipp": "Patient ID (IPP)",
        "ins": "INS",
        "status": "Identity status",
        "status_source": "Status source",
        "state": "State",
        "active": "active",
        "merged_into": "merged into {target}",
        "reason": "Reason (required)",
        "reason_short": "Reason",
        "survivor": "If merging, identity kept",
        "merge": "Merge",
        "link": "Link (same patient, both identities stay)",
        "distinct": "These are not the same patient",
        "keep_separate": "Keep separate",
        "apply": "Apply the received traits",
        "keep": "Keep the known traits",
        "acknowledge": "Acknowledge",
        "status_change": "Status: {before} → {after}",
        "merge_not_possible": "Merge not possible: the two patient IDs are not of one authority "
        "(link the identities instead).",
        "done_merge": "Merged. The merge can be undone from “Identity changes”.",
        "done_link": "Identities linked (same patient). The link can be undone from “Identity changes”.",
        "done_distinct": "Case closed: the identities stay separate.",
        "done_apply": "Received traits applied; case closed.",
        "done_keep": "Known traits kept; case closed.",
        "done_acknowledge": "Status change acknowledged; case closed.",
        "done_undo": "Change undone.",
        "no_reason": "State a reason (at least {n} characters).",
        "no_survivor": "Choose the identity to keep to merge.",
        "no_such_case": "This case does not exist or was already dealt with.",
        "not_done": "Nothing was changed: {error}",
        "bad_action": "Unknown action for this kind of case.",
        "when": "Time (UTC)",
        "change": "Change",
        "identity": "Identity",
        "other_identity": "Other identity",
        "actor": "By",
        "undo": "Undo",
        "undo_reason": "Reason for undoing",
        "undone": "undone {when} by {who}",
        "in_force": "in force",
        "no_change": "No identity change.",
        "portal_case": "portal, case no. {id}",
        "reason_ins": "same INS (automatic link)",
        "colon": ": ",
        "linked": "Identities of the same person",
        "this_one": "this identity",
        "studies": "The patient's studies",
        "no_identity": "This identity does not exist.",
        "studies_none": "None of this patient's studies is accessible to you. Studies are visible only "
        "to professionals of the organisations holding them, or through emergency access "
        "(break-glass).",
        "studies_filtered": "Only the studies you have access to are shown.",
        "name": "Patient name",
        "date": "Date",
        "modalities": "Modalities",
        "description": "Description",
        "accession": "Accession number",
        "holders": "Organisations",
        "open": "Open in the viewer",
        "merged_notice": "This identity was merged into {target}: it is no longer active.",
    },
}

KIND_LABELS: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        CASE_SUSPECTED_DUPLICATE: "Doublon suspecté",
        CASE_CONFLICTING_TRAITS: "Traits discordants",
        CASE_INS_STATUS_CHANGE: "Changement de statut de l'identité (INS)",
    },
    "en": {
        CASE_SUSPECTED_DUPLICATE: "Suspected duplicate",
        CASE_CONFLICTING_TRAITS: "Conflicting traits",
        CASE_INS_STATUS_CHANGE: "Change of identity status (INS)",
    },
}

CHANGE_LABELS: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        CHANGE_MERGE: "Fusion",
        CHANGE_LINK: "Lien",
        CHANGE_UNLINK: "Suppression de lien",
        CHANGE_IDENTIFIER: "Changement d'IPP",
    },
    "en": {
        CHANGE_MERGE: "Merge",
        CHANGE_LINK: "Link",
        CHANGE_UNLINK: "Unlink",
        CHANGE_IDENTIFIER: "Change of patient ID",
    },
}

TRAIT_LABELS: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        "birth_name": "Nom de naissance",
        "birth_given_names": "Prénoms de naissance",
        "first_birth_given_name": "Premier prénom de naissance",
        "sex": "Sexe",
        "birth_date": "Date de naissance",
        "birth_place_code": "Lieu de naissance (code INSEE)",
        "used_name": "Nom utilisé",
        "used_given_name": "Prénom utilisé",
    },
    "en": {
        "birth_name": "Birth name",
        "birth_given_names": "Birth first names",
        "first_birth_given_name": "First birth first name",
        "sex": "Sex",
        "birth_date": "Birth date",
        "birth_place_code": "Birth place (INSEE code)",
        "used_name": "Used name",
        "used_given_name": "Used first name",
    },
}

STATUS_LABELS: Mapping[Language, Mapping[str, str]] = {
    "fr": {"PROV": "provisoire", "RECUP": "récupérée", "VALI": "validée", "QUAL": "qualifiée"},
    "en": {"PROV": "provisional", "RECUP": "retrieved", "VALI": "validated", "QUAL": "qualified"},
}

SEX_LABELS: Mapping[Language, Mapping[str, str]] = {
    "fr": {"M": "masculin", "F": "féminin", "O": "autre"},
    "en": {"M": "male", "F": "female", "O": "other"},
}

#: The service's detection reasons (stored in English in the case), as the worklist says them.
DETECTION_LABELS: Mapping[Language, Mapping[str, str]] = {
    "fr": {
        "same strict traits under two identifiers of one authority": "mêmes traits stricts sous deux IPP "
        "d'une même autorité",
        "same INS under two identifiers of one authority": "même INS sous deux IPP d'une même autorité",
        "same identifier, different strict traits": "même IPP reçu avec d'autres traits stricts",
        "same INS, different strict traits": "même INS, traits stricts différents",
    },
    "en": {},
}

DONE_CODES = ("merge", "link", "distinct", "apply", "keep", "acknowledge", "undo")


def case_actions(case: VigilanceCase) -> tuple[str, ...]:
    """The decisions a case offers (the values of its form's ``action`` buttons).

    Suspected duplicate: merge, link, or "not the same patient". Conflicting traits received for
    one identifier: apply them or keep the known ones; between two identities (same INS): link
    them or keep them separate. Change of INS status: acknowledge.
    """
    if case.kind == CASE_SUSPECTED_DUPLICATE:
        return ("merge", "link", "distinct")
    if case.kind == CASE_CONFLICTING_TRAITS:
        return ("link", "distinct") if case.other_identity_id is not None else ("apply", "keep")
    if case.kind == CASE_INS_STATUS_CHANGE:
        return ("acknowledge",)
    return ()


class _Refused(Exception):
    """A decision that cannot be taken as posted: the message to show and the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- small pieces


def _fold(value: str) -> str:
    """Comparison form of a trait value: no diacritics, upper case, single spaces."""
    text = unicodedata.normalize("NFKD", value)
    return " ".join("".join(c for c in text if not unicodedata.combining(c)).upper().split())


def _differs(first: str, second: str) -> bool:
    """Whether two known values disagree (an unknown value disagrees with nothing)."""
    return bool(first and second and _fold(first) != _fold(second))


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else ""


def _with_lang(request: Request, path: str, **params: str) -> str:
    """``path`` with ``params`` and the explicit ``lang`` of the request, if any."""
    query = {k: v for k, v in params.items() if v}
    lang = lang_param(request)
    if lang:
        query["lang"] = lang
    return path + (f"?{urlencode(query)}" if query else "")


def _trait_value(name: str, value: str, language: Language) -> str:
    """A trait as a reader expects it (dates in the page's language, sex in words)."""
    if not value:
        return "—"
    if name == "birth_date":
        return display_date(value, language)
    if name == "sex":
        words = SEX_LABELS[language].get(value)
        return f"{value} ({words})" if words else value
    return value


def _ins(summary: views.IdentitySummary) -> str:
    return f"{summary.ins_matricule} ({summary.ins_oid})" if summary.ins_matricule else "—"


def _status(summary: views.IdentitySummary, language: Language) -> str:
    label = STATUS_LABELS[language].get(summary.status, summary.status)
    return f"{summary.status} ({label})"


def _identity_label(summary: views.IdentitySummary) -> str:
    """How a page names an identity: IPP and the organisation (or authority) assigning it."""
    assigner = summary.organisation_code or summary.authority_namespace or summary.authority
    return f"{summary.local_id} — {assigner}"


def _identity_link(request: Request, summary: views.IdentitySummary | None, fallback: int | None) -> str:
    if summary is None:
        return escape(f"#{fallback}") if fallback is not None else "—"
    href = _with_lang(request, f"/identities/{summary.id}")
    return f'<a href="{escape(href)}">{escape(_identity_label(summary))}</a>'


def _authority_text(summary: views.IdentitySummary) -> str:
    parts = [p for p in (summary.organisation_code, summary.authority) if p]
    return " · ".join(dict.fromkeys(parts)) or "—"


def _source_text(source: str, text: Mapping[str, str]) -> str:
    """A change's or case's source in words (the portal's own sources name the case)."""
    prefix = "portal:vigilance-case:"
    if source.startswith(prefix) and source[len(prefix) :].isdigit():
        return text["portal_case"].format(id=source[len(prefix) :])
    return source or "—"


def _link_reason(reason: object, text: Mapping[str, str]) -> str:
    """Why a link was made: the INS the identities share, an HL7 A24, or a person's stated reason."""
    value = str(reason)
    return text["reason_ins"] if value == "ins" else f"{text['reason_short']}{text['colon']}{value}"


def _notice(message: str, *, error: bool = False) -> str:
    if not message:
        return ""
    if error:
        return f'<p class="error" role="alert">{escape(message)}</p>'
    return f'<p class="message" role="status">{escape(message)}</p>'


def _back_link(request: Request, text: Mapping[str, str]) -> str:
    href = _with_lang(request, "/identities/vigilance")
    return f'<p><a href="{escape(href)}">{escape(text["see_worklist"])}</a></p>'


def _reason_field(text: Mapping[str, str], field_id: str) -> str:
    return (
        f'<label for="{field_id}">{escape(text["reason"])}'
        f'<textarea id="{field_id}" name="reason" required minlength="{REASON_MIN}" '
        f'maxlength="{REASON_MAX}"></textarea></label>'
    )


# ------------------------------------------------------------------------------ case render


def _row(label: str, first: str, second: str, *, differs: bool, differs_text: str) -> str:
    """One row of a side-by-side comparison; a differing row is marked in text and colour."""
    if differs:
        return (
            f'<tr class="differs"><th scope="row">{escape(label)} '
            f'<span class="flag">≠ {escape(differs_text)}</span></th>'
            f"<td><mark>{escape(first)}</mark></td><td><mark>{escape(second)}</mark></td></tr>"
        )
    return f'<tr><th scope="row">{escape(label)}</th><td>{escape(first)}</td><td>{escape(second)}</td></tr>'


def _compare_identities(
    request: Request,
    first: views.IdentitySummary,
    second: views.IdentitySummary,
    language: Language,
    conflicts: Mapping[str, object],
) -> str:
    """Two identities side by side: authority, IPP, traits, INS and status; the traits and INS
    that disagree are marked (two IPPs, or two authorities, always differ: not marked)."""
    text = TEXT[language]
    labels = TRAIT_LABELS[language]
    rows = [
        _row(
            text["authority"], _authority_text(first), _authority_text(second), differs=False, differs_text=""
        ),
        _row(text["ipp"], first.local_id, second.local_id, differs=False, differs_text=""),
    ]
    for name in views.SHOWN_TRAITS:
        mine, theirs = first.traits.get(name, ""), second.traits.get(name, "")
        rows.append(
            _row(
                labels[name],
                _trait_value(name, mine, language),
                _trait_value(name, theirs, language),
                differs=name in conflicts or _differs(mine, theirs),
                differs_text=text["differs"],
            )
        )
    rows.append(
        _row(
            text["ins"],
            _ins(first),
            _ins(second),
            differs=_differs(first.ins_matricule + first.ins_oid, second.ins_matricule + second.ins_oid),
            differs_text=text["differs"],
        )
    )
    rows.append(
        _row(
            text["status"],
            _status(first, language),
            _status(second, language),
            differs=False,
            differs_text=text["differs"],
        )
    )
    return (
        '<table class="compare"><thead><tr>'
        f'<th scope="col">{escape(text["trait"])}</th>'
        f'<th scope="col">{escape(text["identity_a"])} : {_identity_link(request, first, None)}</th>'
        f'<th scope="col">{escape(text["identity_b"])} : {_identity_link(request, second, None)}</th>'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _compare_received(
    request: Request,
    known: views.IdentitySummary,
    received: Mapping[str, object],
    conflicts: Mapping[str, object],
    language: Language,
) -> str:
    """An identity's known traits beside the ones a message brought (conflicting-traits case)."""
    text = TEXT[language]
    labels = TRAIT_LABELS[language]
    rows = [
        _row(text["ipp"], known.local_id, known.local_id, differs=False, differs_text=""),
    ]
    for name in views.SHOWN_TRAITS:
        mine = known.traits.get(name, "")
        theirs = str(received.get(name, "") or "")
        rows.append(
            _row(
                labels[name],
                _trait_value(name, mine, language),
                _trait_value(name, theirs, language),
                differs=name in conflicts or _differs(mine, theirs),
                differs_text=text["differs"],
            )
        )
    received_ins = str(received.get("ins", "") or "")
    known_ins = f"{known.ins_matricule}@{known.ins_oid}" if known.ins_matricule else ""
    rows.append(
        _row(
            text["ins"],
            _ins(known),
            received_ins.replace("@", " (") + ")" if received_ins else "—",
            differs="ins" in conflicts or _differs(known_ins, received_ins),
            differs_text=text["differs"],
        )
    )
    received_status = str(received.get("status", "") or "")
    rows.append(
        _row(
            text["status"],
            _status(known, language),
            received_status or "—",
            differs=False,
            differs_text="",
        )
    )
    return (
        '<table class="compare"><thead><tr>'
        f'<th scope="col">{escape(text["trait"])}</th>'
        f'<th scope="col">{escape(text["known"])} : {_identity_link(request, known, None)}</th>'
        f'<th scope="col">{escape(text["received"])}</th>'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _single_identity(request: Request, summary: views.IdentitySummary, language: Language) -> str:
    """One identity's keys and traits as a two-column table (row headers, then values)."""
    text = TEXT[language]
    labels = TRAIT_LABELS[language]
    rows = [
        (text["authority"], _authority_text(summary)),
        (text["ipp"], summary.local_id),
        *(
            (labels[name], _trait_value(name, summary.traits.get(name, ""), language))
            for name in views.SHOWN_TRAITS
        ),
        (text["ins"], _ins(summary)),
        (text["status"], _status(summary, language)),
        (text["status_source"], f"{summary.status_source or '—'} ({_when(summary.status_at)} UTC)"),
    ]
    body = "".join(f'<tr><th scope="row">{escape(k)}</th><td>{escape(v)}</td></tr>' for k, v in rows)
    return f'<table class="compare single"><tbody>{body}</tbody></table>'


def _case_actions(
    request: Request,
    case: VigilanceCase,
    identities: Mapping[int, views.IdentitySummary],
    language: Language,
) -> str:
    """The decision form of a case: reason, the choices its kind offers, one button per decision."""
    text = TEXT[language]
    first = identities.get(case.identity_id)
    second = identities.get(case.other_identity_id) if case.other_identity_id is not None else None
    actions = list(case_actions(case))
    extra = ""
    if "merge" in actions:
        if first is None or second is None or first.authority != second.authority:
            actions.remove("merge")
            extra += f'<p class="hint">{escape(text["merge_not_possible"])}</p>'
        else:
            choices = "".join(
                f'<label class="choice"><input type="radio" name="survivor" value="{s.id}"> '
                f"{escape(_identity_label(s))}</label>"
                for s in (first, second)
            )
            extra += f"<fieldset><legend>{escape(text['survivor'])}</legend>{choices}</fieldset>"
    labels = {
        "merge": text["merge"],
        "link": text["link"],
        "distinct": text["distinct"] if case.kind == CASE_SUSPECTED_DUPLICATE else text["keep_separate"],
        "apply": text["apply"],
        "keep": text["keep"],
        "acknowledge": text["acknowledge"],
    }
    buttons = "".join(
        f'<button type="submit" name="action" value="{a}">{escape(labels[a])}</button>' for a in actions
    )
    action_url = _with_lang(request, f"/identities/vigilance/{case.id}")
    return (
        f'<form class="decision" method="post" action="{escape(action_url)}">{csrf_field(request)}'
        f"{extra}{_reason_field(text, f'reason-{case.id}')}"
        f'<div class="buttons">{buttons}</div></form>'
    )


def _case_section(
    request: Request,
    case: VigilanceCase,
    identities: Mapping[int, views.IdentitySummary],
    language: Language,
) -> str:
    text = TEXT[language]
    kind = KIND_LABELS[language].get(case.kind, case.kind)
    detail = case.detail or {}
    conflicts = detail.get("conflicts") or {}
    first = identities.get(case.identity_id)
    second = identities.get(case.other_identity_id) if case.other_identity_id is not None else None
    detection = str(detail.get("reason", "") or "")
    colon = text["colon"]
    meta = [
        text["opened"].format(when=_when(case.created_at)),
        f"{text['source']}{colon}{_source_text(case.source, text)}",
    ]
    if detection:
        meta.append(f"{text['detected']}{colon}{DETECTION_LABELS[language].get(detection, detection)}")
    if case.kind == CASE_INS_STATUS_CHANGE:
        before, after = str(detail.get("from", "")), str(detail.get("to", ""))
        statuses = STATUS_LABELS[language]
        meta.append(
            text["status_change"].format(
                before=f"{before} ({statuses.get(before, before)})",
                after=f"{after} ({statuses.get(after, after)})",
            )
        )
    if first is not None and second is not None:
        comparison = _compare_identities(request, first, second, language, conflicts)
    elif first is not None and detail.get("received"):
        comparison = _compare_received(request, first, detail["received"], conflicts, language)
    elif first is not None:
        comparison = _single_identity(request, first, language)
    else:
        comparison = ""
    heading_id = f"case-{case.id}-title"
    return (
        f'<section class="case" aria-labelledby="{heading_id}" data-case="{case.id}" '
        f'data-kind="{escape(case.kind)}">'
        f'<h2 id="{heading_id}">{escape(kind)} '
        f'<span class="case-no">— {escape(text["case"].format(id=case.id))}</span></h2>'
        f'<p class="meta">{" · ".join(escape(m) for m in meta if m)}</p>'
        f"{comparison}{_case_actions(request, case, identities, language)}</section>"
    )


# ------------------------------------------------------------------------------------ routes


def mount_vigilance(web: FastAPI, ctx: AppContext) -> None:
    """Add ``/identities/vigilance``, ``/identities/changes`` and ``/identities/{id}`` to ``web``."""

    def denied(request: Request, principal: Principal) -> HTMLResponse:
        text = TEXT[request_language(request)]
        body = f'<p class="error" role="alert">{escape(text["denied"])}</p>'
        return page(request, text["title"], body, principal=principal, status=403)

    def render_worklist(
        request: Request, principal: Principal, *, kind: str = "", notice: str = "", status: int = 200
    ) -> HTMLResponse:
        language = request_language(request)
        text = TEXT[language]
        kind = kind if kind in CASE_KINDS else ""
        with ctx.db.reading() as session:
            cases = patients.list_cases(session, state=CASE_OPEN, kind=kind or None)
            counts = views.open_case_counts(session)
            ids = {c.identity_id for c in cases} | {
                c.other_identity_id for c in cases if c.other_identity_id is not None
            }
            identities = views.identity_summaries(session, ids)
            sections = [_case_section(request, case, identities, language) for case in cases]
        total = sum(counts.values())
        options = f'<option value="">{escape(text["all"])} ({total})</option>' + "".join(
            f'<option value="{k}"{" selected" if k == kind else ""}>'
            f"{escape(KIND_LABELS[language][k])} ({counts.get(k, 0)})</option>"
            for k in CASE_KINDS
        )
        lang = lang_param(request)
        body = (
            notice + f"<p>{escape(text['worklist_intro'])} "
            f'<a href="{escape(_with_lang(request, "/identities/changes"))}">'
            f"{escape(text['see_changes'])}</a></p>"
            '<form method="get" action="/identities/vigilance" role="search">'
            + (f'<input type="hidden" name="lang" value="{lang}">' if lang else "")
            + f'<label>{escape(text["kind"])}<select name="kind">{options}</select></label>'
            f'<button type="submit">{escape(text["filter"])}</button></form>'
        )
        if sections:
            body += "".join(sections)
        else:
            body += (
                f'<p class="message" role="status">{escape(text["no_case_kind" if kind else "no_case"])}</p>'
            )
        return page(request, text["title"], body, principal=principal, status=status)

    def done_notice(request: Request) -> str:
        code = request.query_params.get("done", "")
        if code not in DONE_CODES:
            return ""
        return _notice(TEXT[request_language(request)][f"done_{code}"])

    @web.get("/identities/vigilance", response_class=HTMLResponse)
    def worklist(request: Request, kind: str = "") -> HTMLResponse:
        """The open identity-vigilance cases, filtered by kind."""
        principal = request_principal(request)
        if not may_manage_identities(principal):
            return denied(request, principal)
        return render_worklist(request, principal, kind=kind, notice=done_notice(request))

    async def posted(request: Request) -> tuple[Principal, dict[str, str]]:
        principal = request_principal(request)
        form = await request.form()
        check_form_csrf(request, str(form.get("csrf_token", "")))
        return principal, {k: str(v).strip()[:REASON_MAX] for k, v in form.items() if isinstance(v, str)}

    @web.post("/identities/vigilance/{case_id:int}")
    async def decide(request: Request, case_id: RowId) -> Response:
        """Take a decision on a case (with its reason); the service acts and audits."""
        principal, form = await posted(request)
        text = TEXT[request_language(request)]
        if not may_manage_identities(principal):
            return denied(request, principal)
        action = form.get("action", "")
        reason = form.get("reason", "")

        try:
            if len(reason) < REASON_MIN:
                raise _Refused(text["no_reason"].format(n=REASON_MIN), 400)
            with ctx.db.unit_of_work() as session:
                case = session.get(VigilanceCase, case_id)
                if case is None or case.state != CASE_OPEN:
                    raise _Refused(text["no_such_case"], 404)
                if action not in case_actions(case):
                    raise _Refused(text["bad_action"], 400)
                source = f"portal:vigilance-case:{case.id}"
                first = session.get(PatientIdentity, case.identity_id)
                second = (
                    session.get(PatientIdentity, case.other_identity_id)
                    if case.other_identity_id is not None
                    else None
                )
                if first is None:
                    raise _Refused(text["no_such_case"], 404)
                if action == "merge":
                    chosen = form.get("survivor", "")
                    if second is None or chosen not in (str(first.id), str(second.id)):
                        raise _Refused(text["no_survivor"], 400)
                    survivor, merged = (first, second) if chosen == str(first.id) else (second, first)
                    patients.merge_identities(
                        session,
                        survivor=survivor,
                        merged=merged,
                        principal=principal,
                        source=source,
                        reason=reason,
                    )
                elif action == "link" and second is not None:
                    patients.link_identities(
                        session, first, second, principal=principal, source=source, reason=reason
                    )
                patients.resolve_case(
                    session,
                    case.id,
                    resolution=f"{action}: {reason}",
                    principal=principal,
                    apply_received=action == "apply",
                )
        except _Refused as exc:
            return render_worklist(
                request, principal, notice=_notice(str(exc), error=True), status=exc.status
            )
        except AccessDenied:
            return denied(request, principal)
        except patients.PatientError as exc:
            notice = _notice(text["not_done"].format(error=str(exc)), error=True)
            return render_worklist(request, principal, notice=notice, status=409)
        return RedirectResponse(_with_lang(request, "/identities/vigilance", done=action), status_code=303)

    # ------------------------------------------------------------------ changes

    def render_changes(
        request: Request, principal: Principal, *, notice: str = "", status: int = 200
    ) -> HTMLResponse:
        language = request_language(request)
        text = TEXT[language]
        with ctx.db.reading() as session:
            changes = views.recent_changes(session, limit=CHANGES_SHOWN)
            ids = {c.identity_id for c in changes} | {
                c.other_identity_id for c in changes if c.other_identity_id is not None
            }
            identities = views.identity_summaries(session, ids)
        rows = []
        for change in changes:
            what = CHANGE_LABELS[language].get(change.kind, change.kind)
            if change.kind == CHANGE_IDENTIFIER:
                what += (
                    f" ({change.detail.get('old_local_id', '')} → {change.detail.get('new_local_id', '')})"
                )
            if change.undone_at is not None:
                state = text["undone"].format(when=_when(change.undone_at), who=change.undone_by)
                if change.detail.get("undo_reason"):
                    state += f" — {change.detail['undo_reason']}"
                action = ""
            else:
                state = text["in_force"]
                field_id = f"undo-reason-{change.id}"
                action = (
                    f'<form class="inline undo" method="post" '
                    f'action="{escape(_with_lang(request, f"/identities/changes/{change.id}/undo"))}">'
                    f"{csrf_field(request)}"
                    f'<label for="{field_id}">{escape(text["undo_reason"])}'
                    f'<input id="{field_id}" name="reason" required minlength="{REASON_MIN}" '
                    f'maxlength="{REASON_MAX}"></label>'
                    f'<button type="submit">{escape(text["undo"])}</button></form>'
                )
            subject = identities.get(change.identity_id)
            other = identities.get(change.other_identity_id) if change.other_identity_id else None
            rows.append(
                f'<tr data-change="{change.id}" data-kind="{escape(change.kind)}"'
                f"{' class=undone' if change.undone_at is not None else ''}>"
                f'<td class="nowrap">{escape(_when(change.created_at))}</td><td>{escape(what)}</td>'
                f'<td class="nowrap">{_identity_link(request, subject, change.identity_id)}</td>'
                f'<td class="nowrap">{_identity_link(request, other, change.other_identity_id)}</td>'
                f"<td>{escape(change.actor)}</td>"
                f"<td>{escape(_source_text(change.source, text))}"
                + (
                    f"<br>{escape(_link_reason(change.detail['reason'], text))}"
                    if change.detail.get("reason")
                    else ""
                )
                + f"</td><td>{escape(state)}</td><td>{action}</td></tr>"
            )
        body = notice + _back_link(request, text)
        if rows:
            body += table(
                [
                    text["when"],
                    text["change"],
                    text["identity"],
                    text["other_identity"],
                    text["actor"],
                    text["source"],
                    text["state"],
                    text["undo"],
                ],
                rows,
            )
        else:
            body += f'<p class="message" role="status">{escape(text["no_change"])}</p>'
        return page(request, text["changes_title"], body, principal=principal, status=status)

    @web.get("/identities/changes", response_class=HTMLResponse)
    def changes_page(request: Request) -> HTMLResponse:
        """Recent merges, links, unlinks and changes of identifier, with undo."""
        principal = request_principal(request)
        if not may_manage_identities(principal):
            return denied(request, principal)
        return render_changes(request, principal, notice=done_notice(request))

    @web.post("/identities/changes/{change_id:int}/undo")
    async def undo(request: Request, change_id: RowId) -> Response:
        """Undo a change (unmerge, unlink...), with a stated reason; the service audits it."""
        principal, form = await posted(request)
        text = TEXT[request_language(request)]
        if not may_manage_identities(principal):
            return denied(request, principal)
        reason = form.get("reason", "")
        if len(reason) < REASON_MIN:
            notice = _notice(text["no_reason"].format(n=REASON_MIN), error=True)
            return render_changes(request, principal, notice=notice, status=400)
        try:
            with ctx.db.unit_of_work() as session:
                patients.undo_change(session, change_id, principal=principal, source="portal", reason=reason)
        except AccessDenied:
            return denied(request, principal)
        except patients.PatientError as exc:
            notice = _notice(text["not_done"].format(error=str(exc)), error=True)
            return render_changes(request, principal, notice=notice, status=409)
        return RedirectResponse(_with_lang(request, "/identities/changes", done="undo"), status_code=303)

    # ------------------------------------------------------------------ one identity

    @web.get("/identities/{identity_id:int}", response_class=HTMLResponse)
    def identity_page(request: Request, identity_id: RowId) -> HTMLResponse:
        """An identity, the identities linked to it, and the person's studies the viewer may see."""
        principal = request_principal(request)
        language = request_language(request)
        text = TEXT[language]
        if not may_manage_identities(principal):
            return denied(request, principal)
        with ctx.db.reading() as session:
            summary = views.get_identity_summary(session, identity_id)
            if summary is None:
                body = f'<p class="error" role="alert">{escape(text["no_identity"])}</p>'
                return page(request, text["identity_title"], body, principal=principal, status=404)
            linked = views.person_identity_summaries(session, summary.person_id)
            studies = views.visible_person_studies(session, principal=principal, person_id=summary.person_id)
            known = {s.id: s for s in linked}
            if summary.merged_into_id is not None and summary.merged_into_id not in known:
                known.update(views.identity_summaries(session, [summary.merged_into_id]))
        archive.audit_query(
            ctx,
            principal,
            protocol="portal",
            level="PATIENT",
            keys={"PatientID": summary.local_id, "IssuerOfPatientID": summary.authority},
            matches=len(studies),
        )
        body = f"<h2>{escape(_identity_label(summary))}</h2>"
        if summary.merged_into_id is not None:
            target = _identity_link(request, known.get(summary.merged_into_id), summary.merged_into_id)
            body += f'<p class="message">{escape(text["merged_notice"]).format(target=target)}</p>'
        body += _single_identity(request, summary, language)
        linked_rows = []
        for other in linked:
            state = (
                text["active"]
                if other.merged_into_id is None
                else text["merged_into"].format(
                    target=_identity_label(known[other.merged_into_id])
                    if other.merged_into_id in known
                    else f"#{other.merged_into_id}"
                )
            )
            name = _identity_link(request, other, other.id)
            if other.id == summary.id:
                name = f"{escape(_identity_label(other))} ({escape(text['this_one'])})"
            linked_rows.append(
                f'<tr data-identity="{other.id}"><td>{name}</td>'
                f"<td>{escape(_authority_text(other))}</td>"
                f"<td>{escape(_ins(other))}</td><td>{escape(_status(other, language))}</td>"
                f"<td>{escape(state)}</td></tr>"
            )
        body += f"<h2>{escape(text['linked'])}</h2>" + table(
            [text["ipp"], text["authority"], text["ins"], text["status"], text["state"]], linked_rows
        )
        body += f"<h2>{escape(text['studies'])}</h2>"
        if not studies:
            body += f'<p class="message" role="status" id="studies-none">{escape(text["studies_none"])}</p>'
        else:
            explicit = language if lang_param(request) else None
            study_rows = []
            for study in studies:
                name = " ".join(p for p in study.patient_name.split("=")[0].split("^") if p) or "?"
                study_rows.append(
                    f'<tr data-study="{escape(study.study_uid)}">'
                    f'<td><a href="{escape(viewer_url(study.study_uid, explicit))}" '
                    f'title="{escape(text["open"])}">{escape(name)}</a></td>'
                    f"<td>{escape(study.patient_id)}</td>"
                    f"<td>{escape(display_date(study.study_date, language))}</td>"
                    f"<td>{escape(study.modalities.replace(chr(92), ', '))}</td>"
                    f'<td><a href="/studies/{escape(study.study_uid)}">'
                    f"{escape(study.description) or '…'}</a></td>"
                    f"<td>{escape(study.accession_number)}</td>"
                    f"<td>{escape(', '.join(study.organisations))}</td></tr>"
                )
            body += f"<p>{escape(text['studies_filtered'])}</p>" + table(
                [
                    text["name"],
                    text["ipp"],
                    text["date"],
                    text["modalities"],
                    text["description"],
                    text["accession"],
                    text["holders"],
                ],
                study_rows,
            )
        body += _back_link(request, text)
        return page(request, text["identity_title"], body, principal=principal)
