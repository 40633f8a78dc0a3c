"""Mixture Density Network head: per output dimension K logits, means and log-stds.

The NLL sums LOG densities over output dimensions and takes a logsumexp over mixtures
(never the log of a sum of densities); sampling at temperature tau divides the logits by
tau and scales sigma = exp(log_std) -- not the variance -- by sqrt(tau). M (memory.py)
and the toy example share this module. The NLL itself (Chainer's composition and the fused
CPU kernel) lives in the lower layer, :mod:`wm_trainer.ops.mdn_loss`; :func:`mdn_nll` and
:func:`mdn_nll_packed` here are :mod:`wm_trainer.ops`' switch between the two.
"""
from __future__ import annotations

import math

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np

from ..ops import mdn_nll, mdn_nll_packed
from ..ops.mdn_loss import mdn_log_prob

__all__ = ["MDNHead", "mdn_log_prob", "mdn_moments", "mdn_nll", "mdn_nll_packed", "mdn_sample"]


class MDNHead(chainer.Chain):
    """Linear layer giving (logits, mu, log_std), each of shape (N, out_dim, mixtures)."""

    def __init__(self, in_size: int | None, out_dim: int, mixtures: int):
        super().__init__()
        self.out_dim, self.mixtures = out_dim, mixtures
        with self.init_scope():
            self.linear = L.Linear(in_size, out_dim * mixtures * 3)

    def forward(self, h: chainer.Variable) -> tuple[chainer.Variable, chainer.Variable, chainer.Variable]:
        """Mixture parameters for each row of ``h``."""
        logits, mu, log_std = F.split_axis(self.packed(h), 3, axis=2)
        return logits, mu, log_std

    def packed(self, h: chainer.Variable) -> chainer.Variable:
        """The mixture parameters unsplit, (N, out_dim, 3K) = [logits | mu | log_std] (for mdn_nll_packed)."""
        y = self.linear(h)
        return F.reshape(y, (y.shape[0], self.out_dim, 3 * self.mixtures))


def _arr(x):
    return x.array if isinstance(x, chainer.Variable) else x


def mdn_sample(logits, mu, log_std, tau: float = 1.0, rng: np.random.Generator | None = None):
    """One sample per row and dimension at temperature ``tau``: shape (N, out_dim).

    Mixture chosen from softmax(logits / tau); value mu_k + exp(log_std_k) * sqrt(tau) * eps.
    """
    logits, mu, log_std = _arr(logits), _arr(mu), _arr(log_std)
    xp = chainer.backend.get_array_module(mu)
    rng = rng if rng is not None else np.random.default_rng()
    tau = max(float(tau), 1e-6)
    scaled = logits / tau
    scaled = scaled - scaled.max(axis=2, keepdims=True)
    probs = xp.exp(scaled)
    probs /= probs.sum(axis=2, keepdims=True)
    cdf = xp.cumsum(probs, axis=2)
    u = xp.asarray(rng.random(cdf.shape[:2]), dtype=cdf.dtype)[:, :, None]
    k = xp.minimum((cdf < u).sum(axis=2), cdf.shape[2] - 1)
    idx = k[:, :, None]
    mu_k = xp.take_along_axis(mu, idx, axis=2)[:, :, 0]
    sd_k = xp.exp(xp.take_along_axis(log_std, idx, axis=2)[:, :, 0])
    eps = xp.asarray(rng.standard_normal(mu_k.shape), dtype=mu.dtype)
    return mu_k + sd_k * math.sqrt(tau) * eps


def mdn_moments(logits, mu, log_std) -> tuple[np.ndarray, np.ndarray]:
    """The mixture's mean and variance per row and dimension (at tau = 1)."""
    logits, mu, log_std = _arr(logits), _arr(mu), _arr(log_std)
    xp = chainer.backend.get_array_module(mu)
    p = xp.exp(logits - logits.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)
    mean = (p * mu).sum(axis=2)
    second = (p * (xp.exp(2 * log_std) + mu * mu)).sum(axis=2)
    return mean, second - mean * mean
