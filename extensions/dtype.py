"""float64 troubleshooting mode: the global dtype switch, casting Links and batches, and the check.

Chainer's ``global_config.dtype`` (the Chainer MDN blog post's float64 recipe) only reaches parameters whose
initializer asks for the default dtype; ``add_param`` and explicit arrays stay float32. So
float64 mode is three parts: the switch before models are built, a converter that casts
float inputs, and a check that names every parameter that is still not float64.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import chainer
import numpy as np
from chainer.dataset import convert

from . import chainer_compat as compat
from .errors import Float64Error

_state = {"requested": False}


def set_float64(enabled: bool) -> None:
    """Switch Chainer's default dtype to float64 (or back to float32); call before building models."""
    _state["requested"] = bool(enabled)
    if enabled:
        chainer.global_config.dtype = np.dtype(np.float64)
    elif np.dtype(chainer.global_config.dtype) == np.float64:
        chainer.global_config.dtype = np.dtype(np.float32)


def float64_requested() -> bool:
    """Whether ``set_float64(True)`` is in force (the bookkeeping ``set_float64`` keeps)."""
    return _state["requested"] and np.dtype(chainer.global_config.dtype) == np.float64


def _cast_array(a: Any, dtype: np.dtype) -> Any:
    if a is None or not hasattr(a, "dtype") or a.dtype.kind != "f" or a.dtype == dtype:
        return a
    return a.astype(dtype)


def cast_link(link: chainer.Link, dtype: Any, optimizer: chainer.Optimizer | None = None) -> chainer.Link:
    """Cast every float parameter, gradient and persistent of ``link`` (and the optimizer's state) to ``dtype``.

    Chainer has no ``Link.astype``; this is it. Uninitialised parameters are initialised
    in ``dtype`` later because their initializer's dtype is set too. Returns ``link``.
    """
    dtype = np.dtype(dtype)
    for param in link.params(include_uninit=True):
        if param.array is None:
            init = getattr(param, "initializer", None)
            if init is not None and hasattr(init, "dtype"):
                init.dtype = dtype
            continue
        grad = param.grad
        param.array = _cast_array(param.array, dtype)
        if grad is not None:
            param.grad = _cast_array(grad, dtype)
        rule = getattr(param, "update_rule", None)
        state = getattr(rule, "state", None) if rule is not None else None
        if state:
            for key, value in list(state.items()):
                state[key] = _cast_array(value, dtype)
    for sub in link.links():
        for name in compat.persistent_names(sub):
            value = getattr(sub, name)
            if hasattr(value, "dtype"):
                setattr(sub, name, _cast_array(value, dtype))
    if optimizer is not None and getattr(optimizer, "target", None) is not None:
        for param in optimizer.target.params(include_uninit=False):
            rule = getattr(param, "update_rule", None)
            state = getattr(rule, "state", None) if rule is not None else None
            if state:
                for key, value in list(state.items()):
                    state[key] = _cast_array(value, dtype)
    return link


def cast_floats(batch: Any, dtype: Any = np.float64) -> Any:
    """Cast float arrays inside a converted batch (array, tuple, list or dict); integers untouched."""
    dtype = np.dtype(dtype)
    if isinstance(batch, tuple):
        return tuple(cast_floats(b, dtype) for b in batch)
    if isinstance(batch, list):
        return [cast_floats(b, dtype) for b in batch]
    if isinstance(batch, dict):
        return {k: cast_floats(v, dtype) for k, v in batch.items()}
    return _cast_array(batch, dtype)


def float64_converter(base: Callable = convert.concat_examples) -> Callable:
    """A converter that runs ``base`` and casts its float arrays to float64 (integer arrays untouched)."""
    if getattr(base, "_ext_float64_base", None) is not None:
        return base

    @convert.converter()
    def to_float64(batch, device=None):
        return cast_floats(compat.call_converter(base, batch, device), np.float64)

    to_float64._ext_float64_base = base
    return to_float64


def non_float64_params(named_params: Iterable[tuple[str, chainer.Parameter]]) -> list[str]:
    """Paths (with dtype) of initialised float parameters that are not float64."""
    bad = []
    for path, param in named_params:
        a = param.array
        if a is not None and a.dtype != np.float64:
            bad.append(f"{path} ({a.dtype})")
    return bad


def check_float64(link: chainer.Link) -> None:
    """Raise Float64Error naming every initialised parameter of ``link`` that is not float64."""
    bad = non_float64_params((n.lstrip("/"), p) for n, p in link.namedparams(include_uninit=False))
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise Float64Error(
            f"float64 mode is on but {len(bad)} parameter(s) are not float64: {shown}. Call "
            "extensions.set_float64(True) before building the model, or extensions.cast_link(model, "
            "numpy.float64, optimizer) after building it")
