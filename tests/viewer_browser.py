"""What the viewer's browser tests share: a headless Chromium (tests/chromium_cdp.py) whose every
page records its Content-Security-Policy violations from the start, and opening a written page."""

from __future__ import annotations

from pathlib import Path

import pytest

from chromium_cdp import Chromium, find_chromium

needs_chromium = pytest.mark.skipif(find_chromium() is None,
                                    reason="no Chromium on PATH (apt-get install -y chromium); the page is not rendered")


# --------------------------------------------------------------------------- in Chromium
# Every page the browser opens records its Content-Security-Policy violations from the start.
RECORD_VIOLATIONS = """window.__violations = [];
document.addEventListener('securitypolicyviolation', e => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));"""


@pytest.fixture(scope="module")
def browser():
    if find_chromium() is None:
        pytest.skip("no Chromium on PATH (apt-get install -y chromium)")
    with Chromium.launch(width=1400, height=900) as chromium:
        chromium.on_new_document(RECORD_VIOLATIONS)
        yield chromium


def _open(browser: Chromium, path: Path, fragment_: str = "") -> None:
    browser.navigate(path.as_uri() + fragment_)
    browser.wait_for("document.body.dataset.ready === '1'")


def _violations(browser: Chromium) -> list[str]:
    return browser.evaluate("window.__violations")


def block(code: str) -> str:
    """A fenced REPL cell as a model writes it."""
    return f"```repl\n{code}\n```"
