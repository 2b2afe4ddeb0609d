"""Output files that take their name only when complete.

Each output is written under a hidden temporary name of its own, beside it: unique to this run and created
exclusively (two runs writing the same output never share one, and an existing file is never reused), with
the output's extension last (OpenCV picks the container by it). :meth:`PartialFile.commit` gives it the
output's name; whatever goes wrong, a file that this run did not create is never deleted.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import SinkError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask can only be read by setting it


class PartialFile:
    """The temporary file an output is written to (``tmp``) until :meth:`commit` renames it onto ``path``.

    As a context manager it gives ``tmp`` and, when the block ends without an error, commits it.

    Creating it is the first write into the output's folder, so an unwritable folder fails here.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        folder = self.path.parent if str(self.path.parent) else Path(".")
        try:
            fd, name = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".partial{self.path.suffix}",
                                        dir=folder)
        except OSError as exc:
            raise SinkError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        try:
            # mkstemp makes the file private (0600), and the rename keeps that: give it the mode open() would.
            os.fchmod(fd, 0o666 & ~_UMASK)
            self._identity = _identity(os.fstat(fd))
        finally:
            os.close(fd)
        self.tmp = Path(name)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        """Complete: give it its name; in any case, remove the temporary file if it is still there."""
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.discard()

    def ours(self) -> bool:
        """True while ``tmp`` is still the file this object created (not removed, not replaced)."""
        try:
            return _identity(os.stat(self.tmp)) == self._identity
        except OSError:
            return False

    def commit(self) -> Path:
        """Give the complete file its name; a one-line error when it vanished or cannot be renamed."""
        if not self.ours():
            raise self.gone()
        try:
            os.replace(self.tmp, self.path)
        except OSError as exc:
            raise SinkError(f"cannot give {self.path} its name ({exc.strerror or exc}); the complete file is "
                            f"{self.tmp}") from None
        return self.path

    def gone(self) -> SinkError:
        """The error for a temporary file that is no longer this object's."""
        return SinkError(f"writing {self.path} failed: its temporary file {self.tmp} was removed or replaced "
                         "during the run (was the folder deleted, or another program writing there?)")

    def discard(self) -> None:
        """Remove the temporary file, if it is still the one this object created."""
        if self.ours():
            try:
                self.tmp.unlink()
            except OSError:
                pass


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino
