"""Activations fused into the fast kernels: the ReLU backward mask, and sigmoid + summed squared error.

Chainer runs ``F.relu`` and ``F.sigmoid`` as separate nodes with fresh arrays each way, on one core and
in whatever memory order the conv kernels left; fused, the ReLU costs one in-cache pass in the forward
and one masked copy in the backward, and the VAE's output sigmoid, squared error and sum are one node.
"""
from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
from chainer import function_node

from wm_trainer.ops.scratch import scratch
from wm_trainer.ops.threads import run_chunks


def memory_order(a: np.ndarray) -> tuple[int, ...]:
    """The axis permutation that makes ``a.transpose(perm)`` follow ``a``'s memory (largest stride first)."""
    return tuple(int(i) for i in np.argsort([-abs(s) for s in a.strides], kind="stable"))


def relu_grad(gy: np.ndarray, y: np.ndarray, name: str) -> np.ndarray:
    """``gy * (y > 0)`` for a ReLU output ``y``, in ``y``'s memory order, in a scratch buffer named ``name``.

    The result lives until the next call with the same name and shape: consume it inside one backward.
    """
    perm = memory_order(y)
    y_p = y.transpose(perm)
    if not y_p.flags.c_contiguous:
        perm, y_p = tuple(range(y.ndim)), np.ascontiguousarray(y)
    gy_p = gy.transpose(perm)
    out = scratch(name, y_p.shape, gy.dtype)
    mask = scratch(name + ".mask", y_p.shape, np.bool_)

    def chunk(lo: int, hi: int) -> None:
        np.multiply(gy_p[lo:hi], np.greater(y_p[lo:hi], 0, out=mask[lo:hi]), out=out[lo:hi])
    run_chunks(chunk, y_p.shape[0])
    return out.transpose(np.argsort(perm))


def add_bias_relu(y: np.ndarray, b: np.ndarray | None, relu: bool, threads: bool = True) -> None:
    """In place: ``y += b`` (``b`` broadcast against ``y``) then ``max(y, 0)``, over threads along axis 0
    (``threads=False``: in the calling thread, e.g. from inside another chunk)."""
    if b is None and not relu:
        return

    def chunk(lo: int, hi: int) -> None:
        part = y[lo:hi]
        if b is not None:
            part += b
        if relu:
            np.maximum(part, 0, out=part)
    if threads:
        run_chunks(chunk, y.shape[0])
    else:
        chunk(0, y.shape[0])


class SigmoidSquaredError(function_node.FunctionNode):
    """sum((sigmoid(logits) - x) ** 2) as one node (the VAE's reconstruction term before the batch mean)."""

    def forward_cpu(self, inputs):
        """Chainer's sigmoid formula (tanh), the difference and its sum of squares, in the logits' memory order,
        over threads along the batch (partial sums added in a fixed order)."""
        logits, x = inputs
        perm = memory_order(logits)
        lg, xt = logits.transpose(perm), x.transpose(perm)
        s, d = np.empty_like(lg), np.empty_like(lg)
        batch_axis = perm.index(0)
        n = lg.shape[batch_axis]
        partial = np.zeros(n, dtype=logits.dtype)

        def chunk(lo: int, hi: int) -> None:
            sl = (slice(None),) * batch_axis + (slice(lo, hi),)
            sp, dp = s[sl], d[sl]
            np.multiply(lg[sl], logits.dtype.type(0.5), out=sp)
            np.tanh(sp, out=sp)
            sp *= 0.5
            sp += 0.5
            np.subtract(sp, xt[sl], out=dp)
            partial[lo] = np.square(dp).sum(dtype=dp.dtype)
        run_chunks(chunk, n)
        if chainer.config.enable_backprop:
            inv = tuple(int(i) for i in np.argsort(perm))
            self.s, self.d = s.transpose(inv), d.transpose(inv)
        return np.asarray(partial.sum(dtype=logits.dtype), dtype=logits.dtype),

    def backward(self, indexes, grad_outputs):
        """d/dlogits = 2 g d s (1 - s), d/dx = -2 g d (first order only)."""
        if chainer.config.enable_backprop:
            raise NotImplementedError("fused sigmoid_squared_error has no double backprop; use experiment.ops=chainer")
        two_g = self.d.dtype.type(2 * grad_outputs[0].array)
        grads = [None, None]
        if 0 in indexes:
            gl = np.empty_like(self.s)  # same memory order as s (the logits')

            def chunk(lo: int, hi: int) -> None:
                sp, dp, gp = self.s[lo:hi], self.d[lo:hi], gl[lo:hi]
                np.subtract(1, sp, out=gp)
                gp *= sp
                gp *= dp
                gp *= two_g
            run_chunks(chunk, gl.shape[0])
            grads[0] = chainer.Variable(gl)
        if 1 in indexes:
            grads[1] = chainer.Variable(self.d * -two_g)
        return tuple(grads)


def sigmoid_squared_error(logits, x) -> chainer.Variable:
    """``F.sum(F.squared_difference(F.sigmoid(logits), x))`` as one node; Chainer's functions on GPU arrays."""
    la = logits.array if isinstance(logits, chainer.Variable) else logits
    xa = x.array if isinstance(x, chainer.Variable) else x
    if type(la) is not np.ndarray or type(xa) is not np.ndarray or la.dtype != xa.dtype or la.shape != xa.shape:
        return F.sum(F.squared_difference(F.sigmoid(logits), x))
    return SigmoidSquaredError().apply((logits, x))[0]
