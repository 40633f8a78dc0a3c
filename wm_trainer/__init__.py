"""wm-trainer: World Models (Ha & Schmidhuber 2018) on Chainer, built with the ``extensions`` toolkit."""
from .base import gpu_compat

# CuPy's CUDA libraries must be loadable before chainer imports cupy; a no-op without CuPy.
gpu_compat.enable_if_installed()

# Chainer itself is shielded by the toolkit (see extensions.chainer_compat) before anything imports it.
import extensions  # noqa: E402,F401
