"""The real OpenCV window under a real X server (Xvfb): shown, screenshotted, quit with a key."""

import os
import shutil
import subprocess
import sys
import time

import cv2
import pytest
from conftest import needs_shared, shared
from synthetic import write_photo

TOOLS = [shutil.which(t) for t in ("Xvfb", "import", "xdotool")]
if os.environ.get("REALTIME_CAM_REQUIRE_X") == "1" and not all(TOOLS):
    raise pytest.UsageError("REALTIME_CAM_REQUIRE_X=1 but Xvfb, import (imagemagick) or xdotool is missing")
needs_x = pytest.mark.skipif(not all(TOOLS), reason="needs Debian's xvfb, imagemagick and xdotool")


@pytest.fixture
def display(tmp_path):
    number = 90 + os.getpid() % 500
    proc = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "DISPLAY": f":{number}", "QT_QPA_PLATFORM": "xcb"}
    deadline = time.monotonic() + 10
    while subprocess.run(["xdotool", "getdisplaygeometry"], env=env, capture_output=True).returncode != 0:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("Xvfb did not start")
        time.sleep(0.1)
    yield env
    proc.terminate()
    proc.wait(timeout=10)


def wait_for_window(env, name, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", name], env=env,
                             capture_output=True, text=True)
        if res.returncode == 0 and res.stdout.strip():
            return res.stdout.split()[0]
        time.sleep(0.2)
    pytest.fail(f"no window named {name!r} appeared")


def screenshot(env, path):
    subprocess.run(["import", "-window", "root", str(path)], env=env, check=True, timeout=30)
    return cv2.imread(str(path))


@needs_x
def test_window_shows_the_heatmap_and_q_quits(display, tiny_onnx, tmp_path):
    source = write_photo(tmp_path / "photo.png", (451, 300))
    proc = subprocess.Popen([sys.executable, "-m", "realtime_cam", "run", "--model", str(tiny_onnx),
                             "--source", str(source)], env=display, stderr=subprocess.PIPE, text=True)
    try:
        window = wait_for_window(display, "realtime-cam")
        time.sleep(1.0)  # let the first frame paint
        shot = screenshot(display, tmp_path / "shot.png")
        # The photo is brown/grey; JET blended over it makes strongly saturated blue and red regions.
        hsv = cv2.cvtColor(shot, cv2.COLOR_BGR2HSV)
        saturated = (hsv[..., 1] > 150) & (hsv[..., 2] > 80)
        assert saturated.sum() > 0.3 * 451 * 300, "no heatmap visible in the window"
        blue = saturated & (hsv[..., 0] > 100) & (hsv[..., 0] < 130)
        assert blue.sum() > 1000
        subprocess.run(["xdotool", "windowactivate", "--sync", window], env=display, capture_output=True)
        subprocess.run(["xdotool", "key", "--window", window, "q"], env=display, check=True)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "QFontDatabase" not in err  # Qt's warning about the fonts opencv-python does not ship


def close_like_the_x_button(env, name):
    """Send WM_DELETE_WINDOW, what a window manager sends when the user clicks the window's X button."""
    code = f"""
from Xlib import X, display, protocol
d = display.Display()
protocols, delete = d.intern_atom("WM_PROTOCOLS"), d.intern_atom("WM_DELETE_WINDOW")
def walk(w):
    yield w
    for c in w.query_tree().children:
        yield from walk(c)
sent = 0
for w in walk(d.screen().root):
    try:
        title = w.get_wm_name()
    except Exception:
        continue
    if title and {name!r} in str(title):
        w.send_event(protocol.event.ClientMessage(window=w, client_type=protocols,
                     data=(32, [delete, X.CurrentTime, 0, 0, 0])), event_mask=X.NoEventMask)
        sent += 1
d.flush()
assert sent, "no window to close"
"""
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=30)


@needs_x
@needs_shared
def test_closing_the_window_ends_a_video_run_like_q(display, mnv2_int8_onnx, tmp_path):
    pytest.importorskip("Xlib")
    out = tmp_path / "o.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "realtime_cam", "run", "--model", str(mnv2_int8_onnx),
                             "--source", str(shared("videos", "bottle-detection.mp4")), "--output", str(out)],
                            env=display, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_window(display, "realtime-cam")
        time.sleep(2.0)
        close_like_the_x_button(display, "realtime-cam")
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    cap = cv2.VideoCapture(str(out))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    assert 0 < n < 1189          # stopped early (the video plays at 30 FPS in a window), file finalised
