"""M: the MDN-RNN learns two modes where one Gaussian cannot, and its done head and loss."""
from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
import pytest

from wm_trainer.data.latents import LatentSet, SequenceIterator, sequence_converter
from wm_trainer.models.memory import MDNRNN, weighted_sigmoid_bce


def _train(model: MDNRNN, it: SequenceIterator, iterations: int) -> list[float]:
    opt = chainer.optimizers.Adam(alpha=1e-2)
    opt.setup(model)
    losses = []
    for _ in range(iterations):
        batch = sequence_converter(next(it))
        model.cleargrads()
        loss = model.loss(**batch)
        loss.backward()
        opt.update()
        losses.append(float(loss.array))
    return losses


def _held_out_nll(model: MDNRNN, it: SequenceIterator) -> float:
    with chainer.no_backprop_mode(), chainer.using_config("train", False):
        obs = chainer.reporter.Reporter()
        with obs.scope(obs.observation):
            obs.add_observer("m", model)
            vals = [float(model.loss(**sequence_converter(next(it))).array) for _ in range(3)]
    return float(np.mean(vals))


def test_mdnrnn_learns_two_modes_and_beats_single_gaussian(two_mode_episodes):
    data = LatentSet(two_mode_episodes(40, 40, 2, seed=0))
    fresh = SequenceIterator(LatentSet(two_mode_episodes(10, 40, 2, seed=1)), batch_size=32, seq_len=10, seed=9)
    results = {}
    for k in (5, 1):
        np.random.seed(0)
        model = MDNRNN(2, 1, hidden=16, mixtures=k, done_head=False)
        losses = _train(model, SequenceIterator(data, batch_size=16, seq_len=10, seed=1), 200)
        results[k] = _held_out_nll(model, fresh)
        if k == 5:
            assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0
    # a Gaussian fit to +-1 has per-dim NLL ~1.4; two narrow modes get well below 0
    assert results[1] > 1.2
    assert results[5] < results[1] - 1.0, results


def test_weighted_done_loss_matches_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(12).astype(np.float32)
    y = rng.random(12) < 0.3
    mask = np.ones(12, bool)
    mask[-2:] = False
    got = float(weighted_sigmoid_bce(chainer.Variable(x), y, 10.0, mask).array)
    s = 1 / (1 + np.exp(-x.astype(np.float64)))
    per = -(10.0 * y * np.log(s) + (1 - y) * np.log(1 - s))
    assert got == pytest.approx(per[:10].mean(), rel=1e-5)


def test_done_head_learns_episode_ends(two_mode_episodes):
    data = LatentSet(two_mode_episodes(4, 12, 2, seed=0))
    np.random.seed(0)
    model = MDNRNN(2, 1, hidden=16, mixtures=2, done_head=True, done_weight=10.0)
    it = SequenceIterator(data, batch_size=16, seq_len=12, seed=0)
    _train(model, it, 60)
    b = sequence_converter(next(it))
    with chainer.no_backprop_mode():
        hs, _ = model.rnn.forward_seq(F.concat((b["z_in"], b["a"]), axis=2))
        logit = model.predict(F.reshape(hs, (-1, 16)))[3].array.reshape(16, 12)
    pos, neg = logit[b["done"]], logit[b["done_mask"] & ~b["done"]]
    assert pos.mean() > neg.mean() + 1.0
