"""The MDN head's maths: NLL against brute force, gradients, and sampling statistics."""
from __future__ import annotations

import math

import chainer
import numpy as np
import pytest
from chainer import gradient_check

from wm_trainer.models.mdn import MDNHead, mdn_moments, mdn_nll, mdn_sample


def brute_force_nll(logits, mu, log_std, target):
    """Per row: -sum_d log sum_k pi_k N(t_d | mu_dk, sigma_dk), looping in plain Python."""
    n, d, k = mu.shape
    out = np.zeros(n)
    for i in range(n):
        total = 0.0
        for j in range(d):
            w = np.exp(logits[i, j] - logits[i, j].max())
            w /= w.sum()
            dens = 0.0
            for m in range(k):
                s = math.exp(log_std[i, j, m])
                dens += w[m] * math.exp(-0.5 * ((target[i, j] - mu[i, j, m]) / s) ** 2) / (s * math.sqrt(2 * math.pi))
            total += math.log(dens)
        out[i] = -total
    return out


def random_params(rng, n=6, d=4, k=3):
    return (rng.standard_normal((n, d, k)), rng.standard_normal((n, d, k)),
            0.5 * rng.standard_normal((n, d, k)), rng.standard_normal((n, d)))


@pytest.mark.parametrize("ops", ["fast", "chainer"])
def test_nll_matches_brute_force(ops):
    rng = np.random.default_rng(1)
    with chainer.using_config("wm_ops", ops):
        for _ in range(5):
            logits, mu, log_std, t = random_params(rng)
            per_row = mdn_nll(logits, mu, log_std, t, reduce="no").array
            np.testing.assert_allclose(per_row, brute_force_nll(logits, mu, log_std, t), rtol=1e-10)
            assert np.isclose(float(mdn_nll(logits, mu, log_std, t).array), per_row.mean())


def test_nll_is_stable_far_from_every_mixture():
    logits, mu, log_std, _ = random_params(np.random.default_rng(2))
    t = np.full(mu.shape[:2], 200.0)
    assert np.isfinite(mdn_nll(logits, mu, log_std, t).array)


@pytest.mark.parametrize("ops", ["fast", "chainer"])
def test_nll_gradient_check(ops):
    rng = np.random.default_rng(3)
    logits, mu, log_std, t = random_params(rng, n=3, d=2, k=3)

    def f(lg, m, ls):
        return mdn_nll(lg, m, ls, t)

    with chainer.using_config("wm_ops", ops):
        gradient_check.check_backward(f, (logits, mu, log_std), np.array(1.0), dtype=np.float64,
                                      atol=1e-6, rtol=1e-5)


def test_samples_match_mixture_moments_at_tau_one():
    rng = np.random.default_rng(4)
    logits, mu, log_std, _ = random_params(rng, n=1, d=2, k=3)
    reps = 60000
    lg, m, ls = (np.repeat(a, reps, axis=0) for a in (logits, mu, log_std))
    s = mdn_sample(lg, m, ls, tau=1.0, rng=rng)
    mean, var = mdn_moments(logits, mu, log_std)
    np.testing.assert_allclose(s.mean(axis=0), mean[0], atol=0.03)
    np.testing.assert_allclose(s.var(axis=0), var[0], rtol=0.05)


def test_temperature_scales_sigma_not_variance():
    rng = np.random.default_rng(5)
    n = 50000
    logits = np.zeros((n, 1, 1))
    mu = np.zeros((n, 1, 1))
    log_std = np.full((n, 1, 1), math.log(2.0))
    for tau in (0.25, 1.0, 2.0):
        s = mdn_sample(logits, mu, log_std, tau=tau, rng=rng)
        # sigma * sqrt(tau) => variance 4 * tau (squaring sigma twice would give 16 * tau)
        assert abs(s.var() / (4.0 * tau) - 1.0) < 0.05


def test_low_temperature_picks_the_dominant_mixture():
    rng = np.random.default_rng(6)
    n = 4000
    logits = np.tile(np.array([[[0.0, 1.0]]]), (n, 1, 1))
    mu = np.tile(np.array([[[-5.0, 5.0]]]), (n, 1, 1))
    log_std = np.full((n, 1, 2), -3.0)
    hi = (mdn_sample(logits, mu, log_std, tau=1.0, rng=rng) > 0).mean()
    lo = (mdn_sample(logits, mu, log_std, tau=0.05, rng=rng) > 0).mean()
    assert abs(hi - 1 / (1 + math.exp(-1))) < 0.03 and lo > 0.999


def test_head_shapes():
    head = MDNHead(8, 3, 5)
    logits, mu, log_std = head(np.zeros((4, 8), np.float32))
    assert logits.shape == mu.shape == log_std.shape == (4, 3, 5)
    loss = mdn_nll(logits, mu, log_std, np.zeros((4, 3), np.float32))
    loss.backward()
    assert head.linear.W.grad is not None and chainer.backend.get_array_module(loss.array) is np


def brute_force_joint_nll(logits, mu, log_std, target):
    """Per row: -log sum_k pi_k prod_d N(t_d | mu_dk, sigma_dk), pi from dimension 0's logits, in plain Python."""
    n, d, k = mu.shape
    out = np.zeros(n)
    for i in range(n):
        w = np.exp(logits[i, 0] - logits[i, 0].max())
        w /= w.sum()
        dens = 0.0
        for m in range(k):
            p = w[m]
            for j in range(d):
                s = math.exp(log_std[i, j, m])
                p *= math.exp(-0.5 * ((target[i, j] - mu[i, j, m]) / s) ** 2) / (s * math.sqrt(2 * math.pi))
            dens += p
        out[i] = -math.log(dens)
    return out


def test_joint_nll_matches_brute_force_and_its_gradients():
    from wm_trainer.ops import joint_mdn_nll_packed

    rng = np.random.default_rng(4)
    for _ in range(3):
        logits, mu, log_std, t = random_params(rng)
        y = np.concatenate([logits, mu, log_std], axis=2)
        per_row = joint_mdn_nll_packed(y, t, 3, reduce="no").array
        np.testing.assert_allclose(per_row, brute_force_joint_nll(logits, mu, log_std, t), rtol=1e-10)
        # not the per-dimension mixture's NLL
        assert not np.allclose(per_row, brute_force_nll(logits, mu, log_std, t))
    logits, mu, log_std, t = random_params(rng, n=3, d=2, k=3)
    y = np.concatenate([logits, mu, log_std], axis=2)
    gradient_check.check_backward(lambda v: joint_mdn_nll_packed(v, t, 3), (y,), np.array(1.0), dtype=np.float64,
                                  atol=1e-6, rtol=1e-5)
