"""Fast CPU kernels for the world model's nets as Chainer FunctionNodes, and drop-in links on them.

``convolution_2d``, ``deconvolution_2d``, ``lstm_sequence`` and ``mdn_nll`` take the same arguments as
Chainer's (or ``wm_trainer.mdn``'s) functions and fall back to them on GPU arrays and for options the
kernels do not cover. The links in :mod:`wm_trainer.ops.links` have the stock links' parameter names and
shapes. ``experiment.ops: chainer`` in the config (:func:`select`) switches back to Chainer's stock functions.
"""
import chainer

from wm_trainer.ops.conv import convolution_2d
from wm_trainer.ops.deconv import deconvolution_2d
from wm_trainer.ops.lstm import lstm_sequence
from wm_trainer.ops.mdn_loss import mdn_nll, mdn_nll_packed

__all__ = ["convolution_2d", "deconvolution_2d", "fast_ops_enabled", "lstm_sequence", "make_adam", "mdn_nll",
           "mdn_nll_packed", "select"]


def select(ops: str) -> None:
    """Choose the kernels models built from now on use: ``"fast"`` (this package) or ``"chainer"`` (stock).

    The choice is Chainer's config key ``wm_ops`` (``experiment.ops`` in the YAML); the layer factories in
    ``vision.py`` and ``memory.py`` read it through :func:`fast_ops_enabled`. ``chainer.using_config("wm_ops",
    "chainer")`` switches it for a block.
    """
    if ops not in ("fast", "chainer"):
        raise ValueError(f"ops must be 'fast' or 'chainer', got {ops!r}")
    chainer.global_config.wm_ops = ops


def fast_ops_enabled() -> bool:
    """Whether layer factories should build the fast links (the default, as in ``experiment.ops``)."""
    return getattr(chainer.config, "wm_ops", "fast") == "fast"


def make_adam(**hyperparams) -> chainer.optimizers.Adam:
    """``chainer.optimizers.Adam(**hyperparams)``, as :class:`wm_trainer.ops.adam.FastAdam` (same results, in
    place and threaded on the CPU) unless ``experiment.ops`` is ``chainer``."""
    from wm_trainer.ops.adam import FastAdam

    return (FastAdam if fast_ops_enabled() else chainer.optimizers.Adam)(**hyperparams)
