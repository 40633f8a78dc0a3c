"""Adam whose CPU update runs in place, block by block, over threads: the same arithmetic as Chainer's.

Chainer's ``AdamRule.update_core_cpu`` makes about eight full-size temporaries per parameter and runs on one
core: on the ConvVAE's 4.3 M parameters, a tenth of a training step. :class:`FastAdam` is a drop-in
``chainer.optimizers.Adam`` whose rule does the same float operations in the same order (so results are
bit-identical) on cache-sized blocks with ``out=`` ufuncs, split over :mod:`wm_trainer.ops.threads`.
AMSGrad, AdaBound, weight decay, mixed dtypes and GPU arrays take Chainer's own path.

The rule follows the toolkit's save protocol (``extensions.backup.SAVE_PROTOCOL``): given a save target,
it copies each block of the parameter and of ``m`` and ``v`` there just before updating it, while the
block is in cache, so the toolkit's rollback copy costs about a third of a separate pass; and each
thread checks its part of the parameter for NaN/Inf right after updating it (one compiled call, while
much of it is still cached), so the toolkit's post-update check need not read the parameter again.

It also keeps upper bounds on |p|, |m| and v, carried forward through each update by arithmetic
alone, so that it can answer the protocol's ``update_stays_finite``: whether, for gradients no larger
than a given bound, its next update can only write finite values. When every rule of an update can
say so, the toolkit makes no rollback copy at all (on the ConvVAE, 52 MB written per step).
"""
from __future__ import annotations

import math

import chainer
import numpy as np
from chainer.optimizers.adam import AdamRule

from extensions import kernels
from wm_trainer.ops.scratch import scratch
from wm_trainer.ops.threads import run_chunks

BLOCK = 65536  # elements per block: five float32 blocks (1.25 MB) stay in a 2 MB L2, and the ~15 NumPy calls per
# block hold the GIL against the other threads, so blocks are as big as the cache allows


class FastAdamRule(AdamRule):
    """:class:`chainer.optimizers.adam.AdamRule` with a fused, threaded, in-place CPU update."""

    save_overwritten = None  # (param out, {"m": out, "v": out}), flat: set by the toolkit's UpdateBackup
    check_overwritten = False  # set by the toolkit's UpdateBackup: check what the update writes, even unsaved
    overwritten_finite = None  # after an update that saved or checked: whether all written into the parameter is finite
    _bounds = None  # ((p, m, v), P, M, V): |p| <= P, |m| <= M, v <= V for these arrays, after the last fused update
    _next_bounds = None  # the bounds after the next update, as ``update_stays_finite`` derived them

    def update_stays_finite(self, param, grad_bound: float) -> bool:
        """Whether the next (fused) update of ``param`` can only write finite values into it and into m and v,
        for gradients with |g| <= ``grad_bound``: from bounds on |p|, |m| and v (read once, then carried).

        The fused update computes m += c1 (g - m), v += c2 (g g - v), p -= eta alpha_t m / (sqrt(v) + eps).
        With every input finite: |m'| <= max(M, G) and v' <= max(V, G^2) (convex combinations), and the
        step is at most eta alpha_t |m'| / eps, alpha_t <= alpha / (1 - beta1) at any t; every intermediate
        is then below max(M, G, G^2, alpha_t / eps, alpha_t M / eps, P + step), which is required to stay a
        sixteenth below the dtype's largest value (rounding adds a few units in the last place per operation).
        """
        if not self.saves_overwritten(param):
            return False
        hp = self.hyperparam
        if not (hp.eps > 0 and hp.eta >= 0 and 0 <= hp.beta1 < 1 and 0 <= hp.beta2 < 1 and hp.alpha >= 0):
            return False
        key = self._key(param)
        p, m, v = key
        if self._bounds is None or not _same(self._bounds[0], key):  # first use, or an array replaced: read once
            self._bounds = (key, _max_abs(p), _max_abs(m), _max_abs(v))
        _, P, M, V = self._bounds
        G = float(grad_bound)
        limit = float(np.finfo(p.dtype).max) / 16
        A = max(M, G)
        if not (math.isfinite(A) and A < limit and G * G < limit and V < limit):  # NaN fails every comparison
            return False
        rate = hp.alpha / (1.0 - hp.beta1) / hp.eps * (1 + 1e-3)  # alpha_t / (sqrt(v') + eps) at most
        if not (rate < limit and rate * A < limit):  # the intermediates before eta scales them
            return False
        step = hp.eta * rate * A
        if not P + step < limit:
            return False
        grow = 1 + 1e-5  # a few roundings per operation, whatever the dtype
        self._next_bounds = (key, (P + step) * grow, A * grow, max(V, G * G) * grow)
        return True

    def _key(self, param) -> tuple:
        return param.array, self.state["m"], self.state["v"]  # the arrays themselves: an id could be reused

    def serialize(self, serializer):
        """Chainer's, and forget the bounds: loading a snapshot writes new values into the arrays in place."""
        super().serialize(serializer)
        self._bounds = self._next_bounds = None

    def saves_overwritten(self, param) -> bool:
        """Whether the next update of ``param`` can save the values it overwrites (the fused path will run)."""
        state = self._state
        return (state is not None and set(state) == {"m", "v"} and param.grad is not None
                and self._fast_ok(param))

    def _fast_ok(self, param) -> bool:
        hp = self.hyperparam
        arrays = (param.array, param.grad, self.state["m"], self.state["v"])
        return (not hp.amsgrad and not hp.adabound and hp.weight_decay_rate == 0
                and all(type(a) is np.ndarray and a.flags.c_contiguous for a in arrays)
                and param.array.dtype in (np.float32, np.float64)
                and all(a.dtype == param.array.dtype for a in arrays))

    def update_core_cpu(self, param):
        """m += (1-b1)(g-m); v += (1-b2)(g*g-v); p += -eta * alpha_t / (sqrt(v)+eps) * m, per block."""
        if param.grad is None:
            return
        save, self.save_overwritten = self.save_overwritten, None
        check, self.check_overwritten = self.check_overwritten or save is not None, False
        bounds, self._next_bounds = self._next_bounds, None
        if not self._fast_ok(param):
            self._bounds = None
            if save is not None:
                _save_whole(param, self.state, save)
            return super().update_core_cpu(param)
        if save is not None and set(save[1]) != {"m", "v"}:
            _save_whole(param, self.state, save)
            save = None
        hp = self.hyperparam
        dtype = param.array.dtype
        self._check_eps(dtype.type)
        # python floats meet float32 arrays exactly as in Chainer's expressions (cast to the array's dtype)
        c1, c2, eps, neg_eta, alpha_t = 1.0 - hp.beta1, 1.0 - hp.beta2, hp.eps, -hp.eta, self.alpha_t
        p, g = param.array.reshape(-1), param.grad.reshape(-1)
        m, v = self.state["m"].reshape(-1), self.state["v"].reshape(-1)

        failed_parts: list[bool] = []  # one entry per thread whose part of the parameter is not finite
        if save is not None:
            sp, sm, sv = save[0], save[1]["m"], save[1]["v"]
        if check:
            finite = kernels.all_finite_for(dtype)

        def chunk(lo: int, hi: int) -> None:
            buf = scratch("adam.block", (min(BLOCK, hi - lo),), dtype)
            for s in range(lo, hi, BLOCK):
                e = min(s + BLOCK, hi)
                t, gs, ms, vs = buf[:e - s], g[s:e], m[s:e], v[s:e]
                if save is not None:
                    np.copyto(sp[s:e], p[s:e])
                    np.copyto(sm[s:e], ms)
                    np.copyto(sv[s:e], vs)
                np.subtract(gs, ms, out=t)
                t *= c1
                ms += t
                np.multiply(gs, gs, out=t)
                t -= vs
                t *= c2
                vs += t
                np.sqrt(vs, out=t)
                t += eps
                np.divide(alpha_t, t, out=t)
                t *= ms
                t *= neg_eta
                p[s:e] += t
            if check and not finite(p[lo:hi]):  # this thread's part, still partly in cache
                failed_parts.append(True)
        run_chunks(chunk, p.size, min_chunk=2 * BLOCK)
        if check:
            self.overwritten_finite = not failed_parts
        # the bounds carried through this update hold only for the gradients they were derived for: the next
        # update reads the arrays again unless update_stays_finite is asked (and derives them) before it
        self._bounds = bounds if bounds is not None and _same(bounds[0], self._key(param)) else None


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _max_abs(a: np.ndarray) -> float:
    """Largest |value| of ``a`` (NaN if it holds one), without a temporary of its size."""
    return float(max(a.max(), -a.min())) if a.size else 0.0


def _save_whole(param, state: dict, save: tuple) -> None:
    """Honour a save target before an update that cannot save block by block: copy everything first."""
    np.copyto(save[0], param.array.reshape(-1))
    for key, out in save[1].items():
        np.copyto(out, state[key].reshape(-1))


class FastAdam(chainer.optimizers.Adam):
    """Drop-in :class:`chainer.optimizers.Adam` (same hyperparameters, state and snapshots) using
    :class:`FastAdamRule`."""

    def create_update_rule(self):
        """A fused rule sharing this optimizer's hyperparameters."""
        return FastAdamRule(self.hyperparam)
