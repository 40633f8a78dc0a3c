"""Compiled loops for the toolkit's per-iteration work, with NumPy fallbacks.

On a net whose iteration takes a millisecond, the gradient statistics, the pre-update copy and
the post-update check cost more in NumPy's call machinery than in arithmetic: five reductions
(``reduceat`` over a float64 gather) measured ~35 us inside a real iteration for 700 numbers.
One compiled loop does them all in a single call and a single read (``tuple_table`` reads each
gradient where it is). On big arrays, one vectorised pass replaces NumPy's five chunked
reductions (``big_sums``) and the finiteness check. The loops are compiled by numba on first
use (cached on disk); without numba, or with ``EXTENSIONS_KERNELS=numpy``, the same results
come from NumPy (``available()`` says which).
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

_COMPILED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_BITS = {np.dtype(np.float32): (np.int32, 0x7FFFFFFF), np.dtype(np.float64): (np.int64, 0x7FFFFFFFFFFFFFFF)}
_compiled: dict[str, Any] | None = None
_tried = False


def _segment_stats(values, row, s):  # pragma: no cover - compiled by numba (the NumPy twin is tested)
    # one segment's statistics into row[1 + 7s:], in the order of ``stats.STATS``; returns its sum of squares
    acc = 0.0
    sq = 0.0
    hi = 0.0
    zeros = 0
    nans = 0
    infs = 0
    inf = np.inf
    for x in values.flat:
        v = np.float64(x)
        acc += v
        sq += v * v
        a = abs(v)
        if a > hi or a != a:  # once NaN, stays NaN (nothing compares greater)
            hi = a
        if v == 0.0:
            zeros += 1
        elif a != a:
            nans += 1
        elif a == inf:
            infs += 1
    n = values.size
    mean = acc / n
    var = sq / n - mean * mean
    at = 1 + 7 * s
    row[at] = np.sqrt(sq) if sq >= 0 else sq
    row[at + 1] = mean
    row[at + 2] = np.sqrt(var) if var > 0 else (0.0 if var == var else var)
    row[at + 3] = hi
    row[at + 4] = zeros / n
    row[at + 5] = nans
    row[at + 6] = infs
    return sq


def _segment_table(work, offsets, row):  # pragma: no cover - compiled by numba (the NumPy twin is tested)
    total = 0.0
    for s in range(offsets.size - 1):
        total += _segment_stats(work[offsets[s]:offsets[s + 1]], row, s)
    row[0] = np.sqrt(total) if total >= 0 else np.nan
    return total


_unroll = None  # numba.literal_unroll, set by ``_compile`` (only compiled code calls it)


def _tuple_table(arrays, row):  # pragma: no cover - compiled by numba (the NumPy twin is tested)
    # ``_segment_table`` with each segment an array of the tuple ``arrays``, read where it is (no gather)
    total = 0.0
    s = 0
    for values in _unroll(arrays):
        total += _segment_stats(values, row, s)
        s += 1
    row[0] = np.sqrt(total) if total >= 0 else np.nan
    return total


def _all_finite(values):  # pragma: no cover - compiled by numba
    # v * 0 is 0 for a finite v and NaN for NaN or +-inf, and a NaN anywhere makes the sum NaN in any order: with
    # reassociation allowed (and nothing else of fastmath: NaN and inf keep their meaning) the loop vectorises
    acc = 0.0
    for i in range(values.size):
        acc += values[i] * 0.0
    return acc == 0.0


def _big_sums(values, bits, mask):  # pragma: no cover - compiled by numba (the NumPy path is tested)
    # one pass over a big array: sum and sum of squares in float64 (reassociated, so vectorised), the zero
    # count, and max |x| as the largest sign-cleared bit pattern (``bits`` is ``values`` viewed as integers:
    # for non-negative floats the patterns sort as the values do, and NaN's sort above inf, so a NaN shows)
    acc = 0.0
    sq = 0.0
    zeros = 0
    hi = 0
    for i in range(values.size):
        v = np.float64(values[i])
        acc += v
        sq += v * v
        b = bits[i] & mask
        hi = max(hi, b)
        zeros += b == 0
    return acc, sq, hi, zeros


def _histogram_table(values, offsets, edges, counts, stats, zero, scale, ratio):  # pragma: no cover - numba
    # ``edges`` are sorted; near-geometric around ``edges[zero] == 0``: +-scale * ratio**k (as tensorboardX's)
    nb = edges.size - 1
    first, last = edges[0], edges[nb]
    inv_log_ratio = 1.0 / np.log(ratio)
    inf = np.inf
    for s in range(offsets.size - 1):
        lo = inf
        hi = -inf
        acc = 0.0
        sq = 0.0
        finite = 0
        nans = 0
        infs = 0
        outside = 0
        for i in range(offsets[s], offsets[s + 1]):
            v = np.float64(values[i])
            if v != v:
                nans += 1
                continue
            if v == inf or v == -inf:
                infs += 1
                continue
            finite += 1
            lo = min(lo, v)
            hi = max(hi, v)
            acc += v
            sq += v * v
            if v < first or v > last:
                outside += 1
                continue
            # the last edge <= v, as np.histogram places it (the last bucket is closed): a guess from the
            # edges' geometric spacing, then corrected against the edges themselves
            if v > 0.0 and v >= scale:
                k = zero + 1 + int(np.log(v / scale) * inv_log_ratio)
            elif v < 0.0 and -v >= scale:
                k = zero - 1 - int(np.log(-v / scale) * inv_log_ratio) - 1
            else:
                k = zero if v >= 0.0 else zero - 1
            k = min(max(k, 0), nb - 1)
            while k > 0 and edges[k] > v:
                k -= 1
            while k < nb - 1 and edges[k + 1] <= v:
                k += 1
            counts[s, k] += 1
        stats[s, 0] = lo
        stats[s, 1] = hi
        stats[s, 2] = acc
        stats[s, 3] = sq
        stats[s, 4] = finite
        stats[s, 5] = nans
        stats[s, 6] = infs
        stats[s, 7] = outside


def _compile() -> dict[str, Any] | None:
    global _compiled, _tried, _unroll
    if _tried:
        return _compiled
    _tried = True
    if os.environ.get("EXTENSIONS_KERNELS", "").lower() == "numpy":
        return None
    try:
        import numba
    except ImportError:
        return None
    # error_model "numpy": an empty segment gives NaN statistics rather than a ZeroDivisionError
    jit = numba.njit(cache=True, nogil=True, error_model="numpy")
    try:
        with warnings.catch_warnings():  # a read-only install cannot cache: compile in memory, silently
            warnings.simplefilter("ignore", numba.NumbaWarning)
            numba.extending.register_jitable(_segment_stats)
            _unroll = numba.literal_unroll
            finite = numba.njit(cache=True, nogil=True, fastmath={"reassoc"})(_all_finite)
            big = numba.njit(cache=True, nogil=True, fastmath={"reassoc"})(_big_sums)
            compiled = {"table": jit(_segment_table), "tuple": jit(_tuple_table), "finite": finite, "big": big,
                        "histogram": jit(_histogram_table)}
            _warm_up(compiled)
    except Exception as e:  # numba present but unusable here: NumPy does the work
        warnings.warn(f"extensions.kernels: numba could not compile the toolkit's loops ({type(e).__name__}: {e}); "
                      "using NumPy", RuntimeWarning, stacklevel=2)
        compiled = None
    _compiled = compiled
    return _compiled


def _warm_up(compiled: dict[str, Any]) -> None:
    """Compile (or load from the cache) every signature the toolkit calls, so a failure shows here, not mid-run."""
    bounds = np.array([0, 2], dtype=np.int64)
    for dtype in _COMPILED_DTYPES:
        work = np.zeros(2, dtype)
        compiled["table"](work, bounds, np.empty(8))
        compiled["tuple"]((work,), np.empty(8))  # each tuple of shapes compiles on first use
        compiled["finite"](work)
        compiled["big"](work, work.view(_BITS[dtype][0]), _BITS[dtype][1])
    edges = np.array([-1.0, 0.0, 1.0])
    compiled["histogram"](np.zeros(2), bounds, edges, np.zeros((1, 2), np.int64), np.empty((1, 8)), 1, 1.0, 2.0)


def available() -> bool:
    """Whether the compiled loops are in use (numba importable and not switched off)."""
    return _compile() is not None


def use(compiled: bool) -> None:
    """Switch the compiled loops on (when numba is there) or off; for tests and comparisons."""
    global _tried, _compiled
    _tried, _compiled = False, None
    if not compiled:
        _tried = True


def tuple_table_for(dtype: Any) -> Callable[..., float]:
    """``f(arrays, row) -> total``: the statistics of ``segment_table`` with each array of the tuple
    ``arrays`` (of ``dtype``, any shapes and layouts) a segment, read in place. Compiled once per tuple of
    array types (about a second, then cached on disk)."""
    kernels = _compile()
    if kernels is not None and np.dtype(dtype) in _COMPILED_DTYPES:
        return kernels["tuple"]
    return numpy_tuple_table


def numpy_tuple_table(arrays: tuple[np.ndarray, ...], row: np.ndarray) -> float:
    """``tuple_table``'s NumPy twin (any dtype)."""
    offsets = np.concatenate(([0], np.cumsum([a.size for a in arrays]))).astype(np.int64)
    return _numpy_segment_table(np.concatenate(arrays, axis=None), offsets, row)


def segment_table(work: np.ndarray, offsets: np.ndarray, row: np.ndarray) -> float:
    """The gradient statistics of each segment ``work[offsets[s]:offsets[s+1]]`` in one pass: into ``row[1 + 7s:]``
    its L2 norm, mean, std, max |x| (NaN if any), fraction of zeros, NaN count and Inf count (the order of
    ``stats.STATS``), and into ``row[0]`` the L2 norm of all; returns the total sum of squares, accumulated in
    float64."""
    kernels = _compile()
    table = kernels["table"] if kernels is not None and work.dtype in _COMPILED_DTYPES else _numpy_segment_table
    return table(work, offsets, row)


def _numpy_segment_table(work: np.ndarray, offsets: np.ndarray, row: np.ndarray) -> float:
    starts, n = offsets[:-1], np.diff(offsets).astype(np.float64)
    x = work.astype(np.float64)
    sq = np.add.reduceat(x * x, starts)
    mean = np.add.reduceat(x, starts) / n
    table = row[1:].reshape(-1, 7)
    with np.errstate(invalid="ignore"):
        var = sq / n - mean * mean
        table[:, 0] = np.where(sq >= 0, np.sqrt(np.abs(sq)), sq)
        table[:, 1] = mean
        table[:, 2] = np.where(var > 0, np.sqrt(np.abs(var)), np.where(var == var, 0.0, var))
        table[:, 3] = np.maximum.reduceat(np.abs(x), starts)
        table[:, 4] = np.add.reduceat((x == 0).astype(np.float64), starts) / n
        table[:, 5] = np.add.reduceat(np.isnan(x).astype(np.float64), starts)
        table[:, 6] = np.add.reduceat(np.isinf(x).astype(np.float64), starts)
        total = float(sq.sum())
    row[0] = math.sqrt(total) if total >= 0 else math.nan
    return total


def all_finite_for(dtype: Any) -> Callable[[np.ndarray], bool]:
    """``all_finite`` for flat arrays of ``dtype``, bound once."""
    kernels = _compile()
    if kernels is not None and np.dtype(dtype) in _COMPILED_DTYPES:
        return kernels["finite"]
    return _numpy_all_finite


def _numpy_all_finite(values: np.ndarray) -> bool:
    return math.isfinite(np.maximum.reduce(np.abs(values), initial=0))


def all_finite(values: np.ndarray) -> bool:
    """Whether every element of the flat array ``values`` is finite (no overflow, no warning)."""
    return bool(all_finite_for(values.dtype)(values))


def big_sums(values: np.ndarray) -> tuple[float, float, float, int] | None:
    """(sum, sum of squares, max |x|, zero count) of a flat contiguous float array in one compiled pass (sums in
    float64); None without the compiled loops or for another dtype (callers use NumPy's reductions)."""
    kernels = _compile()
    bits = _BITS.get(values.dtype)
    if kernels is None or bits is None or not values.flags.c_contiguous:
        return None
    acc, sq, hi, zeros = kernels["big"](values, values.view(bits[0]), bits[1])
    return acc, sq, float(np.array(hi, bits[0]).view(values.dtype)), int(zeros)


def histogram_table(values: np.ndarray, offsets: np.ndarray, edges: np.ndarray, zero: int, scale: float,
                    ratio: float) -> tuple[np.ndarray, np.ndarray] | None:
    """For each segment ``values[offsets[s]:offsets[s+1]]``: its counts in the buckets of the sorted ``edges``
    (as ``np.histogram`` places finite values; the last bucket is closed) and (min, max, sum, sum of squares,
    finite count, NaN count, Inf count, finite values outside the edges) of its finite values, all in one
    compiled pass. ``edges[zero]`` is 0 and the others about +-``scale * ratio**k`` (any sorted edges give the
    right counts; these make the search short). None without the compiled loops (callers use ``np.histogram``)."""
    kernels = _compile()
    if kernels is None or values.dtype not in _COMPILED_DTYPES:
        return None
    counts = np.zeros((offsets.size - 1, edges.size - 1), dtype=np.int64)
    stats = np.empty((offsets.size - 1, 8))
    kernels["histogram"](values, offsets, edges, counts, stats, zero, scale, ratio)
    return counts, stats
