"""The real OpenCV window under a real X server (Xvfb): shown, screenshotted, quit with a key."""

import json
import os
import shutil
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from conftest import needs_shared, shared
from synthetic import write_photo

from realtime_cam.bench import synthetic_video

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


def press(env, window, *keys):
    """Send keys to the window (xdotool's names: space, s, q)."""
    subprocess.run(["xdotool", "windowactivate", "--sync", window], env=env, capture_output=True)
    subprocess.run(["xdotool", "key", "--window", window, *keys], env=env, check=True)


def wait_for_snapshots(folder, count, timeout_s=20.0):
    """Wait until the window has written ``count`` snapshots (keys are served once per frame: on a busy
    machine one pressed too soon after another can be read before the first is acted on)."""
    deadline = time.monotonic() + timeout_s
    while len(list(folder.glob("snapshot-*.json"))) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def snapshot_frames(folder):
    """The frame index of each snapshot the window's `s` wrote, in the order taken."""
    return [json.loads(p.read_text())["frame"] for p in sorted(folder.glob("snapshot-*.json"))]


@needs_x
def test_the_window_shows_the_frame_at_its_own_size_without_a_toolbar(display, tiny_onnx, tmp_path):
    """Qt's toolbar and status bar took room from the image, which was shrunk and blurred to fit."""
    source = write_photo(tmp_path / "photo.png", (451, 300))
    snaps = tmp_path / "snaps"
    proc = subprocess.Popen([sys.executable, "-m", "realtime_cam", "run", "--model", str(tiny_onnx),
                             "--source", str(source), "--snapshot-dir", str(snaps)],
                            env=display, stderr=subprocess.PIPE, text=True)
    try:
        window = wait_for_window(display, "realtime-cam")
        time.sleep(1.0)  # let the first frame paint
        press(display, window, "s")
        deadline = time.monotonic() + 10
        while not list(snaps.glob("*.png")) and time.monotonic() < deadline:
            time.sleep(0.1)
        shot_path = tmp_path / "window.png"
        subprocess.run(["import", "-window", window, str(shot_path)], env=display, check=True, timeout=30)
        press(display, window, "q")
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    shot, overlay = cv2.imread(str(shot_path)), cv2.imread(str(next(snaps.glob("*.png"))))
    assert shot.shape == overlay.shape == (300, 451, 3)
    # Pixel for pixel what was drawn: no toolbar above it, no scaling.
    difference = float(np.abs(shot.astype(int) - overlay.astype(int)).mean())
    assert difference < 2.0, f"the window shows the overlay changed (mean |difference| {difference:.1f})"


@needs_x
def test_after_a_pause_a_video_resumes_at_its_own_rate(display, tiny_onnx, tmp_path):
    """It used to play as fast as it could until it had caught up with the time spent paused."""
    video = synthetic_video(tmp_path / "clip.mp4", frames=900, size_wh=(160, 120))  # 30 FPS, 30 s
    snaps = tmp_path / "snaps"
    proc = subprocess.Popen([sys.executable, "-m", "realtime_cam", "run", "--model", str(tiny_onnx),
                             "--source", str(video), "--snapshot-dir", str(snaps)],
                            env=display, stderr=subprocess.PIPE, text=True)
    try:
        window = wait_for_window(display, "realtime-cam")
        started = time.monotonic()
        time.sleep(0.5)
        press(display, window, "space")                  # pause ...
        paused = time.monotonic()
        time.sleep(3.0)
        press(display, window, "s")                      # the held frame (keys work while paused)
        wait_for_snapshots(snaps, 1)
        first = time.monotonic()                         # before the key: the bound below only grows
        press(display, window, "space")                  # ... resume
        time.sleep(1.5)
        press(display, window, "s")
        wait_for_snapshots(snaps, 2)
        second = time.monotonic()                        # after the file: likewise
        press(display, window, "q")
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    frames = snapshot_frames(snaps)
    assert len(frames) == 2, err
    assert frames[0] <= 30 * (paused - started) + 30           # the pause held the video
    # 30 FPS from the resume on (allowing for the keys' delivery); caught up, it would be ~90 frames more.
    assert frames[1] - frames[0] <= 30 * (second - first) + 20, frames
