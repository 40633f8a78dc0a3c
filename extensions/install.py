"""``install(trainer, debug)``: every switch of the ``debug:`` section on any Chainer Trainer.

Every optimizer of the trainer's updater gets the toolkit's guard (``guard.OptimizerGuard``: statistics,
NaN/Inf guard, rollback, inside ``optimizer.update``), so any updater that updates through
``optimizer.update`` (StandardUpdater, a GAN's updater with one optimizer per network) is guarded and
logged per optimizer. A ``GradientLoggingUpdater`` (or any ``GradientLoggingMixin`` updater) also hands
the guard its loss and batch, for the loss check, the localisation and the float64 replay.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import chainer
import numpy as np
from chainer import training

from . import chainer_compat as compat
from .config import DebugConfig
from .dtype import cast_link, check_float64, float64_converter, non_float64_params, set_float64
from .guard import Session, guard_optimizers
from .multinode import is_multi_node, rank_of
from .tensorboard import EXTENSION_NAME, TensorBoardReport, open_writer
from .updater import GradientLoggingMixin

logger = logging.getLogger("extensions")

SCHEDULE_NAME = "ext_report_schedule"


def log_schedule(trainer: training.Trainer) -> list[tuple[float, str]] | None:
    """(period, unit) of every LogReport/PlotReport trigger of ``trainer``; None when there is none or one
    is not an interval (then nothing is known of when the observation is read)."""
    schedule = []
    for entry in compat.trainer_extensions(trainer).values():
        if isinstance(entry.extension, (training.extensions.LogReport, training.extensions.PlotReport)):
            trigger = compat.extension_trigger(entry.extension)
            if not isinstance(trigger, training.triggers.IntervalTrigger):
                return None
            schedule.append((trigger.period, trigger.unit))
    return schedule or None


class ReportSchedule(training.Extension):
    """Holds the toolkit's session of a trainer: when training starts, tells it when the trainer's logs are
    written; after the first iteration, warns (one line) if the updater updated no optimizer through the guard."""

    priority = training.PRIORITY_READER
    default_name = SCHEDULE_NAME

    def __init__(self, session: Session):
        self.session = session
        self.watching = True
        self.trigger = self._watching  # called after the first iteration only, without an IntervalTrigger's cost

    def _watching(self, trainer: training.Trainer) -> bool:
        return self.watching

    def initialize(self, trainer: training.Trainer) -> None:
        st = self.session
        logged = st.debug.gradients.report == "logged"
        st.log_schedule = log_schedule(trainer) if logged else None
        st.next_log = 0
        st.due = (-1, (False, False))
        guard_optimizers(trainer.updater, st)
        self.calls_before = st.guard_calls

    def __call__(self, trainer: training.Trainer) -> None:
        if not self.watching:
            return
        if self.session.guard_calls == getattr(self, "calls_before", 0) and not getattr(self, "waited", False) and \
                any(g.optimizer is not None and is_multi_node(g.optimizer) for g in self.session.guards.values()):
            self.waited = True  # a multi-node optimizer's first update may only broadcast the weights: one more
            return
        self.watching = False
        if self.session.guard_calls == getattr(self, "calls_before", 0):
            warnings.warn(f"extensions: {type(trainer.updater).__name__} updated no optimizer through "
                          "optimizer.update, so the toolkit saw no gradients (no statistics, no NaN/Inf guard)",
                          stacklevel=2)


def _logdir(trainer: training.Trainer, debug: DebugConfig) -> str | None:
    logdir = debug.tensorboard.logdir
    if logdir is False:
        return None
    if logdir is None:
        return os.path.join(trainer.out, "tb")
    return os.fspath(logdir)


def _cast_float64(updater: Any) -> None:
    """Cast every optimizer's model and state to float64 (float64 mode from YAML alone); say so in one line."""
    if np.dtype(chainer.global_config.dtype) != np.float64:
        set_float64(True)
    cast = []
    for name, optimizer in updater.get_all_optimizers().items():
        target = optimizer.target
        before = non_float64_params((n, p) for n, p in target.namedparams(include_uninit=False))
        cast_link(target, np.float64, optimizer)
        if before:
            cast.append(f"{name} ({len(before)} parameter(s))")
    if cast:
        logger.warning("extensions: float64 mode: cast %s and optimizer state to float64", ", ".join(cast))


def install(trainer: training.Trainer, debug: DebugConfig | dict | None = None) -> None:
    """Wire the ``debug:`` switches into ``trainer``: guards on every optimizer, TensorBoard, reports. Idempotent.

    Under a ChainerMN multi-node optimizer only rank 0 opens a TensorBoard writer.

    With ``float64: true`` the models and optimizer state are cast to float64 here (one line says so) and
    float inputs are cast by the converter. A second call updates the switches; the TensorBoard writer of
    the first call is kept.
    """
    if debug is None:
        debug = DebugConfig()
    elif isinstance(debug, dict):
        debug = DebugConfig.from_dict(debug)
    updater = trainer.updater
    extensions = compat.trainer_extensions(trainer)
    writer = None
    optimizers = updater.get_all_optimizers() if hasattr(updater, "get_all_optimizers") else {}
    # under ChainerMN every process sees the same averaged gradients and weights: rank 0 alone writes them
    rank = max((rank_of(o) for o in optimizers.values()), default=0)
    if EXTENSION_NAME in extensions:
        writer = trainer.get_extension(EXTENSION_NAME).writer
    elif rank != 0:
        pass
    else:
        logdir = _logdir(trainer, debug)
        if logdir is not None:
            writer = open_writer(logdir)
            trainer.extend(TensorBoardReport(writer), name=EXTENSION_NAME)
    if not hasattr(updater, "get_all_optimizers"):
        warnings.warn(f"extensions: {type(updater).__name__} has no get_all_optimizers(): the toolkit cannot "
                      "reach its optimizers (no statistics, no NaN/Inf guard)", stacklevel=2)
        return
    if debug.float64:
        _cast_float64(updater)
    if isinstance(updater, GradientLoggingMixin):
        updater.debug = debug
        session = updater._ext
    elif SCHEDULE_NAME in extensions:
        session = trainer.get_extension(SCHEDULE_NAME).session
        session.debug = debug
    else:
        session = Session(updater)
        session.debug = debug
    if not isinstance(updater, GradientLoggingMixin) and debug.float64:
        updater.converter = float64_converter(updater.converter)
        for optimizer in updater.get_all_optimizers().values():
            check_float64(optimizer.target)
    session.out = trainer.out
    session.writer = writer
    session.tb_report = trainer.get_extension(EXTENSION_NAME) if writer is not None else None
    for guard in session.guards.values():
        guard.float64_checked = False
    guard_optimizers(updater, session)
    if SCHEDULE_NAME not in extensions:
        trainer.extend(ReportSchedule(session), name=SCHEDULE_NAME)
