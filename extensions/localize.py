"""Find where a NaN/Inf was born: the first Link and function whose inputs were finite and outputs were not.

Used only after the guard has failed: the iteration is re-run with a ``LinkHook`` (which
Link, by path, is running) and a ``FunctionHook`` (which function, called from which user
source line). Each FunctionNode of the replay has its ``forward``/``backward`` wrapped on
the instance, so outputs and outgoing gradients are seen as they are made. A function is
blamed only for a kind of non-finite value (NaN or Inf) that none of its inputs had, so a
Link that merely passes a NaN along is never blamed. Infinities born inside a Link listed
in ``allow_inf_in`` (e.g. attention masks) are intended and skipped.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import chainer
import numpy as np

from .replay import RngState, preserved, quiet_reporter
from .stats import nonfinite_counts

_CHAINER_DIR = os.path.dirname(os.path.abspath(chainer.__file__))
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))
_NUMPY_DIR = os.path.dirname(os.path.abspath(np.__file__))
_SKIP_DIRS = (_CHAINER_DIR + os.sep, _OWN_DIR + os.sep, _NUMPY_DIR + os.sep)


@dataclasses.dataclass
class Birth:
    """Where a non-finite value first appeared."""

    where: str                     # forward | backward | update
    kind: str                      # nan | inf | nan+inf
    link: str | None               # Link path, "/" for the root link, None outside any Link
    function: str | None           # Chainer function label (e.g. Log) or update rule
    source: str | None             # "file:line in func: code" of the user's call
    inputs: list[dict] = dataclasses.field(default_factory=list)
    outputs: list[dict] = dataclasses.field(default_factory=list)

    def describe(self) -> str:
        """One line: what, where, in which function, called from where."""
        link = f"Link '{self.link}'" if self.link else "code outside any Link"
        fn = f" (function {self.function})" if self.function else ""
        src = f" at {self.source}" if self.source else ""
        what = {"nan": "NaN", "inf": "Inf", "nan+inf": "NaN and Inf"}.get(self.kind, self.kind)
        return f"{what} born in {self.where} in {link}{fn}{src}"


def _host(a: Any) -> np.ndarray:
    return chainer.backend.CpuDevice().send(a)


def array_summary(a: Any) -> dict:
    """Shape, dtype, finite range and NaN/Inf counts of one array (for the report)."""
    if a is None:
        return {"shape": None}
    a = _host(getattr(a, "array", a))
    info: dict = {"shape": list(a.shape), "dtype": str(a.dtype)}
    if a.dtype.kind not in "fc" or not a.size:
        if a.size and a.dtype.kind in "iub":
            info.update(min=float(a.min()), max=float(a.max()))
        return info
    finite = np.isfinite(a)
    info["nan"] = int(np.isnan(a).sum())
    info["inf"] = int(np.isinf(a).sum())
    if finite.any():
        vals = a[finite]
        info.update(min=float(vals.min()), max=float(vals.max()), max_abs=float(np.abs(vals).max()))
    return info


def _kinds(arrays: Sequence[Any]) -> tuple[bool, bool]:
    has_nan = has_inf = False
    for a in arrays:
        a = getattr(a, "array", a)
        if a is None or not hasattr(a, "dtype") or a.dtype.kind != "f" or not a.size:
            continue
        xp = chainer.backend.get_array_module(a)
        has_nan = has_nan or bool(xp.isnan(a).any())
        has_inf = has_inf or bool(xp.isinf(a).any())
    return has_nan, has_inf


def user_source(skip: tuple[str, ...] = _SKIP_DIRS) -> str | None:
    """The innermost stack frame outside chainer, numpy and this toolkit, as ``file:line in func: code``."""
    frame = inspect.currentframe()
    frame = frame.f_back if frame is not None else None  # the caller's
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(skip) and not filename.startswith("<"):
            import linecache

            code = linecache.getline(filename, frame.f_lineno).strip()
            return f"{filename}:{frame.f_lineno} in {frame.f_code.co_name}: {code}"
        frame = frame.f_back
    return None


class _LinkTracker(chainer.LinkHook):
    """Keeps the stack of Link paths currently running."""

    name = "extensions_localize_links"

    def __init__(self, paths: dict[int, str]):
        self.paths = paths
        self.stack: list[str] = []

    def forward_preprocess(self, args) -> None:
        path = self.paths.get(id(args.link))
        self.stack.append(path if path is not None else f"<{type(args.link).__name__}>")

    def forward_postprocess(self, args) -> None:
        self.stack.pop()


class _FunctionTracker(chainer.FunctionHook):
    """Wraps each new FunctionNode's forward and backward to find the first non-finite birth."""

    name = "extensions_localize_functions"

    def __init__(self, links: _LinkTracker, allow_inf_in: Sequence[str]):
        self.links = links
        self.allow = tuple(p.strip("/") for p in allow_inf_in)
        self.phase = "forward"
        self.first: Birth | None = None
        self.keep: list[Any] = []   # keeps the replay's nodes alive while hooked

    def _allowed_inf(self, stack: Sequence[str]) -> bool:
        for path in stack:
            p = path.strip("/")
            if any(p == a or p.startswith(a + "/") for a in self.allow):
                return True
        return False

    def _check(self, where: str, fn: Any, ins: Sequence[Any], outs: Sequence[Any], site: dict) -> None:
        if self.first is not None:
            return
        in_nan, in_inf = _kinds(ins)
        out_nan, out_inf = _kinds(outs)
        new_nan = out_nan and not in_nan
        new_inf = out_inf and not in_inf and not site["allowed_inf"]
        if not (new_nan or new_inf):
            return
        self.first = Birth(
            where=where, kind="nan+inf" if new_nan and new_inf else ("nan" if new_nan else "inf"),
            link=site["link"], function=fn.label, source=site["source"],
            inputs=[array_summary(a) for a in ins], outputs=[array_summary(a) for a in outs])

    def forward_preprocess(self, function, in_data) -> None:
        if self.phase != "forward" or self.first is not None:
            return
        stack = list(self.links.stack)
        site = {"link": stack[-1] if stack else None, "source": user_source(),
                "allowed_inf": self._allowed_inf(stack)}
        self.keep.append(function)
        forward, backward = function.forward, function.backward

        def traced_forward(inputs):
            outputs = forward(inputs)
            self._check("forward", function, inputs, outputs, site)
            return outputs

        def traced_backward(target_input_indexes, grad_outputs):
            grads = backward(target_input_indexes, grad_outputs)
            self._check("backward", function, [g for g in grad_outputs if g is not None],
                        [g for g in grads if g is not None], site)
            return grads

        function.forward = traced_forward
        function.backward = traced_backward


def link_paths(link: chainer.Link) -> dict[int, str]:
    """id(sub-link) -> path like ``predictor/l1`` ("/" for the root)."""
    return {id(sub): (name.strip("/") or "/") for name, sub in link.namedlinks()}


def localize(compute_loss: Callable[[Any], chainer.Variable], in_arrays: Any, link: chainer.Link,
             rng: RngState | None, allow_inf_in: Sequence[str] = (), loss_scale: float | None = None,
             grad_counts: dict[str, tuple[int, int]] | None = None) -> tuple[Birth | None, float | None]:
    """Re-run one iteration with hooks; return the first birth of a NaN/Inf (or None) and the loss.

    The weights, gradients, persistents and random state are left as they were. With ``grad_counts`` (a dict)
    the backward pass runs even after a birth in the forward pass, and the dict gets the (NaN, Inf) counts of
    the replay's gradients by parameter path: this process's own gradients, before any averaging.
    """
    links = _LinkTracker(link_paths(link))
    functions = _FunctionTracker(links, allow_inf_in)
    after = np.random.get_state()
    loss_value = None
    try:
        with preserved(link), quiet_reporter(), links, functions:
            if rng is not None:
                rng.restore()
            link.cleargrads()
            loss = compute_loss(in_arrays)
            loss_value = float(_host(loss.array).sum())
            if functions.first is None or grad_counts is not None:
                functions.phase = "backward"
                loss.backward(loss_scale=loss_scale)
            if grad_counts is not None:
                named = list(link.namedparams(include_uninit=False))
                grad_counts.update(nonfinite_counts([n.lstrip("/") for n, _ in named], [p.grad for _, p in named]))
            functions.keep.clear()
    finally:
        np.random.set_state(after)
    return functions.first, loss_value
