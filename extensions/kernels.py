"""Compiled loops for the toolkit's per-iteration work on small arrays, with NumPy fallbacks.

On a net whose iteration takes a millisecond, the gradient statistics, the pre-update copy and
the post-update check cost more in NumPy's call machinery than in arithmetic: five reductions
(``reduceat`` over a float64 gather) measured ~35 us inside a real iteration for 700 numbers.
One compiled loop does them all in a single call and a single read. The loops are compiled
by numba on first use (cached on disk); without numba, or with ``EXTENSIONS_KERNELS=numpy``,
the same results come from NumPy (``available()`` says which).
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np

_COMPILED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_compiled: dict[str, Any] | None = None
_tried = False


def _segment_stats(work, offsets, out, src, dst):  # pragma: no cover - compiled by numba (the NumPy twin is tested)
    for i in range(src.size):  # the pre-update copy, when asked for (else both are empty)
        dst[i] = src[i]
    total = 0.0
    for s in range(offsets.size - 1):
        acc = 0.0
        sq = 0.0
        hi = 0.0
        zeros = 0
        for i in range(offsets[s], offsets[s + 1]):
            v = np.float64(work[i])
            acc += v
            sq += v * v
            a = abs(v)
            if a > hi or a != a:  # once NaN, stays NaN (nothing compares greater)
                hi = a
            if v == 0.0:
                zeros += 1
        out[0, s] = acc
        out[1, s] = sq
        out[2, s] = hi
        out[3, s] = zeros
        total += sq
    return total


def _all_finite(values):  # pragma: no cover - compiled by numba
    for i in range(values.size):
        v = values[i]
        if v - v != 0.0:  # NaN or +-inf (inf - inf is NaN)
            return False
    return True


def _compile() -> dict[str, Any] | None:
    global _compiled, _tried
    if _tried:
        return _compiled
    _tried = True
    if os.environ.get("EXTENSIONS_KERNELS", "").lower() == "numpy":
        return None
    try:
        import numba
    except ImportError:
        return None
    jit = numba.njit(cache=True, nogil=True)
    try:
        with warnings.catch_warnings():  # a read-only install cannot cache: compile in memory, silently
            warnings.simplefilter("ignore", numba.NumbaWarning)
            _compiled = {"stats": jit(_segment_stats), "finite": jit(_all_finite)}
    except Exception:  # numba present but unusable here: NumPy does the work
        _compiled = None
    return _compiled


def available() -> bool:
    """Whether the compiled loops are in use (numba importable and not switched off)."""
    return _compile() is not None


def use(compiled: bool) -> None:
    """Switch the compiled loops on (when numba is there) or off; for tests and comparisons."""
    global _tried, _compiled
    _tried, _compiled = False, None
    if not compiled:
        _tried = True


def segment_stats(work: np.ndarray, offsets: np.ndarray, out: np.ndarray,
                  save: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """Per segment ``work[offsets[s]:offsets[s+1]]``: sum, sum of squares, max |x| (NaN if any) and zero count
    into ``out[0..3, s]`` (float64); returns the total sum of squares. ``save=(src, dst)`` also copies ``src``
    into ``dst`` in the same call."""
    kernels = _compile()
    if kernels is not None and work.dtype in _COMPILED_DTYPES and (save is None or save[0].dtype == work.dtype):
        src, dst = save if save is not None else (work[:0], work[:0])
        return kernels["stats"](work, offsets, out, src, dst)
    if save is not None:
        np.copyto(save[1], save[0])
    return _numpy_segment_stats(work, offsets, out)


def _numpy_segment_stats(work: np.ndarray, offsets: np.ndarray, out: np.ndarray) -> float:
    starts = offsets[:-1]
    x = work.astype(np.float64)
    np.add.reduceat(x, starts, out=out[0])
    sq = x * x
    np.add.reduceat(sq, starts, out=out[1])
    with np.errstate(invalid="ignore"):
        np.maximum.reduceat(np.abs(x), starts, out=out[2])
    np.add.reduceat((x == 0).astype(np.float64), starts, out=out[3])
    return float(out[1].sum())


def all_finite(values: np.ndarray) -> bool:
    """Whether every element of the flat array ``values`` is finite (no overflow, no warning)."""
    kernels = _compile()
    if kernels is not None and values.dtype in _COMPILED_DTYPES:
        return bool(kernels["finite"](values))
    return math.isfinite(np.maximum.reduce(np.abs(values), initial=0))
