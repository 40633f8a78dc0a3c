"""The gradient-logging, NaN/Inf-guarding updater: ``GradientLoggingUpdater`` and its mixin.

One iteration, top to bottom (``GradientLoggingMixin.update_core``):
next batch -> converter (float inputs cast to float64 in float64 mode) -> save the random
state -> cleargrads -> ``compute_loss`` -> backward -> per-parameter statistics and the guard
(loss and global gradient norm finite) -> histograms -> copy of weights and optimizer state
(see ``backup``) and optimizer update, only when finite -> parameters checked after the update
(restored from the copy if the update made them non-finite). On a failure the iteration is
replayed (same batch, same pre-update weights, same random state) to localise the birth and to
replay it in float64, a report and the last good state are written, and the policy (raise,
warn, skip) decides what happens next.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import chainer
import numpy as np
from chainer.dataset import convert
from chainer.training.updaters import StandardUpdater

from .arrays import fast_access, raw_grads
from .backup import UnsavedUpdateError, UpdateBackup
from .config import DebugConfig
from .dtype import check_float64, float64_converter
from .errors import NonFiniteError
from .localize import Birth, localize
from .replay import RngState, RngTracker, replay_float64
from .report import Failure, update_counts, write_report
from .stats import GradSummary, HostGradients, gradient_summary, nonfinite_counts
from .tensorboard import add_histograms_safe

logger = logging.getLogger("extensions")


class _State:
    """The mixin's bookkeeping, created lazily so subclasses need not call the mixin's __init__."""

    def __init__(self) -> None:
        self.debug = DebugConfig()
        self.out: str | None = None
        self.writer: Any = None
        self.seeder = np.random.default_rng()
        # (the target, parameter paths, parameters, whether ``arrays.raw_grads`` may read them)
        self.table: tuple[Any, list[str], list[chainer.Parameter], bool] | None = None
        self.float64_checked = False
        self.failures = 0
        self.skipped = 0
        self.last_failure: Failure | None = None
        self.backup = UpdateBackup()
        self.rng = RngTracker()
        # (period, unit) of the trainer's LogReport/PlotReport triggers, found when training starts (see
        # ``install``); None: hand the statistics to the reporter at every statistics iteration
        self.log_schedule: list[tuple[float, str]] | None = None
        self.next_log = 0  # with a schedule in iterations only: no log is written before this iteration
        self.tb_report: Any = None
        self.grad_pass: HostGradients | None = None  # the fast gradient pass for this net, once seen


class GradientLoggingMixin:
    """Gives a ``StandardUpdater`` subclass per-parameter gradient logging, float64 mode and NaN/Inf guards.

    Use as ``class MyUpdater(GradientLoggingMixin, StandardUpdater)``; ``debug=`` and
    ``out=`` are keyword arguments of ``__init__`` (``extensions.install`` also sets them).

    Extension points (override these, not ``update_core``):

    - ``compute_loss(in_arrays) -> Variable``: the forward pass of one iteration on the
      converted arrays. Default: ``loss_func(*in_arrays)`` for a tuple, ``(**in_arrays)``
      for a dict, ``(in_arrays)`` for one array, where ``loss_func`` is the updater's
      ``loss_func`` or the main optimizer's target. Replays call it again with the same
      arrays, weights and random state, so it must depend on nothing else: reset
      recurrent state (e.g. ``LSTM.reset_state()``) inside it.
    - ``next_batch() -> in_arrays``: the main iterator's next batch through the converter.

    Reporter keys: ``grad/<path>/{norm,mean,std,max_abs,zero_frac,nan,inf}``,
    ``grad/<path>/missing`` (1 when a parameter got no gradient), ``grad/global_norm``,
    ``nonfinite/skipped``. With ``gradients.report: logged`` (the default) and a trainer set up by
    ``install``, the statistics reach the reporter at the iterations the trainer's LogReport and
    PlotReport write, so their logs show the values of that iteration rather than an average over
    the interval; TensorBoard still gets them every ``gradients.every`` iterations.
    """

    def __init__(self, *args: Any, debug: DebugConfig | None = None, out: str | None = None,
                 writer: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.debug = debug
        self.out = out
        self.writer = writer

    @property
    def _ext(self) -> _State:
        state = self.__dict__.get("_ext_state")
        if state is None:
            state = self.__dict__["_ext_state"] = _State()
        return state

    @property
    def debug(self) -> DebugConfig:
        """The toolkit switches in force; setting them re-wraps the converter for float64 mode."""
        return self._ext.debug

    @debug.setter
    def debug(self, value: DebugConfig | dict | None) -> None:
        if value is None:
            value = DebugConfig()
        elif isinstance(value, dict):
            value = DebugConfig.from_dict(value)
        self._ext.debug = value
        base = getattr(self.converter, "_ext_float64_base", None)
        if value.float64 and base is None:
            self.converter = float64_converter(self.converter)
        elif not value.float64 and base is not None:
            self.converter = base
        self._ext.float64_checked = False

    @property
    def out(self) -> str | None:
        """Folder under which ``nonfinite/`` reports go (the trainer's ``out`` after ``install``)."""
        return self._ext.out

    @out.setter
    def out(self, value: str | None) -> None:
        self._ext.out = value

    @property
    def writer(self) -> Any:
        """The tensorboardX writer for histograms (set by ``install``), or None."""
        return self._ext.writer

    @writer.setter
    def writer(self, value: Any) -> None:
        self._ext.writer = value

    @property
    def skipped(self) -> int:
        """How many updates were skipped because of a NaN/Inf."""
        return self._ext.skipped

    @property
    def last_failure(self) -> Failure | None:
        """The most recent non-finite iteration's report (None if none happened)."""
        return self._ext.last_failure

    # -- extension points -------------------------------------------------------------
    def next_batch(self) -> Any:
        """The main iterator's next batch, converted (and cast to float64 in float64 mode)."""
        batch = self.get_iterator("main").next()
        return convert._call_converter(self.converter, batch, self.input_device)

    def compute_loss(self, in_arrays: Any) -> chainer.Variable:
        """Forward pass for one iteration on converted arrays; default = StandardUpdater's loss_func(*in_arrays)
        (or **in_arrays for dicts, in_arrays for a single array)."""
        loss_func = self.loss_func or self.get_optimizer("main").target
        if isinstance(in_arrays, tuple):
            return loss_func(*in_arrays)
        if isinstance(in_arrays, dict):
            return loss_func(**in_arrays)
        return loss_func(in_arrays)

    # -- one iteration ----------------------------------------------------------------
    def update_core(self) -> None:
        """One guarded, logged training iteration (see the module docstring)."""
        iterator = self.get_iterator("main")
        optimizer = self.get_optimizer("main")
        in_arrays = self.next_batch()
        self.guarded_update(optimizer, in_arrays)
        if self.auto_new_epoch and iterator.is_new_epoch:
            optimizer.new_epoch(auto=True)

    def _param_table(self, target: chainer.Link) -> tuple[Any, list[str], list[chainer.Parameter], bool]:
        """(target, parameter paths, parameters, whether ``arrays.raw_grads`` may read them), made once per target."""
        table = self._ext.table
        if table is None or table[0] is not target:
            named = list(target.namedparams(include_uninit=True))
            params = [p for _, p in named]
            table = self._ext.table = (target, [n.lstrip("/") for n, _ in named], params, fast_access(params))
            self._ext.grad_pass = None
        return table

    def guarded_update(self, optimizer: chainer.Optimizer, in_arrays: Any) -> bool:
        """Forward, backward, statistics, guard and update on ``in_arrays``; True if the weights were updated."""
        # on a small net this runs in a millisecond's iteration: each Python call or attribute chain saved is
        # a visible part of the toolkit's cost, hence the flat code
        st = self._ext
        debug = st.debug
        nf = debug.nonfinite
        check = nf.check
        iteration = self.iteration + 1
        target = optimizer.target
        table = st.table
        if table is None or table[0] is not target:  # the cached table, without a call in the common case
            table = self._param_table(target)
        names, params = table[1], table[2]
        rng = st.rng.capture(target.xp, st.seeder) if check and (nf.localize or nf.replay_float64) else None

        unchecked = debug.float64 and not st.float64_checked
        if unchecked:
            check_float64(target)  # before the forward pass, where Chainer's type check would fail first
        target.cleargrads()
        loss = self.compute_loss(in_arrays)
        loss.backward(loss_scale=optimizer._loss_scale)
        if unchecked:
            check_float64(target)  # parameters initialised lazily by that forward pass
            st.float64_checked = True
        loss_value = _host_scalar(loss.array) if check else math.nan
        del loss  # free the graph before the update, as Optimizer.update(lossfun) does

        grads_config = debug.gradients
        every = grads_config.every
        logged = every > 0 and grads_config.report != "tensorboard" and (
            st.log_schedule is None or iteration >= st.next_log and self._logged_now(iteration))
        stats_now = every > 0 and (iteration % every == 0 or (logged and st.log_schedule is not None))
        backup = st.backup
        # a small net's pre-update copy rides along the pass over the gradients (see backup.begin)
        save = backup.begin(params, optimizer) if check else None
        summary = None
        total = 0.0
        if stats_now or check:
            grads = raw_grads(params) if table[3] else [p.grad for p in params]
            host = st.grad_pass
            result = host.table(grads, save) if host is not None else None
            if result is None:
                summary = gradient_summary(names, grads, stats_now, save)
                st.grad_pass = HostGradients.fitting(names, grads)
                total = summary.sqnorm
                report = summary.report_array() if summary.has_stats else None
            else:
                total = result[0]
                report = (host.keys, result[1])
            if stats_now and report is not None:
                if logged:
                    _report(dict(zip(report[0], report[1].tolist())))
                elif st.tb_report is not None:
                    st.tb_report.stage(report, iteration)
        hist = grads_config.histograms_every
        if st.writer is not None and hist > 0 and iteration % hist == 0:
            self._histograms(names, params, iteration)

        updated = True
        if not check:
            optimizer.update()
        elif not (math.isfinite(loss_value) and math.isfinite(total)):
            updated = False
            if summary is None:
                summary = gradient_summary(names, grads, True)
            trigger = (f"loss is {loss_value}" if not math.isfinite(loss_value)
                       else f"global gradient norm is {summary.global_norm}")
            self._on_nonfinite(optimizer, in_arrays, rng, trigger, "forward" if
                               not math.isfinite(loss_value) else "backward", loss_value, summary, {})
        else:
            if save is None:  # |g| <= the global norm: the bound under which rules may show the update stays finite
                backup.finish(params, optimizer, math.sqrt(total) * (1 + 1e-9))
            optimizer._ext_grad_sqnorm = (optimizer.t, total)
            if backup.delegated:
                try:
                    optimizer.update()
                finally:
                    backup.settle()
            else:
                optimizer.update()
            if not backup.params_finite(params):
                updated = False
                bad = nonfinite_counts(names, [p.array for p in params])
                try:
                    backup.restore(optimizer)
                except UnsavedUpdateError as e:  # nothing to restore: say where, and stop
                    raise UnsavedUpdateError(f"iteration {iteration}: {', '.join(bad)} non-finite after the "
                                             f"update; {e}") from None
                # the gradients as they were before the update (its hooks may have changed them since)
                before = summary or GradSummary(total, tuple(names))
                self._on_nonfinite(optimizer, in_arrays, None, "parameters after the update", "update",
                                   loss_value, before, bad)
        if grads_config.print:
            for name, param in target.namedparams(include_uninit=False):
                print(name, param.grad)
        return updated

    def _logged_now(self, iteration: int) -> bool:
        """Whether a LogReport/PlotReport of the schedule will write after this iteration's update."""
        schedule = self._ext.log_schedule or ()
        logged = False
        for period, unit in schedule:
            if unit == "iteration":
                if (iteration - 1) // period != iteration // period:
                    logged = True
                continue
            try:
                current, previous = self.epoch_detail, self.previous_epoch_detail
            except AttributeError:  # an iterator without epochs: report rather than miss the log
                return True
            if (previous or 0.0) // period != current // period:
                return True
        if schedule and all(unit == "iteration" and float(period).is_integer() for period, unit in schedule):
            # the next iteration any of them writes: nothing to ask before it
            self._ext.next_log = min(math.ceil((iteration // period + 1) * period) for period, _ in schedule)
        return logged

    def _histograms(self, names: list[str], params: list[chainer.Parameter], step: int) -> None:
        arrays = {f"grad/{name}": p.grad for name, p in zip(names, params) if p.grad is not None}
        arrays.update((f"param/{name}", p.array) for name, p in zip(names, params) if p.array is not None)
        add_histograms_safe(self.writer, arrays, step)

    # -- failure path -------------------------------------------------------------------
    def _on_nonfinite(self, optimizer: chainer.Optimizer, in_arrays: Any, rng: RngState | None, trigger: str,
                      stage: str, loss_value: float | None, summary: GradSummary,
                      params_nonfinite: dict[str, tuple[int, int]]) -> None:
        st, nf = self._ext, self._ext.debug.nonfinite
        st.failures += 1
        iteration = self.iteration + 1
        target = optimizer.target
        out = st.out or "result"
        if nf.policy != "raise":
            st.skipped += 1
            chainer.reporter.report({"nonfinite/skipped": float(st.skipped)})
        if nf.policy == "skip" and st.failures > 1:
            update_counts(out, st.skipped, st.failures, iteration)
            return

        _, names, params, _ = self._param_table(target)
        grads_nonfinite = summary.nonfinite or nonfinite_counts(names, [p.grad for p in params])
        birth: Birth | None = None
        replay_loss = None
        if stage == "update":
            bad = sorted(params_nonfinite)
            rule = type(params[names.index(bad[0])].update_rule).__name__ if bad else None
            birth = Birth("update", "nan" if any(n for n, _ in params_nonfinite.values()) else "inf",
                          bad[0].rpartition("/")[0] or "/" if bad else None, rule, None)
        elif nf.localize:
            birth, replay_loss = localize(self.compute_loss, in_arrays, target, rng, nf.allow_inf_in,
                                          optimizer._loss_scale)
        verdict = detail = None
        if nf.replay_float64 and stage != "update":
            result = replay_float64(self.compute_loss, in_arrays, target, rng)
            verdict, detail = result.verdict, result.detail
        failure = Failure(
            iteration=iteration, where=birth.where if birth else stage, trigger=trigger, policy=nf.policy,
            loss=loss_value, replay_loss=replay_loss, global_norm=summary.global_norm,
            grads_nonfinite=grads_nonfinite,
            params_nonfinite=params_nonfinite, missing_grads=summary.missing, birth=birth,
            verdict=verdict, verdict_detail=detail, skipped=st.skipped, failures=st.failures)
        report_path = write_report(out, failure, target, optimizer, in_arrays)
        st.last_failure = failure
        if nf.policy == "raise":
            raise NonFiniteError(failure.headline(), iteration=iteration, where=failure.where, link=failure.link,
                                 function=failure.function, verdict=verdict, report_path=report_path)
        if nf.policy == "warn":
            logger.warning("update skipped:\n%s", failure.to_text())

    def serialize(self, serializer: Any) -> None:
        """Serialise the updater as StandardUpdater does, plus the toolkit's skip counters."""
        super().serialize(serializer)
        st = self._ext
        try:
            st.failures = int(serializer("ext_nonfinite_failures", st.failures))
            st.skipped = int(serializer("ext_nonfinite_skipped", st.skipped))
        except KeyError:  # a snapshot written without the toolkit
            pass


def _report(values: dict[str, float]) -> None:
    """``chainer.reporter.report(values)`` for plain floats, without its per-value Variable copy."""
    try:
        reporter = chainer.reporter.get_current_reporter()
    except IndexError:  # outside any reporter scope, as report() would be: nothing to do
        return
    reporter.observation.update(values)


def _host_scalar(a: Any) -> float:
    if type(a) is np.ndarray:
        return float(a) if a.ndim == 0 else float(a.sum())
    return float(chainer.backend.CpuDevice().send(a).sum())


class GradientLoggingUpdater(GradientLoggingMixin, StandardUpdater):
    """A StandardUpdater with per-parameter gradient logging, float64 mode and NaN/Inf guards.

    ``GradientLoggingUpdater(train_iter, optimizer, device)`` (as the MDN blog post builds its updater) works;
    ``debug`` is an ``extensions.DebugConfig`` (or its dict), usually set by ``extensions.install``.
    """

    def __init__(self, iterator: Any, optimizer: Any, device: Any = -1, *, debug: DebugConfig | None = None,
                 converter: Any = convert.concat_examples, loss_func: Any = None, loss_scale: float | None = None,
                 auto_new_epoch: bool = True, out: str | None = None, writer: Any = None,
                 input_device: Any = None):
        super().__init__(iterator, optimizer, converter=converter, device=device, loss_func=loss_func,
                         loss_scale=loss_scale, auto_new_epoch=auto_new_epoch, input_device=input_device,
                         debug=debug, out=out, writer=writer)
