"""The ``debug:`` section: every switch of the toolkit, as typed, validated data."""
from __future__ import annotations

import dataclasses
import os
from typing import Literal, Union

from .schema import ConfigError, Source, field, from_dict, read_yaml


@dataclasses.dataclass
class GradientsConfig:
    """Per-parameter gradient statistics and histograms."""

    every: int = field(1, min=0, help="per-parameter gradient stats every N iterations (0 = off)")
    histograms_every: int = field(100, min=0, help="gradient and weight histograms every N iterations (0 = off)")
    print: bool = field(False, help="print(name, param.grad) after each update (the MDN blog post's updater)")
    report: Literal["logged", "every", "tensorboard"] = field(
        "logged", help="logged: the reporter gets the stats of each iteration LogReport/PlotReport write (their "
        "log shows that iteration's values, not an interval average); TensorBoard gets every N. every: the "
        "reporter gets every N (LogReport then averages them). tensorboard: TensorBoard only, never the "
        "reporter (keeps the log small; install makes Chainer's LogReport append each entry rather than "
        "rewrite its whole log, but a subclass of it still rewrites)")


@dataclasses.dataclass
class NonFiniteConfig:
    """NaN/Inf guard, localisation and float64 replay."""

    check: bool = field(True, help="cheap always-on guard: loss and global gradient norm finite")
    localize: bool = field(True, help="on failure, re-run the iteration to find the Link where the NaN/Inf was born")
    policy: Literal["raise", "warn", "skip"] = field("raise", help="raise | warn | skip (skip drops the update)")
    replay_float64: bool = field(True, help="on failure in float32, replay the iteration in float64 for a verdict")
    allow_inf_in: list[str] = field(default_factory=list, help="link paths where an infinity is intended")


@dataclasses.dataclass
class TensorBoardConfig:
    """Where TensorBoard event files go."""

    logdir: Union[bool, str, None] = field(None, help="default <trainer out>/tb; false turns TensorBoard off")

    def validate(self) -> None:
        if self.logdir is True:
            raise ValueError("logdir: use null for the default folder, false to turn TensorBoard off, or a path")


@dataclasses.dataclass
class DebugConfig:
    """The toolkit's switches; the ``debug:`` section of any wm-trainer config."""

    float64: bool = field(False, help="the troubleshooting switch: every parameter and input in float64")
    gradients: GradientsConfig = field(default_factory=GradientsConfig, help="gradient statistics")
    nonfinite: NonFiniteConfig = field(default_factory=NonFiniteConfig, help="NaN/Inf detection")
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig, help="TensorBoard output")

    def validate(self) -> None:
        if self.gradients.report == "tensorboard" and self.gradients.every and self.tensorboard.logdir is False:
            raise ValueError("gradients.report is tensorboard but tensorboard.logdir is false: the statistics "
                             "would go nowhere (turn TensorBoard on, or use report: logged)")

    @classmethod
    def from_dict(cls, data: dict | None, *, source: Source | None = None, prefix: str = "debug") -> DebugConfig:
        """Validate a ``debug:`` mapping; errors name the key path (``debug.nonfinite.policy``)."""
        return from_dict(cls, data, source=source, prefix=prefix)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> DebugConfig:
        """Read a YAML file that is either a ``debug:`` section alone or a config containing one."""
        data, source = read_yaml(path)
        if "debug" in data:
            return cls.from_dict(data["debug"], source=source, prefix="debug")
        if not data:
            return cls()
        # a file holding the section's body alone: report paths as debug.* all the same
        body_source = Source(source.default_file)
        body_source.lines = {f"debug.{k}": v for k, v in source.lines.items()}
        return cls.from_dict(data, source=body_source, prefix="debug")


__all__ = ["DebugConfig", "GradientsConfig", "NonFiniteConfig", "TensorBoardConfig", "ConfigError"]
