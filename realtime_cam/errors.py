"""Errors a user can act on. The CLI prints their message on one line and exits non-zero.

Anything else that escapes is a bug in realtime-cam and keeps its traceback.
"""


class CamError(Exception):
    """A problem with the user's input, environment or options, with a message that says what to do."""


class ModelError(CamError):
    """The model file is missing, unreadable, or not a realtime-cam contract file."""


class ExportError(CamError):
    """Exporting or rewriting a model failed (weights missing, unsupported head, failed check)."""


class SourceError(CamError):
    """A frame source cannot be opened or stopped delivering frames."""


class SinkError(CamError):
    """An output (window, video file) cannot be opened or written."""


class DeviceError(CamError):
    """The requested execution device cannot run."""
