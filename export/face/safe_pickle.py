"""Restricted unpicklers for the research-era pickles CapHuman needs (FLAME, DECA's landmark file).

Pickles are untrusted input. Every global a pickle may name is looked up in an explicit allow-list
that maps it to a harmless stand-in; anything else (``os.system``, ``builtins.eval``,
``subprocess.Popen``, any unknown class) raises ``UnsafePickleError`` before it is called.

* chumpy ``Ch`` objects (FLAME's ``generic_model.pkl``) become NumPy arrays of their value ``x``;
* SciPy ``csc_matrix`` / ``csr_matrix`` (FLAME's ``J_regressor``) become dense NumPy arrays;
* NumPy arrays, dtypes and scalars are rebuilt with NumPy's own reconstructors;
* torch tensors inside DECA's ``landmark_embedding.npy`` are rebuilt from storages that are
  themselves loaded with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import collections
import copyreg
import io
import pickle
from typing import Any

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global that is not on the allow-list."""


class ChumpyArray:
    """Stand-in for ``chumpy.ch.Ch``: keeps the pickled state; `to_numpy` returns its value."""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def to_numpy(self) -> np.ndarray:
        state = self.state if isinstance(self.state, dict) else {}
        if "x" not in state:
            raise UnsafePickleError("chumpy object without a value 'x' (only plain Ch arrays are supported)")
        return np.asarray(_resolve(state["x"]))


class SparseMatrix:
    """Stand-in for SciPy ``csc_matrix``/``csr_matrix``: `to_numpy` rebuilds the dense array."""

    layout = "csc"

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def to_numpy(self) -> np.ndarray:
        s = self.state
        try:
            data, indices, indptr = np.asarray(s["data"]), np.asarray(s["indices"]), np.asarray(s["indptr"])
            shape = tuple(int(v) for v in (s.get("_shape") or s.get("shape")))
        except (KeyError, TypeError) as e:
            raise UnsafePickleError(f"sparse matrix state is not in SciPy's layout: {e}") from None
        dense = np.zeros(shape, dtype=data.dtype)
        outer = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        if self.layout == "csc":
            np.add.at(dense, (indices, outer), data)
        else:
            np.add.at(dense, (outer, indices), data)
        return dense


class CsrMatrix(SparseMatrix):
    layout = "csr"


def _resolve(obj: Any) -> Any:
    """Replace stand-ins by NumPy arrays, recursively through dicts, lists and tuples."""
    if isinstance(obj, (ChumpyArray, SparseMatrix)):
        return obj.to_numpy()
    if isinstance(obj, dict):
        return {k: _resolve(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v) for v in obj)
    return obj


def _numpy_reconstruct():
    import importlib
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")  # NumPy >= 2
    except ImportError:
        multiarray = importlib.import_module("numpy.core.multiarray")
    return multiarray._reconstruct, multiarray.scalar


def _reconstructor(cls, base, state):
    """copyreg._reconstructor restricted to the allowed classes."""
    if cls not in _SAFE_CLASSES:
        raise UnsafePickleError(f"refusing to reconstruct {cls!r}")
    return copyreg._reconstructor(cls, base, state)


_SAFE_CLASSES = (ChumpyArray, SparseMatrix, CsrMatrix, np.ndarray, collections.OrderedDict, object)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as Python 3 protocol-2 pickles use it for bytes; only latin-1 is allowed."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _allowed_numpy() -> dict[tuple[str, str], Any]:
    reconstruct, scalar = _numpy_reconstruct()
    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_bytes}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(mod, "_reconstruct")] = reconstruct
        table[(mod, "scalar")] = scalar
    return table


_FLAME_GLOBALS: dict[tuple[str, str], Any] = {
    ("chumpy.ch", "Ch"): ChumpyArray,
    ("scipy.sparse.csc", "csc_matrix"): SparseMatrix,
    ("scipy.sparse._csc", "csc_matrix"): SparseMatrix,
    ("scipy.sparse.csr", "csr_matrix"): CsrMatrix,
    ("scipy.sparse._csr", "csr_matrix"): CsrMatrix,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("__builtin__", "object"): object,
    ("builtins", "object"): object,
    ("__builtin__", "set"): set,
    ("builtins", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("builtins", "frozenset"): frozenset,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


def _torch_globals() -> dict[tuple[str, str], Any]:
    import torch
    import torch._utils

    def load_storage(data: bytes):
        return torch.load(io.BytesIO(data), weights_only=True)

    return {("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
            ("torch.storage", "_load_from_bytes"): load_storage,
            ("collections", "OrderedDict"): collections.OrderedDict}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, allowed: dict[tuple[str, str], Any], what: str):
        super().__init__(file, encoding="latin1", fix_imports=True)
        self._allowed = allowed
        self._what = what

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._what}: refusing to load global '{module}.{name}' (not on the allow-list; "
                "the file may be corrupt or malicious)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._what}: persistent ids are not allowed")


def load_flame_pickle(data: bytes, what: str = "FLAME model") -> dict[str, Any]:
    """Unpickle a FLAME ``generic_model.pkl`` (chumpy era) into a dict of NumPy arrays/values."""
    table = dict(_allowed_numpy())
    table.update(_FLAME_GLOBALS)
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), table, what).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, IndexError) as e:  # not a pickle at all
        raise UnsafePickleError(f"{what} is not a readable FLAME pickle ({e})") from None
    if not isinstance(obj, dict):
        raise UnsafePickleError(f"{what}: expected a dict, got {type(obj).__name__}")
    return _resolve(obj)


def load_npy_object(data: bytes, what: str = "landmark embedding") -> Any:
    """Load a pickled-object ``.npy`` (DECA's ``landmark_embedding.npy``) without running code."""
    from numpy.lib import format as npy_format

    f = io.BytesIO(data)
    version = npy_format.read_magic(f)
    # public readers (numpy 1.x and 2.x); the private _read_array_header is gone in numpy 2.4
    read_header = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}.get(version)
    if read_header is None:
        raise UnsafePickleError(f"{what}: unsupported .npy format version {version}")
    shape, _, dtype = read_header(f)
    if dtype != np.dtype(object):
        f.seek(0)
        return np.load(f, allow_pickle=False)
    table = dict(_allowed_numpy())
    table.update(_torch_globals())
    obj = _RestrictedUnpickler(f, table, what).load()
    if isinstance(obj, np.ndarray) and obj.shape == () and obj.dtype == object:
        obj = obj[()]
    return obj
