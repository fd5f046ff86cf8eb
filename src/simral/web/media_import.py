"""Importing media from the portal (IHE RAD Import Reconciliation Workflow, IRWF.b): a technologist
or radiologist uploads a CD / USB folder (with its DICOMDIR) or a ZIP, with a progress bar; the
files go through the same import as ``simral import`` (DICOMDIR and ZIP expansion, the one ingest
path), optionally reconciled to the organisation's patient identifier
(:mod:`simral.archive.reconciliation`). Each stored instance is audited by the ingest.

The upload is sent by a small script (XMLHttpRequest, for the progress events; a static file, as
the Content-Security-Policy allows no inline script) with the session's CSRF token in the
``X-CSRF-Token`` header, as every non-form POST of the portal.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from html import escape
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from simral.access.policy import Principal, may_store
from simral.archive.importing import ImportSummary, import_paths
from simral.archive.reconciliation import Reconciler, ReconciliationError
from simral.context import AppContext
from simral.web.auth import check_header_csrf, request_principal
from simral.web.layout import Language, page, request_language

#: Files one upload may carry (a CD holds a few thousand; larger media travel better as a ZIP).
MAX_FILES = 20000
COPY_CHUNK = 1024 * 1024

TEXT: dict[Language, dict[str, str]] = {
    "fr": {
        "title": "Importer un support",
        "intro": "Examens d'un CD, d'une clé USB (le dossier avec son DICOMDIR) ou d'une archive ZIP, "
        "pour votre établissement.",
        "folder": "Dossier du support (CD, clé USB)",
        "files": "Ou fichiers : archive ZIP, fichiers DICOM",
        "reconcile": "Rattacher au patient de l'établissement (par l'INS ou l'identifiant lié du support)",
        "patient_id": "IPP de l'établissement à utiliser pour tout le support (facultatif)",
        "submit": "Importer",
        "progress": "Envoi",
        "importing": "Envoi terminé, import en cours…",
        "done": "Import terminé : {stored} enregistré(s), {duplicate} déjà présent(s), {rejected} refusé(s).",
        "reconciled": "{reconciled} rattaché(s) au patient de l'établissement, "
        "{kept} conservé(s) tels quels.",
        "failed": "L'import a échoué : {error}",
        "nothing": "Aucun fichier choisi.",
        "denied": "Vous ne pouvez pas importer d'examens pour cet établissement.",
        "rejected_item": "refusé",
    },
    "en": {
        "title": "Import media",
        "intro": "Studies from a CD, a USB stick (the folder with its DICOMDIR) or a ZIP archive, for "
        "your organisation.",
        "folder": "Media folder (CD, USB stick)",
        "files": "Or files: ZIP archive, DICOM files",
        "reconcile": "Attach to the organisation's patient (by the media's INS or linked identifier)",
        "patient_id": "The organisation's patient ID to use for the whole media (optional)",
        "submit": "Import",
        "progress": "Upload",
        "importing": "Upload complete, importing…",
        "done": "Import finished: {stored} stored, {duplicate} already there, {rejected} refused.",
        "reconciled": "{reconciled} attached to the organisation's patient, {kept} kept as on the media.",
        "failed": "The import failed: {error}",
        "nothing": "No file chosen.",
        "denied": "You may not import studies for this organisation.",
        "rejected_item": "refused",
    },
}

_SCRIPT = """
(function () {
  const form = document.getElementById('media-import');
  const bar = document.getElementById('upload-progress');
  const status = document.getElementById('import-status');
  const text = JSON.parse(form.dataset.text);
  form.addEventListener('submit', function (event) {
    event.preventDefault();
    const data = new FormData();
    let count = 0;
    for (const input of form.querySelectorAll('input[type=file]')) {
      for (const file of input.files) {
        data.append('media', file, file.webkitRelativePath || file.name);
        count += 1;
      }
    }
    if (!count) { status.textContent = text.nothing; return; }
    status.textContent = '';
    bar.value = 0;
    for (const field of form.querySelectorAll('input[type=checkbox]:checked, input[type=text]')) {
      data.append(field.name, field.value);
    }
    const xhr = new XMLHttpRequest();
    xhr.open('POST', form.action);
    xhr.setRequestHeader('X-CSRF-Token', form.dataset.csrf);
    xhr.upload.addEventListener('progress', function (e) {
      if (e.lengthComputable) { bar.max = e.total; bar.value = e.loaded; }
    });
    xhr.upload.addEventListener('load', function () { status.textContent = text.importing; });
    xhr.addEventListener('load', function () {
      let answer = {};
      try { answer = JSON.parse(xhr.responseText); } catch (e) { answer = {error: xhr.statusText}; }
      if (xhr.status !== 200) {
        status.textContent = text.failed.replace('{error}', answer.error || xhr.status);
        return;
      }
      let message = text.done.replace('{stored}', answer.stored)
        .replace('{duplicate}', answer.duplicate).replace('{rejected}', answer.rejected.length);
      if (answer.reconcile) {
        message += ' ' + text.reconciled.replace('{reconciled}', answer.reconciled)
          .replace('{kept}', answer.not_reconciled);
      }
      status.textContent = message;
      const list = document.getElementById('import-rejected');
      list.replaceChildren();
      for (const item of answer.rejected) {
        const li = document.createElement('li');
        li.textContent = item.name + ' : ' + item.reason;
        list.appendChild(li);
      }
      form.reset();
    });
    xhr.send(data);
  });
})();
"""


def _may_import(principal: Principal) -> bool:
    return principal.kind == "user" and bool(principal.organisation) and may_store(principal)


def _relative(filename: str) -> Path | None:
    """The uploaded file's path under the work folder (a folder upload sends relative paths);
    None for names that would leave it."""
    parts = [p for p in PurePosixPath(filename.replace("\\", "/")).parts if p not in ("", ".", "/")]
    if not parts or any(p == ".." for p in parts):
        return None
    return Path(*parts)


def summary_json(summary: ImportSummary, *, reconcile: bool) -> dict[str, Any]:
    """What the page shows of an import (counts, and each refused file with its reason)."""
    outcomes = summary.outcomes
    return {
        "stored": outcomes.get("stored", 0) + outcomes.get("replaced", 0),
        "duplicate": outcomes.get("duplicate", 0) + outcomes.get("duplicate-conflict", 0),
        "rejected": [{"name": name, "reason": reason} for name, reason in summary.rejected],
        "reconcile": reconcile,
        "reconciled": summary.reconciled,
        "not_reconciled": summary.not_reconciled,
    }


def mount_media_import(web: FastAPI, ctx: AppContext) -> None:
    """Add ``GET /import`` (the upload page) and ``POST /import`` (the upload) to ``web``."""

    @web.get("/static/media-import.js", include_in_schema=False)
    def media_import_script() -> Response:
        return Response(_SCRIPT, media_type="text/javascript", headers={"Cache-Control": "max-age=3600"})

    @web.get("/import", response_class=HTMLResponse)
    def import_page(request: Request) -> Response:
        principal = request_principal(request)
        language = request_language(request)
        text = TEXT[language]
        if not _may_import(principal):
            return page(
                request, text["title"], f"<p>{escape(text['denied'])}</p>", principal=principal, status=403
            )
        csrf = escape(getattr(request.state, "csrf_token", ""))
        client_text = escape(
            json.dumps({k: text[k] for k in ("importing", "done", "reconciled", "failed", "nothing")})
        )
        body = (
            f"<p>{escape(text['intro'])}</p>"
            f'<form id="media-import" class="request-form media-import" method="post" action="/import" '
            f'enctype="multipart/form-data" data-csrf="{csrf}" data-text="{client_text}">'
            f'<label for="media-folder">{escape(text["folder"])}</label>'
            '<input id="media-folder" type="file" name="folder" webkitdirectory multiple>'
            f'<label for="media-files">{escape(text["files"])}</label>'
            '<input id="media-files" type="file" name="files" multiple '
            'accept=".zip,.dcm,application/zip,application/dicom">'
            '<label class="check"><input type="checkbox" name="reconcile" value="1" checked> '
            f"{escape(text['reconcile'])}</label>"
            f'<label for="media-patient-id">{escape(text["patient_id"])}</label>'
            '<input id="media-patient-id" type="text" name="patient_id" maxlength="64" autocomplete="off">'
            f'<button class="primary" type="submit">{escape(text["submit"])}</button>'
            f'<label for="upload-progress">{escape(text["progress"])}</label>'
            '<progress id="upload-progress" value="0" max="1"></progress>'
            "</form>"
            '<p id="import-status" role="status" aria-live="polite"></p><ul id="import-rejected"></ul>'
            '<script src="/static/media-import.js" defer></script>'
        )
        return page(request, text["title"], body, principal=principal)

    @web.post("/import")
    async def upload(request: Request) -> Response:
        principal = request_principal(request)
        check_header_csrf(request)  # the X-CSRF-Token header of a session, whatever the body
        if not _may_import(principal):
            return JSONResponse({"error": "forbidden"}, status_code=403)
        form = await request.form(max_files=MAX_FILES, max_fields=20)
        reconcile = str(form.get("reconcile", "")) == "1"
        patient_id = str(form.get("patient_id", "")).strip()[:64]
        uploads = [item for item in form.getlist("media") if isinstance(item, UploadFile)]
        if not uploads:
            return JSONResponse({"error": TEXT[request_language(request)]["nothing"]}, status_code=400)
        reconciler = (
            Reconciler(ctx, principal.organisation, patient_id=patient_id)
            if reconcile or patient_id
            else None
        )
        with tempfile.TemporaryDirectory(prefix=".tmp-upload-", dir=ctx.store.scratch_dir()) as work:
            root = Path(work)
            for item in uploads:
                relative = _relative(item.filename or "")
                if relative is None:
                    continue
                target = root / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with target.open("wb") as out:
                    await run_in_threadpool(shutil.copyfileobj, item.file, out, COPY_CHUNK)
                await item.close()
            try:
                summary = await run_in_threadpool(
                    import_paths, ctx, [root], principal=principal, reconciler=reconciler
                )
            except ReconciliationError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        result = summary_json(summary, reconcile=reconciler is not None)
        for entry in result["rejected"]:
            # Named as the user's own files, not by the server's work folder.
            entry["name"] = entry["name"].replace(str(root) + "/", "")
        return JSONResponse(result)
