"""torchvision's weights files without torch: torch.hub's cache folder, the hash in a file's name, the download.

A weights file is named ``<name>-<first hex digits of its sha256>.<ext>`` (torch.hub's rule). Unlike torch.hub,
which checks only what it downloads, :func:`fetch` also checks a file it finds in the cache, so that a wrong
file under the right name (a renamed fine-tune, a truncated copy) is never exported as torchvision's weights.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TextIO
from urllib.parse import urlparse

from realtime_cam.errors import ExportError
from realtime_cam.partial import PartialFile

__all__ = ["checkpoints_dir", "fetch", "is_weights_file", "sha256_of", "weights_url"]

HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's HASH_REGEX, with at least one digit
# Tests only: the URL to fetch instead of torchvision's (a local server; the file name carries the hash).
URL_ENV = "REALTIME_CAM_WEIGHTS_URL"
TIMEOUT_S = 30.0


def checkpoints_dir() -> Path:
    """torch.hub's: ``$TORCH_HOME/hub/checkpoints``; TORCH_HOME defaults to ``$XDG_CACHE_HOME/torch``, and that
    to ``~/.cache/torch``."""
    home = os.getenv("TORCH_HOME") or os.path.join(os.getenv("XDG_CACHE_HOME") or "~/.cache", "torch")
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


def weights_url(url: str) -> str:
    """``url``, or the URL in ``$REALTIME_CAM_WEIGHTS_URL`` (set by tests)."""
    return os.environ.get(URL_ENV) or url


def is_weights_file(weights: str) -> bool:
    """Whether ``--weights`` names a file rather than a torchvision weights name (or "none")."""
    return os.path.sep in weights or weights.endswith((".pth", ".pt", ".bin")) or os.path.exists(weights)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def expected_hash(name: str) -> str:
    """The sha256 prefix a weights file's name carries."""
    match = HASH_IN_NAME.search(name)
    if match is None:
        raise ExportError(f"{name} carries no hash in its name (NAME-<sha256 prefix>.pth); realtime-cam checks "
                          "every weights file it downloads or finds in the cache against it")
    return match.group(1)


def fetch(url: str, what: str, log: Callable[[str], None] = print, stream: TextIO | None = None) -> Path:
    """The checked weights file for ``url`` in the cache: found there (and hash-checked), or downloaded.

    Args:
        what: names the weights in messages ("resnet18 weights ResNet18_Weights.IMAGENET1K_V1").

    Raises:
        ExportError: a file whose content does not match its name (cached or downloaded; nothing is kept),
            or a download that failed (the message says where to put the file offline).
    """
    path = checkpoints_dir() / os.path.basename(urlparse(url).path)
    expected = expected_hash(path.name)
    if path.is_file():
        try:
            found = sha256_of(path)
        except OSError as exc:
            raise ExportError(f"cannot read the cached weights file {path}: {exc.strerror or exc}") from None
        if not found.startswith(expected):
            raise ExportError(
                f"the cached weights file {path} is damaged or not the file its name says: its sha256 begins "
                f"{found[:len(expected)]}, its name says {expected}; delete it and the next run downloads it again "
                f"(or put a complete copy of {url} there)"
            )
        return path
    log(f"downloading {url} into {path.parent}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot make the weights folder {path.parent}: {exc.strerror or exc}") from None
    partial = PartialFile(path)
    try:
        try:
            found = _download(url, partial.tmp, stream if stream is not None else sys.stderr)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = (str(getattr(exc, "reason", None) or exc).splitlines() or [""])[0][:200] or type(exc).__name__
            raise ExportError(
                f"could not get {what} ({reason}); offline, download {url} and put it at {path} (TORCH_HOME sets "
                "the folder), or export from a local file: realtime-cam export --weights PATH --output FILE"
            ) from None
        if not found.startswith(expected):
            raise ExportError(f"downloaded {url}, but its sha256 begins {found[:len(expected)]} where its name says "
                              f"{expected}: not kept; try again, or download it yourself and put it at {path}")
        partial.commit()
    finally:
        partial.discard()
    return path


def _download(url: str, dest: Path, stream: TextIO) -> str:
    """Write ``url`` to ``dest`` with a progress line; returns the sha256 of what was written."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        progress = _Progress(os.path.basename(urlparse(url).path), total, stream)
        done = 0
        while chunk := response.read(1 << 20):
            out.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            progress.update(done)
        progress.close(done)
    if total is not None and done != total:
        raise OSError(f"the download ended after {done} of {total} bytes")
    return digest.hexdigest()


class _Progress:
    """``resnet18-f37072fd.pth 12.0/44.7 MB (26%)``: redrawn in place on a terminal, a line per 25% otherwise."""

    def __init__(self, name: str, total: int | None, stream: TextIO) -> None:
        self.name, self.total, self.stream = name, total, stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last_draw = 0.0
        self._quarter = 0

    def _text(self, done: int) -> str:
        if self.total:
            return f"{self.name} {done / 1e6:.1f}/{self.total / 1e6:.1f} MB ({min(100, 100 * done // self.total)}%)"
        return f"{self.name} {done / 1e6:.1f} MB"

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self.tty and now - self._last_draw >= 0.1:
            self.stream.write("\r" + self._text(done) + "\x1b[K")
            self.stream.flush()
            self._last_draw = now
        elif not self.tty and self.total and 4 * done // self.total > self._quarter and done < self.total:
            self._quarter = 4 * done // self.total
            self.stream.write(self._text(done) + "\n")

    def close(self, done: int) -> None:
        self.stream.write(("\r" + self._text(done) + "\x1b[K\n") if self.tty else self._text(done) + "\n")
        self.stream.flush()
