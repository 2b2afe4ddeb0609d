"""A real browser for the tests: Debian's chromium driven by Playwright, and a loopback HTTP server for files.

Playwright's own browser download cannot work here; it drives the system's chromium (`executable_path`).
CI sets REALTIME_CAM_REQUIRE_BROWSER=1 so that a missing browser fails the run instead of skipping.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import importlib.util
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("REALTIME_CAM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
HAVE_BROWSER = Path(CHROMIUM).exists() and importlib.util.find_spec("playwright") is not None
if os.environ.get("REALTIME_CAM_REQUIRE_BROWSER") == "1" and not HAVE_BROWSER:
    raise pytest.UsageError(f"REALTIME_CAM_REQUIRE_BROWSER=1 but chromium ({CHROMIUM}) or playwright is missing")
needs_browser = pytest.mark.skipif(not HAVE_BROWSER, reason="needs Debian's chromium and pip's playwright")


@contextlib.contextmanager
def launched_chromium() -> Iterator[object]:
    """A headless chromium (Playwright's Browser), closed at the end."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        try:
            yield browser
        finally:
            browser.close()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def served(folder: Path) -> Iterator[str]:
    """Files of ``folder`` over HTTP on 127.0.0.1; gives the base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
