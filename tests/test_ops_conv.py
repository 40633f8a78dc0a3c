"""Fast convolution / deconvolution kernels: gradients, equality with Chainer's functions, links, hooks."""
from __future__ import annotations

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest
from chainer import gradient_check

from wm_trainer.ops import convolution_2d, deconvolution_2d
from wm_trainer.ops.conv import Convolution2DFast
from wm_trainer.ops.deconv import Deconvolution2DFast
from wm_trainer.ops.links import FastConvolution2D, FastDeconvolution2D

CONV_CASES = [((2, 3, 9, 8), (4, 3, 4, 4), 2, 0), ((2, 3, 7, 8), (4, 3, 3, 2), (1, 2), 1),
              ((2, 3, 9, 9), (4, 3, 3, 3), 2, 0)]
DECONV_CASES = [((2, 3, 4, 5), (3, 4, 5, 4), 2, 0), ((2, 3, 1, 1), (3, 4, 5, 5), 2, 0),
                ((2, 3, 3, 3), (3, 4, 6, 4), (2, 1), 1), ((2, 2, 3, 4), (2, 3, 6, 6), 2, 0)]


def _args(rng, x_shape, w_shape, out_axis):
    return (rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[out_axis]))


@pytest.mark.parametrize("x_shape,w_shape,stride,pad", CONV_CASES)
def test_convolution_matches_chainer_and_gradients_check(x_shape, w_shape, stride, pad):
    rng = np.random.default_rng(0)
    x, w, b = _args(rng, x_shape, w_shape, 0)
    y = convolution_2d(x, w, b, stride, pad)
    assert isinstance(y.creator, Convolution2DFast)
    np.testing.assert_allclose(y.array, F.convolution_2d(x, w, b, stride, pad).array, rtol=1e-10, atol=1e-10)
    gy = rng.standard_normal(y.shape)
    gradient_check.check_backward(lambda *a: convolution_2d(*a, stride=stride, pad=pad), (x, w, b), gy,
                                  dtype=np.float64)


@pytest.mark.parametrize("x_shape,w_shape,stride,pad", DECONV_CASES)
def test_deconvolution_matches_chainer_and_gradients_check(x_shape, w_shape, stride, pad):
    rng = np.random.default_rng(1)
    x, w, b = _args(rng, x_shape, w_shape, 1)
    y = deconvolution_2d(x, w, b, stride, pad)
    assert isinstance(y.creator, Deconvolution2DFast)
    np.testing.assert_allclose(y.array, F.deconvolution_2d(x, w, b, stride, pad).array, rtol=1e-10, atol=1e-10)
    gy = rng.standard_normal(y.shape)
    gradient_check.check_backward(lambda *a: deconvolution_2d(*a, stride=stride, pad=pad), (x, w, b), gy,
                                  dtype=np.float64)


def test_unsupported_options_fall_back_to_chainer():
    rng = np.random.default_rng(2)
    x, w, b = _args(rng, (1, 2, 7, 7), (2, 2, 3, 3), 0)
    assert not isinstance(convolution_2d(x, w, b, dilate=2).creator, Convolution2DFast)
    with pytest.raises(chainer.utils.type_check.InvalidType):  # Chainer's own check of mixed dtypes
        convolution_2d(x.astype(np.float32), w, b)
    assert not isinstance(deconvolution_2d(x, w, b, outsize=(16, 16), stride=2).creator, Deconvolution2DFast)


class _VAELike(chainer.Chain):
    """The paper's VAE layer stack at a small width."""

    def __init__(self, fast: bool):
        super().__init__()
        conv = FastConvolution2D if fast else L.Convolution2D
        deconv = FastDeconvolution2D if fast else L.Deconvolution2D
        with self.init_scope():
            self.c1, self.c2, self.c3 = conv(3, 4, 4, 2), conv(4, 8, 4, 2), conv(8, 8, 4, 2)
            self.fc = L.Linear(8 * 2 * 2, 16)
            self.d1, self.d2, self.d3 = deconv(16, 8, 5, 2), deconv(8, 4, 6, 2), deconv(4, 3, 6, 2)

    def loss(self, x):
        h = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        z = F.reshape(self.fc(h), (x.shape[0], 16, 1, 1))
        y = F.sigmoid(self.d3(F.relu(self.d2(F.relu(self.d1(z))))))
        return F.sum(F.squared_difference(y, x)) / x.shape[0]


def test_vae_stack_loss_and_gradients_match_stock_links_in_float32():
    rng = np.random.default_rng(3)
    stock, fast = _VAELike(False), _VAELike(True)
    x = rng.random((4, 3, 32, 32), dtype=np.float32)
    stock.loss(x)
    fast.loss(x)
    fast.copyparams(stock)
    losses = []
    for m in (stock, fast):
        m.cleargrads()
        loss = m.loss(x)
        loss.backward()
        losses.append(float(loss.array))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    grads = dict(stock.namedparams())
    for name, p in fast.namedparams():
        assert p.shape == grads[name].shape and p.dtype == np.float32
        np.testing.assert_allclose(p.grad, grads[name].grad, rtol=1e-3, atol=1e-5, err_msg=name)


def test_fast_links_load_stock_weights_and_run_in_float64(tmp_path):
    stock = L.Deconvolution2D(4, 3, 6, 2)
    path = str(tmp_path / "w.npz")
    chainer.serializers.save_npz(path, stock)
    with chainer.using_config("dtype", np.float64):
        fast = FastDeconvolution2D(4, 3, 6, 2)
    chainer.serializers.load_npz(path, fast)
    np.testing.assert_array_equal(fast.W.array, stock.W.array)
    fast.W.array = fast.W.array.astype(np.float64)  # as the toolkit's float64 mode casts a loaded model
    fast.b.array = fast.b.array.astype(np.float64)
    x = np.random.default_rng(4).random((2, 4, 3, 3))
    y = fast(x)
    assert y.dtype == np.float64 and isinstance(y.creator, Deconvolution2DFast)
    np.testing.assert_allclose(y.array, F.deconvolution_2d(x, fast.W, fast.b, 2).array, rtol=1e-12)


def test_function_and_link_hooks_see_the_fast_ops():
    class Names(chainer.FunctionHook):
        def __init__(self):
            self.forward, self.backward = [], []

        def forward_postprocess(self, function, in_data):
            self.forward.append(function.label)

        def backward_postprocess(self, function, in_data, out_grad):
            self.backward.append(function.label)

    conv = FastConvolution2D(3, 2, 3)
    seen = []

    class LinkNames(chainer.LinkHook):
        def forward_postprocess(self, args):
            seen.append(type(args.link).__name__)

    x = np.random.default_rng(5).random((1, 3, 5, 5), dtype=np.float32)
    with Names() as hook, LinkNames():
        F.sum(conv(x)).backward()
    assert "Convolution2DFast" in hook.forward and "Convolution2DFast" in hook.backward
    assert seen == ["FastConvolution2D"]


def test_results_do_not_depend_on_the_number_of_threads():
    from wm_trainer.ops.threads import get_threads, set_threads

    rng = np.random.default_rng(6)
    x, w, b = _args(rng, (5, 3, 12, 12), (3, 4, 6, 6), 1)
    before = get_threads()
    outs = []
    try:
        for n in (1, 3):
            set_threads(n)
            xv = chainer.Variable(x.copy())
            w_c = w.transpose(1, 0, 2, 3)
            y = deconvolution_2d(convolution_2d(xv, w_c, None, 2), w_c, b[:3], 2)
            F.sum(y * y).backward()
            outs.append((y.array, xv.grad))
    finally:
        set_threads(before)
    np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-12)
    np.testing.assert_allclose(outs[1][1], outs[0][1], rtol=1e-12)
    with pytest.raises(ValueError):
        set_threads(0)


def test_callers_floating_point_error_settings_reach_the_worker_threads():
    import warnings

    x = np.ones((8, 1, 5, 5), dtype=np.float32)
    w = np.full((1, 2, 3, 3), 2e38, dtype=np.float32)  # finite taps whose overlapping sums overflow
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning from any thread would fail the test
        with np.errstate(over="ignore", invalid="ignore"):
            y = deconvolution_2d(x, w, stride=2)
    assert not np.isfinite(y.array).all()


def test_scratch_buffers_are_reused_and_never_leak_into_results():
    from wm_trainer.ops import scratch

    rng = np.random.default_rng(7)
    x, w, b = _args(rng, (3, 4, 5, 5), (4, 2, 6, 6), 1)
    xv = chainer.Variable(x)
    y = deconvolution_2d(xv, w, b, 2)
    y.grad = np.ones_like(y.array)
    y.backward()
    kept = (y.array, xv.grad)
    copies = [k.copy() for k in kept]
    y2 = deconvolution_2d(chainer.Variable(2 * x), w, b, 2)  # same shapes: the same scratch buffers again
    y2.grad = np.full_like(y2.array, 3.0)
    y2.backward()
    for k, c in zip(kept, copies):
        np.testing.assert_array_equal(k, c)
    a = scratch.scratch("test", (2, 3), np.float32)
    assert scratch.scratch("test", (2, 3), np.float32) is a
    scratch.clear()
    assert scratch.scratch("test", (2, 3), np.float32) is not a
