"""Global-norm gradient clipping that never spreads a NaN: a non-finite norm skips the update instead.

Chainer's own ``GradientClipping`` multiplies every gradient by ``threshold / norm``; when
one gradient holds a NaN or Inf that rate is NaN or 0 and every parameter is ruined or
silently zeroed. This hook leaves the weights untouched in that case and counts the skip.
"""
from __future__ import annotations

import math
import warnings

import chainer

from .stats import gradient_summary


def _cached_sqnorm(opt: chainer.Optimizer) -> float | None:
    """The squared norm a GradientLoggingUpdater computed for this very step, if still valid.

    Valid only when this hook is the first 'pre' hook (no other hook changed the gradients).
    """
    cached = getattr(opt, "_ext_grad_sqnorm", None)
    if cached is None or cached[0] != opt.t:
        return None
    hooks = getattr(opt, "_pre_update_hooks", None)
    if not hooks or not isinstance(next(iter(hooks.values())), GradientClipping):
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
        params = [p for p in opt.target.params(include_uninit=False) if p.grad is not None]
        sqnorm = _cached_sqnorm(opt)
        if sqnorm is None:
            sqnorm = gradient_summary([str(i) for i in range(len(params))], [p.grad for p in params],
                                      with_stats=False).sqnorm
        if not math.isfinite(sqnorm):
            self.skipped += 1
            opt._loss_scaling_isnan = True  # Optimizer.update consults is_safe_to_update() right after 'pre' hooks
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
