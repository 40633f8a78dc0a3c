"""Drop-in links on the fast CPU kernels, with the stock links' parameter names, shapes and initialisers.

The convolution links subclass the Chainer links they replace (``W``/``b`` of
:class:`chainer.links.Convolution2D` and :class:`chainer.links.Deconvolution2D`), and the LSTM has
``L.LSTM``'s ``upward``/``lateral`` layout, so a model saved with either kind loads into the other.
"""
from __future__ import annotations

import chainer
import chainer.functions as F
import chainer.links as L

from wm_trainer.memory import SeqLSTM
from wm_trainer.ops.conv import convolution_2d
from wm_trainer.ops.deconv import deconvolution_2d
from wm_trainer.ops.lstm import lstm_sequence


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


class FastSequenceLSTM(SeqLSTM):
    """An LSTM layer whose ``forward_seq`` runs :func:`wm_trainer.ops.lstm.lstm_sequence` (one FunctionNode).

    Extends ``wm_trainer.memory.SeqLSTM``: the same parameters (``L.LSTM``'s layout), initialisation and
    ``step`` (Chainer's ``F.lstm``, one step for a batch, e.g. in the dream), so weights saved from either
    load into the other; only the whole-sequence pass is replaced.
    """

    def forward_seq(self, xs, state: tuple | None = None) -> tuple:
        """A whole batch of sequences: xs (B, T, in) -> (hs (B, T, H), final (h, c))."""
        if state is None:
            state = self.initial_state(xs.shape[0])
        h0, c0 = state
        dtype = self.upward.W.dtype
        h0 = h0 if isinstance(h0, chainer.Variable) else h0.astype(dtype, copy=False)
        c0 = c0 if isinstance(c0, chainer.Variable) else c0.astype(dtype, copy=False)
        hs, h, c = lstm_sequence(xs, h0, c0, self.upward.W, self.lateral.W, self.upward.b)
        return hs, (h, c)
