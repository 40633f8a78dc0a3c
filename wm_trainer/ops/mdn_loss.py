"""The MDN negative log-likelihood: Chainer's composition (the stock path) and one fused FunctionNode (CPU).

NLL per row = -sum_dims logsumexp_k(log_softmax(logits)_k + log N(t | mu_k, exp(log_std_k))). Chainer's
composition of ~15 element-wise functions allocates a (rows, dims, K) temporary per step in forward and
backward; this kernel works on blocks of rows laid out mixture-major (K, rows, dims) so the reductions over
K are slab operations, keeps each block in cache, and (when a backward pass will follow) computes the
gradients in the same sweep.
GPU arrays go to the stock composition, :func:`stock_mdn_nll`.
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


def mdn_log_prob(logits, mu, log_std, target) -> chainer.Variable:
    """log p(target) per row, summed over output dimensions, as Chainer functions: shape (N,)."""
    xp = chainer.backend.get_array_module(target)
    t = target.array if isinstance(target, chainer.Variable) else target
    t = xp.asarray(t, dtype=mu.dtype)[:, :, None]
    t = F.broadcast_to(t, mu.shape)
    z = (t - mu) * F.exp(-log_std)
    log_normal = -0.5 * z * z - log_std - LOG_SQRT_2PI
    log_mix = F.log_softmax(logits, axis=2) + log_normal
    per_dim = F.logsumexp(log_mix, axis=2)
    return F.sum(per_dim, axis=1)


def stock_mdn_nll(logits, mu, log_std, target, reduce: str = "mean") -> chainer.Variable:
    """-:func:`mdn_log_prob`: mean over rows (``'mean'``) or per row (``'no'``); any device, double backprop."""
    _check_reduce(reduce)
    nll = -mdn_log_prob(logits, mu, log_std, target)
    return nll if reduce == "no" else F.mean(nll)


def _block_stats(logits, mu, log_std, target) -> tuple:
    """Mixture-major intermediates of one block (K, rows, dims) and the two log-normalisers.

    s = logits - log_std - z^2 / 2 with z = (mu - t) / sigma (the sign of z is the gradient's); each
    logsumexp keeps its shifted exponentials and their sums, so the two softmaxes of the backward pass
    cost a multiplication each instead of another exp.
    """
    lg = np.ascontiguousarray(logits.transpose(2, 0, 1))
    ls = np.ascontiguousarray(log_std.transpose(2, 0, 1))
    inv = np.negative(ls)
    np.exp(inv, out=inv)
    z = np.subtract(mu.transpose(2, 0, 1), target)
    z *= inv
    q = np.multiply(z, z)
    s = np.multiply(q, -0.5)
    s -= ls
    s += lg
    return z, inv, q, _logsumexp0(s), _logsumexp0(lg)


def _logsumexp0(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logsumexp over axis 0, exp(a - max) written over ``a``, its sum) of a (K, rows, dims) array."""
    m = _slab_reduce(np.maximum, a)
    np.subtract(a, m, out=a)
    np.exp(a, out=a)
    total = _slab_reduce(np.add, a)
    out = np.log(total)
    out += m
    return out, a, total


def _slab_reduce(ufunc: np.ufunc, a: np.ndarray) -> np.ndarray:
    """``ufunc.reduce(a, axis=0)`` as K - 1 element-wise calls on whole slabs: numpy's own reduction over a
    short leading axis runs element by element, slower than the rest of this kernel together."""
    out = ufunc(a[0], a[1]) if len(a) > 1 else a[0].copy()
    for k in range(2, len(a)):
        ufunc(out, a[k], out=out)
    return out


def _block_unit_grads(z, inv, q, exp_s, exp_l) -> tuple:
    """Per-row-unit gradients of one block, mixture-major: (d logits, d mu, d log_std, d target).

    With responsibilities r = softmax_k(s) and pi = softmax_k(logits): d/dlogits = pi - r,
    d/dmu = r z / sigma, d/dlog_std = r (1 - z^2), d/dtarget = -sum_k r z / sigma (z = (mu - t) / sigma).
    """
    r = np.divide(exp_s[1], exp_s[2], out=exp_s[1])
    pi = np.divide(exp_l[1], exp_l[2], out=exp_l[1])
    pi -= r
    g_ls = np.subtract(1.0, q, out=q)
    g_ls *= r
    r *= z
    r *= inv
    g_t = _slab_reduce(np.add, r)
    np.negative(g_t, out=g_t)
    return pi, r, g_ls, g_t


class MDNNegLogLikelihood(function_node.FunctionNode):
    """(logits, mu, log_std (N, D, K), target (N, D)) -> per-row NLL (N,).

    With ``mixtures=K`` the node takes the head's packed output instead: (y (N, D, 3K), target), where
    y's last axis holds [logits | mu | log_std]; its gradient is then written in one buffer, with no split
    on the way in and no concatenation of three gradients on the way back.
    When a backward pass will follow, forward also computes the gradients for a unit upstream gradient
    while the block's intermediates are in cache (backward then only scales them by each row's gradient)
    instead of recomputing everything block by block.
    """

    def __init__(self, mixtures: int | None = None):
        super().__init__()
        self.mixtures = mixtures

    def forward_cpu(self, inputs):
        """Block by block: the per-row sum over dims of -logsumexp_k (and the unit gradients)."""
        keep = chainer.config.enable_backprop
        if self.mixtures is None:
            logits, mu, log_std, target = inputs
            self.unit = tuple(np.empty(a.shape, dtype=a.dtype) for a in inputs) if keep else None
            unit_parts = self.unit
        else:
            y, target = inputs
            k = self.mixtures
            logits, mu, log_std = y[..., :k], y[..., k:2 * k], y[..., 2 * k:]
            self.unit = (np.empty(y.shape, dtype=y.dtype), np.empty(target.shape, dtype=target.dtype)) if keep \
                else None
            unit_parts = None if self.unit is None else (self.unit[0][..., :k], self.unit[0][..., k:2 * k],
                                                         self.unit[0][..., 2 * k:], self.unit[1])
        n, d = target.shape
        out = np.empty(n, dtype=mu.dtype)

        def blocks(first: int, last: int) -> None:
            for lo in range(first * BLOCK_ROWS, min(last * BLOCK_ROWS, n), BLOCK_ROWS):
                sl = slice(lo, lo + BLOCK_ROWS)
                z, inv, q, exp_s, exp_l = _block_stats(logits[sl], mu[sl], log_std[sl], target[sl])
                out[sl] = (exp_l[0] - exp_s[0]).sum(axis=1)
                if keep:
                    g_lg, g_mu, g_ls, g_t = _block_unit_grads(z, inv, q, exp_s, exp_l)
                    for dst, src in zip(unit_parts[:3], (g_lg, g_mu, g_ls)):
                        dst[sl] = src.transpose(1, 2, 0)
                    unit_parts[3][sl] = g_t
        run_chunks(blocks, -(-n // BLOCK_ROWS))
        out += d * LOG_SQRT_2PI
        return out,

    def backward(self, indexes, grad_outputs):
        """The unit gradients from forward, scaled in place by each row's upstream gradient and handed on
        (no second 100+ MB buffer per step); so this node's backward runs once per forward."""
        if chainer.config.enable_backprop:
            raise NotImplementedError("fast mdn_nll has no double backprop; use experiment.ops=chainer")
        if self.unit is None:
            raise RuntimeError("fast mdn_nll's backward already ran on this graph (or forward ran without "
                               "backprop); use experiment.ops=chainer to backpropagate twice")
        gy = grad_outputs[0].array
        grads = [None] * len(self.unit)
        for i in indexes:
            g = self.unit[i]
            w = gy.reshape((-1,) + (1,) * (g.ndim - 1))
            run_chunks(lambda lo, hi, g=g, w=w: np.multiply(g[lo:hi], w[lo:hi], out=g[lo:hi]),
                       len(gy), min_chunk=BLOCK_ROWS)
            grads[i] = chainer.Variable(g)
        self.unit = None
        return tuple(grads)


def _check_reduce(reduce: str) -> None:
    if reduce not in ("mean", "no"):
        raise ValueError(f"reduce must be 'mean' or 'no', got {reduce!r}")


def mdn_nll_packed(y, target, mixtures: int, reduce: str = "mean") -> chainer.Variable:
    """:func:`mdn_nll` of ``MDNHead.packed``'s output y (N, D, 3K) = [logits | mu | log_std], in one node."""
    _check_reduce(reduce)
    arr = y.array if isinstance(y, chainer.Variable) else y
    t = target.array if isinstance(target, chainer.Variable) else target
    if not (type(arr) is np.ndarray and type(t) is np.ndarray and arr.dtype in FLOAT_TYPES):
        return stock_mdn_nll(*F.split_axis(y, 3, axis=2), target, reduce=reduce)
    if not isinstance(target, chainer.Variable):
        target = np.asarray(t, dtype=arr.dtype)
    per_row = MDNNegLogLikelihood(mixtures).apply((y, target))[0]
    return per_row if reduce == "no" else F.mean(per_row)


def mdn_nll(logits, mu, log_std, target, reduce: str = "mean") -> chainer.Variable:
    """:func:`stock_mdn_nll` as one node on CPU arrays of one float dtype (the stock composition otherwise)."""
    _check_reduce(reduce)
    arrays = [v.array if isinstance(v, chainer.Variable) else v for v in (logits, mu, log_std)]
    t = target.array if isinstance(target, chainer.Variable) else target
    dtype = arrays[0].dtype
    if not (all(type(a) is np.ndarray and a.dtype == dtype for a in arrays) and type(t) is np.ndarray
            and dtype in FLOAT_TYPES):
        return stock_mdn_nll(logits, mu, log_std, target, reduce=reduce)
    if not isinstance(target, chainer.Variable):
        target = np.asarray(t, dtype=dtype)
    per_row = MDNNegLogLikelihood().apply((logits, mu, log_std, target))[0]
    return per_row if reduce == "no" else F.mean(per_row)


def joint_mdn_nll_packed(y, target, mixtures: int, reduce: str = "mean") -> chainer.Variable:
    """NLL of a joint mixture over the whole vector: -logsumexp_k(log pi_k + sum_dims log N(t_d | mu_kd, s_kd)).

    ``y`` is ``MDNHead.packed``'s (N, D, 3K) layout; the K mixture logits are dimension 0's (the other
    dimensions' logit columns get no gradient). One component explains every dimension of a row at once, so
    a sample drawn from it changes z coherently (a per-dimension mixture picks each dimension's component
    on its own). Per row, summed over dimensions like :func:`mdn_nll_packed`; Chainer functions on any device.
    """
    _check_reduce(reduce)
    k = mixtures
    xp = chainer.backend.get_array_module(y)
    t = target.array if isinstance(target, chainer.Variable) else target
    t = F.broadcast_to(xp.asarray(t, dtype=y.dtype)[:, :, None], (y.shape[0], y.shape[1], k))
    logits = y[:, 0, :k]
    mu, log_std = y[:, :, k:2 * k], y[:, :, 2 * k:]
    z = (t - mu) * F.exp(-log_std)
    log_normal = F.sum(-0.5 * z * z - log_std, axis=1) - y.shape[1] * LOG_SQRT_2PI
    per_row = -F.logsumexp(F.log_softmax(logits, axis=1) + log_normal, axis=1)
    return per_row if reduce == "no" else F.mean(per_row)
