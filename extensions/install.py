"""``install(trainer, debug)``: every switch of the ``debug:`` section on any Chainer Trainer.

With a ``GradientLoggingUpdater`` (or any updater using ``GradientLoggingMixin``) the updater
gets the config, the report folder and the TensorBoard writer; with a plain updater, a
monitor extension gives what can be had after the fact (gradient statistics and histograms
after the update, a parameter check that stops at the first non-finite weight).
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import chainer
from chainer import training

from .config import DebugConfig
from .dtype import check_float64, float64_converter
from .errors import NonFiniteError
from .logreport import upgrade as upgrade_log_reports
from .report import Failure, write_report
from .stats import all_finite, gradient_summary, nonfinite_counts
from .tensorboard import EXTENSION_NAME, TensorBoardReport, add_histograms_safe, open_writer
from .updater import GradientLoggingMixin

MONITOR_NAME = "ext_monitor"
SCHEDULE_NAME = "ext_report_schedule"


def log_schedule(trainer: training.Trainer) -> list[tuple[float, str]] | None:
    """(period, unit) of every LogReport/PlotReport trigger of ``trainer``; None when there is none or one
    is not an interval (then nothing is known of when the observation is read)."""
    schedule = []
    for entry in trainer._extensions.values():
        if isinstance(entry.extension, (training.extensions.LogReport, training.extensions.PlotReport)):
            trigger = getattr(entry.extension, "_trigger", None)
            if not isinstance(trigger, training.triggers.IntervalTrigger):
                return None
            schedule.append((trigger.period, trigger.unit))
    return schedule or None


def _never(trainer: training.Trainer) -> bool:
    return False


class ReportSchedule(training.Extension):
    """Tells a ``GradientLoggingMixin`` updater, when training starts, when the trainer's logs are written."""

    trigger = staticmethod(_never)  # all its work is in initialize
    priority = training.PRIORITY_READER
    default_name = SCHEDULE_NAME

    def initialize(self, trainer: training.Trainer) -> None:
        upgrade_log_reports(trainer)
        updater = trainer.updater
        if isinstance(updater, GradientLoggingMixin):
            logged = updater.debug.gradients.report == "logged"
            updater._ext.log_schedule = log_schedule(trainer) if logged else None
            updater._ext.next_log = 0

    def __call__(self, trainer: training.Trainer) -> None:
        pass


def _logdir(trainer: training.Trainer, debug: DebugConfig) -> str | None:
    logdir = debug.tensorboard.logdir
    if logdir is False:
        return None
    if logdir is None:
        return os.path.join(trainer.out, "tb")
    return os.fspath(logdir)


class PlainUpdaterMonitor(training.Extension):
    """For updaters without the mixin: stats and histograms after the update, and a weight check."""

    trigger = 1, "iteration"
    priority = training.PRIORITY_WRITER + 1
    default_name = MONITOR_NAME

    def __init__(self, debug: DebugConfig, writer: Any):
        self.debug, self.writer = debug, writer

    def initialize(self, trainer: training.Trainer) -> None:
        upgrade_log_reports(trainer)

    def __call__(self, trainer: training.Trainer) -> None:
        it = trainer.updater.iteration
        target = trainer.updater.get_optimizer("main").target
        named = [(n.lstrip("/"), p) for n, p in target.namedparams(include_uninit=False)]
        names, params = [n for n, _ in named], [p for _, p in named]
        every, hist = self.debug.gradients.every, self.debug.gradients.histograms_every
        if every > 0 and it % every == 0:
            chainer.reporter.report(gradient_summary(names, [p.grad for p in params]).as_report())
        if self.writer is not None and hist > 0 and it % hist == 0:
            arrays = {f"grad/{name}": p.grad for name, p in named if p.grad is not None}
            arrays.update((f"param/{name}", p.array) for name, p in named)
            add_histograms_safe(self.writer, arrays, it)
        if self.debug.nonfinite.check:
            arrays = [p.array for p in params]
            bad = {} if all_finite(arrays) else nonfinite_counts(names, arrays)
            if bad:
                failure = Failure(iteration=it, where="update", trigger="parameters after the update",
                                  policy="raise", params_nonfinite=bad)
                path = write_report(trainer.out, failure)
                raise NonFiniteError(f"{failure.headline()} (a plain updater cannot guard before the update: "
                                     "use extensions.GradientLoggingUpdater)", iteration=it, where="update",
                                     report_path=path)


def install(trainer: training.Trainer, debug: DebugConfig | dict | None = None) -> None:
    """Wire the ``debug:`` switches into ``trainer``: TensorBoard writer, guards, reports. Idempotent.

    When training starts, the trainer's plain Chainer ``LogReport`` extensions (also those added after this
    call) are given ``extensions.LogReport``'s write: the same log file, one entry at a time (the per-parameter
    keys would make Chainer's whole-log rewrites grow with the run).

    A second call updates the updater's switches; the TensorBoard writer of the first call is kept.
    """
    if debug is None:
        debug = DebugConfig()
    elif isinstance(debug, dict):
        debug = DebugConfig.from_dict(debug)
    updater = trainer.updater
    writer = None
    if EXTENSION_NAME in trainer._extensions:
        writer = trainer.get_extension(EXTENSION_NAME).writer
    else:
        logdir = _logdir(trainer, debug)
        if logdir is not None:
            writer = open_writer(logdir)
            trainer.extend(TensorBoardReport(writer), name=EXTENSION_NAME)
    if isinstance(updater, GradientLoggingMixin):
        updater.debug = debug
        updater.out = trainer.out
        updater.writer = writer
        updater._ext.tb_report = trainer.get_extension(EXTENSION_NAME) if writer is not None else None
        if SCHEDULE_NAME not in trainer._extensions:
            trainer.extend(ReportSchedule(), name=SCHEDULE_NAME)
    elif MONITOR_NAME in trainer._extensions:
        monitor = trainer.get_extension(MONITOR_NAME)
        monitor.debug = debug
    else:
        warnings.warn(f"{type(updater).__name__} does not use extensions.GradientLoggingMixin: gradients are "
                      "logged after the update and NaN/Inf are caught only once the weights are hit; use "
                      "extensions.GradientLoggingUpdater for the guard, localisation and float64 replay",
                      stacklevel=2)
        trainer.extend(PlainUpdaterMonitor(debug, writer), name=MONITOR_NAME)
    if not isinstance(updater, GradientLoggingMixin) and debug.float64:
        updater.converter = float64_converter(updater.converter)
        check_float64(updater.get_optimizer("main").target)
    trainer._ext_debug = debug
