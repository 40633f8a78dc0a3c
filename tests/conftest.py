"""Shared test setup: every test starts and ends with Chainer's default float32 configuration."""
from __future__ import annotations

# isort: off
import wm_trainer  # noqa: F401  (applies the CuPy shims before chainer imports cupy)
import chainer
# isort: on
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _chainer_float32():
    """float64 mode and the ops switch are global in Chainer; a test that sets them must not leak them."""
    from extensions import set_float64

    set_float64(False)
    chainer.global_config.dtype = np.dtype(np.float32)
    chainer.global_config.wm_ops = "fast"
    yield
    set_float64(False)
    chainer.global_config.dtype = np.dtype(np.float32)
    chainer.global_config.wm_ops = "fast"
