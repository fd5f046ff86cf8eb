"""The OHIF viewer and the study list, end to end in a real browser (Debian's Chromium, headless).

``simral serve`` serves OHIF (npm ``@ohif/app``, installed by ``make install``) under ``/viewer``
with a generated ``app-config.js`` pointing at its own DICOMweb services (PS3.18 QIDO-RS/WADO-RS
under ``/dicom-web``). Chromium opens a CT study and must draw it; every request that would leave
127.0.0.1 is blocked. The viewport's screenshot goes to ``test-artifacts/viewer-ct.png``.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageStat
from playwright.sync_api import Browser, Page, Request, Response, Route, sync_playwright
from pydicom import dcmread
from tests.corpus import ct_series
from tests.portal_login import TotpDevice, browser_login
from tests.simral_proc import TEST_PASSWORD, TEST_USER, SimralProcess

from simral.config import load_settings
from simral.web import viewer
from simral.web.viewer import IMMUTABLE, accepts_gzip, app_config, data_source, rebase

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOSTILE_NAME = "<b>INJ</b>^&amp;\"'"
VIEWPORT_CANVAS = "[data-viewport-uid] canvas.cornerstone-canvas"
#: Grey-level standard deviation of the viewport's central region above which an image is drawn
#: (the CT phantom in its soft-tissue window gives about 60; a black or uniform canvas gives 0).
MIN_SPREAD = 20.0


@dataclass
class Served:
    simral: SimralProcess
    study_uid: str
    hostile_study_uid: str
    #: StudyDate + StudyTime by Study Instance UID.
    study_dates: dict[str, str]
    http: httpx.Client

    @property
    def url(self) -> str:
        return self.simral.http_url


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("viewer")
    files = ct_series(base / "ct", slices=24, patient_id="VIEW001", patient_name="DUPONT^JEANNE")
    hostile = ct_series(
        base / "hostile", slices=1, rows=64, cols=64, patient_id="INJ001", patient_name=HOSTILE_NAME
    )
    simral = SimralProcess(base / "data")
    simral.cli("import", str(base / "ct"), str(base / "hostile"))
    ct, injected = (dcmread(paths[0], stop_before_pixels=True) for paths in (files, hostile))
    with (
        simral,
        httpx.Client(
            base_url=simral.http_url, trust_env=False, timeout=60, headers=simral.auth_headers
        ) as http,
    ):
        yield Served(
            simral=simral,
            study_uid=str(ct.StudyInstanceUID),
            hostile_study_uid=str(injected.StudyInstanceUID),
            study_dates={str(ds.StudyInstanceUID): ds.StudyDate + ds.StudyTime for ds in (ct, injected)},
            http=http,
        )


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@dataclass
class Traffic:
    """What a page asked for: blocked (non-loopback) requests, failures and error statuses."""

    blocked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: (URL, content type) of every successful response.
    served: list[tuple[str, str]] = field(default_factory=list)

    def dicomweb_problems(self) -> list[str]:
        return [p for p in self.failed + self.errors if "/dicom-web" in p or "/wado" in p]


_logged_in: dict[str, Any] = {}


def logged_in_state(browser: Browser, served: Served) -> Any:
    """The test technologist's session, logged in once through the portal (password + TOTP)."""
    key = served.simral.http_url
    if key not in _logged_in:
        _logged_in[key] = browser_login(browser, key, TEST_USER, TEST_PASSWORD, TotpDevice())
    return _logged_in[key]


def open_page(browser: Browser, served: Served, *, locale: str = "fr-FR") -> tuple[Page, Traffic]:
    """A fresh, logged-in browser context whose page may only reach ``served``'s own origin."""
    context = browser.new_context(
        locale=locale, viewport={"width": 1280, "height": 900}, storage_state=logged_in_state(browser, served)
    )
    page = context.new_page()
    traffic = Traffic()

    def route(route: Route) -> None:
        if route.request.url.startswith("http://127.0.0.1:"):
            route.continue_()
        else:
            traffic.blocked.append(route.request.url)
            route.abort()

    def on_failed(request: Request) -> None:
        traffic.failed.append(f"{request.method} {request.url}: {request.failure}")

    def on_response(response: Response) -> None:
        if response.status >= 400:
            traffic.errors.append(f"{response.request.method} {response.url}: {response.status}")
        else:
            traffic.served.append((response.url, response.headers.get("content-type", "")))

    page.route("**/*", route)
    page.on("requestfailed", on_failed)
    page.on("response", on_response)
    return page, traffic


def grey_spread(png: bytes) -> float:
    """Standard deviation of the grey levels of the central half of an image (overlays sit at the edges)."""
    image = Image.open(io.BytesIO(png)).convert("L")
    w, h = image.size
    centre = image.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    return float(ImageStat.Stat(centre).stddev[0])


def wait_for_image(page: Page, timeout: float = 120) -> bytes:
    """The viewport canvas's screenshot once it shows an image (not blank); fails after ``timeout``."""
    page.wait_for_selector(VIEWPORT_CANVAS, state="visible", timeout=timeout * 1000)
    deadline = time.monotonic() + timeout
    spread = 0.0
    while time.monotonic() < deadline:
        png = page.locator(VIEWPORT_CANVAS).first.screenshot()
        spread = grey_spread(png)
        if spread > MIN_SPREAD:
            return png
        time.sleep(0.25)
    raise AssertionError(f"the viewport stayed blank (grey-level spread {spread:.1f} <= {MIN_SPREAD})")


def viewer_config(served: Served) -> dict[str, Any]:
    response = served.http.get("/viewer/app-config.js")
    assert response.status_code == 200
    text = response.text
    start = text.index("window.config = ") + len("window.config = ")
    return dict(json.loads(text[start : text.index("};\n", start) + 1]))


# ------------------------------------------------------------------------------------------- viewer


def test_viewer_renders_ct_study(browser: Browser, served: Served, artifacts_dir: Path) -> None:
    page, traffic = open_page(browser, served)
    try:
        page.goto(f"{served.url}/viewer/viewer?StudyInstanceUIDs={served.study_uid}")
        png = wait_for_image(page)
        (artifacts_dir / "viewer-ct.png").write_bytes(png)
        page.screenshot(path=str(artifacts_dir / "viewer-ct-page.png"))
        assert page.evaluate("() => window.localStorage.getItem('i18nextLng')") == "fr"
        assert page.evaluate("() => window.PUBLIC_URL") == "/viewer/"
        # Wait for the rest of the series to load before judging the DICOMweb traffic.
        page.wait_for_load_state("networkidle", timeout=60_000)
    finally:
        page.context.close()
    assert not traffic.blocked, f"requests leaving 127.0.0.1: {traffic.blocked}"
    assert not traffic.dicomweb_problems(), traffic.dicomweb_problems()
    assert not traffic.errors, f"error responses: {traffic.errors}"
    # The series thumbnail is a small JPEG rendered by the server (PS3.18 thumbnail resource).
    thumbnails = [(url, kind) for url, kind in traffic.served if "/thumbnail" in url]
    assert thumbnails and all(kind == "image/jpeg" for _, kind in thumbnails), thumbnails
    # The style sheets (unhashed names) were asked for with the build's version, so they are cached.
    sheets = [url for url, _ in traffic.served if re.search(r"/viewer/[^/?]+\.css", url)]
    assert sheets and all(re.search(r"\.css\?v=[0-9a-f]{16}$", url) for url in sheets), sheets


def test_viewer_english_on_request(browser: Browser, served: Served) -> None:
    page, traffic = open_page(browser, served)
    try:
        response = page.goto(f"{served.url}/viewer/?lang=en")
        assert response is not None and response.status == 200
        page.wait_for_function("() => window.localStorage.getItem('i18nextLng') === 'en-US'", timeout=30_000)
        assert page.evaluate("() => document.documentElement.lang") == "en"
    finally:
        page.context.close()
    assert not traffic.blocked


def test_app_config_points_at_same_origin_dicomweb(served: Served) -> None:
    response = served.http.get("/viewer/app-config.js")
    assert response.headers["content-type"].startswith("text/javascript")
    assert response.headers["cache-control"] == "no-store"
    config = viewer_config(served)
    assert config["routerBasename"] == "/viewer"
    assert config["showStudyList"] is True
    assert config["defaultDataSourceName"] == "simral"
    (source,) = config["dataSources"]
    assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
    settings = source["configuration"]
    assert settings["qidoRoot"] == settings["wadoRoot"] == "/dicom-web"
    assert settings["wadoUriRoot"] == "/wado"
    assert settings["qidoSupportsIncludeField"] is True
    assert settings["imageRendering"] == "wadors"
    assert settings["thumbnailRendering"] == "thumbnail" and settings["thumbnailRequestStrategy"] == "fetch"
    assert settings["enableStudyLazyLoad"] is True
    assert settings["supportsFuzzyMatching"] is True
    assert settings["bulkDataURI"]["enabled"] is True
    assert settings["dicomUploadEnabled"] is False
    assert "authorization" not in json.dumps(config).lower()
    # The roots really are our DICOMweb service (QIDO-RS, PS3.18 §10.6).
    studies = served.http.get(
        f"{settings['qidoRoot']}/studies", params={"StudyInstanceUID": served.study_uid}
    )
    assert studies.status_code == 200 and len(studies.json()) == 1


def test_app_config_authorization_hook() -> None:
    assert "requestOptions" not in data_source()["configuration"]
    source = data_source(authorization="Bearer abc")
    assert source["configuration"]["requestOptions"] == {"authorization": "Bearer abc"}
    script = app_config(authorization="Bearer abc")
    assert '"authorization": "Bearer abc"' in script
    assert "userAuthenticationService.setServiceImplementation" in script
    assert "setServiceImplementation" not in app_config()


def test_viewer_files_and_cache_headers(served: Served) -> None:
    http = served.http
    redirect = http.get("/viewer")
    assert redirect.status_code in (307, 308) and redirect.headers["location"].endswith("/viewer/")
    index = http.get("/viewer/", headers={"Accept-Language": "fr-FR,fr;q=0.9,en;q=0.8"})
    assert index.status_code == 200 and index.headers["cache-control"] == "no-store"
    assert 'window.PUBLIC_URL="/viewer/"' in index.text
    assert 'src="/viewer/app-config.js"' in index.text and 'src="/app' not in index.text
    assert '<html lang="fr">' in index.text
    # Client-side routes of the single page application answer index.html to a browser navigation...
    route = http.get(f"/viewer/viewer?StudyInstanceUIDs={served.study_uid}", headers={"Accept": "text/html"})
    assert route.status_code == 200 and "window.PUBLIC_URL" in route.text
    # ... but a missing asset stays a 404, and nothing escapes the build folder.
    assert (
        http.get("/viewer/missing.bundle.0123456789abcdef.js", headers={"Accept": "*/*"}).status_code == 404
    )
    assert http.get("/viewer/..%2f..%2fetc/passwd", headers={"Accept": "*/*"}).status_code == 404
    # Hashed build outputs are immutable; the webpack public path and the CSS fonts are rebased.
    bundle_name = index.text.split('src="/viewer/app.bundle.')[1].split('"')[0]
    bundle = http.get(f"/viewer/app.bundle.{bundle_name}")
    assert bundle.status_code == 200
    assert "immutable" in bundle.headers["cache-control"]
    assert '__webpack_require__.p = "/viewer/";' in bundle.text
    css = http.get("/viewer/app.bundle.css")
    assert css.headers["cache-control"] == "no-cache"
    assert "url(/viewer/" in css.text and "url(/a" not in css.text
    again = http.get("/viewer/app.bundle.css", headers={"If-None-Match": css.headers["etag"]})
    assert again.status_code == 304
    wasm = next(load_settings(environ=served.simral.env).viewer_dir.glob("*.wasm"))
    binary = http.get(f"/viewer/{wasm.name}")
    assert binary.status_code == 200 and binary.content == wasm.read_bytes()
    assert "immutable" in binary.headers["cache-control"]


def test_viewer_compression_and_versioned_caching(served: Served) -> None:
    """Text and WebAssembly go gzip'd to clients that accept it (``Vary: Accept-Encoding``); the
    build's version on the references to unhashed files makes them cacheable for good."""
    http = served.http
    index = http.get("/viewer/")
    assert index.headers["cache-control"] == "no-store"
    found = re.search(r'href="/viewer/app\.bundle\.css\?v=([0-9a-f]{16})"', index.text)
    assert found, "app.bundle.css is referenced without the build's version"
    version = found.group(1)
    assert 'src="/viewer/app-config.js"' in index.text  # generated per request, never cached
    bundle_name = index.text.split('src="/viewer/app.bundle.')[1].split('"')[0]
    assert "?v=" not in bundle_name  # content-hashed already
    bundle_url = f"/viewer/app.bundle.{bundle_name}"
    # The first index.html starts the compression in the background; until a file's gzip'd copy is
    # ready it goes out as is.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (
            http.head(bundle_url, headers={"Accept-Encoding": "gzip"}).headers.get("content-encoding")
            == "gzip"
        ):
            break
        time.sleep(0.2)
    zipped = http.get(bundle_url, headers={"Accept-Encoding": "gzip"})
    assert zipped.status_code == 200 and zipped.headers.get("content-encoding") == "gzip"
    assert zipped.headers["vary"] == "Accept-Encoding"
    assert zipped.headers["cache-control"] == IMMUTABLE
    assert zipped.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert zipped.num_bytes_downloaded < len(zipped.content) / 3
    assert "wasm-unsafe-eval" in zipped.headers["content-security-policy"]
    # The webpack runtime is rebased and names the CSS chunks with the build's version.
    assert '__webpack_require__.p = "/viewer/";' in zipped.text
    assert f'".css?v={version}"' in zipped.text
    plain = http.get(bundle_url, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.headers["vary"] == "Accept-Encoding"
    assert plain.content == zipped.content and plain.headers["etag"] != zipped.headers["etag"]
    again = http.get(bundle_url, headers={"Accept-Encoding": "gzip", "If-None-Match": zipped.headers["etag"]})
    assert again.status_code == 304 and again.headers["vary"] == "Accept-Encoding"
    # Unhashed files: immutable with the current version, revalidated otherwise.
    css = http.get(f"/viewer/app.bundle.css?v={version}")
    assert css.status_code == 200 and css.headers["cache-control"] == IMMUTABLE
    assert "url(/viewer/" in css.text
    for stale in ("/viewer/app.bundle.css", "/viewer/app.bundle.css?v=0123456789abcdef"):
        assert http.get(stale).headers["cache-control"] == "no-cache"
    # Images are compressed already: sent as they are, without Vary.
    icon = http.get("/viewer/assets/favicon-32x32.png", headers={"Accept-Encoding": "gzip"})
    assert icon.status_code == 200
    assert "content-encoding" not in icon.headers and "vary" not in icon.headers
    # A range request gets the plain bytes (ranges apply to the representation as stored).
    wasm = next(load_settings(environ=served.simral.env).viewer_dir.glob("*.wasm"))
    part = http.get(f"/viewer/{wasm.name}", headers={"Accept-Encoding": "gzip", "Range": "bytes=0-3"})
    assert part.status_code == 206 and part.content == wasm.read_bytes()[:4]


def test_accept_encoding_and_page_versioning() -> None:
    assert accepts_gzip("gzip, deflate, br, zstd")
    assert accepts_gzip("br;q=1.0, gzip;q=0.8")
    assert accepts_gzip("*")
    assert not accepts_gzip("gzip;q=0, br")
    assert not accepts_gzip("identity")
    assert not accepts_gzip("")
    page = (
        b'<link href="/manifest.json"><script src="/app-config.js"></script>'
        b'<script src="/app.bundle.0123456789abcdef.js"></script><link href="/app.bundle.css">'
        b'<a href="https://example.org/x.css">'
    )
    rebased = rebase("index.html", page, "/viewer/", "fedcba9876543210")
    assert b'href="/viewer/manifest.json?v=fedcba9876543210"' in rebased
    assert b'href="/viewer/app.bundle.css?v=fedcba9876543210"' in rebased
    assert b'src="/viewer/app-config.js"' in rebased
    assert b'src="/viewer/app.bundle.0123456789abcdef.js"' in rebased
    assert b'href="https://example.org/x.css"' in rebased
    assert b"?v=" not in rebase("index.html", page, "/viewer/")


def test_prepared_copies_are_files_of_the_current_build_version(tmp_path: Path) -> None:
    """Rebased and gzip copies live on disk, one folder per build version; nothing is kept in
    memory, and a new build version removes the copies of the old one."""
    prepared = viewer._PreparedFiles(tmp_path / "prepared")
    prepared.use_version("build1")
    source = tmp_path / "app.js"
    source.write_bytes(b"console.log('simral');\n" * 2000)

    def settled() -> None:
        deadline = time.monotonic() + 10
        while prepared._pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not prepared._pending

    assert prepared.gzipped(str(source), "k1") is None
    prepared.request_gzip(str(source), "k1", lambda: source)
    settled()
    copy = prepared.gzipped(str(source), "k1")
    assert copy is not None and copy.parent == tmp_path / "prepared" / "build1"
    assert gzip.decompress(copy.read_bytes()) == source.read_bytes()
    assert copy.stat().st_size < source.stat().st_size / 10
    assert prepared.gzipped(str(source), "k2") is None  # another state of the file: not this copy
    assert not [p for p in copy.parent.iterdir() if p.name.startswith(".part-")]  # no temporary left
    vars_held = [v for v in vars(prepared).values() if isinstance(v, bytes | bytearray)]
    assert vars_held == []
    prepared.use_version("build2")  # a new installation of the viewer
    assert not (tmp_path / "prepared" / "build1").exists()
    assert prepared.gzipped(str(source), "k1") is None


def test_viewer_not_installed_answers_503(tmp_path: Path) -> None:
    simral = SimralProcess(tmp_path / "data", extra_env={"SIMRAL_VIEWER_DIR": str(tmp_path / "no-ohif")})
    with simral, httpx.Client(base_url=simral.http_url, trust_env=False, headers=simral.auth_headers) as http:
        response = http.get("/viewer/viewer", headers={"Accept": "text/html"})
        assert response.status_code == 503
        assert "make install" in response.text
        assert http.get("/healthz").status_code == 200
        assert http.get("/").status_code == 200


# --------------------------------------------------------------------------------------- study list


def test_study_list_opens_viewer(browser: Browser, served: Served) -> None:
    page, traffic = open_page(browser, served)
    try:
        page.goto(f"{served.url}/")
        assert page.title().startswith("Examens")
        assert page.locator("h1").inner_text() == "Examens"
        row = page.locator("tbody tr", has_text="VIEW001")
        assert row.count() == 1
        cells = row.locator("td").all_inner_texts()
        assert cells[0] == "DUPONT JEANNE"
        assert cells[3] == "CT"
        assert cells[4] == "CT THORAX ABDOMEN (synthetic)"
        assert cells[6:] == ["1", "24"]
        link = row.locator("td").first.locator("a")
        assert link.get_attribute("href") == f"/viewer/viewer?StudyInstanceUIDs={served.study_uid}"
        link.click()
        page.wait_for_url(f"**/viewer/viewer?StudyInstanceUIDs={served.study_uid}")
        wait_for_image(page)
    finally:
        page.context.close()
    assert not traffic.blocked
    assert not traffic.dicomweb_problems(), traffic.dicomweb_problems()


def test_study_list_search_language_and_escaping(served: Served) -> None:
    http = served.http
    page = http.get("/")
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    assert "<title>Examens" in page.text
    # Both studies, newest first.
    assert page.text.count("<tr><td>") == 2
    order = sorted([served.study_uid, served.hostile_study_uid], key=lambda uid: served.study_dates[uid])
    assert page.text.index(order[1]) < page.text.index(order[0])
    # Every value is escaped: the hostile patient name shows as text.
    assert "<b>INJ</b>" not in page.text
    assert "&lt;b&gt;INJ&lt;/b&gt;" in page.text
    found = http.get("/", params={"name": "dupont jea"})
    assert found.text.count("<tr><td>") == 1 and "VIEW001" in found.text
    assert http.get("/", params={"patient_id": "VIEW001"}).text.count("<tr><td>") == 1
    assert "Aucun examen" in http.get("/", params={"patient_id": "NOBODY"}).text
    dates = http.get("/", params={"date_from": "1900-01-01", "date_to": "1900-12-31"})
    assert "Aucun examen" in dates.text
    bad = http.get("/", params={"date_from": "2020-13-45"})
    assert bad.status_code == 400 and "Date invalide" in bad.text
    english = http.get("/", params={"lang": "en"})
    assert (
        "<title>Studies" in english.text
        and "StudyInstanceUIDs=" in english.text
        and "lang=en" in english.text
    )
    preferred = http.get("/", headers={"Accept-Language": "en-GB,en;q=0.9,fr;q=0.5"})
    assert '<html lang="en">' in preferred.text
    french = http.get("/", headers={"Accept-Language": "de-DE,fr;q=0.7,en;q=0.3"})
    assert '<html lang="fr">' in french.text
