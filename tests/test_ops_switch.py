"""The ops switch through the public model API: vision.ConvVAE / memory.MDNRNN with fast or stock layers."""
from __future__ import annotations

import chainer
import chainer.links as L
import numpy as np
import pytest

from extensions.localize import localize
from wm_trainer import ops
from wm_trainer.models.memory import MDNRNN
from wm_trainer.models.vision import ConvVAE
from wm_trainer.ops.links import FastConvolution2D, FastDeconvolution2D, FastSequenceLSTM, ReLUConvolution2D, SeqLSTM


@pytest.fixture
def restore_ops():
    before = getattr(chainer.global_config, "wm_ops", "fast")
    yield
    ops.select(before)


def test_select_picks_fast_or_stock_layers_with_the_same_parameters(restore_ops):
    ops.select("chainer")
    stock_vae, stock_m = ConvVAE(8), MDNRNN(8, 3, hidden=16, mixtures=2)
    assert type(stock_vae.conv0) is ReLUConvolution2D and type(stock_vae.deconv3) is L.Deconvolution2D
    assert type(stock_m.rnn) is SeqLSTM
    ops.select("fast")
    fast_vae, fast_m = ConvVAE(8), MDNRNN(8, 3, hidden=16, mixtures=2)
    assert isinstance(fast_vae.conv0, FastConvolution2D) and isinstance(fast_vae.deconv3, FastDeconvolution2D)
    assert isinstance(fast_m.rnn, FastSequenceLSTM)
    for stock, fast in ((stock_vae, fast_vae), (stock_m, fast_m)):
        assert {n: p.shape for n, p in stock.namedparams()} == {n: p.shape for n, p in fast.namedparams()}
    with pytest.raises(ValueError, match="ops"):
        ops.select("cuda")


def test_vae_saved_with_stock_layers_gives_the_same_loss_with_fast_layers(tmp_path, restore_ops):
    ops.select("chainer")
    stock = ConvVAE(8)
    path = str(tmp_path / "vae.npz")
    chainer.serializers.save_npz(path, stock)
    ops.select("fast")
    fast = ConvVAE(8)
    chainer.serializers.load_npz(path, fast)
    x = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
    values = []
    for model in (stock, fast):
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            mu, logvar = model.encode(x)
            values.append((mu.array, model.decode(mu).array))
    np.testing.assert_allclose(values[1][0], values[0][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(values[1][1], values[0][1], rtol=1e-4, atol=1e-5)


def test_toolkit_localizes_a_non_finite_value_born_inside_a_fast_layer(restore_ops):
    ops.select("fast")
    model = ConvVAE(8)
    model.deconv2.W.array[...] = 3e38  # finite weights whose products overflow: Inf/NaN born in deconv2
    x = np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        birth, _ = localize(lambda xs: chainer.functions.sum(model.decode(model.encode(xs)[0])), x, model, None)
    assert birth is not None and birth.where == "forward"
    assert birth.link == "deconv2" and birth.function == "Deconvolution2DFast"
