"""Benchmark harness: alternate the two sides of a comparison (A B A B ...) and report per-pair ratios.

Alternating cancels the drift of a shared machine; every figure keeps min/median/max over
repeats after warm-up. ``machine_info`` records the BLAS library and the kernel it ran.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable


@dataclasses.dataclass
class Figure:
    """A throughput or time figure over repeats."""

    name: str
    unit: str
    values: list[float]

    def summary(self) -> dict:
        """min/median/max of the repeats."""
        return {"unit": self.unit, "min": min(self.values), "median": statistics.median(self.values),
                "max": max(self.values), "repeats": len(self.values)}


@dataclasses.dataclass
class Comparison:
    """Two sides measured alternately; ratio = B / A per pair (for a rate) or A / B (for a time)."""

    name: str
    a: Figure
    b: Figure
    ratios: list[float]
    ratio_meaning: str
    target: str = ""
    met: bool | None = None
    amortised: float | None = None  # ratio of total work over total time: for costs paid every N iterations

    def to_dict(self) -> dict:
        """Plain data for the results JSON."""
        r = sorted(self.ratios)
        ratio = {"meaning": self.ratio_meaning, "min": r[0], "median": statistics.median(r), "max": r[-1]}
        if self.amortised is not None:
            ratio["amortised"] = self.amortised
        return {"name": self.name, "a": {"name": self.a.name, **self.a.summary()},
                "b": {"name": self.b.name, **self.b.summary()},
                "ratio": ratio, "target": self.target, "met": self.met}


def time_call(fn: Callable[[], object], n: int) -> float:
    """Seconds for ``n`` calls of ``fn``."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t0


def alternate(fn_a: Callable[[], object], fn_b: Callable[[], object], *, calls: int, repeats: int,
              warmup: int = 1) -> tuple[list[float], list[float]]:
    """Seconds per call of A and of B, measured A B A B ... after ``warmup`` untimed rounds each."""
    for _ in range(warmup):
        time_call(fn_a, calls)
        time_call(fn_b, calls)
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(time_call(fn_a, calls) / calls)
        tb.append(time_call(fn_b, calls) / calls)
    return ta, tb


def compare_rates(name: str, label_a: str, fn_a: Callable[[], object], label_b: str, fn_b: Callable[[], object], *,
                  items_per_call: float, unit: str, calls: int, repeats: int, warmup: int = 1,
                  target: str = "", target_ratio: float | None = None, higher_is_better: bool = True,
                  amortised: bool = False) -> Comparison:
    """Throughput of A and B (items/s); ratio = rate_B / rate_A per alternating pair.

    ``amortised``: judge the target on total time over all repeats instead of the median pair,
    for a cost paid once every N iterations (the repeats then cover a whole period).
    """
    ta, tb = alternate(fn_a, fn_b, calls=calls, repeats=repeats, warmup=warmup)
    ra = [items_per_call / t for t in ta]
    rb = [items_per_call / t for t in tb]
    ratios = [b / a for a, b in zip(ra, rb)]
    judged = statistics.median(ratios)
    total = sum(ta) / sum(tb) if amortised else None
    if total is not None:
        judged = total
    met = None
    if target_ratio is not None:
        met = judged >= target_ratio if higher_is_better else judged <= target_ratio
    return Comparison(name, Figure(label_a, unit, ra), Figure(label_b, unit, rb), ratios,
                      f"{label_b} / {label_a} ({unit})", target, met, total)


def machine_info() -> dict:
    """CPU model, cores, library versions, BLAS and its kernel (threadpoolctl), thread settings."""
    import numpy as np

    info: dict = {"platform": platform.platform(), "python": platform.python_version(),
                  "cpu_count": os.cpu_count(), "numpy": np.__version__}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        info["cpu_model"] = platform.processor()
    try:
        import chainer

        info["chainer"] = chainer.__version__
    except ImportError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = "not available"
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [{k: p.get(k) for k in ("internal_api", "version", "architecture", "num_threads",
                                               "threading_layer", "filepath")} for p in threadpool_info()]
    except ImportError:
        info["blas"] = "threadpoolctl not installed"
    info["env"] = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS",
                                                   "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    return info
