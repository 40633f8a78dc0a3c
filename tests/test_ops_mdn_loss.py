"""Fused MDN negative log-likelihood: gradients and equality with the stock composition, and the ops switch."""
from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
import pytest
from chainer import gradient_check

from wm_trainer.models import mdn
from wm_trainer.ops.mdn_loss import BLOCK_ROWS, MDNNegLogLikelihood, mdn_nll, mdn_nll_packed, stock_mdn_nll


def test_gradients_check_in_float64():
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s) for s in [(7, 3, 4), (7, 3, 4), (7, 3, 4), (7, 3)]]
    gradient_check.check_backward(lambda *a: MDNNegLogLikelihood().apply(a), args, rng.standard_normal(7),
                                  dtype=np.float64)


def test_packed_gradients_check_in_float64():
    rng = np.random.default_rng(3)
    args = [rng.standard_normal((6, 3, 12)), rng.standard_normal((6, 3))]
    gradient_check.check_backward(lambda *a: MDNNegLogLikelihood(mixtures=4).apply(a), args,
                                  rng.standard_normal(6), dtype=np.float64)


@pytest.mark.parametrize("reduce", ["mean", "no"])
def test_packed_matches_stock_composition_across_blocks(reduce):
    rng = np.random.default_rng(4)
    rows = BLOCK_ROWS + 7
    y = rng.standard_normal((rows, 3, 15)).astype(np.float32)
    target = rng.standard_normal((rows, 3)).astype(np.float32)
    results = []
    for fast in (False, True):
        yv = chainer.Variable(y.copy())
        out = mdn_nll_packed(yv, target, 5, reduce=reduce) if fast else \
            stock_mdn_nll(*F.split_axis(yv, 3, axis=2), target, reduce=reduce)
        if fast:
            assert isinstance((out if reduce == "no" else out.creator.inputs[0]).creator, MDNNegLogLikelihood)
        (F.sum(out) if reduce == "no" else out).backward()
        results.append((out.array, yv.grad))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)


def test_packed_dispatch_follows_the_ops_switch():
    from wm_trainer import ops

    rng = np.random.default_rng(5)
    y = rng.standard_normal((4, 2, 6)).astype(np.float32)
    target = rng.standard_normal((4, 2)).astype(np.float32)
    fast = mdn.mdn_nll_packed(y, target, 2, reduce="no")
    ops.select("chainer")
    try:
        stock = mdn.mdn_nll_packed(y, target, 2, reduce="no")
    finally:
        ops.select("fast")
    assert isinstance(fast.creator, MDNNegLogLikelihood) and not isinstance(stock.creator, MDNNegLogLikelihood)
    np.testing.assert_allclose(fast.array, stock.array, rtol=1e-5)


@pytest.mark.parametrize("reduce", ["mean", "no"])
def test_matches_stock_composition_on_split_head_output_across_blocks(reduce):
    rng = np.random.default_rng(1)
    rows = BLOCK_ROWS + 5  # more than one block
    y = rng.standard_normal((rows, 2, 9)).astype(np.float32)
    target = rng.standard_normal((rows, 2)).astype(np.float32)
    results = []
    for fn in (stock_mdn_nll, mdn_nll):
        yv = chainer.Variable(y.copy())
        out = fn(*F.split_axis(yv, 3, axis=2), target, reduce=reduce)
        (F.sum(out) if reduce == "no" else out).backward()
        results.append((out.array, yv.grad))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)


def test_bad_reduce_is_an_error():
    z = np.zeros((2, 1, 1), np.float32)
    with pytest.raises(ValueError, match="reduce"):
        mdn_nll(z, z, z, np.zeros((2, 1), np.float32), reduce="sum")


def test_unsupported_dtype_falls_back_to_the_stock_composition():
    rng = np.random.default_rng(2)
    args = [rng.standard_normal(s).astype(np.float16) for s in [(3, 2, 2), (3, 2, 2), (3, 2, 2)]]
    target = rng.standard_normal((3, 2)).astype(np.float16)
    out = mdn_nll(*args, target, reduce="no")
    assert not isinstance(out.creator, MDNNegLogLikelihood)
    np.testing.assert_allclose(out.array, stock_mdn_nll(*args, target, reduce="no").array, rtol=1e-3)


def test_second_backward_on_the_same_graph_is_a_clear_error():
    rng = np.random.default_rng(6)
    y = chainer.Variable(rng.standard_normal((5, 2, 6)).astype(np.float32))
    loss = mdn_nll_packed(y, rng.standard_normal((5, 2)).astype(np.float32), 2)
    loss.backward(retain_grad=True)
    with pytest.raises(RuntimeError, match="experiment.ops=chainer"):
        loss.backward()


def test_packed_unsupported_dtype_falls_back_to_the_stock_composition():
    rng = np.random.default_rng(7)
    y = rng.standard_normal((3, 2, 6)).astype(np.float16)
    target = rng.standard_normal((3, 2)).astype(np.float16)
    out = mdn_nll_packed(y, target, 2, reduce="no")
    assert not isinstance(out.creator, MDNNegLogLikelihood)
    np.testing.assert_allclose(out.array, stock_mdn_nll(*F.split_axis(y, 3, axis=2), target, reduce="no").array,
                               rtol=1e-3)
