"""The MDN negative log-likelihood as one Chainer FunctionNode (CPU), equal to ``wm_trainer.mdn.mdn_nll``.

NLL per row = -sum_dims logsumexp_k(log_softmax(logits)_k + log N(t | mu_k, exp(log_std_k))). Chainer's
composition of ~15 element-wise functions allocates a (rows, dims, K) temporary per step in forward and
backward; this kernel works on blocks of rows laid out mixture-major (K, rows, dims) so the reductions over
K are slab operations, keeps each block in cache, and (when a backward pass will follow) computes the
gradients in the same sweep.
GPU arrays go to the stock composition.
"""
from __future__ import annotations

import math

import chainer
import chainer.functions as F
import numpy as np
from chainer import function_node

from wm_trainer.ops.conv import FLOAT_TYPES
from wm_trainer.ops.threads import run_chunks

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
BLOCK_ROWS = 1024


def _block_stats(logits, mu, log_std, target):
    """Mixture-major intermediates of one block: (lg, zs, inv, s, lse_s, lse_l); s = lg - zs^2/2 - log_std."""
    lg = np.ascontiguousarray(logits.transpose(2, 0, 1))
    ls = np.ascontiguousarray(log_std.transpose(2, 0, 1))
    inv = np.negative(ls)
    np.exp(inv, out=inv)
    zs = np.subtract(target, mu.transpose(2, 0, 1))
    zs *= inv
    s = np.multiply(zs, zs)
    s *= -0.5
    s -= ls
    s += lg
    return lg, zs, inv, s, _logsumexp0(s), _logsumexp0(lg)


def _logsumexp0(a: np.ndarray) -> np.ndarray:
    """logsumexp over axis 0 of a (K, rows, dims) array, slab by slab."""
    m = a.max(axis=0)
    e = np.subtract(a, m)
    np.exp(e, out=e)
    out = e.sum(axis=0)
    np.log(out, out=out)
    out += m
    return out


def _block_unit_grads(lg, zs, inv, s, lse_s, lse_l) -> tuple:
    """Per-row-unit gradients of one block, mixture-major: (d logits, d mu, d log_std, d target).

    With responsibilities r = softmax_k(s) and pi = softmax_k(logits): d/dlogits = pi - r,
    d/dmu = -r zs / sigma, d/dlog_std = r (1 - zs^2), d/dtarget = sum_k r zs / sigma.
    """
    r = np.subtract(s, lse_s, out=s)
    np.exp(r, out=r)
    pi = np.subtract(lg, lse_l, out=lg)
    np.exp(pi, out=pi)
    pi -= r
    g_ls = np.multiply(zs, zs)
    np.subtract(1.0, g_ls, out=g_ls)
    g_ls *= r
    r *= zs
    r *= inv
    g_t = r.sum(axis=0)
    np.negative(r, out=r)
    return pi, r, g_ls, g_t


class MDNNegLogLikelihood(function_node.FunctionNode):
    """(logits, mu, log_std (N, D, K), target (N, D)) -> per-row NLL (N,).

    When a backward pass will follow, forward also computes the gradients for a unit upstream gradient
    while the block's intermediates are in cache (backward then only scales them by each row's gradient)
    instead of recomputing everything block by block.
    """

    def forward_cpu(self, inputs):
        """Block by block: the per-row sum over dims of -logsumexp_k (and the unit gradients)."""
        logits, mu, log_std, target = inputs
        n, d = target.shape
        out = np.empty(n, dtype=mu.dtype)
        keep = chainer.config.enable_backprop
        if keep:
            self.unit = tuple(np.empty(a.shape, dtype=a.dtype) for a in (logits, mu, log_std, target))
        else:
            self.unit = None

        def blocks(first: int, last: int) -> None:
            for lo in range(first * BLOCK_ROWS, min(last * BLOCK_ROWS, n), BLOCK_ROWS):
                sl = slice(lo, lo + BLOCK_ROWS)
                lg, zs, inv, s, lse_s, lse_l = _block_stats(logits[sl], mu[sl], log_std[sl], target[sl])
                out[sl] = (lse_l - lse_s).sum(axis=1)
                if keep:
                    g_lg, g_mu, g_ls, g_t = _block_unit_grads(lg, zs, inv, s, lse_s, lse_l)
                    for dst, src in zip(self.unit[:3], (g_lg, g_mu, g_ls)):
                        dst[sl] = src.transpose(1, 2, 0)
                    self.unit[3][sl] = g_t
        run_chunks(blocks, -(-n // BLOCK_ROWS))
        out += d * LOG_SQRT_2PI
        return out,

    def backward(self, indexes, grad_outputs):
        """The unit gradients from forward, scaled by each row's upstream gradient."""
        if chainer.config.enable_backprop:
            raise NotImplementedError("fast mdn_nll has no double backprop; use experiment.ops=chainer")
        gy = grad_outputs[0].array
        grads = [None] * 4
        for i in indexes:
            unit = self.unit[i]
            g = np.empty_like(unit)
            w = gy.reshape((-1,) + (1,) * (unit.ndim - 1))
            run_chunks(lambda lo, hi, unit=unit, g=g, w=w: np.multiply(unit[lo:hi], w[lo:hi], out=g[lo:hi]),
                       len(gy), min_chunk=BLOCK_ROWS)
            grads[i] = chainer.Variable(g)
        return tuple(grads)


def mdn_nll(logits, mu, log_std, target, reduce: str = "mean"):
    """Drop-in for :func:`wm_trainer.mdn.mdn_nll`: mean over rows (``'mean'``) or per row (``'no'``)."""
    from wm_trainer import mdn

    if reduce not in ("mean", "no"):
        raise ValueError(f"reduce must be 'mean' or 'no', got {reduce!r}")
    arrays = [v.array if isinstance(v, chainer.Variable) else v for v in (logits, mu, log_std)]
    t = target.array if isinstance(target, chainer.Variable) else target
    dtype = arrays[0].dtype
    if not (all(type(a) is np.ndarray and a.dtype == dtype for a in arrays) and type(t) is np.ndarray
            and dtype in FLOAT_TYPES):
        nll = -mdn.mdn_log_prob(logits, mu, log_std, target)  # the stock composition (no dispatch back here)
        return nll if reduce == "no" else F.mean(nll)
    if not isinstance(target, chainer.Variable):
        target = np.asarray(t, dtype=dtype)
    per_row = MDNNegLogLikelihood().apply((logits, mu, log_std, target))[0]
    return per_row if reduce == "no" else F.mean(per_row)
