#!/usr/bin/env python3
"""Viewer benchmark: time from opening the OHIF viewer URL to its first drawn image, in Chromium.

Not a test: there are no thresholds, only the target printed next to the figures (first image in
under 1.5 s). simral serves OHIF under ``/viewer`` and its DICOMweb services (PS3.18) under
``/dicom-web``; headless Debian Chromium opens ``/viewer/viewer?StudyInstanceUIDs=<CT study>``.

- **cold**: a new browser with an empty profile for each run (no HTTP cache, no compiled-code cache);
- **warm**: one browser profile, primed by two untimed loads, a new tab for each run (the HTTP cache
  answers the viewer's own files, revalidating the unhashed ones).

The time is the page's own clock (``performance.now()``, from the navigation start) when a canvas of
OHIF's viewport first holds an image (grey-level spread above a threshold, sampled every 20 ms);
the median of the runs is printed with a breakdown. Chromium can only reach 127.0.0.1 (a dead proxy
for every other address). Results also go to ``bench/results/viewer-<timestamp>.json``.

Run with the project's virtualenv: ``.venv/bin/python bench/viewer_bench.py [--quick]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import log, machine_info, write_results  # noqa: E402
from playwright.sync_api import BrowserContext, Playwright, sync_playwright  # noqa: E402
from pydicom import dcmread  # noqa: E402
from tests.corpus import ct_series  # noqa: E402
from tests.peers import free_port  # noqa: E402
from tests.portal_login import TotpDevice, browser_login  # noqa: E402
from tests.simral_proc import SIMRAL, TEST_PASSWORD, TEST_USER, SimralProcess  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
TARGET_S = 1.5
#: Grey-level standard deviation above which the viewport shows an image (a blank canvas gives 0).
MIN_SPREAD = 20
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# Installed before any of the page's scripts: polls OHIF's viewport canvases (2D canvases that
# cornerstone3D draws into) and records when one first holds an image.
PROBE = """
(() => {
  const sample = () => {
    for (const canvas of document.querySelectorAll('[data-viewport-uid] canvas.cornerstone-canvas')) {
      if (!canvas.width || !canvas.height) continue;
      const ctx = canvas.getContext('2d');
      if (!ctx) continue;
      const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
      let n = 0, sum = 0, sum2 = 0;
      for (let i = 0; i < data.length; i += 4 * 13) { const v = data[i]; n++; sum += v; sum2 += v * v; }
      if (n && Math.sqrt(sum2 / n - (sum / n) ** 2) > MIN_SPREAD) {
        window.__simralFirstImage = performance.now();
        return;
      }
    }
    setTimeout(sample, 20);
  };
  setTimeout(sample, 20);
})();
""".replace("MIN_SPREAD", str(MIN_SPREAD))

BREAKDOWN = """() => {
  const entries = performance.getEntriesByType('resource');
  const first = (re) => entries.find((e) => re.test(e.name));
  const nav = performance.getEntriesByType('navigation')[0];
  const at = (e, key) => (e ? Math.round(e[key]) : null);
  const app = first(/\\/app\\.bundle\\.[0-9a-f]+\\.js/);
  const qido = first(/\\/dicom-web\\/studies\\?/);
  const meta = first(/\\/metadata/);
  const frame = first(/\\/frames\\/|\\/rendered|\\/bulkdata/);
  return {
    app_bundle_loaded_ms: at(app, 'responseEnd'),
    app_bundle_cached: app ? app.transferSize === 0 : null,
    dom_content_loaded_ms: Math.round(nav.domContentLoadedEventEnd),
    first_qido_ms: at(qido, 'startTime'),
    first_metadata_done_ms: at(meta, 'responseEnd'),
    first_pixels_done_ms: at(frame, 'responseEnd'),
    bytes_transferred: entries.reduce((s, e) => s + (e.transferSize || 0), 0),
  };
}"""


WATERFALL = """() => performance.getEntriesByType('resource').map((e) => ({
  name: e.name.replace(location.origin, ''),
  start_ms: Math.round(e.startTime),
  first_byte_ms: Math.round(e.responseStart),
  end_ms: Math.round(e.responseEnd),
  bytes: e.transferSize,
}))"""


def git_commit() -> str:
    result = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() or "unknown"


def chromium_version() -> str:
    result = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, check=False)
    return result.stdout.strip()


def launch(playwright: Playwright, profile: Path, dead_proxy: int) -> BrowserContext:
    """Headless Chromium on ``profile``; every address but loopback goes to a proxy that is not there."""
    return playwright.chromium.launch_persistent_context(
        str(profile),
        executable_path=CHROMIUM,
        headless=True,
        locale="fr-FR",
        viewport={"width": 1280, "height": 900},
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            # Loopback bypasses the proxy implicitly; anything else fails against the dead proxy.
            f"--proxy-server=http://127.0.0.1:{dead_proxy}",
        ],
    )


def open_viewer(
    context: BrowserContext, url: str, timeout_s: float, *, waterfall: bool = False
) -> dict[str, Any]:
    """One timed load in a new tab: the first-image time and the breakdown, in ms from navigation start
    (with ``waterfall``, every request the page made until then: what is on the first image's path)."""
    page = context.new_page()
    outside: list[str] = []
    # blob: and data: URLs are the page's own (OHIF's web workers), not network requests.
    local = ("http://127.0.0.1:", "blob:http://127.0.0.1:", "data:")
    page.on("request", lambda r: None if r.url.startswith(local) else outside.append(r.url))
    try:
        page.add_init_script(PROBE)
        page.goto(url, wait_until="commit")
        page.wait_for_function(
            "() => window.__simralFirstImage !== undefined", timeout=timeout_s * 1000, polling=50
        )
        result: dict[str, Any] = {"first_image_ms": round(page.evaluate("() => window.__simralFirstImage"))}
        result.update(page.evaluate(BREAKDOWN))
        if waterfall:
            result["waterfall"] = page.evaluate(WATERFALL)
    finally:
        page.close()
    if outside:
        raise RuntimeError(f"the viewer tried to leave 127.0.0.1: {outside}")
    return result


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in runs[0] if k.endswith("_ms")]
    median = {
        k: statistics.median(r[k] for r in runs if r[k] is not None) for k in keys if any(r[k] for r in runs)
    }
    return {"runs": runs, "median": median}


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="simral-viewer-bench-"))
    slices = 20 if args.quick else 100
    runs = 2 if args.quick else args.runs
    load_before = os.getloadavg()
    report: dict[str, Any] = {
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "machine": machine_info(load_before),
        "versions": {"simral_commit": git_commit(), "chromium": chromium_version()},
        "series": {"slices": slices, "rows": 512, "columns": 512},
        "runs_per_mode": runs,
    }
    try:
        log(f"generating a {slices}-slice 512x512 CT series and importing it")
        files = ct_series(work / "ct", slices=slices)
        study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        simral = SimralProcess(work / "data", extra_env={"SIMRAL_WORKERS": "0"})
        simral.cli("import", str(work / "ct"))
        with simral:
            url = f"{simral.http_url}/viewer/viewer?StudyInstanceUIDs={study_uid}"
            # The server rebases OHIF's bundles on their first request: do that before timing.
            for path in ("/viewer/", "/viewer/app.bundle.css"):
                request = urllib.request.Request(simral.http_url + path, headers=simral.auth_headers)
                _HTTP.open(request, timeout=60).read()
            dead_proxy = free_port()
            with sync_playwright() as playwright:
                # Log in once (password + TOTP, as a user does); every timed profile gets the session.
                browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
                session = browser_login(browser, simral.http_url, TEST_USER, TEST_PASSWORD, TotpDevice())
                browser.close()
                cookies = session["cookies"]
                cold = []
                for i in range(runs):
                    with_profile = work / f"cold-profile-{i}"
                    context = launch(playwright, with_profile, dead_proxy)
                    context.add_cookies(cookies)
                    try:
                        cold.append(open_viewer(context, url, args.timeout))
                    finally:
                        context.close()
                        shutil.rmtree(with_profile, ignore_errors=True)
                    log(f"cold run {i + 1}: first image at {cold[-1]['first_image_ms']} ms")
                context = launch(playwright, work / "warm-profile", dead_proxy)
                context.add_cookies(cookies)
                try:
                    for _ in range(2):
                        open_viewer(context, url, args.timeout)
                    warm = []
                    for i in range(runs):
                        warm.append(open_viewer(context, url, args.timeout, waterfall=args.waterfall))
                        log(f"warm run {i + 1}: first image at {warm[-1]['first_image_ms']} ms")
                finally:
                    context.close()
        report["cold"] = summarise(cold)
        report["warm"] = summarise(warm)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print_report(report)
    return report


def print_report(report: dict[str, Any]) -> None:
    rows = [
        ("first image", "first_image_ms"),
        ("  app bundle loaded", "app_bundle_loaded_ms"),
        ("  DOMContentLoaded", "dom_content_loaded_ms"),
        ("  first QIDO-RS request", "first_qido_ms"),
        ("  first metadata received", "first_metadata_done_ms"),
        ("  first pixel data received", "first_pixels_done_ms"),
    ]
    print()
    print(f"OHIF first image, median of {report['runs_per_mode']} runs (ms from navigation start)")
    header = f"{'':30} {'cold':>8} {'warm':>8}"
    print(header)
    print("-" * len(header))
    for label, key in rows:
        cold, warm = report["cold"]["median"].get(key), report["warm"]["median"].get(key)
        print(f"{label:30} {cold if cold is not None else '-':>8} {warm if warm is not None else '-':>8}")
    print()
    last_warm = report["warm"]["runs"][-1]
    if "waterfall" in last_warm:
        print(f"requests of the last warm run (first image at {last_warm['first_image_ms']} ms)")
        for entry in sorted(last_warm["waterfall"], key=lambda e: e["start_ms"]):
            name = entry["name"] if len(entry["name"]) <= 90 else entry["name"][:87] + "..."
            times = f"{entry['start_ms']:>6} {entry['first_byte_ms']:>6} {entry['end_ms']:>6}"
            print(f"{times} {entry['bytes']:>9}  {name}")
        print()
    for mode in ("cold", "warm"):
        seconds = report[mode]["median"]["first_image_ms"] / 1000
        verdict = "met" if seconds < TARGET_S else "NOT met"
        print(f"{mode}: first image in {seconds:.2f} s (target < {TARGET_S} s: {verdict})")
    if report["machine"]["loadavg_before"][0] > 0.5:
        print("note: other work was running on this machine: the figures may be noisy.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="20-slice series, 2 runs per mode: a smoke run")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per mode (default 5)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for the first image")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (server log) at the end")
    parser.add_argument(
        "--waterfall",
        action="store_true",
        help="print every request of the last warm run (start, first byte, end in ms; bytes transferred)",
    )
    parser.add_argument(
        "--output", type=Path, help="JSON result file (default: bench/results/viewer-<ts>.json)"
    )
    args = parser.parse_args(argv)
    if not Path(SIMRAL).exists():
        parser.error(f"{SIMRAL} not found: run with the project's virtualenv (.venv/bin/python)")
    if not Path(CHROMIUM).exists():
        parser.error(f"{CHROMIUM} not found: install chromium (make test-deps)")
    report = run(args)
    write_results(report, args.output, "viewer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
