"""Fast CPU kernels for the world model's nets, and the one place that chooses them or Chainer's stock path.

The kernels (``convolution_2d``, ``deconvolution_2d``, ``lstm_sequence``, ``mdn_loss.mdn_nll``) take the same
arguments as the stock functions and fall back to them on GPU arrays and for options they do not cover; the
links in :mod:`wm_trainer.ops.links` have the stock links' parameter names and shapes. The models build their
layers and losses through the factories below, which read ``experiment.ops`` (set by :func:`select`):
``fast`` (the default) gives the kernels, ``chainer`` Chainer's stock functions and links. This package
imports no model module: the models (``vision``, ``memory``, ``mdn``) import it.
"""
from __future__ import annotations

import chainer
import chainer.functions as F
import chainer.links as L

from wm_trainer.ops import links, mdn_loss
from wm_trainer.ops.activation import sigmoid_squared_error
from wm_trainer.ops.adam import FastAdam
from wm_trainer.ops.conv import convolution_2d
from wm_trainer.ops.deconv import deconvolution_2d
from wm_trainer.ops.lstm import lstm_sequence

__all__ = ["conv_layer", "convolution_2d", "deconv_layer", "deconvolution_2d", "fast_ops_enabled",
           "joint_mdn_nll_packed", "lstm_layer", "lstm_sequence", "make_adam", "mdn_nll", "mdn_nll_packed",
           "reconstruction_error", "select"]


def select(ops: str) -> None:
    """Choose the kernels models built from now on use: ``"fast"`` (this package) or ``"chainer"`` (stock).

    The choice is Chainer's config key ``wm_ops`` (``experiment.ops`` in the YAML), read by
    :func:`fast_ops_enabled`; ``chainer.using_config("wm_ops", "chainer")`` switches it for a block.
    """
    if ops not in ("fast", "chainer"):
        raise ValueError(f"ops must be 'fast' or 'chainer', got {ops!r}")
    chainer.global_config.wm_ops = ops


def fast_ops_enabled() -> bool:
    """Whether the factories below give the fast kernels (the default, as in ``experiment.ops``)."""
    return getattr(chainer.config, "wm_ops", "fast") == "fast"


def conv_layer(in_channels: int, out_channels: int, ksize: int, stride: int, relu: bool = False) -> chainer.Link:
    """A convolution link; ``relu``: ReLU'd output (fused in the fast kernel)."""
    if fast_ops_enabled():
        return links.FastConvolution2D(in_channels, out_channels, ksize=ksize, stride=stride, relu=relu)
    link = links.ReLUConvolution2D if relu else L.Convolution2D
    return link(in_channels, out_channels, ksize=ksize, stride=stride)


def deconv_layer(in_channels: int, out_channels: int, ksize: int, stride: int, relu: bool = False) -> chainer.Link:
    """A transposed-convolution link; ``relu``: ReLU'd output (fused in the fast kernel)."""
    if fast_ops_enabled():
        return links.FastDeconvolution2D(in_channels, out_channels, ksize=ksize, stride=stride, relu=relu)
    link = links.ReLUDeconvolution2D if relu else L.Deconvolution2D
    return link(in_channels, out_channels, ksize=ksize, stride=stride)


def lstm_layer(in_size: int, hidden: int) -> links.SeqLSTM:
    """M's recurrent layer: the same parameters either way, the whole-sequence pass in one node when fast."""
    return (links.FastSequenceLSTM if fast_ops_enabled() else links.SeqLSTM)(in_size, hidden)


def reconstruction_error(logits, x) -> chainer.Variable:
    """sum((sigmoid(logits) - x) ** 2): one fused node when fast, Chainer's three otherwise."""
    if fast_ops_enabled():
        return sigmoid_squared_error(logits, x)
    return F.sum(F.squared_difference(F.sigmoid(logits), x))


def mdn_nll(logits, mu, log_std, target, reduce: str = "mean") -> chainer.Variable:
    """The MDN negative log-likelihood: mean over rows (``reduce='mean'``) or per row (``'no'``)."""
    fn = mdn_loss.mdn_nll if fast_ops_enabled() else mdn_loss.stock_mdn_nll
    return fn(logits, mu, log_std, target, reduce=reduce)


def mdn_nll_packed(y, target, mixtures: int, reduce: str = "mean") -> chainer.Variable:
    """:func:`mdn_nll` of ``MDNHead.packed``'s output: no split and, when fast, one gradient buffer."""
    if fast_ops_enabled():
        return mdn_loss.mdn_nll_packed(y, target, mixtures, reduce=reduce)
    return mdn_loss.stock_mdn_nll(*F.split_axis(y, 3, axis=2), target, reduce=reduce)


def joint_mdn_nll_packed(y, target, mixtures: int, reduce: str = "mean") -> chainer.Variable:
    """The NLL of one mixture over the whole vector (``mdnrnn.mixture: joint``), from ``MDNHead.packed``'s output."""
    return mdn_loss.joint_mdn_nll_packed(y, target, mixtures, reduce=reduce)


def make_adam(**hyperparams) -> chainer.optimizers.Adam:
    """``chainer.optimizers.Adam(**hyperparams)``, as :class:`FastAdam` (same results, threaded on CPU) when fast."""
    return (FastAdam if fast_ops_enabled() else chainer.optimizers.Adam)(**hyperparams)
