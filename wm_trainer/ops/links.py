"""The layers the models are built from: drop-in links on the fast CPU kernels and their stock twins.

The fast convolution links subclass the Chainer links they replace (``W``/``b`` of
:class:`chainer.links.Convolution2D` and :class:`chainer.links.Deconvolution2D`), and both LSTM layers have
``L.LSTM``'s ``upward``/``lateral`` layout, so a model saved with either kind loads into the other.
Which kind a model gets is chosen in :mod:`wm_trainer.ops` (``experiment.ops``).
"""
from __future__ import annotations

import chainer
import chainer.functions as F
import chainer.links as L

from wm_trainer.ops.conv import convolution_2d
from wm_trainer.ops.deconv import deconvolution_2d
from wm_trainer.ops.lstm import lstm_sequence

State = tuple  # (h, c): each (B, hidden)


class FastConvolution2D(L.Convolution2D):
    """:class:`chainer.links.Convolution2D` computed by :func:`wm_trainer.ops.conv.convolution_2d`.

    ``relu=True`` (keyword only) applies ReLU to the output inside the same node.
    """

    def __init__(self, *args, relu: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.relu = relu

    def forward(self, x):
        """The convolution; Chainer's own path for cuDNN-only options and non-NCHW layouts."""
        if self.cudnn_fast or self.x_layout is not None:
            y = super().forward(x)
            return F.relu(y) if self.relu else y
        if self.W.array is None:
            self._initialize_params(x.shape[1])
        return convolution_2d(x, self.W, self.b, self.stride, self.pad, dilate=self.dilate, groups=self.groups,
                              relu=self.relu)


class FastDeconvolution2D(L.Deconvolution2D):
    """:class:`chainer.links.Deconvolution2D` computed by :func:`wm_trainer.ops.deconv.deconvolution_2d`.

    ``relu=True`` (keyword only) applies ReLU to the output inside the same node.
    """

    def __init__(self, *args, relu: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.relu = relu

    def forward(self, x):
        """The transposed convolution."""
        if self.W.array is None:
            self._initialize_params(x.shape[1])
        return deconvolution_2d(x, self.W, self.b, self.stride, self.pad, self.outsize,
                                dilate=self.dilate, groups=self.groups, relu=self.relu)


class ReLUConvolution2D(L.Convolution2D):
    """Stock :class:`chainer.links.Convolution2D` then ``F.relu`` (the stock twin of the fused fast link)."""

    def forward(self, x):
        """Chainer's convolution and ReLU, two nodes."""
        return F.relu(super().forward(x))


class ReLUDeconvolution2D(L.Deconvolution2D):
    """Stock :class:`chainer.links.Deconvolution2D` then ``F.relu`` (the stock twin of the fused fast link)."""

    def forward(self, x):
        """Chainer's transposed convolution and ReLU, two nodes."""
        return F.relu(super().forward(x))


class SeqLSTM(chainer.Chain):
    """An LSTM whose input projection is one matmul over the whole sequence (the stock path, fastest on CPU).

    Weights as in ``L.LSTM``: ``upward`` (in -> 4H, with bias) and ``lateral`` (H -> 4H);
    gates interleaved per unit in ``F.lstm``'s order (a, i, f, o); forget-gate bias starts at 1.
    """

    def __init__(self, in_size: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        with self.init_scope():
            self.upward = L.Linear(in_size, 4 * hidden)
            self.lateral = L.Linear(hidden, 4 * hidden, nobias=True)
        self.upward.b.array.reshape(hidden, 4)[:, 2] = 1.0

    def initial_state(self, batch: int) -> State:
        """Zero (h, c) for ``batch`` sequences."""
        z = self.xp.zeros((batch, self.hidden), dtype=self.upward.W.dtype)
        return z, z.copy()

    def _cell(self, gates_in, state: State | None):
        if state is None:
            c = self.xp.zeros((gates_in.shape[0], self.hidden), dtype=gates_in.dtype)
            gates = gates_in
        else:
            h, c = state
            gates = gates_in + self.lateral(h)
        c, h = F.lstm(c, gates)
        return h, (h, c)

    def step(self, x, state: State | None) -> tuple[chainer.Variable, State]:
        """One step for a batch: x (B, in) -> (h (B, H), new state)."""
        return self._cell(self.upward(x), state)

    def forward_seq(self, xs, state: State | None = None) -> tuple[chainer.Variable, State]:
        """A whole batch of sequences: xs (B, T, in) -> (hs (B, T, H), final state)."""
        b, t, n = xs.shape
        xt = F.reshape(F.transpose(xs, (1, 0, 2)), (t * b, n))  # time-major: contiguous per-step slices
        proj = F.reshape(self.upward(xt), (t, b, 4 * self.hidden))
        hs = []
        for g in F.separate(proj, axis=0):
            h, state = self._cell(g, state)
            hs.append(h)
        return F.stack(hs, axis=1), state


class FastSequenceLSTM(SeqLSTM):
    """An LSTM layer whose ``forward_seq`` runs :func:`wm_trainer.ops.lstm.lstm_sequence` (one FunctionNode).

    Extends :class:`SeqLSTM`: the same parameters (``L.LSTM``'s layout), initialisation and
    ``step`` (Chainer's ``F.lstm``, one step for a batch, e.g. in the dream), so weights saved from either
    load into the other; only the whole-sequence pass is replaced.
    """

    def forward_seq(self, xs, state: State | None = None) -> tuple[chainer.Variable, State]:
        """A whole batch of sequences: xs (B, T, in) -> (hs (B, T, H), final (h, c))."""
        if state is None:
            state = self.initial_state(xs.shape[0])
        h0, c0 = state
        dtype = self.upward.W.dtype
        h0 = h0 if isinstance(h0, chainer.Variable) else h0.astype(dtype, copy=False)
        c0 = c0 if isinstance(c0, chainer.Variable) else c0.astype(dtype, copy=False)
        hs, h, c = lstm_sequence(xs, h0, c0, self.upward.W, self.lateral.W, self.upward.b)
        return hs, (h, c)
