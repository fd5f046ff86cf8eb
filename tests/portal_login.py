"""Logging in to the portal as a user would, in headless Chromium: password, then TOTP.

A :class:`TotpDevice` plays the user's authenticator app: it reads the secret shown on the
enrolment page and gives codes (RFC 6238), never the same time step twice (the server refuses a
replayed code). :func:`browser_login` returns the context's storage state (the session cookie), so
other contexts of the same test module can reuse the session.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pyotp
from playwright.sync_api import Browser, Page


@dataclass
class TotpDevice:
    """A user's authenticator: the secret and the last time step used."""

    secret: str = ""
    last_step: int = 0

    def code(self) -> str:
        """A code for a step the server has not seen yet (the current step or the next one, which the
        server's ±1 window accepts; never the previous one, which a slow request could carry past
        the window), waiting if both were used."""
        totp = pyotp.TOTP(self.secret)
        while True:
            now = int(time.time()) // totp.interval
            for step in (now, now + 1):
                if step > self.last_step:
                    self.last_step = step
                    return totp.at(step * totp.interval)
            time.sleep(1)


def submit_password(page: Page, base_url: str, login: str, password: str) -> None:
    page.goto(base_url + "/login")
    page.fill("input[name=login]", login)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_load_state("domcontentloaded")


def submit_second_factor(page: Page, device: TotpDevice) -> None:
    """On the enrolment or TOTP page: read the secret when enrolling, then type a code."""
    if "/login/enrol" in page.url:
        device.secret = page.inner_text("#totp-secret").strip()
    page.fill("input[name=code]", device.code())
    page.click("button[type=submit]")
    page.wait_for_load_state("domcontentloaded")


def login_page(page: Page, base_url: str, login: str, password: str, device: TotpDevice) -> None:
    """Log in on ``page`` (password + TOTP, enrolling on first login)."""
    submit_password(page, base_url, login, password)
    assert "/login/" in page.url, f"password step failed: {page.url}\n{page.content()[:2000]}"
    submit_second_factor(page, device)
    assert "/login" not in page.url, f"second factor refused: {page.url}\n{page.content()[:2000]}"


def browser_login(browser: Browser, base_url: str, login: str, password: str, device: TotpDevice) -> Any:
    """Log in in a fresh context and return its storage state (cookies) for other contexts."""
    context = browser.new_context()
    try:
        page = context.new_page()
        login_page(page, base_url, login, password, device)
        return context.storage_state()
    finally:
        context.close()
