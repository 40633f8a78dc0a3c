"""Fused kernels: conv/deconv + bias + ReLU nodes, sigmoid + squared error, FastAdam; the ConvVAE built on them."""
from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
import pytest
from chainer import gradient_check

from wm_trainer import ops
from wm_trainer.models.vision import ConvVAE
from wm_trainer.ops import convolution_2d, deconvolution_2d
from wm_trainer.ops.activation import SigmoidSquaredError, sigmoid_squared_error
from wm_trainer.ops.adam import FastAdam
from wm_trainer.ops.conv import Convolution2DFast
from wm_trainer.ops.deconv import Deconvolution2DFast

FUSED_CASES = [("conv", (2, 3, 9, 8), (4, 3, 4, 4), 2), ("deconv", (2, 3, 4, 5), (3, 4, 5, 4), 2),
               ("deconv", (3, 5, 1, 1), (5, 4, 5, 5), 2), ("deconv", (2, 2, 3, 4), (2, 3, 6, 6), 2)]


@pytest.fixture
def restore_ops():
    before = getattr(chainer.global_config, "wm_ops", "fast")
    yield
    ops.select(before)


@pytest.mark.parametrize("kind,x_shape,w_shape,stride", FUSED_CASES)
def test_fused_relu_matches_chainer_and_gradients_check(kind, x_shape, w_shape, stride):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0 if kind == "conv" else 1])
    fast, stock, node = ((convolution_2d, F.convolution_2d, Convolution2DFast) if kind == "conv"
                         else (deconvolution_2d, F.deconvolution_2d, Deconvolution2DFast))
    pre = stock(x, w, b, stride).array
    assert np.abs(pre).min() > 1e-3  # no pre-activation near the kink, so finite differences are valid
    y = fast(x, w, b, stride, relu=True)
    assert isinstance(y.creator, node) and y.creator.relu
    np.testing.assert_allclose(y.array, np.maximum(pre, 0), rtol=1e-10, atol=1e-10)
    gy = rng.standard_normal(y.shape)
    gradient_check.check_backward(lambda *a: fast(*a, stride=stride, relu=True), (x, w, b), gy,
                                  dtype=np.float64, eps=1e-4)


def test_fused_relu_falls_back_to_chainer_with_relu_applied():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((1, 2, 7, 7)), rng.standard_normal((2, 2, 3, 3))
    y = convolution_2d(x, w, dilate=2, relu=True)
    assert not isinstance(y.creator, Convolution2DFast)
    np.testing.assert_allclose(y.array, np.maximum(F.convolution_2d(x, w, dilate=2).array, 0))
    y = deconvolution_2d(x, w, stride=2, outsize=(16, 16), relu=True)
    np.testing.assert_allclose(y.array, np.maximum(F.deconvolution_2d(x, w, stride=2, outsize=(16, 16)).array, 0))


def test_sigmoid_squared_error_matches_chainer_and_gradients_check():
    rng = np.random.default_rng(2)
    logits, x = rng.standard_normal((3, 2, 4, 5)), rng.random((3, 2, 4, 5))
    y = sigmoid_squared_error(logits, x)
    assert isinstance(y.creator, SigmoidSquaredError) and y.shape == ()
    ref = F.sum(F.squared_difference(F.sigmoid(logits), x))
    np.testing.assert_allclose(y.array, ref.array, rtol=1e-12)
    gradient_check.check_backward(sigmoid_squared_error, (logits, x), rng.standard_normal(()), dtype=np.float64)
    # other layouts in memory (the deconv kernel hands over channel-major arrays) give the same value
    cm = np.ascontiguousarray(logits.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
    np.testing.assert_allclose(sigmoid_squared_error(cm, x).array, ref.array, rtol=1e-12)


def _loss_and_grads(model: ConvVAE, x: np.ndarray) -> tuple[float, dict]:
    np.random.seed(5)  # the same reparameterisation noise for both models
    model.cleargrads()
    loss = model.loss(x)
    loss.backward()
    return float(loss.array), {n: p.grad.copy() for n, p in model.namedparams()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_convvae_loss_and_gradients_match_stock_chainer(dtype, restore_ops):
    with chainer.using_config("dtype", dtype):
        ops.select("chainer")
        stock = ConvVAE(8)
        ops.select("fast")
        fast = ConvVAE(8)
    fast.copyparams(stock)
    x = np.random.default_rng(3).random((4, 3, 64, 64)).astype(dtype)
    (l_s, g_s), (l_f, g_f) = _loss_and_grads(stock, x), _loss_and_grads(fast, x)
    assert isinstance(fast.conv0(x).creator, Convolution2DFast) and fast.conv0(x).creator.relu
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(l_f, l_s, **tol)
    for name, g in g_s.items():
        assert g_f[name].dtype == dtype
        np.testing.assert_allclose(g_f[name], g, err_msg=name, **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_adam_equals_chainer_adam_bit_for_bit(dtype):
    from wm_trainer.ops.threads import get_threads, set_threads

    rng = np.random.default_rng(4)

    class Net(chainer.Chain):
        def __init__(self):
            super().__init__()
            with self.init_scope():
                # two threads' parts of several blocks each, the last one partial
                self.big = chainer.Parameter(rng.standard_normal((1100, 500)).astype(dtype))
                self.small = chainer.Parameter(rng.standard_normal(7).astype(dtype))
                self.no_grad = chainer.Parameter(rng.standard_normal(3).astype(dtype))

    stock, fast = Net(), Net()
    fast.copyparams(stock)
    start = stock.big.array.copy()
    opt_s, opt_f = chainer.optimizers.Adam(1e-2), FastAdam(1e-2)
    opt_s.setup(stock)
    opt_f.setup(fast)
    before = get_threads()
    try:
        set_threads(2)
        for _ in range(4):
            for name in ("big", "small"):
                g = rng.standard_normal(getattr(stock, name).shape).astype(dtype)
                getattr(stock, name).grad = g
                getattr(fast, name).grad = g.copy()
            opt_s.update()
            opt_f.update()
    finally:
        set_threads(before)
    for (name, p_s), (_, p_f) in zip(sorted(stock.namedparams()), sorted(fast.namedparams())):
        np.testing.assert_array_equal(p_f.array, p_s.array, err_msg=name)
    assert np.abs(stock.big.array - start).min() > 0  # every weight moved
    np.testing.assert_array_equal(opt_f.target.big.update_rule.state["v"], opt_s.target.big.update_rule.state["v"])


def test_fast_adam_takes_chainers_path_for_options_it_does_not_fuse():
    rng = np.random.default_rng(6)
    params = [rng.standard_normal(50).astype(np.float32) for _ in range(2)]
    links = []
    for cls in (chainer.optimizers.Adam, FastAdam):
        link = chainer.Link()
        with link.init_scope():
            link.w = chainer.Parameter(params[0].copy())
        opt = cls(1e-2, amsgrad=True, weight_decay_rate=1e-3)
        opt.setup(link)
        link.w.grad = params[1].copy()
        opt.update()
        links.append(link)
    np.testing.assert_array_equal(links[1].w.array, links[0].w.array)


def test_make_adam_follows_the_ops_switch(restore_ops):
    ops.select("fast")
    assert type(ops.make_adam(alpha=1e-4)) is FastAdam and ops.make_adam(alpha=1e-4).hyperparam.alpha == 1e-4
    ops.select("chainer")
    assert type(ops.make_adam(alpha=1e-4)) is chainer.optimizers.Adam


@pytest.mark.parametrize("threads", [1, 2])
def test_conv_forward_in_image_blocks_matches_chainer_with_and_without_a_graph(threads, monkeypatch):
    from wm_trainer.ops import conv
    from wm_trainer.ops.threads import get_threads, set_threads

    monkeypatch.setattr(conv, "BLOCK_BYTES", 1)  # one image per block: many blocks, split over threads
    monkeypatch.setattr(conv, "MIN_BLOCK_ROWS", 1)
    rng = np.random.default_rng(8)
    x, w, b = rng.standard_normal((5, 3, 10, 10)), rng.standard_normal((4, 3, 4, 4)), rng.standard_normal(4)
    ref = np.maximum(F.convolution_2d(x, w, b, 2).array, 0)
    before = get_threads()
    try:
        set_threads(threads)
        with chainer.no_backprop_mode():
            np.testing.assert_allclose(convolution_2d(x, w, b, 2, relu=True).array, ref, rtol=1e-12)
        xv = chainer.Variable(x)
        y = convolution_2d(xv, w, b, 2, relu=True)
        np.testing.assert_allclose(y.array, ref, rtol=1e-12)
        F.sum(y * y).backward()
    finally:
        set_threads(before)
    xs = chainer.Variable(x)
    F.sum(F.relu(F.convolution_2d(xs, w, b, 2)) ** 2).backward()
    np.testing.assert_allclose(xv.grad, xs.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("x_shape,w_shape,stride,pad", [((3, 2, 4, 4), (2, 6, 5, 5), 2, 1),  # windows path
                                                        ((3, 2, 4, 5), (2, 6, 5, 4), 2, 0),
                                                        ((3, 6, 3, 3), (6, 2, 6, 6), 2, 1)])  # tap path
def test_deconv_forward_in_image_blocks_matches_chainer(threads, x_shape, w_shape, stride, pad, monkeypatch):
    from wm_trainer.ops import conv
    from wm_trainer.ops.threads import get_threads, set_threads

    monkeypatch.setattr(conv, "BLOCK_BYTES", 1)  # the blocked kernels' block size lives in ops.conv
    monkeypatch.setattr(conv, "MIN_BLOCK_ROWS", 1)
    rng = np.random.default_rng(9)
    x, w, b = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[1])
    before = get_threads()
    try:
        set_threads(threads)
        xv = chainer.Variable(x)
        y = deconvolution_2d(xv, w, b, stride, pad, relu=True)
        F.sum(y * y).backward()
    finally:
        set_threads(before)
    xs = chainer.Variable(x)
    ref = F.relu(F.deconvolution_2d(xs, w, b, stride, pad))
    F.sum(ref * ref).backward()
    np.testing.assert_allclose(y.array, ref.array, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(xv.grad, xs.grad, rtol=1e-10, atol=1e-12)


def test_conv_window_rows_are_reused_only_after_their_graph_is_gone():
    rng = np.random.default_rng(10)
    x, w = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((4, 3, 4, 4))
    y1 = convolution_2d(x, w, stride=2, relu=True)
    w2 = chainer.Variable(w.copy())
    y2 = convolution_2d(2 * x, w2, stride=2, relu=True)  # y1's graph is alive: y2 gets its own rows
    rows1 = y1.creator.rows
    assert rows1 is not y2.creator.rows
    del y1  # the graph goes and its rows go back to the pool ...
    y3 = convolution_2d(3 * x, w, stride=2, relu=True)
    assert y3.creator.rows is rows1  # ... where the next forward of that shape takes them
    y2.grad = np.ones_like(y2.array)
    y2.backward()  # y2's weight gradient still comes from its own rows
    w_ref = chainer.Variable(w.copy())
    ref = F.relu(F.convolution_2d(2 * x, w_ref, stride=2))
    ref.grad = np.ones_like(ref.array)
    ref.backward()
    np.testing.assert_allclose(w2.grad, w_ref.grad, rtol=1e-12)
