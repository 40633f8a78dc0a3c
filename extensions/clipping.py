"""Global-norm gradient clipping that never spreads a NaN: a non-finite norm skips the update instead.

Chainer's own ``GradientClipping`` multiplies every gradient by ``threshold / norm``; when
one gradient holds a NaN or Inf that rate is NaN or 0 and every parameter is ruined or
silently zeroed. This hook leaves the weights untouched in that case and counts the skip.
"""
from __future__ import annotations

import math
import warnings

import chainer

from . import chainer_compat as compat
from .stats import gradient_summary


def _cached_sqnorm(opt: chainer.Optimizer) -> float | None:
    """The squared norm the toolkit's guard computed for this very step, if still valid.

    Valid only when this hook comes right after the guard's 'pre' hook (no other hook changed the gradients).
    """
    from .guard import PRE_HOOK

    pre, _ = compat.hook_dicts(opt)
    hooks = iter(pre.items())
    first, second = next(hooks, (None, None)), next(hooks, (None, None))
    if first[0] != PRE_HOOK or not isinstance(second[1], GradientClipping):
        return None
    cached = first[1].guard.sqnorm
    if cached is None or cached[0] != opt.t:
        return None
    return cached[1]


class GradientClipping:
    """Optimizer hook: scale gradients to a global L2 norm of at most ``threshold``; skip non-finite steps.

    Add with ``optimizer.add_hook(GradientClipping(1.0))``. ``skipped`` counts the updates
    dropped because the norm was NaN or Inf.
    """

    name = "GradientClipping"
    timing = "pre"
    call_for_each_param = False

    def __init__(self, threshold: float):
        if not threshold > 0:
            raise ValueError(f"GradientClipping threshold must be positive, got {threshold!r}")
        self.threshold = float(threshold)
        self.skipped = 0

    def __call__(self, opt: chainer.Optimizer) -> None:
        if compat.update_vetoed(opt):  # the guard (or dynamic loss scaling) already dropped this update
            return
        params = [p for p in opt.target.params(include_uninit=False) if p.grad is not None]
        sqnorm = _cached_sqnorm(opt)
        if sqnorm is None:
            sqnorm = gradient_summary([str(i) for i in range(len(params))], [p.grad for p in params],
                                      with_stats=False).sqnorm
        if not math.isfinite(sqnorm):
            self.skipped += 1
            compat.veto_update(opt)
            warnings.warn(f"GradientClipping: gradient norm is {math.sqrt(sqnorm) if sqnorm >= 0 else sqnorm}; "
                          f"update skipped (weights untouched, {self.skipped} skipped so far)", RuntimeWarning,
                          stacklevel=2)
            return
        norm = math.sqrt(sqnorm)
        if norm <= self.threshold:
            return
        rate = self.threshold / norm
        for p in params:
            with chainer.using_device(p.device):
                p.grad *= rate
