"""A real OpenID provider (npm ``oidc-provider``, tests/oidc_provider/server.js) on a free loopback port.

The provider mimics Pro Santé Connect: scope ``scope_all`` with ``SubjectNameID`` / ``SubjectRefPro``
claims, acr values ``eidas1`` and ``low``, PKCE required, and login/consent completed without a browser.
Its node_modules are installed on first use with ``npm ci`` from the committed package-lock.json
(``--prefer-offline``: later runs use npm's cache). Usage::

    with OidcProviderPeer(redirect_uri="http://127.0.0.1:9/cb", acr="low") as op:
        discovery = fetch_discovery(op.issuer, http)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
from pathlib import Path

from tests.peers import _HTTP, HOST, PeerStartError, _Peer, free_port

PROVIDER_DIR = Path(__file__).resolve().parent / "oidc_provider"
NODE = shutil.which("node") or "/usr/bin/node"
NPM = shutil.which("npm") or "/usr/bin/npm"
#: The command the Makefile runs before the tests (same as ensure_node_modules()).
NPM_CI = [NPM, "ci", "--prefix", str(PROVIDER_DIR), "--no-audit", "--no-fund", "--prefer-offline"]
#: The test account of server.js.
ACCOUNT_SUB = "f:test-psc-account-0001"
ACCOUNT_NATIONAL_ID = "899700000001"
ACCOUNT_FINESS = "990000001"


def _installed() -> bool:
    return (PROVIDER_DIR / "node_modules" / "oidc-provider" / "package.json").is_file()


def ensure_node_modules(timeout: float = 300.0) -> None:
    """``npm ci`` into tests/oidc_provider/node_modules unless present (file-locked for parallel runs)."""
    if _installed():
        return
    # The lock file lives outside the work tree, keyed by its path.
    key = hashlib.sha256(str(PROVIDER_DIR).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"simral-oidc-npm-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed():
            return
        proc = subprocess.run(NPM_CI, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0 or not _installed():
            raise PeerStartError(f"{' '.join(NPM_CI)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


class OidcProviderPeer(_Peer):
    """tests/oidc_provider/server.js: issuer ``http://127.0.0.1:PORT``, one confidential client."""

    kind = "oidc"
    grace = 5.0

    def __init__(
        self,
        *,
        redirect_uri: str,
        client_id: str = "simral-test",
        client_secret: str | None = None,
        acr: str = "eidas1",
        token_auth_method: str = "client_secret_basic",
        userinfo_jwt: bool = False,
        keep_dir: bool = False,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(keep_dir=keep_dir)
        self.redirect_uri = redirect_uri
        self.client_id = client_id
        self.client_secret = client_secret or secrets.token_urlsafe(24)
        self.acr = acr
        self.token_auth_method = token_auth_method
        self.userinfo_jwt = userinfo_jwt
        self.timeout = timeout
        self.port = free_port()

    @property
    def issuer(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _start(self) -> None:
        ensure_node_modules()
        env = {
            "OIDC_PORT": str(self.port),
            "OIDC_CLIENT_ID": self.client_id,
            "OIDC_CLIENT_SECRET": self.client_secret,
            "OIDC_REDIRECT_URI": self.redirect_uri,
            "OIDC_ACR": self.acr,
            "OIDC_TOKEN_AUTH": self.token_auth_method,
            "OIDC_USERINFO_JWT": "1" if self.userinfo_jwt else "0",
            "NODE_ENV": "test",
        }
        self.proc = self._spawn([NODE, str(PROVIDER_DIR / "server.js")], "oidc-provider", env=env)
        url = f"{self.issuer}/.well-known/openid-configuration"
        deadline = time.monotonic() + self.timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self._alive():
                raise RuntimeError(f"oidc-provider exited with code {self.proc.returncode}")
            try:
                with _HTTP.open(url, timeout=2) as resp:
                    if json.load(resp).get("issuer") == self.issuer:
                        return
            except (OSError, urllib.error.URLError, ValueError) as exc:
                last = exc
            time.sleep(0.05)
        raise TimeoutError(f"{url} did not answer within {self.timeout:.0f}s: {last}")
