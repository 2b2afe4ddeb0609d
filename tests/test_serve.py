"""`realtime-cam serve`: the page in a real browser (Debian's chromium driven by Playwright), the JSON endpoint,
the controls, the token, and a server that survives its clients (slow, disconnecting, many, a dying stream).

REALTIME_CAM_REQUIRE_BROWSER=1 (CI) turns a missing browser into a failure instead of a skip. Set
REALTIME_CAM_SCREENSHOT=docs/serve.png to write the README's screenshot of the page.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from browser import needs_browser
from conftest import shared
from live_helpers import wait_until
from mjpeg_server import MjpegServer

from realtime_cam.model import CamModel
from realtime_cam.streams import MultiStream, open_live
from realtime_cam.web.server import StreamServer, resolve_token

TOKEN = "s3cret-test-token"


def get(url, headers=None):
    """(status, body) of a GET."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post(url, doc):
    req = urllib.request.Request(url, json.dumps(doc).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def served(mnv2_int8_onnx):
    """Three streams of the real MobileNetV2 behind one server (and a second server with a token): two video
    files played live and looped, and an MJPEG camera on 127.0.0.1 that dies after 40 frames."""
    model = CamModel(mnv2_int8_onnx, device="cpu")
    with MjpegServer(shared("videos", "vtest.avi"), fps=20, stop_after=40) as camera:
        sources = [open_live(str(shared("videos", "bottle-detection.mp4")), loop=True),
                   open_live(str(shared("videos", "car-detection.mp4")), loop=True),
                   open_live(camera.url, reconnect=0)]
        with MultiStream(model, sources) as multi, StreamServer(multi) as server, \
                StreamServer(multi, token=TOKEN) as guarded:
            wait_until(lambda: all(b.seq > 0 for b in server.broadcasts), what="a first overlay on every stream")
            yield server, guarded


def streams(server):
    return json.loads(get(server.url + "api/streams")[1])["streams"]


@needs_browser
def test_the_page_shows_every_stream_live_and_pinning_changes_the_label(served, chromium, tmp_path):
    server, _ = served
    page = chromium.new_page(viewport={"width": 1500, "height": 300})
    try:
        page.goto(server.url)
        frame = page.locator("#frame-0")
        page.wait_for_function("document.getElementById('frame-0') && "
                               "document.getElementById('frame-0').naturalWidth > 0")
        assert page.locator("section.stream").count() == 3
        first = frame.screenshot()
        wait_until(lambda: frame.screenshot() != first, what="the overlay image to change")
        # Pin a class by its label: the label shown (and the JSON) follow.
        page.fill("#pin-0", "tabby")
        page.click("#pin-button-0")
        page.wait_for_function("document.getElementById('label-0').textContent.startsWith('tabby')")
        assert "[pinned]" in page.inner_text("#label-0")
        assert streams(server)[0]["prediction"]["label"] == "tabby" and streams(server)[0]["prediction"]["pinned"]
        assert not streams(server)[1]["prediction"]["pinned"]  # the other streams keep their own view
        # A label the model does not have is said on the page, and changes nothing.
        page.fill("#pin-0", "no such class")
        page.click("#pin-button-0")
        page.wait_for_function("document.getElementById('error-0').textContent.includes('no class named')")
        # Method and box act on the stream too.
        page.select_option("#method-1", "gradcam")
        page.check("#box-1")  # while the method's change may still be on its way (see the test after this one)
        page.wait_for_function("document.getElementById('label-1').textContent.includes('gradcam')")
        wait_until(lambda: streams(server)[1]["view"]["show_box"], what="the box ticked on the page to reach the stream")
        view = streams(server)[1]["view"]
        assert view["method"] == "gradcam" and view["show_box"]
        # The camera that died shows as ended.
        page.wait_for_function("document.getElementById('status-2').textContent.startsWith('ended')")
        assert "stopped delivering frames" in page.inner_text("#reason-2")
        shot = Path(os.environ.get("REALTIME_CAM_SCREENSHOT") or tmp_path / "serve.png")
        page.screenshot(path=str(shot), full_page=True)
    finally:
        page.close()
        post(server.url + "api/streams/0/view", {"pin": None})
        post(server.url + "api/streams/1/view", {"method": "cam", "box": False})


@needs_browser
def test_a_control_keeps_what_the_user_set_while_the_change_is_on_its_way(served, chromium):
    """The page polls the server's state every half second and shows it in the controls; a poll answered
    before a change reached the server must not undo, under the user's hand, what the user just set."""
    server, _ = served
    page = chromium.new_page()
    held = []
    try:
        page.goto(server.url)
        page.wait_for_selector("#box-1")
        page.wait_for_function("document.getElementById('label-1').textContent.includes('%')")
        page.route("**/api/streams/1/view", lambda route: held.append(route))  # the change held on its way
        page.click("#box-1")
        page.wait_for_timeout(1500)  # three polls answer meanwhile, each with the box still off on the server
        assert len(held) == 1 and not streams(server)[1]["view"]["show_box"]
        assert page.is_checked("#box-1")
        held[0].continue_()
        wait_until(lambda: streams(server)[1]["view"]["show_box"], what="the change to reach the stream")
        page.wait_for_timeout(700)
        assert page.is_checked("#box-1")
        page.unroute("**/api/streams/1/view")
        # Two changes, the first one's answer (the box still off then) held back and shown last: it does not
        # untick the box either.
        post(server.url + "api/streams/1/view", {"box": False})
        page.wait_for_function("!document.getElementById('box-1').checked")
        answers = []

        def hold_the_methods_answer(route):
            if "method" in (route.request.post_data or ""):
                answers.append((route, route.fetch()))  # the server has it; the page gets its answer later
            else:
                route.continue_()

        page.route("**/api/streams/1/view", hold_the_methods_answer)
        page.select_option("#method-1", "gradcam")
        for _ in range(200):  # Playwright calls the route's handler only while the page is waited on
            if answers:
                break
            page.wait_for_timeout(50)
        assert not answers[0][1].json()["view"]["show_box"]
        page.click("#box-1")
        wait_until(lambda: streams(server)[1]["view"]["show_box"], what="the box's change to reach the stream")
        page.wait_for_timeout(200)  # its answer shown
        assert page.is_checked("#box-1")
        route, answer = answers[0]
        route.fulfill(response=answer)
        seen = page.evaluate("""async () => {  // the box, every 20 ms for 0.4 s after that answer
            const seen = [];
            for (let i = 0; i < 20; i++) {
                seen.push(document.getElementById('box-1').checked);
                await new Promise((done) => setTimeout(done, 20));
            }
            return seen;
        }""")
        assert all(seen), seen
        page.unroute("**/api/streams/1/view")
        # A change made elsewhere (another page, a program) still shows on this page.
        post(server.url + "api/streams/1/view", {"box": False})
        page.wait_for_function("!document.getElementById('box-1').checked")
    finally:
        page.close()
        post(server.url + "api/streams/1/view", {"box": False, "method": "cam"})


@needs_browser
def test_pause_holds_the_stream_and_snapshot_downloads_it(served, chromium):
    server, _ = served
    page = chromium.new_page()
    try:
        page.goto(server.url)
        page.wait_for_selector("#pause-1")
        page.click("#pause-1")
        page.wait_for_function("document.getElementById('pause-1').textContent === 'Resume'")
        time.sleep(0.3)  # a frame already taken for inference still lands
        held = streams(server)[1]["frames"]
        other = streams(server)[0]["frames"]
        wait_until(lambda: streams(server)[0]["frames"] >= other + 10, what="the other stream to go on")
        assert streams(server)[1]["frames"] == held
        with page.expect_download() as download:
            page.click("#snapshot-1")
        path = download.value.path()
        assert download.value.suggested_filename.startswith("car-detection") and Path(path).read_bytes()[:4] == b"\x89PNG"
        page.click("#pause-1")
        wait_until(lambda: streams(server)[1]["frames"] > held, what="the stream to resume")
    finally:
        page.close()
        post(server.url + "api/streams/1/view", {"paused": False})


@needs_browser
def test_the_token_is_required_when_set(served, chromium):
    _, guarded = served
    base = guarded.url.split("?")[0]
    for path in ("", "api/streams", "api/labels", "stream/0.mjpg", "stream/0/snapshot.png"):
        assert get(base + path)[0] == 403, path
        assert get(base + path + "?token=wrong")[0] == 403, path
    assert get(base + "api/streams?token=" + TOKEN)[0] == 200
    assert get(base + "api/streams", {"X-Token": TOKEN})[0] == 200
    assert post(base + "api/streams/0/view", {"box": True})[0] == 403
    page = chromium.new_page()
    try:
        assert page.goto(base).status == 403
        assert page.goto(guarded.url).status == 200  # the URL the server prints carries the token
        page.wait_for_function("document.getElementById('frame-0') && "
                               "document.getElementById('frame-0').naturalWidth > 0")
        page.wait_for_function("document.getElementById('label-0').textContent.includes('%')")
    finally:
        page.close()


def test_a_token_is_made_up_for_any_address_but_loopback():
    assert resolve_token("127.0.0.1", None) == (None, False)
    assert resolve_token("localhost", None) == (None, False)
    assert resolve_token("127.0.0.1", "abc") == ("abc", False)
    token, generated = resolve_token("0.0.0.0", None)
    assert generated and len(token) >= 16
    assert resolve_token("192.168.1.20", "mine") == ("mine", False)


def test_the_json_endpoint_and_bad_view_changes(served):
    server, _ = served
    doc = json.loads(get(server.url + "api/streams")[1])
    first = doc["streams"][0]
    assert first["name"] == "bottle-detection.mp4" and first["live"] and first["frames"] > 0
    assert {"class_id", "label", "probability", "topk", "method"} <= set(first["prediction"])
    assert doc["recent_batch_sizes"]
    for bad in ({"alpha": 2}, {"method": "nope"}, {"box": "yes"}, {"zoom": 1}, {"pin": "no such class"}):
        code, body = post(server.url + "api/streams/0/view", bad)
        assert code == 400 and body["error"], bad
    assert post(server.url + "api/streams/9/view", {"box": True})[0] == 404
    assert get(server.url + "stream/9.mjpg")[0] == 404
    labels = json.loads(get(server.url + "api/labels")[1])
    assert len(labels["labels"]) == 1000 and "cam" in labels["methods"]


def read_parts(sock, n):
    """Read from an MJPEG response until ``n`` JPEGs have arrived."""
    data = b""
    while data.count(b"\xff\xd8") < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def open_mjpeg(server, stream, rcvbuf=None):
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(f"GET /stream/{stream}.mjpg HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def clients_of(server, stream):
    return [c for c in server.clients if c.stream == stream and not c.done]


def test_a_slow_client_gets_frames_dropped_and_slows_nobody(served):
    server, _ = served
    slow = open_mjpeg(server, 0, rcvbuf=4096)  # reads nothing from here on
    fast = open_mjpeg(server, 0)
    other = open_mjpeg(server, 1)
    try:
        wait_until(lambda: len(clients_of(server, 0)) >= 2, what="both clients")
        slow_stats = clients_of(server, 0)[0]
        # Once the socket's buffers are full the slow client's handler is blocked: frames are dropped for it.
        wait_until(lambda: slow_stats.skipped > 5, what="frames dropped for the slow client")
        sent, skipped = slow_stats.sent, slow_stats.skipped
        # The fast client and the other stream's client keep getting frames meanwhile.
        assert read_parts(fast, 30).count(b"\xff\xd8") >= 30
        assert read_parts(other, 10).count(b"\xff\xd8") >= 10
        assert slow_stats.sent <= sent + 1 and slow_stats.skipped <= skipped + 1  # nothing queued up for it
        # What the server holds for it: at most the one frame it is writing.
        assert 0 <= slow_stats.pending_bytes <= server.broadcasts[0].max_jpeg_bytes
    finally:
        for sock in (slow, fast, other):
            sock.close()


def test_many_clients_share_one_encode_and_a_disconnecting_client_ends_its_handler(served):
    server, _ = served
    broadcast = server.broadcasts[0]
    socks = [open_mjpeg(server, 0) for _ in range(4)]
    try:
        wait_until(lambda: len(clients_of(server, 0)) >= 4, what="four clients")
        encodes, seq = broadcast.encodes, broadcast.seq
        for sock in socks:
            read_parts(sock, 8)
        # Four clients, each sent 8 frames or more: every frame was encoded once for all of them.
        assert broadcast.encodes - encodes <= broadcast.seq - seq + 1
        stats = clients_of(server, 0)
        assert sum(c.sent for c in stats) > 2 * (broadcast.encodes - encodes)
    finally:
        for sock in socks[1:]:
            sock.close()
    wait_until(lambda: len(clients_of(server, 0)) == 1, what="the closed clients' handlers to end")
    socks[0].close()
    wait_until(lambda: not clients_of(server, 0), what="the last handler to end")
    frames = streams(server)[0]["frames"]
    wait_until(lambda: streams(server)[0]["frames"] > frames + 5, what="the stream to go on")


def test_a_dying_stream_ends_its_mjpeg_response(served):
    server, _ = served
    wait_until(lambda: streams(server)[2]["ended"], what="the camera's stream to end")
    sock = open_mjpeg(server, 2)
    try:
        data = b""
        while (chunk := sock.recv(65536)):
            data += chunk
        assert data.rstrip().endswith(b"--realtime-cam-frame--")  # the response ends; the client is told
    finally:
        sock.close()
    assert streams(server)[0]["ended"] is False


def test_serve_command_prints_the_url_and_stops_on_sigterm_in_one_line(tiny_onnx):
    video = shared("videos", "car-detection.mp4")
    proc = subprocess.Popen([sys.executable, "-m", "realtime_cam", "serve", "--model", str(tiny_onnx), "--source",
                             str(video), "--source", str(video), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
        wait_until(lambda: json.loads(get(url + "api/streams")[1])["streams"][1]["frames"] > 3, what="frames")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    lines = err.strip().splitlines()
    assert lines[-1] == "realtime-cam: terminated" and "Traceback" not in err
    assert any("serving 2 streams" in line for line in lines)


def test_serve_refuses_a_bad_source_in_one_line(tiny_onnx, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "realtime_cam", "serve", "--model", str(tiny_onnx), "--source",
                           str(tmp_path / "missing.mp4"), "--port", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"realtime-cam: error: source not found: {tmp_path / 'missing.mp4'}"]
