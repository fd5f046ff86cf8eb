"""Known vulnerabilities of the pinned dependencies, from PyPI's JSON API, where ``pip-audit``
cannot ask it.

``pip-audit`` (``make audit``) asks ``/pypi/NAME/VERSION/json`` for each pin. Some package
mirrors answer only the project document, ``/pypi/NAME/json``, whose ``vulnerabilities`` are those
of the project's latest release (PyPI JSON API, "Project"; the entries are OSV records from the
PyPA advisory database). This check asks the version document first, as ``pip-audit`` does; when
the index does not serve it, it takes the project document, which speaks for a pin only when the
pin is the latest release. A pin it could not check fails the audit, as ``pip-audit --strict``
does; so does a known vulnerability that is not withdrawn.

``python tools/pin_audit.py [--requirements requirements.lock] [--index https://pypi.org/pypi]``
(``make audit-pins``); exit 0 when every pin was checked and none has a known vulnerability.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name


@dataclass
class Pin:
    name: str
    version: str


@dataclass
class Finding:
    pin: Pin
    #: "version" (the version's own document), "latest" (the project document, pin == latest) or
    #: "" when neither could speak for the pin.
    source: str
    vulnerabilities: list[dict[str, object]] = field(default_factory=list)
    problem: str = ""


def read_pins(path: Path) -> list[Pin]:
    """The ``name==version`` lines of a pip requirements file (comments and options skipped)."""
    pins = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        exact = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        if exact:
            pins.append(Pin(canonicalize_name(requirement.name), exact[0]))
    return pins


def _document(url: str, timeout: float) -> dict[str, object] | None:
    """The JSON document at ``url``, or None when the index has none there (404)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            document: dict[str, object] = json.load(response)
            return document
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise


def _live(entries: object) -> list[dict[str, object]]:
    """The vulnerability records of a document that are not withdrawn (OSV ``withdrawn``)."""
    if not isinstance(entries, list):
        return []
    return [e for e in entries if isinstance(e, dict) and not e.get("withdrawn")]


def _words(value: object) -> str:
    return ", ".join(str(v) for v in value) if isinstance(value, list) else ""


def check(pin: Pin, index: str, timeout: float = 30.0) -> Finding:
    """Look ``pin`` up: its version document, else the project document when the pin is latest."""
    try:
        own = _document(f"{index}/{pin.name}/{pin.version}/json", timeout)
        if own is not None:
            return Finding(pin, "version", vulnerabilities=_live(own.get("vulnerabilities")))
        project = _document(f"{index}/{pin.name}/json", timeout)
    except (OSError, ValueError) as error:
        return Finding(pin, "", problem=f"index unreachable or answer unreadable: {error}")
    if project is None:
        return Finding(pin, "", problem="not on the index")
    info = project.get("info")
    latest = str(info.get("version", "")) if isinstance(info, dict) else ""
    if latest != pin.version:
        return Finding(
            pin,
            "",
            problem=f"the index serves no document for {pin.version} and the project's speaks for {latest}",
        )
    return Finding(pin, "latest", vulnerabilities=_live(project.get("vulnerabilities")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requirements", type=Path, default=Path("requirements.lock"))
    parser.add_argument("--index", default="https://pypi.org/pypi", help="PyPI JSON API root")
    args = parser.parse_args(argv)
    pins = read_pins(args.requirements)
    with ThreadPoolExecutor(max_workers=8) as pool:
        findings = list(pool.map(lambda pin: check(pin, args.index.rstrip("/")), pins))

    vulnerable = [f for f in findings if f.vulnerabilities]
    unchecked = [f for f in findings if not f.source]
    by_version = sum(1 for f in findings if f.source == "version")
    by_latest = sum(1 for f in findings if f.source == "latest")
    print(
        f"{len(pins)} pins: {by_version} checked by their version's document, {by_latest} by the "
        f"project's (pin is the latest release), {len(unchecked)} not checked"
    )
    for finding in vulnerable:
        for vulnerability in finding.vulnerabilities:
            aliases = _words(vulnerability.get("aliases"))
            fixed = _words(vulnerability.get("fixed_in")) or "no fix"
            print(
                f"VULNERABLE {finding.pin.name}=={finding.pin.version}: {vulnerability.get('id')} "
                f"({aliases}) fixed in: {fixed}"
            )
    for finding in unchecked:
        print(f"NOT CHECKED {finding.pin.name}=={finding.pin.version}: {finding.problem}")
    if not vulnerable and not unchecked:
        print("no known vulnerability")
    return 1 if vulnerable or unchecked else 0


if __name__ == "__main__":
    sys.exit(main())
