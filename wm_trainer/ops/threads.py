"""Split the memory-bound parts of the kernels (strided copies, scatter-adds, the MDN loss blocks) over
threads. numpy releases the GIL inside large copies and ufunc loops, so batch slices run in parallel on
the cores OpenBLAS already uses for the GEMMs; without this the copies run on one core while the rest idle.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # without it blocks run one after another on multi-threaded BLAS
    threadpool_limits = None

_threads = max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))
_pool: ThreadPoolExecutor | None = None


def set_threads(n: int) -> None:
    """Use ``n`` threads (1 = run everything in the calling thread)."""
    global _threads, _pool
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    if _pool is not None and n != _threads:
        _pool.shutdown(wait=True)
        _pool = None
    _threads = n


def get_threads() -> int:
    """The number of threads the kernels split their copies over."""
    return _threads


def run_chunks(fn: Callable[[int, int], object], n: int, min_chunk: int = 1) -> None:
    """Call ``fn(lo, hi)`` over a split of ``range(n)`` into at most ``get_threads()`` chunks, concurrently."""
    global _pool
    parts = min(_threads, max(1, n // max(min_chunk, 1)))
    if parts <= 1:
        fn(0, n)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_threads, thread_name_prefix="wm-ops")
    bounds = [n * i // parts for i in range(parts + 1)]
    err = np.geterr()  # numpy's floating-point error settings are per thread: carry the caller's over

    def work(lo: int, hi: int) -> None:
        with np.errstate(**err):
            fn(lo, hi)
    futures = [_pool.submit(work, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:])]
    fn(bounds[0], bounds[1])
    for f in futures:
        f.result()


def run_blocks(fn: Callable[[int, int], object], n: int, step: int) -> None:
    """Call ``fn(lo, hi)`` for each block ``[lo, lo + step)`` of ``range(n)``, in order on one thread.

    With several threads the blocks are handed out as threads free up (a core shared with another process
    then slows only the blocks it runs), and BLAS is limited to one thread meanwhile: each block's GEMM is
    small and in cache, so running blocks side by side beats splitting every GEMM.
    """
    starts = list(range(0, n, max(step, 1)))
    parts = min(_threads, len(starts))
    if parts <= 1 or threadpool_limits is None:
        for lo in starts:
            fn(lo, min(lo + step, n))
        return
    counter = itertools.count()

    def worker(_lo: int, _hi: int) -> None:
        while (i := next(counter)) < len(starts):  # itertools.count is atomic under the GIL
            fn(starts[i], min(starts[i] + step, n))
    with threadpool_limits(limits=1, user_api="blas") if parts > 1 else contextlib.nullcontext():
        run_chunks(worker, parts)
