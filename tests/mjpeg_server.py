"""A real MJPEG-over-HTTP camera stand-in on 127.0.0.1, serving frames of a video file."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

import cv2

BOUNDARY = b"frameboundary"


class MjpegServer:
    """Serves ``video`` as multipart/x-mixed-replace JPEG frames at ``fps``, looping it.

    Args:
        stop_after: close each connection after this many frames (a camera that drops out).
        stall_after: after this many frames, keep each connection open and send nothing (a stalled camera).
        max_connections: answer later connections with 503 (a camera that is gone for good).
    """

    def __init__(self, video: Path, fps: float = 25.0, stop_after: int | None = None, max_frames: int = 200,
                 max_connections: int | None = None, stall_after: int | None = None):
        cap = cv2.VideoCapture(str(video))
        self.jpegs = []
        while len(self.jpegs) < max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            frame = cv2.resize(frame, (320, 180))
            self.jpegs.append(cv2.imencode(".jpg", frame)[1].tobytes())
        cap.release()
        self.fps = fps
        self.stop_after = stop_after
        self.max_connections = max_connections
        self.stall_after = stall_after
        self.connections = 0
        self._stop = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                server.connections += 1
                if server.max_connections is not None and server.connections > server.max_connections:
                    self.send_error(503, "camera gone")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=" + BOUNDARY.decode())
                self.end_headers()
                sent = 0
                try:
                    while not server._stop.is_set():
                        jpeg = server.jpegs[sent % len(server.jpegs)]
                        self.wfile.write(b"--" + BOUNDARY + b"\r\nContent-Type: image/jpeg\r\n")
                        self.wfile.write(f"Content-Length: {len(jpeg)}\r\n\r\n".encode() + jpeg + b"\r\n")
                        sent += 1
                        if server.stop_after is not None and sent >= server.stop_after:
                            return
                        if server.stall_after is not None and sent >= server.stall_after:
                            self.wfile.flush()
                            server._stop.wait()  # until the server stops: the connection stays open, silent
                            return
                        time.sleep(1.0 / server.fps)
                except (BrokenPipeError, ConnectionResetError):
                    return

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/stream.mjpg"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> MjpegServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
