"""Reusable buffers for the big temporaries that never leave one forward or backward call.

A fresh multi-megabyte array is mmap'ed, and the kernel zero-fills its pages on first touch and unmaps them on
free, every training step; on the VAE this page-fault work is a tenth of a step. Buffers here are kept per
(name, shape, dtype) and per thread, up to ``LIMIT_BYTES`` in all (past that the cache starts over).
"""
from __future__ import annotations

import threading

import numpy as np

LIMIT_BYTES = 1 << 30
_local = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous buffer, the same one each time for the same (name, shape, dtype)."""
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    key = (name, tuple(shape), np.dtype(dtype))
    buf = cache.get(key)
    if buf is None:
        buf = np.empty(shape, dtype=dtype)
        if sum(b.nbytes for b in cache.values()) + buf.nbytes > LIMIT_BYTES:
            cache.clear()
        cache[key] = buf
    return buf


def clear() -> None:
    """Drop this thread's buffers (memory goes back once nothing else refers to them)."""
    getattr(_local, "cache", {}).clear()


# Enough for one MDN-RNN step at the paper's size (batch 100, sequence 1000: ~1.2 GB of saved LSTM states and
# their gradients); arrays past the limit are freed as usual.
POOL_LIMIT_BYTES = 1 << 31
_pool: dict[tuple, list[np.ndarray]] = {}


def take(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array for a temporary that a FunctionNode keeps from forward to backward:
    one handed back by :func:`give_back` when there is one (no fresh pages to fault in), else a new one."""
    free = _pool.get((tuple(shape), np.dtype(dtype)))
    if free:
        try:
            return free.pop()
        except IndexError:  # another thread took the last one
            pass
    return np.empty(shape, dtype=dtype)


def give_back(a: np.ndarray) -> None:
    """Return an array from :func:`take` once nothing refers to it any more (e.g. from its node's ``__del__``)."""
    if sum(b.nbytes for free in _pool.values() for b in free) + a.nbytes <= POOL_LIMIT_BYTES:
        _pool.setdefault((a.shape, a.dtype), []).append(a)
