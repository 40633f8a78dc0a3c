"""Reading many Chainer parameters' arrays and gradients at once, without Chainer's property chain.

``Parameter.array`` and ``Parameter.grad`` are three Python calls each (property, layout check,
ChainerX branch). The toolkit reads every parameter several times an iteration; on a net whose
iteration takes a millisecond those calls are a visible part of what the toolkit costs. For
parameters that hold plain NumPy/CuPy arrays in the standard layout (``fast_access``), the
functions below read the same objects Chainer would return with C-level ``map`` calls.
"""
from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from typing import Any

import chainer

from . import chainer_compat as compat

_first = operator.itemgetter(0)
_data = compat.DATA_OF
_grad_var = compat.GRAD_VAR_OF


def fast_access(params: Sequence[chainer.Parameter]) -> bool:
    """Whether ``raw_arrays``/``raw_grads`` answer what ``.array``/``.grad`` would for every one of ``params``."""
    try:
        return compat.plain_parameters(params)
    except (AttributeError, IndexError, TypeError):  # another Chainer's Variable layout
        return False


def iter_arrays(params: Sequence[chainer.Parameter]) -> Iterator[Any]:
    """``(p.array for p in params)`` for parameters that passed ``fast_access``, as a C-level iterator."""
    return map(_first, map(_data, params))


def raw_arrays(params: Sequence[chainer.Parameter]) -> list[Any]:
    """``[p.array for p in params]`` for parameters that passed ``fast_access``."""
    return list(map(_first, map(_data, params)))


def raw_grads(params: Sequence[chainer.Parameter]) -> list[Any]:
    """``[p.grad for p in params]`` for parameters that passed ``fast_access``."""
    try:
        return list(map(_first, map(_data, map(_grad_var, params))))
    except AttributeError:  # a parameter without a gradient variable (no gradient, or one set as an array)
        return [p.grad for p in params]
