"""What Chainer 7.8.1 needs at import time that today's Python lacks: shimmed before the first ``import chainer``.

Chainer's ``_environment_check`` imports ``numpy.distutils.system_info`` (for a macOS-only BLAS warning).
NumPy has no ``numpy.distutils`` on Python 3.12 and newer, so there ``import chainer`` fails outright;
:func:`shield_numpy_distutils`, run when this module is imported (``extensions`` imports it first),
puts a stand-in whose ``get_info`` finds no BLAS information, which turns that one warning off and
nothing else.
"""
from __future__ import annotations

import importlib.util
import sys
import types


def shield_numpy_distutils() -> bool:
    """Register a stand-in ``numpy.distutils.system_info`` where NumPy has none; True if it did."""
    if "numpy.distutils" in sys.modules or importlib.util.find_spec("numpy.distutils") is not None:
        return False
    import numpy

    package = types.ModuleType("numpy.distutils", "Stand-in (wm-trainer): NumPy has no distutils on this Python.")
    package.__path__ = []
    system_info = types.ModuleType("numpy.distutils.system_info")
    system_info.get_info = lambda name, notfound_action=0: {}
    package.system_info = system_info
    sys.modules["numpy.distutils"], sys.modules["numpy.distutils.system_info"] = package, system_info
    numpy.distutils = package
    return True


shield_numpy_distutils()
