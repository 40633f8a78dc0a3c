"""A Chainer training-extension and debugging toolkit: gradients, float64, NaN/Inf, TensorBoard.

Knows nothing of world models; any Chainer model gets every switch from a ``debug:`` YAML section.
"""
from .config import DebugConfig, GradientsConfig, NonFiniteConfig, TensorBoardConfig
from .errors import NonFiniteError
from .schema import ConfigError

__all__ = [
    "ConfigError",
    "DebugConfig",
    "GradientsConfig",
    "NonFiniteConfig",
    "NonFiniteError",
    "TensorBoardConfig",
]
