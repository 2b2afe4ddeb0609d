"""A PyTorch state-dict file (torch.save's zip format) read into numpy arrays, without torch.

torch.save writes a zip holding ``<folder>/data.pkl`` (the pickled dict), ``<folder>/data/<key>`` (each
storage's raw bytes) and ``<folder>/byteorder``. The pickle is read by an Unpickler that knows only what a
plain state dict needs: ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and the typed
storages (through ``persistent_load``). Any other global (a pickle that would call code) is refused before
anything is called, as ``torch.load(weights_only=True)`` refuses it.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np

from realtime_cam.errors import ExportError

__all__ = ["read_state_dict"]

# torch's typed storage classes -> numpy dtypes (bfloat16 is widened to float32 by hand: numpy has none).
STORAGE_DTYPES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": "u2",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}


class _Refused(pickle.UnpicklingError):
    """The pickle names something a state dict does not need."""


class _StorageType:
    """What ``torch.FloatStorage`` (and the other storages) unpickle to here: a name and a dtype."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


class _StateDictUnpickler(pickle.Unpickler):
    """Builds numpy arrays where torch would build tensors; storages are read from the zip on demand."""

    def __init__(self, archive: zipfile.ZipFile, folder: str, byteorder: str) -> None:
        super().__init__(io.BytesIO(archive.read(f"{folder}/data.pkl")))
        self._archive = archive
        self._folder = folder
        self._order = "<" if byteorder == "little" else ">"
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: object) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise _Refused(f"a persistent id {str(pid)[:80]!r} that is not a tensor storage")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if key not in self._storages:
            self._storages[key] = self._read_storage(storage_type, key, numel)
        return self._storages[key]

    def _read_storage(self, storage_type: _StorageType, key: str, numel: int) -> np.ndarray:
        dtype = np.dtype(storage_type.dtype).newbyteorder(self._order)
        raw = self._archive.read(f"{self._folder}/data/{key}")
        if numel < 0 or len(raw) < numel * dtype.itemsize:
            raise ValueError(f"storage {key} holds {len(raw)} bytes, not the {numel} values its tensor needs")
        array = np.frombuffer(raw, dtype=dtype, count=numel).astype(dtype.newbyteorder("="))
        if storage_type.name == "BFloat16Storage":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array

    @staticmethod
    def _rebuild_tensor(storage: object, offset: object, size: object, stride: object, *rest: object) -> np.ndarray:
        """torch._utils._rebuild_tensor_v2: a view of ``storage``, checked to lie inside it, then copied."""
        if not isinstance(storage, np.ndarray):
            raise _Refused("a tensor whose storage is not a storage")
        if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
                and all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride))):
            raise ValueError(f"a tensor with offset {offset}, size {size} and stride {stride}")
        if 0 in size:
            return np.zeros(size, storage.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:  # as_strided does not check: without this, a file could read any memory
            raise ValueError(f"a tensor of size {size} reaches past its storage ({storage.size} values)")
        if math.prod(size) > max(storage.size, 1 << 28):  # stride-0 views of a huge size: memory, not weights
            raise ValueError(f"a tensor of size {size} from a storage of {storage.size} values")
        item = storage.itemsize
        view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=[s * item for s in stride])
        return np.array(view)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a torch.save'd state dict (or of its ``state_dict``/``model`` entry), as numpy arrays.

    Raises:
        ExportError: a missing or unreadable file, a pickle that asks for anything but a state dict's own
            types (it is never called), or a file that does not hold a mapping of names to tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"weights file not found: {path}")
    if not zipfile.is_zipfile(p):
        raise ExportError(f"cannot read {path} as PyTorch weights: it is not the zip file torch.save writes "
                          "(PyTorch 1.6 and later); load it in PyTorch and torch.save it again")
    try:
        with zipfile.ZipFile(p) as archive:
            pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise ValueError("no single <folder>/data.pkl in the zip")
            folder = pickles[0].split("/")[0]
            names = set(archive.namelist())
            byteorder = archive.read(f"{folder}/byteorder").decode().strip() if f"{folder}/byteorder" in names \
                else "little"
            obj = _StateDictUnpickler(archive, folder, byteorder).load()
    except _Refused as exc:
        raise ExportError(
            f"refused to load {path}: it is not a plain state dict of tensors (its pickle asks for {exc}, which "
            "could run code; like torch.load(weights_only=True), realtime-cam calls nothing else)"
        ) from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, KeyError, TypeError, AttributeError,
            IndexError, OSError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ExportError(f"cannot read {path} as PyTorch weights ({reason})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
        raise ExportError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)
