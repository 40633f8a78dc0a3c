"""Fast CPU kernels for the world model's nets as Chainer FunctionNodes, and drop-in links on them.

``convolution_2d``, ``deconvolution_2d``, ``lstm_sequence`` and ``mdn_nll`` take the same arguments as
Chainer's (or ``wm_trainer.mdn``'s) functions and fall back to them on GPU arrays and for options the
kernels do not cover. The links in :mod:`wm_trainer.ops.links` have the stock links' parameter names and
shapes. ``experiment.ops: chainer`` in the config switches back to Chainer's stock functions.
"""
from wm_trainer.ops.conv import convolution_2d
from wm_trainer.ops.deconv import deconvolution_2d
from wm_trainer.ops.lstm import lstm_sequence
from wm_trainer.ops.mdn_loss import mdn_nll

__all__ = ["convolution_2d", "deconvolution_2d", "lstm_sequence", "mdn_nll"]
