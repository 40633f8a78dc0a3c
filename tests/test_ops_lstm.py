"""Fast LSTM-over-a-sequence: gradients, equality with stepped F.lstm and with the stock SeqLSTM, weight layout."""
from __future__ import annotations

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest
from chainer import gradient_check

from wm_trainer.models.mdn import MDNHead
from wm_trainer.ops import lstm_sequence
from wm_trainer.ops.links import FastSequenceLSTM
from wm_trainer.ops.lstm import LSTMSequence, lstm_sequence_reference
from wm_trainer.ops.mdn_loss import mdn_nll, stock_mdn_nll


def _inputs(rng, n=3, t=4, i=5, h=6):
    shapes = [(n, t, i), (n, h), (n, h), (4 * h, i), (4 * h, h), (4 * h,)]
    return [rng.standard_normal(s) for s in shapes]


def test_lstm_sequence_matches_stepped_f_lstm_and_gradients_check():
    rng = np.random.default_rng(0)
    args = _inputs(rng)
    fast = lstm_sequence(*args)
    assert isinstance(fast[0].creator, LSTMSequence)
    for a, b in zip(fast, lstm_sequence_reference(*args)):
        np.testing.assert_allclose(a.array, b.array, rtol=1e-10, atol=1e-12)
    gys = [rng.standard_normal(o.shape) for o in fast]
    gradient_check.check_backward(lambda *a: LSTMSequence().apply(a), args, gys, dtype=np.float64)
    # only the sequence output used: the grads of the final state arrive as None
    gradient_check.check_backward(lambda *a: LSTMSequence().apply(a)[0], args, gys[0], dtype=np.float64)


def test_sequence_lstm_equals_stock_l_lstm_stepping_and_loads_its_weights(tmp_path):
    rng = np.random.default_rng(1)
    stock = L.LSTM(5, 6)
    path = str(tmp_path / "lstm.npz")
    chainer.serializers.save_npz(path, stock)
    fast = FastSequenceLSTM(5, 6)
    chainer.serializers.load_npz(path, fast)
    x = rng.standard_normal((2, 7, 5)).astype(np.float32)
    hs, (h, c) = fast.forward_seq(x)
    ref = [stock(x[:, t]) for t in range(x.shape[1])]
    np.testing.assert_allclose(hs.array, F.stack(ref, axis=1).array, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c.array, stock.c.array, rtol=1e-5, atol=1e-6)
    # step() continues from the returned state exactly like the stock cell
    h2, _ = fast.step(x[:, 0], (h, c))
    np.testing.assert_allclose(h2.array, stock(x[:, 0]).array, rtol=1e-5, atol=1e-6)


def test_sequence_lstm_matches_memory_seqlstm_parameters_and_outputs():
    from wm_trainer.ops.links import SeqLSTM

    ref, fast = SeqLSTM(5, 6), FastSequenceLSTM(5, 6)
    assert {n: p.shape for n, p in ref.namedparams()} == {n: p.shape for n, p in fast.namedparams()}
    np.testing.assert_array_equal(ref.upward.b.array, fast.upward.b.array)  # same forget-gate bias init
    fast.copyparams(ref)
    x = np.random.default_rng(2).standard_normal((3, 4, 5)).astype(np.float32)
    hs_r, (h_r, c_r) = ref.forward_seq(x)
    hs_f, (h_f, c_f) = fast.forward_seq(x)
    for a, b in ((hs_f, hs_r), (h_f, h_r), (c_f, c_r)):
        np.testing.assert_allclose(a.array, b.array, rtol=1e-5, atol=1e-6)


class _LSTMMDN(chainer.Chain):
    def __init__(self, fast: bool):
        super().__init__()
        self.fast = fast
        with self.init_scope():
            self.rnn = FastSequenceLSTM(7, 8) if fast else L.LSTM(7, 8)
            self.mdn = MDNHead(8, 4, 3)

    def loss(self, x, target):
        n, t, _ = x.shape
        if self.fast:
            hs, _ = self.rnn.forward_seq(x)
        else:
            self.rnn.reset_state()
            hs = F.stack([self.rnn(x[:, i]) for i in range(t)], axis=1)
        logits, mu, log_std = self.mdn(F.reshape(hs, (n * t, 8)))
        nll = mdn_nll if self.fast else stock_mdn_nll
        return nll(logits, mu, log_std, target.reshape(n * t, 4))


def test_lstm_mdn_stack_loss_and_gradients_match_stock_in_float32():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 9, 7)).astype(np.float32)
    target = rng.standard_normal((4, 9, 4)).astype(np.float32)
    stock, fast = _LSTMMDN(False), _LSTMMDN(True)
    fast.copyparams(stock)
    losses = []
    for m in (stock, fast):
        m.cleargrads()
        loss = m.loss(x, target)
        loss.backward()
        losses.append(float(loss.array))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    ref = dict(stock.namedparams())
    for name, p in fast.namedparams():
        np.testing.assert_allclose(p.grad, ref[name].grad, rtol=1e-3, atol=1e-5, err_msg=name)


def test_float64_parameters_run_the_fast_kernel_in_float64():
    with chainer.using_config("dtype", np.float64):
        lstm = FastSequenceLSTM(3, 4)
    assert all(p.dtype == np.float64 for p in lstm.params())
    x = np.random.default_rng(4).standard_normal((2, 5, 3))
    hs, (h, c) = lstm.forward_seq(x)
    assert hs.dtype == np.float64 and isinstance(hs.creator, LSTMSequence)
    lstm.cleargrads()
    F.sum(hs).backward()
    assert lstm.lateral.W.grad.dtype == np.float64 and np.isfinite(lstm.lateral.W.grad).all()


def test_double_backprop_is_refused_with_a_clear_error():
    args = [chainer.Variable(a) for a in _inputs(np.random.default_rng(5))]
    hs, _, _ = lstm_sequence(*args)
    with pytest.raises(NotImplementedError, match="experiment.ops=chainer"):
        F.sum(hs).backward(enable_double_backprop=True)


def test_batch_split_over_threads_gives_the_same_values_and_gradients():
    from wm_trainer.ops.threads import get_threads, set_threads

    rng = np.random.default_rng(6)
    args = _inputs(rng, n=37, t=3, i=4, h=5)  # 37 sequences: two parts of >= 16 columns with 2 threads
    before = get_threads()
    results = []
    try:
        for threads in (1, 2):
            set_threads(threads)
            vs = [chainer.Variable(a.copy()) for a in args]
            hs, h, c = lstm_sequence(*vs)
            (F.sum(hs * hs) + F.sum(h) + F.sum(c * c)).backward()
            results.append([hs.array, h.array, c.array] + [v.grad for v in vs])
    finally:
        set_threads(before)
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)
    ref = lstm_sequence_reference(*args)
    np.testing.assert_allclose(results[1][0], ref[0].array, rtol=1e-10, atol=1e-12)
