"""A ``load_npz`` that never unpickles: Chainer's signature, Chainer's files, and one-line errors.

``chainer.serializers.load_npz`` opens files with ``numpy.load(allow_pickle=True)``, so a model
file someone shared can run code when it is loaded. This one reads with pickling off; the only
Python object it accepts is the ``None`` Chainer writes for an empty value (read by an unpickler
that knows no other class). Every array must have the shape of the value it replaces and a dtype
that casts to it within its kind. Any problem is an :class:`NpzLoadError` naming the file and key.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
import zlib
from typing import Any

import numpy as np
from chainer.serializers import npz as chainer_npz

from . import chainer_compat as compat

# What numpy's pickle of ``numpy.asarray(None)`` names, and nothing else.
_NONE_ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
_READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, KeyError, pickle.UnpicklingError)


class NpzLoadError(ValueError):
    """A file that cannot be loaded safely: says which file, which key (if any) and why, in one line."""

    def __init__(self, file: str, key: str | None, reason: str):
        self.file, self.key, self.reason = file, key, reason
        where = f"{file}: key {key!r}" if key else file
        super().__init__(f"{where}: {' '.join(reason.split())}")


def _file_name(file: Any) -> str:
    if isinstance(file, (str, os.PathLike)):
        return os.fspath(file)
    return str(getattr(file, "name", type(file).__name__))


class _NoneOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NONE_ARRAY_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return super().find_class(module, name)


class SafeNpz:
    """An npz archive read with pickling off; member reads raise :class:`NpzLoadError` naming the key."""

    def __init__(self, file: Any):
        self.name = _file_name(file)
        try:
            self._npz = np.load(file, allow_pickle=False)
        except _READ_ERRORS as e:
            raise NpzLoadError(self.name, None, f"not a readable npz file ({type(e).__name__}: {e})") from None
        if not isinstance(self._npz, np.lib.npyio.NpzFile):
            raise NpzLoadError(self.name, None, "not an npz archive (a single .npy array)")
        self.files = list(self._npz.files)

    def __contains__(self, key: str) -> bool:
        return key in self._npz.files

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._npz.files:
            raise NpzLoadError(self.name, key, "missing from the file")
        try:
            return self._npz[key]
        except ValueError as e:
            if "allow_pickle" not in str(e):
                raise NpzLoadError(self.name, key, f"truncated or damaged ({e})") from None
        except _READ_ERRORS as e:
            raise NpzLoadError(self.name, key, f"truncated or damaged ({type(e).__name__}: {e})") from None
        return self._none_array(key)

    def _none_array(self, key: str) -> np.ndarray:
        """The member's object array if it is Chainer's ``None``; anything else is refused unread."""
        try:
            with self._npz.zip.open(key + ".npy") as f:
                raw = io.BytesIO(f.read())
            version = np.lib.format.read_magic(raw)
            shape, _, dtype = compat.read_npy_header(raw, version)
            if shape != () or not dtype.hasobject:
                raise pickle.UnpicklingError("not a single None")
            value = _NoneOnlyUnpickler(raw).load()
        except (pickle.UnpicklingError, *_READ_ERRORS, AttributeError, TypeError, IndexError):
            raise NpzLoadError(self.name, key, "holds a pickled Python object; refused, "
                                               "since loading it could run code") from None
        if not (isinstance(value, np.ndarray) and value.shape == () and value[()] is None):
            raise NpzLoadError(self.name, key, "holds a pickled Python object; refused, "
                                               "since loading it could run code")
        return value

    def close(self) -> None:
        """Close the archive."""
        self._npz.close()

    def __enter__(self) -> SafeNpz:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_array(name: str, key: str, dataset: np.ndarray, value: Any) -> None:
    """Same shape as the value it replaces, and a number dtype that casts to the value's within its kind."""
    if tuple(dataset.shape) != tuple(value.shape):
        raise NpzLoadError(name, key, f"shape {tuple(dataset.shape)}, expected {tuple(value.shape)}")
    target = np.dtype(value.dtype)
    if dataset.dtype.kind not in "biuf" or not np.can_cast(dataset.dtype, target, casting="same_kind"):
        raise NpzLoadError(name, key, f"dtype {dataset.dtype}, expected {target}")


class SafeNpzDeserializer(chainer_npz.NpzDeserializer):
    """Chainer's ``NpzDeserializer`` over a :class:`SafeNpz`, checking each array against its target."""

    def __getitem__(self, key: str) -> SafeNpzDeserializer:
        key = key.strip("/")
        return SafeNpzDeserializer(self.npz, self.path + key + "/", strict=self.strict,
                                   ignore_names=self.ignore_names)

    def _ignored(self, key: str) -> bool:
        names = self.ignore_names if isinstance(self.ignore_names, (tuple, list)) else (self.ignore_names,)
        for name in names:
            if isinstance(name, str):
                if key == name:
                    return True
            elif callable(name):
                if name(key):
                    return True
            else:
                raise ValueError("ignore_names needs to be a callable, string or list of them.")
        return False

    def __call__(self, key: str, value: Any) -> Any:
        full = self.path + key.lstrip("/")
        if (not self.strict and full not in self.npz) or self._ignored(full):
            return value
        dataset = self.npz[full]
        if dataset.dtype.hasobject:
            return None
        if value is None:
            return dataset
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            _check_array(self.npz.name, full, dataset, value)
        try:
            return chainer_npz.NpzDeserializer({full: dataset})(full, value)
        except (TypeError, ValueError) as e:
            raise NpzLoadError(self.npz.name, full, f"cannot be read into {type(value).__name__} ({e})") from None


def load_npz(file: Any, obj: Any, path: str = "", strict: bool = True, ignore_names: Any = None) -> None:
    """``chainer.serializers.load_npz`` with pickling off; a bad file raises :class:`NpzLoadError`."""
    with SafeNpz(file) as npz:
        SafeNpzDeserializer(npz, path=path, strict=strict, ignore_names=ignore_names).load(obj)
