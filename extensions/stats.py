"""Per-parameter gradient statistics in a few vectorised passes, and the cheap finiteness checks.

On NumPy, small gradients are gathered into one buffer and each statistic is one segmented
reduction (``ufunc.reduceat``) over all of them at once; each large gradient is reduced in
place with five read-only passes (sum, squared norm by chunked BLAS dots, max, min, zero
count): no concatenation copy and no float64 temporaries, so a 4M-parameter net costs a few
milliseconds. On other backends (CuPy) the per-parameter statistics are stacked on the device
and copied to the host in one transfer. Squared norms that overflow float32 are recomputed in
float64, so a large but finite gradient is not mistaken for an infinity; NaN/Inf counts are
computed only when the total is not finite.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import warnings
from collections.abc import Sequence
from typing import Any

import chainer
import numpy as np

from . import kernels

STATS = ("norm", "mean", "std", "max_abs", "zero_frac", "nan", "inf")


_KEYS: dict[tuple[Any, ...], tuple[str, ...]] = {}


def _report_keys(prefix: str, names: tuple[str, ...], missing: tuple[str, ...] = (),
                 with_stats: bool = True) -> tuple[str, ...]:
    """``grad/global_norm``, then ``grad/<path>/<stat>`` per name if ``with_stats``, then ``grad/<path>/missing``."""
    key = (prefix, names, missing, with_stats)
    keys = _KEYS.get(key)
    if keys is None:
        if len(_KEYS) > 64:
            _KEYS.clear()
        stats = [f"{prefix}/{n}/{s}" for n in names for s in STATS] if with_stats else []
        keys = _KEYS[key] = (f"{prefix}/global_norm", *stats, *[f"{prefix}/{p}/missing" for p in missing])
    return keys


@dataclasses.dataclass
class GradSummary:
    """What one pass over the gradients found: total squared norm, per-parameter stats, gaps.

    ``row``, when statistics were computed, is a float64 array: the global norm, then one row of
    ``STATS`` per name in ``names``, flattened. ``values`` is the same without the global norm as
    Python floats (what the reporter gets), converted when first read; ``table`` is one row per name.
    """

    sqnorm: float
    names: tuple[str, ...] = ()
    row: np.ndarray | None = dataclasses.field(default=None, repr=False)
    missing: list[str] = dataclasses.field(default_factory=list)
    nonfinite: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    _values: list[float] | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def has_stats(self) -> bool:
        """Whether per-parameter statistics were computed (not only the global norm)."""
        return self.row is not None

    @property
    def values(self) -> list[float] | None:
        """One row of ``STATS`` per name, flattened, or None when statistics were not computed."""
        if self._values is None and self.row is not None:
            self._values = self.row[1:].tolist()
        return self._values

    @property
    def table(self) -> np.ndarray | None:
        """The statistics as an array (one row per name, one column per entry of ``STATS``), or None."""
        if self.row is None:
            return None
        return self.row[1:].reshape(len(self.names), len(STATS)).copy()

    @property
    def global_norm(self) -> float:
        """L2 norm of all gradients together."""
        return math.sqrt(self.sqnorm) if self.sqnorm >= 0 else float("nan")

    @property
    def finite(self) -> bool:
        """True when every gradient element is finite."""
        return math.isfinite(self.sqnorm)

    @property
    def stats(self) -> dict[str, dict[str, float]] | None:
        """{path: {stat: value}}, or None when statistics were not computed this iteration."""
        if self.values is None:
            return None
        k = len(STATS)
        return {n: dict(zip(STATS, self.values[i * k:(i + 1) * k])) for i, n in enumerate(self.names)}

    def as_report(self, prefix: str = "grad") -> dict[str, float]:
        """Reporter keys ``grad/<path>/<stat>``, ``grad/<path>/missing`` and ``grad/global_norm``."""
        return dict(zip(*self.report_items(prefix)))

    def report_items(self, prefix: str = "grad") -> tuple[tuple[str, ...], list[float]]:
        """``as_report()`` as (keys, values); the keys are one cached tuple per set of names."""
        keys, row = self.report_array(prefix)
        return keys, row.tolist()

    def report_array(self, prefix: str = "grad") -> tuple[tuple[str, ...], np.ndarray]:
        """``report_items()`` with the values as one float64 array (no copy when no gradient is missing)."""
        keys = _report_keys(prefix, self.names, tuple(self.missing), self.row is not None)
        row = self.row if self.row is not None else np.array([self.global_norm])
        if self.missing:
            row = np.concatenate([row, np.ones(len(self.missing))])
        return keys, row


def _split(names: Sequence[str], arrays: Sequence[Any]) -> tuple[list[str], list[Any], list[str]]:
    present_names, present, missing = [], [], []
    for name, a in zip(names, arrays):
        if a is None:
            missing.append(name)
        elif a.size:
            present_names.append(name)
            present.append(a)
    return present_names, present, missing


# Arrays at least this large are reduced one by one, in place (no concatenation copy, no float64
# temporaries); smaller ones are gathered into one float64 buffer and reduced together with
# ``reduceat``: a handful of NumPy calls whatever their number.
BIG = 1 << 14
# Big arrays are read in chunks of this many elements (512 KB of float32, in L2 cache), each
# chunk reduced by every statistic while it is cached: one pass over memory instead of five.
# Per-chunk float32 results are summed in float64: a single float32 dot over millions of
# elements loses about 5 digits, chunks keep ~8.
_CHUNK = 1 << 17


class _Layout:
    """Where each array of a given list of sizes goes: reduced alone (big) or in the gathered buffer (small)."""

    def __init__(self, sizes: tuple[int, ...]):
        self.sizes = list(sizes)
        self.big = [i for i, n in enumerate(sizes) if n >= BIG]
        self.small = [i for i, n in enumerate(sizes) if n < BIG]
        self.small_sizes = [sizes[i] for i in self.small]
        # where each small array starts in the gathered buffer, and where the last one ends
        self.bounds = np.concatenate(([0], np.cumsum(self.small_sizes, dtype=np.int64))).astype(np.int64)
        self.gathered: dict[Any, np.ndarray] = {}  # dtype -> buffer the small arrays are gathered into

    def gather(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """The small ``arrays`` copied one after another into a reused buffer of their dtype (float64 if mixed)."""
        dtypes = set(map(_dtype, arrays))
        dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float64)
        buf = self.gathered.get(dtype)
        if buf is None:
            buf = self.gathered[dtype] = np.empty(int(self.bounds[-1]), dtype)
        return np.concatenate(arrays, axis=None, out=buf)


_LAYOUTS: dict[tuple[int, ...], _Layout] = {}
_dtype = operator.attrgetter("dtype")


def _layout(arrays: Sequence[Any], sizes: tuple[int, ...] | None = None) -> _Layout:
    """The layout of ``arrays`` (whose sizes are ``sizes`` if given), cached by their sizes."""
    key = tuple([a.size for a in arrays]) if sizes is None else sizes
    layout = _LAYOUTS.get(key)
    if layout is None:
        if len(_LAYOUTS) > 64:
            _LAYOUTS.clear()
        layout = _LAYOUTS[key] = _Layout(key)
    return layout


def _sqnorm(a: np.ndarray) -> float:
    """Sum of squares of a flat array: BLAS dots over chunks summed in float64; float64 if float32 overflows."""
    n = a.size
    if n <= _CHUNK:
        sq = float(np.dot(a, a))
    else:
        sq = 0.0
        for i in range(0, n, _CHUNK):
            c = a[i:i + _CHUNK]
            sq += float(np.dot(c, c))
    if not math.isfinite(sq) and a.dtype != np.float64:  # overflow of float32, or a real NaN/Inf: settle it
        a = a.astype(np.float64)
        sq = float(np.dot(a, a))
    return sq


def _big_stats(a: np.ndarray) -> tuple[float, float, float, float]:
    """(sum, sum of squares, max |g|, zero count) of one big flat array: one compiled pass, or chunk by chunk
    in NumPy (also when a NaN/Inf is there: NumPy settles it as below)."""
    fast = kernels.big_sums(a)
    if fast is not None and math.isfinite(fast[1]):
        return fast[0], fast[1], fast[2], float(fast[3])
    total = sq = zeros = 0.0
    hi, lo = -math.inf, math.inf
    is_zero = np.empty(min(a.size, _CHUNK), dtype=bool)
    for i in range(0, a.size, _CHUNK):
        c = a[i:i + _CHUNK]
        total += float(c.sum())
        sq += float(np.dot(c, c))
        hi = max(hi, float(c.max()))
        lo = min(lo, float(c.min()))
        flags = is_zero[:c.size]
        np.equal(c, 0, out=flags)  # count_nonzero of a float array is ten times slower than of bools
        zeros += np.count_nonzero(flags)
    if not math.isfinite(sq):  # float32 overflow, or a real NaN/Inf: settle both sums in float64
        sq, total = _sqnorm(a), float(a.sum(dtype=np.float64))
        hi, lo = float(a.max()), float(a.min())  # Python's max() does not propagate NaN
    return total, sq, hi if hi != hi else max(hi, -lo), zeros


def _small_table(layout: _Layout, arrays: Sequence[Any]) -> tuple[np.ndarray, float]:
    """(row, total sum of squares) of the small arrays: ``kernels.segment_table``'s row (their global norm, then
    ``STATS`` per array) from one gather and one call (a compiled loop, or NumPy's ``reduceat``), whatever their
    number."""
    row = np.empty(1 + len(STATS) * len(arrays))
    total = kernels.segment_table(layout.gather(arrays), layout.bounds, row)
    return row, total


def _numpy_summary(names, arrays, missing, with_stats: bool, sizes: tuple[int, ...] | None = None) -> GradSummary:
    if not arrays:
        return GradSummary(0.0, (), np.zeros(1) if with_stats else None, missing)
    layout = _layout(arrays, sizes)
    if not layout.big:  # all gathered: the kernel's row is the summary's
        row, total = _small_table(layout, arrays)
        nonfinite = {} if math.isfinite(total) else nonfinite_counts(names, arrays)
        return GradSummary(total, tuple(names), row if with_stats else None, missing, nonfinite)
    total, k = 0.0, len(STATS)
    small_rows = None
    if layout.small:
        small_row, total = _small_table(layout, [arrays[i] for i in layout.small])
        small_rows = small_row[1:].reshape(-1, k)
    big = []
    for i in layout.big:
        a = arrays[i].ravel()
        if with_stats:
            s, q, m, z = _big_stats(a)
            big.append((layout.sizes[i], s, q, m, z))
            total += q
        else:  # the guard alone: the squared norm is one read
            total += _sqnorm(a)
    nonfinite = {} if math.isfinite(total) else nonfinite_counts(names, arrays)
    if not with_stats:
        return GradSummary(total, tuple(names), None, missing, nonfinite)
    row = np.empty(1 + k * len(arrays))
    table = row[1:].reshape(-1, k)
    if small_rows is not None:
        table[layout.small] = small_rows
    table[layout.big] = np.array(_derive([names[i] for i in layout.big], list(zip(*big)), nonfinite)).reshape(-1, k)
    row[0] = math.sqrt(total) if total >= 0 else math.nan
    return GradSummary(total, tuple(names), row, missing, nonfinite)


def _derive(names: Sequence[str], sums: Sequence[Sequence[float]], nonfinite: dict) -> list[float]:
    """One row of ``STATS`` per name from its (size, sum, sum of squares, max |g|, zero count)."""
    values: list[float] = []
    sqrt = math.sqrt
    for name, n, s, q, m, z in zip(names, *sums):
        mean = s / n
        var = q / n - mean * mean
        nan, inf = nonfinite.get(name, (0, 0))
        values += (sqrt(q) if q >= 0 else q, mean, sqrt(var) if var > 0 else (0.0 if var == var else var), m,
                   z / n, float(nan), float(inf))
    return values


def _device_summary(xp, names, arrays, missing, with_stats: bool) -> GradSummary:
    if not arrays:
        return GradSummary(0.0, (), np.zeros(1) if with_stats else None, missing)
    f64 = xp.float64
    if not with_stats:
        sq = float(sum(xp.vdot(a.ravel(), a.ravel()).astype(f64) for a in arrays))
        if not math.isfinite(sq):
            sq = float(sum(xp.square(a.astype(f64)).sum() for a in arrays))
        summary = GradSummary(sq, tuple(names), None, missing)
        if not summary.finite:
            summary.nonfinite = nonfinite_counts(names, arrays)
        return summary
    rows = []
    for a in arrays:
        g = a.astype(f64, copy=False)
        rows.append(xp.stack([g.sum(), xp.square(g).sum(), xp.abs(g).max(), (g == 0).sum().astype(f64),
                              xp.isnan(g).sum().astype(f64), xp.isinf(g).sum().astype(f64)]))
    table = chainer.backend.CpuDevice().send(xp.stack(rows))  # one device->host transfer
    sums, sqs, max_abs, zeros, nans, infs = table.T.tolist()
    nonfinite = {n: (int(a), int(b)) for n, a, b in zip(names, nans, infs) if a or b}
    total = sum(sqs)
    values = _derive(names, ([a.size for a in arrays], sums, sqs, max_abs, zeros), nonfinite)
    row = np.array([math.sqrt(total) if total >= 0 else math.nan, *values])
    return GradSummary(total, tuple(names), row, missing, nonfinite)


_size = operator.attrgetter("size")


def gradient_summary(names: Sequence[str], grads: Sequence[Any], with_stats: bool = True) -> GradSummary:
    """Global squared norm of ``grads`` and, if ``with_stats``, per-parameter statistics.

    ``grads`` holds one array (or None for a parameter that got no gradient) per name.
    """
    if set(map(type, grads)) == _HOST_ONLY:  # the common case: every gradient there, on the host
        sizes = tuple(map(_size, grads))
        if 0 not in sizes:
            return _numpy_summary(names, grads, [], with_stats, sizes)
    present_names, present, missing = _split(names, grads)
    if not present or all(type(a) is np.ndarray for a in present):
        return _numpy_summary(present_names, present, missing, with_stats)
    xp = chainer.backend.get_array_module(*present)
    return _device_summary(xp, present_names, present, missing, with_stats)


_HOST_ONLY = {np.ndarray}
# ``HostGradients`` compiles its loop for the net's tuple of gradient types, in time growing with their
# number (about 2 s for 64): nets with more parameters take the general path (one gather, one loop)
MAX_ARRAYS = 64


class HostGradients:
    """The updater's gradient pass for a net whose gradients are small host arrays of one float dtype.

    One ``kernels.tuple_table`` call reads every gradient where it is (no gather) and computes the
    statistics; the only check before it is one C-level pass over the gradients' types (a missing one
    or one on a device takes the general path). Made by ``HostGradients.fitting``, for up to ``MAX_ARRAYS``
    arrays under ``BIG`` elements.
    """

    def __init__(self, names: Sequence[str], dtype: Any, prefix: str = "grad"):
        self.names = tuple(names)
        self.row_size = 1 + len(STATS) * len(self.names)
        self.kernel = kernels.tuple_table_for(dtype)
        self.types = (np.ndarray,) * len(self.names)
        self.keys = _report_keys(prefix, self.names)  # the reporter keys of a row, in its order

    @classmethod
    def fitting(cls, names: Sequence[str], grads: Sequence[Any], prefix: str = "grad") -> HostGradients | None:
        """A pass for ``grads`` if they are all host arrays of one float dtype under ``BIG`` elements, else None."""
        if not grads or set(map(type, grads)) != _HOST_ONLY or len(set(map(_dtype, grads))) != 1:
            return None
        sizes = tuple(map(_size, grads))
        if 0 in sizes or max(sizes) >= BIG or grads[0].dtype.kind != "f" or len(grads) > MAX_ARRAYS:
            return None
        return cls(names, grads[0].dtype, prefix)

    def table(self, grads: Sequence[Any]) -> tuple[float, np.ndarray] | None:
        """(total squared norm, ``row`` as in ``GradSummary``) of ``grads``; or None (nothing done) if ``grads``
        are not all host arrays."""
        grads = tuple(grads)
        if tuple(map(type, grads)) != self.types:
            return None
        row = np.empty(self.row_size)
        try:
            return self.kernel(grads, row), row
        except Exception as e:  # arrays numba cannot compile for (a dtype it lacks): NumPy from now on
            if self.kernel is kernels.numpy_tuple_table:
                raise
            warnings.warn(f"extensions: gradient statistics in NumPy from now on ({type(e).__name__})",
                          RuntimeWarning, stacklevel=2)
            self.kernel = kernels.numpy_tuple_table
            return self.kernel(grads, row), row


def nonfinite_counts(names: Sequence[str], arrays: Sequence[Any]) -> dict[str, tuple[int, int]]:
    """{name: (NaN count, Inf count)} for each array holding a non-finite value (failure path only)."""
    out = {}
    for name, a in zip(names, arrays):
        if a is None or not a.size or a.dtype.kind != "f":
            continue
        xp = chainer.backend.get_array_module(a)
        nan, inf = int(xp.isnan(a).sum()), int(xp.isinf(a).sum())
        if nan or inf:
            out[name] = (nan, inf)
    return out


def all_finite(arrays: Sequence[Any]) -> bool:
    """Cheap check that every float array is finite: one read-only summation, exact check only if it is not."""
    arrays = [a for a in arrays if a is not None and a.size and a.dtype.kind == "f"]
    if not arrays:
        return True
    on_host = all([type(a) is np.ndarray for a in arrays])
    xp = np if on_host else chainer.backend.get_array_module(*arrays)
    if on_host:
        layout = _layout(arrays)
        total = 0.0
        if layout.small:
            small = [arrays[i] for i in layout.small] if layout.big else arrays
            if not kernels.all_finite(layout.gather(small)):
                return False
        for i in layout.big:  # squares by BLAS dots read faster than NumPy's pairwise sum of the values
            total += _sqnorm(arrays[i].ravel())
    else:
        total = float(sum(a.sum(dtype=xp.float64) for a in arrays))
    if math.isfinite(total):
        return True
    return all(bool(chainer.backend.get_array_module(a).isfinite(a).all()) for a in arrays)
