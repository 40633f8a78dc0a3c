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
"""
from __future__ import annotations

import chainer
import numpy as np
from chainer.optimizers.adam import AdamRule

from extensions import chainer_compat, kernels
from wm_trainer.ops.scratch import scratch
from wm_trainer.ops.threads import run_chunks

BLOCK = 65536  # elements per block: five float32 blocks (1.25 MB) stay in a 2 MB L2, and the ~15 NumPy calls per
# block hold the GIL against the other threads, so blocks are as big as the cache allows


class FastAdamRule(AdamRule):
    """:class:`chainer.optimizers.adam.AdamRule` with a fused, threaded, in-place CPU update."""

    save_overwritten = None  # (param out, {"m": out, "v": out}), flat: set by the toolkit's UpdateBackup
    overwritten_finite = None  # after an update that saved: whether all it wrote into the parameter is finite

    def saves_overwritten(self, param) -> bool:
        """Whether the next update of ``param`` can save the values it overwrites (the fused path will run)."""
        state = self.state  # None before the first update
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
        check = save is not None
        if not self._fast_ok(param):
            if save is not None:
                _save_whole(param, self.state, save)
            return super().update_core_cpu(param)
        if save is not None and set(save[1]) != {"m", "v"}:
            _save_whole(param, self.state, save)
            save = None
        hp = self.hyperparam
        dtype = param.array.dtype
        chainer_compat.check_adam_eps(self, dtype.type)
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
