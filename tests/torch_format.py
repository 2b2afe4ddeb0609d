"""torch.save's file format written without torch, so that the runtime-only tests have weights files to read.

The pickle is written opcode by opcode, as torch.save writes a state dict (protocol 2: an OrderedDict of
``torch._utils._rebuild_tensor_v2`` calls on typed storages given by persistent ids); tests/test_resnet_numpy.py
checks that torch.load reads it back when torch is installed.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile
from pathlib import Path

import numpy as np

STORAGES = {np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage",
            np.dtype("float16"): "HalfStorage", np.dtype("int64"): "LongStorage"}


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL


def _text(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)  # BININT


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def state_dict_pickle(state: dict[str, np.ndarray], strides: dict[str, tuple[int, ...]] | None = None) -> bytes:
    """The data.pkl torch.save writes for ``state``; ``strides`` overrides a tensor's (to make a bad file)."""
    out = [b"\x80\x02", _global("collections", "OrderedDict"), b")R", b"("]
    for i, (name, array) in enumerate(state.items()):
        storage = _tuple(_text("storage"), _global("torch", STORAGES[array.dtype]), _text(str(i)), _text("cpu"),
                         _int(array.size))
        stride = (strides or {}).get(name) or tuple(s // array.itemsize for s in array.copy(order="C").strides)
        out += [_text(name), _global("torch._utils", "_rebuild_tensor_v2"),
                _tuple(storage + b"Q", _int(0), _tuple(*map(_int, array.shape)), _tuple(*map(_int, stride)), b"\x89",
                       _global("collections", "OrderedDict") + b")R"),
                b"R"]
    return b"".join(out) + b"u."  # SETITEMS, STOP


def torch_zip(pickled: bytes, storages: list[np.ndarray]) -> bytes:
    """A torch.save zip around ``pickled`` whose storage i holds ``storages[i]``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "little")
        for i, array in enumerate(storages):
            archive.writestr(f"archive/data/{i}", np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"))
                             .tobytes())
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()


def torch_save(state: dict[str, np.ndarray]) -> bytes:
    """The bytes of ``torch.save(state_dict)`` for these arrays."""
    return torch_zip(state_dict_pickle(state), list(state.values()))


def write_checkpoint(folder: Path, arch: str, data: bytes) -> Path:
    """``data`` saved in ``folder`` under torch.hub's name for it: ``<arch>-<sha256 prefix>.pth``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{arch}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    path.write_bytes(data)
    return path
