"""Per-parameter gradient statistics in a few vectorised passes, and the cheap finiteness checks.

On NumPy every gradient is flattened into one buffer and each statistic is one segmented
reduction (``ufunc.reduceat``) over all parameters at once; on other backends (CuPy) the
per-parameter statistics are stacked on the device and copied to the host in one transfer.
Squared norms accumulate in float64 so a large but finite float32 gradient is not mistaken
for an infinity; NaN/Inf counts are computed only when the total is not finite.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import chainer
import numpy as np

STATS = ("norm", "mean", "std", "max_abs", "zero_frac", "nan", "inf")


_KEYS: dict[tuple[str, tuple[str, ...]], list[str]] = {}


def _report_keys(prefix: str, names: tuple[str, ...]) -> list[str]:
    key = (prefix, names)
    keys = _KEYS.get(key)
    if keys is None:
        if len(_KEYS) > 64:
            _KEYS.clear()
        keys = _KEYS[key] = [f"{prefix}/{n}/{s}" for n in names for s in STATS]
    return keys


@dataclasses.dataclass
class GradSummary:
    """What one pass over the gradients found: total squared norm, per-parameter stats, gaps.

    ``table`` has one row per name in ``names`` and one column per entry of ``STATS``.
    """

    sqnorm: float
    names: tuple[str, ...] = ()
    table: np.ndarray | None = None
    missing: list[str] = dataclasses.field(default_factory=list)
    nonfinite: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

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
        if self.table is None:
            return None
        return {n: dict(zip(STATS, row)) for n, row in zip(self.names, self.table.tolist())}

    def as_report(self, prefix: str = "grad") -> dict[str, float]:
        """Reporter keys ``grad/<path>/<stat>``, ``grad/<path>/missing`` and ``grad/global_norm``."""
        out = {f"{prefix}/global_norm": self.global_norm}
        if self.table is not None:
            out.update(zip(_report_keys(prefix, self.names), self.table.ravel().tolist()))
        for path in self.missing:
            out[f"{prefix}/{path}/missing"] = 1.0
        return out


def _split(names: Sequence[str], arrays: Sequence[Any]) -> tuple[list[str], list[Any], list[str]]:
    present_names, present, missing = [], [], []
    for name, a in zip(names, arrays):
        if a is None:
            missing.append(name)
        elif a.size:
            present_names.append(name)
            present.append(a)
    return present_names, present, missing


def _flat(arrays: Sequence[Any]) -> Any:
    if len(arrays) == 1:
        return arrays[0].ravel()
    return np.concatenate([a.ravel() for a in arrays])


def _count_nonfinite_numpy(names, arrays, flat, offsets) -> dict[str, tuple[int, int]]:
    nan = np.add.reduceat(np.isnan(flat), offsets, dtype=np.int64)
    inf = np.add.reduceat(np.isinf(flat), offsets, dtype=np.int64)
    return {n: (int(a), int(b)) for n, a, b in zip(names, nan, inf) if a or b}


_OFFSETS: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}


def _layout(arrays: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(sizes, start offsets) of the arrays in the flat buffer, cached by their sizes."""
    key = tuple([a.size for a in arrays])
    layout = _OFFSETS.get(key)
    if layout is None:
        if len(_OFFSETS) > 64:
            _OFFSETS.clear()
        sizes = np.array(key, dtype=np.int64)
        layout = _OFFSETS[key] = (sizes, np.concatenate(([0], np.cumsum(sizes)[:-1])))
    return layout


def _numpy_summary(names, arrays, missing, with_stats: bool) -> GradSummary:
    if not arrays:
        return GradSummary(0.0, (), np.zeros((0, len(STATS))) if with_stats else None, missing)
    flat = _flat(arrays)
    if not with_stats:
        sq = float(np.dot(flat, flat))
        if not math.isfinite(sq):  # overflow of a float32 dot, or a real NaN/Inf: settle it in float64
            sq = float(np.square(flat, dtype=np.float64).sum())
        summary = GradSummary(sq, tuple(names), None, missing)
        if not summary.finite:
            summary.nonfinite = _count_nonfinite_numpy(names, arrays, flat, _layout(arrays)[1])
        return summary
    sizes, offsets = _layout(arrays)
    sums = np.add.reduceat(flat, offsets, dtype=np.float64)
    sqs = np.add.reduceat(np.square(flat, dtype=np.float64), offsets)
    max_abs = np.maximum.reduceat(np.abs(flat), offsets)
    zeros = np.add.reduceat(flat == 0, offsets, dtype=np.int64)
    total = float(sqs.sum())
    nonfinite = _count_nonfinite_numpy(names, arrays, flat, offsets) if not math.isfinite(total) else {}
    return _assemble(names, sizes, sums, sqs, max_abs, zeros, nonfinite, total, missing)


def _assemble(names, sizes, sums, sqs, max_abs, zeros, nonfinite, total, missing) -> GradSummary:
    counts = np.zeros((2, len(names)))
    for i, name in enumerate(names):
        if name in nonfinite:
            counts[:, i] = nonfinite[name]
    with np.errstate(invalid="ignore", over="ignore") if nonfinite else contextlib.nullcontext():
        mean = sums / sizes
        std = np.sqrt(np.maximum(sqs / sizes - mean * mean, 0.0))
        table = np.stack([np.sqrt(sqs), mean, std, max_abs, zeros / sizes, counts[0], counts[1]], axis=1)
    return GradSummary(total, tuple(names), table, missing, nonfinite)


def _device_summary(xp, names, arrays, missing, with_stats: bool) -> GradSummary:
    if not arrays:
        return GradSummary(0.0, (), np.zeros((0, len(STATS))) if with_stats else None, missing)
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
    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    total = float(table[:, 1].sum())
    nonfinite = {n: (int(r[4]), int(r[5])) for n, r in zip(names, table) if r[4] or r[5]}
    return _assemble(names, sizes, table[:, 0], table[:, 1], table[:, 2], table[:, 3], nonfinite, total, missing)


def gradient_summary(names: Sequence[str], grads: Sequence[Any], with_stats: bool = True) -> GradSummary:
    """Global squared norm of ``grads`` and, if ``with_stats``, per-parameter statistics.

    ``grads`` holds one array (or None for a parameter that got no gradient) per name.
    """
    present_names, present, missing = _split(names, grads)
    if not present or all(type(a) is np.ndarray for a in present):
        return _numpy_summary(present_names, present, missing, with_stats)
    xp = chainer.backend.get_array_module(*present)
    return _device_summary(xp, present_names, present, missing, with_stats)


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
    """Cheap check that every float array is finite: one summation, exact check only if it is not."""
    arrays = [a for a in arrays if a is not None and a.size and a.dtype.kind == "f"]
    if not arrays:
        return True
    xp = chainer.backend.get_array_module(*arrays)
    if xp is np:
        total = _flat(arrays).sum()
    else:
        total = sum(a.sum(dtype=xp.float64) for a in arrays)
    if math.isfinite(float(total)):
        return True
    return all(bool(chainer.backend.get_array_module(a).isfinite(a).all()) for a in arrays)
