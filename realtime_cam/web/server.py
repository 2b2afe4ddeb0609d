"""The streams in a browser: a page, MJPEG per stream, a JSON endpoint, and per-stream controls.

Endpoints (all refused with 403 without the token when one is set: ``?token=``, an ``X-Token`` header, or the
cookie the page sets):
    GET  /                          the page
    GET  /api/streams               every stream's state and current prediction (JSON)
    GET  /api/labels                the model's class names and map methods (JSON)
    POST /api/streams/ID/view       change a stream's view: {"pin": label|id|null, "method", "box", "alpha",
                                    "paused"} (any subset); 400 with {"error"} for a bad value
    GET  /stream/ID.mjpg            the overlay, live (multipart/x-mixed-replace)
    GET  /stream/ID/snapshot.png    the overlay now, as a download
"""

from __future__ import annotations

import hmac
import http.server
import ipaddress
import json
import logging
import re
import secrets
import threading
import urllib.parse
from dataclasses import asdict
from importlib import resources

import cv2

from ..errors import CamError
from ..streams import MultiStream, Stream
from .broadcast import Broadcast, ClientStats

log = logging.getLogger("realtime_cam")

BOUNDARY = "realtime-cam-frame"
COOKIE = "realtime_cam_token"
CLIENT_WRITE_TIMEOUT_S = 10.0  # a client that takes no data for this long is dropped
_STREAM_PATH = re.compile(r"^/stream/(\d+)(\.mjpg|/snapshot\.png)$")
_VIEW_PATH = re.compile(r"^/api/streams/(\d+)/view$")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, token: str | None) -> tuple[str | None, bool]:
    """The token the server requires (None: none) and whether it was generated here: binding anything but
    loopback requires one, and one is made up when none is given."""
    if token:
        return token, False
    if is_loopback(host):
        return None, False
    return secrets.token_urlsafe(16), True


def view_dict(stream: Stream, labels) -> dict:
    v = stream.view
    return {"method": v.method, "pinned_class": v.pinned_class,
            "pinned_label": None if v.pinned_class is None else labels[v.pinned_class],
            "show_box": v.show_box, "alpha": v.alpha, "paused": v.paused, "topk": v.topk}


def view_changes(body: dict, model) -> dict:
    """The ViewState fields a POSTed view asks for; CamError (400) for a value the model cannot take."""
    changes: dict = {}
    if "pin" in body:
        pin = body["pin"]
        changes["pinned_class"] = None if pin in (None, "") else model.class_id_for(str(pin))
        changes["rank"] = 0
    if "method" in body:
        if body["method"] not in model.methods:
            raise CamError(f"method {body['method']!r}: this model offers {', '.join(model.methods)}")
        changes["method"] = body["method"]
    for key, field in (("box", "show_box"), ("paused", "paused")):
        if key in body:
            if not isinstance(body[key], bool):
                raise CamError(f"{key} must be true or false")
            changes[field] = body[key]
    if "alpha" in body:
        alpha = body["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise CamError("alpha must be a number from 0 to 1")
        changes["alpha"] = float(alpha)
    unknown = set(body) - {"pin", "method", "box", "paused", "alpha"}
    if unknown:
        raise CamError(f"unknown view field(s): {', '.join(sorted(unknown))}")
    return changes


class StreamServer:
    """Serves a :class:`~realtime_cam.streams.MultiStream` over HTTP, from a thread per client. A context
    manager: leaving it stops accepting, ends every client's response and closes the socket."""

    def __init__(self, multi: MultiStream, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> None:
        self.multi = multi
        self.token = token or None
        self.broadcasts = [Broadcast(s.id) for s in multi.streams]
        for stream, broadcast in zip(multi.streams, self.broadcasts):
            stream.on_overlay.append(broadcast.publish)
        self.clients: list[ClientStats] = []
        self._clients_lock = threading.Lock()
        self.stopping = threading.Event()
        self._page = resources.files("realtime_cam.web").joinpath("static/index.html").read_bytes()
        try:
            self.httpd = http.server.ThreadingHTTPServer((host, port), _handler_class(self))
        except OSError as exc:
            raise CamError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.httpd.daemon_threads = True
        self.host = host
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="serve", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def __enter__(self) -> StreamServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.stopping.set()
        for broadcast in self.broadcasts:
            broadcast.end()
        self.httpd.shutdown()
        self.httpd.server_close()

    def register(self, stats: ClientStats) -> ClientStats:
        """Track a client (the finished ones beyond the last 100 are forgotten)."""
        with self._clients_lock:
            done = [c for c in self.clients if c.done]
            forget = {id(c) for c in done[:-100]}
            self.clients = [c for c in self.clients if id(c) not in forget] + [stats]
        return stats

    def authorised(self, handler: http.server.BaseHTTPRequestHandler, query: dict) -> bool:
        if self.token is None:
            return True
        given = [query.get("token", [""])[0], handler.headers.get("X-Token", "")]
        cookies = handler.headers.get("Cookie", "")
        given += [part.split("=", 1)[1] for part in cookies.split(";") if part.strip().startswith(COOKIE + "=")]
        return any(hmac.compare_digest(g.strip().encode(), self.token.encode()) for g in given if g)

    def streams_doc(self) -> dict:
        labels = self.multi.model.labels
        streams = []
        for stream in self.multi.streams:
            info = asdict(stream.info())
            info["view"] = view_dict(stream, labels)
            info["clients"] = sum(1 for c in self.clients if c.stream == stream.id and not c.done)
            streams.append(info)
        recent = list(self.multi.batch_sizes)[-100:]
        return {"streams": streams, "recent_batch_sizes": recent}


def _handler_class(server: StreamServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = CLIENT_WRITE_TIMEOUT_S  # the socket's: a write to a client that reads nothing ends
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            log.debug("http: " + format, *args)

        # -- helpers
        def _send(self, code: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, code: int, doc: object) -> None:
            self._send(code, json.dumps(doc).encode(), "application/json")

        def _route(self) -> tuple[str, dict] | None:
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            if not server.authorised(self, query):
                self._json(403, {"error": "a valid token is required"})
                return None
            return url.path, query

        def _stream(self, index: str) -> Stream | None:
            i = int(index)
            if i >= len(server.multi.streams):
                self._json(404, {"error": f"no stream {i}"})
                return None
            return server.multi.streams[i]

        # -- methods
        def do_GET(self) -> None:
            try:
                self._get()
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                self.close_connection = True

        def _get(self) -> None:
            routed = self._route()
            if routed is None:
                return
            path, query = routed
            if path in ("/", "/index.html"):
                extra = {}
                if server.token is not None:  # the page's images and requests carry it from now on
                    extra["Set-Cookie"] = f"{COOKIE}={server.token}; Path=/; HttpOnly; SameSite=Strict"
                self._send(200, server._page, "text/html; charset=utf-8", extra)
            elif path == "/api/streams":
                self._json(200, server.streams_doc())
            elif path == "/api/labels":
                self._json(200, {"labels": list(server.multi.model.labels), "methods": list(server.multi.model.methods)})
            elif (m := _STREAM_PATH.match(path)) is not None:
                stream = self._stream(m.group(1))
                if stream is None:
                    return
                if m.group(2) == ".mjpg":
                    self._mjpeg(stream)
                else:
                    self._snapshot(stream)
            else:
                self._json(404, {"error": f"no such page: {path}"})

        def do_POST(self) -> None:
            routed = self._route()
            if routed is None:
                return
            path, _ = routed
            m = _VIEW_PATH.match(path)
            if m is None:
                self._json(404, {"error": f"no such endpoint: {path}"})
                return
            stream = self._stream(m.group(1))
            if stream is None:
                return
            try:
                length = min(int(self.headers.get("Content-Length") or 0), 65536)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise CamError("the body must be a JSON object")
                stream.set_view(**view_changes(body, server.multi.model))
            except (ValueError, CamError) as exc:
                self._json(400, {"error": str(exc)})
                return
            self._json(200, {"view": view_dict(stream, server.multi.model.labels)})

        def _snapshot(self, stream: Stream) -> None:
            _, image = server.broadcasts[stream.id].latest()
            if image is None:
                self._json(404, {"error": "no frame yet"})
                return
            ok, png = cv2.imencode(".png", image)
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", stream.name)
            self._send(200, png.tobytes(), "image/png",
                       {"Content-Disposition": f'attachment; filename="{name}-{stream.rate.done:06d}.png"'})

        def _mjpeg(self, stream: Stream) -> None:
            """Send the newest frame whenever there is one: a slow client misses frames, never queues them."""
            broadcast = server.broadcasts[stream.id]
            stats = server.register(ClientStats(stream.id))
            self.close_connection = True
            try:
                self.send_response(200)
                self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Connection", "close")
                self.end_headers()
                seen = 0
                while not server.stopping.is_set():
                    seq, jpeg = broadcast.wait_newer(seen, 0.5)
                    if jpeg is None:
                        if broadcast.ended or (stream.slot.ended and broadcast.latest()[0] <= seen):
                            break
                        continue
                    if seen:
                        stats.skipped += seq - seen - 1
                    seen = seq
                    stats.pending_bytes = len(jpeg)
                    self.wfile.write(f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}"
                                     "\r\n\r\n".encode() + jpeg + b"\r\n")
                    stats.pending_bytes = 0
                    stats.sent += 1
                self.wfile.write(f"--{BOUNDARY}--\r\n".encode())
            except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
                pass  # the client went away or stopped reading: this handler ends, the stream goes on
            finally:
                stats.pending_bytes = 0
                stats.done = True

    return Handler
