"""A Chainer training-extension and debugging toolkit: gradients, float64, NaN/Inf, TensorBoard.

Knows nothing of world models; any Chainer model gets every switch from a ``debug:`` YAML section::

    import extensions as ext
    debug = ext.DebugConfig.from_yaml("debug.yaml")
    ext.set_float64(debug.float64)                 # before building models
    updater = ext.GradientLoggingUpdater(train_iter, optimizer, device=-1, debug=debug)
    trainer = chainer.training.Trainer(updater, (1000, "iteration"), out="result")
    ext.install(trainer, debug)                    # TensorBoard, guards, reports
    trainer.run()
"""
# isort: off
from . import chainer_compat  # noqa: F401  (first: its import shields Chainer's own imports)
# isort: on
from .clipping import GradientClipping
from .config import DebugConfig, GradientsConfig, NonFiniteConfig, TensorBoardConfig
from .dtype import cast_link, check_float64, float64_converter, float64_requested, set_float64
from .errors import Float64Error, NonFiniteError
from .files import chmod_like_open
from .install import install
from .localize import Birth
from .logreport import LogReport
from .multinode import start as start_multi_node
from .report import Failure
from .schema import ConfigError
from .serializers import NpzLoadError, load_npz
from .snapshot import snapshot
from .stats import GradSummary, gradient_summary
from .tensorboard import add_histogram_safe, add_histograms_safe, add_image_grid, get_writer, open_writer
from .updater import GradientLoggingMixin, GradientLoggingUpdater

__all__ = [
    "Birth",
    "ConfigError",
    "DebugConfig",
    "Failure",
    "Float64Error",
    "GradSummary",
    "GradientClipping",
    "GradientLoggingMixin",
    "GradientLoggingUpdater",
    "GradientsConfig",
    "LogReport",
    "NonFiniteConfig",
    "NonFiniteError",
    "NpzLoadError",
    "TensorBoardConfig",
    "add_histogram_safe",
    "add_histograms_safe",
    "add_image_grid",
    "cast_link",
    "check_float64",
    "chmod_like_open",
    "float64_converter",
    "float64_requested",
    "get_writer",
    "gradient_summary",
    "install",
    "load_npz",
    "open_writer",
    "set_float64",
    "snapshot",
    "start_multi_node",
]
