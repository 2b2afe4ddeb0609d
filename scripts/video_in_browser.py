"""Play a video in a real browser and screenshot it: the README's proof that `run`'s .mp4 plays in one.

    python scripts/video_in_browser.py docs/overlay.mp4 docs/overlay-in-chromium.png --at 2.0

Debian's chromium, driven by Playwright (`pip install playwright`; its own browser download is not needed),
loads the file from a server on 127.0.0.1 in a <video> element with its controls, plays it (muted) to --at seconds,
pauses and screenshots the page; it prints what the browser says of the video (ready state, duration, size) and exits
non-zero when the browser cannot play it.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import shutil
import sys
import threading
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video", type=Path)
    parser.add_argument("screenshot", type=Path)
    parser.add_argument("--at", type=float, default=1.0, help="seconds into the video")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(Quiet, directory=str(args.video.resolve().parent)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/{args.video.name}"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 900, "height": 620})
            page.set_content(
                "<body style='margin:12px;font:14px sans-serif;display:inline-block'>"
                f"<div>chromium, &lt;video src=\"{args.video.name}\" controls&gt;</div>"
                f"<video id='v' src='{url}' controls muted preload='auto' style='max-width:870px'></video></body>")
            page.wait_for_function("(v => v.readyState >= 2 || v.error)(document.getElementById('v'))",
                                   timeout=30_000)
            # Played (muted) up to --at, then paused: a seek would refetch the file from this simple server.
            page.evaluate("(v => v.play())(document.getElementById('v'))")
            page.wait_for_function(f"document.getElementById('v').currentTime >= {args.at}", timeout=60_000)
            page.evaluate("(v => v.pause())(document.getElementById('v'))")
            page.wait_for_timeout(300)
            state = page.evaluate("(v => ({readyState: v.readyState, duration: v.duration, width: v.videoWidth, "
                                  "height: v.videoHeight, error: v.error && v.error.code}))"
                                  "(document.getElementById('v'))")
            page.locator("body").screenshot(path=str(args.screenshot))
            browser.close()
    finally:
        httpd.shutdown()
    print(json.dumps(state))
    return 0 if state["error"] is None and state["readyState"] >= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
