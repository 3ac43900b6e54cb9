"""Reading the authors' pickled ``.npy`` feature dicts without ever running pickled code.

The authors saved each feature set as ``np.save(path, {key: array})``: numpy wraps the dict in a 0-d object
array and pickles it after the ``.npy`` header. ``np.load(allow_pickle=True)`` would unpickle it with the
full pickle machinery, which can call any importable function a crafted file names. Here the header is
parsed by hand and the payload goes through an unpickler whose ``find_class`` admits only the few numpy
callables that rebuild arrays and dtypes (as numpy 1.x, ``numpy.core``, and 2.x, ``numpy._core``, spell
them); any other global stops the load before it is called.
"""

from __future__ import annotations

import ast
import pickle
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from meta_vqa.errors import DataError

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]

NPY_MAGIC = b"\x93NUMPY"

# What rebuilding arrays, dtypes and numpy scalars needs, and nothing else. ``_frombuffer`` is how
# arrays pickle under protocol 5; dicts, lists, tuples, strings, bytes and numbers need no global.
_CALLABLES = {
    "_reconstruct": _multiarray._reconstruct,
    "scalar": _multiarray.scalar,
}
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    for _name, _obj in _CALLABLES.items():
        ALLOWED_GLOBALS[(_module, _name)] = _obj
if hasattr(_numeric, "_frombuffer"):
    for _module in ("numpy.core.numeric", "numpy._core.numeric"):
        ALLOWED_GLOBALS[(_module, "_frombuffer")] = _numeric._frombuffer


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`; ``source`` names the file in errors."""

    def __init__(self, file: BinaryIO, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.source}: refusing to unpickle global '{module}.{name}' (only numpy arrays, dicts, "
                "lists, strings and numbers are allowed in a feature file)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self.source}: refusing a pickle with persistent ids")


def read_npy_header(f: BinaryIO, source: str) -> dict:
    """Parse the ``.npy`` magic and header dict (versions 1-3), leaving ``f`` at the payload."""
    magic = f.read(8)
    if len(magic) < 8 or not magic.startswith(NPY_MAGIC):
        raise DataError(f"{source}: not a .npy file (bad magic bytes)")
    major = magic[6]
    if major == 1:
        (length,), encoding = struct.unpack("<H", f.read(2)), "latin1"
    elif major in (2, 3):
        (length,), encoding = struct.unpack("<I", f.read(4)), "latin1" if major == 2 else "utf8"
    else:
        raise DataError(f"{source}: unsupported .npy format version {major}.{magic[7]}")
    text = f.read(length).decode(encoding)
    try:
        header = ast.literal_eval(text)  # a dict literal; literal_eval evaluates no code
    except (ValueError, SyntaxError):
        raise DataError(f"{source}: malformed .npy header {text.strip()!r}") from None
    if not isinstance(header, dict) or not {"descr", "shape"} <= set(header):
        raise DataError(f"{source}: malformed .npy header {text.strip()!r}")
    return header


def load_pickled_npy(path: str | Path) -> Any:
    """The object pickled in a ``.npy`` file (a 0-d object array is unwrapped), read safely."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: feature file not found")
    with open(path, "rb") as f:
        header = read_npy_header(f, str(path))
        if header["descr"] not in ("|O", "O"):
            raise DataError(
                f"{path}: holds a plain {header['descr']} array of shape {header['shape']}, "
                "expected a pickled dict (np.save of a dict)"
            )
        try:
            obj = RestrictedUnpickler(f, str(path)).load()
        except DataError:
            raise
        except Exception as e:  # truncated or corrupt payloads raise many types
            raise DataError(f"{path}: cannot unpickle the payload ({type(e).__name__}: {e})") from None
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    return obj


def load_feature_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A ``{key: 2-d float array}`` dict from one of the authors' feature files, type-checked."""
    obj = load_pickled_npy(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict of feature arrays, got {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise DataError(f"{path}: key {key!r} is not a string")
        if not (isinstance(value, np.ndarray) and value.ndim == 2 and value.dtype.kind == "f"):
            shape = getattr(value, "shape", None)
            raise DataError(
                f"{path}: features of {key!r} must be a 2-d float array, got {type(value).__name__} {shape}"
            )
    return obj
