"""wm-trainer: World Models (Ha & Schmidhuber 2018) on Chainer, built with the ``extensions`` toolkit."""
import os
import sys

# OpenBLAS's idle threads spin for ~2^28 cycles after each GEMM, taking the cores our own kernel threads
# need between GEMMs: on 2 cores, NumPy 2's OpenBLAS 0.3.31, V trains at 0.29 s/iteration spinning and
# 0.21 s with a short spin; M 100 iterations 28.6 s -> 22.3 s; the dream 3 % slower (measured).
# Read once when OpenBLAS loads, so only if numpy is not imported yet, and never over the user's value.
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
from .base import gpu_compat  # noqa: E402

# CuPy's CUDA libraries must be loadable before chainer imports cupy; a no-op without CuPy.
gpu_compat.enable_if_installed()

# Chainer itself is shielded by the toolkit (see extensions.chainer_compat) before anything imports it.
import extensions  # noqa: E402,F401
