"""Reusable buffers for the big temporaries that never leave one forward or backward call.

A fresh multi-megabyte array is mmap'ed, and the kernel zero-fills its pages on first touch and unmaps them on
free, every training step; on the VAE this page-fault work was a tenth of a step. Buffers here are kept per
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
