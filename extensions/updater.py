"""The gradient-logging, NaN/Inf-guarding updater: ``GradientLoggingUpdater`` and its mixin.

One iteration, top to bottom, is StandardUpdater's (``GradientLoggingMixin.update_core``): next batch ->
converter (float inputs cast to float64 in float64 mode) -> ``optimizer.update(loss_func, *in_arrays)``.
Inside that call, after backward and before the update rules, the optimizer's first 'pre' hook (see
``guard``) computes the per-parameter statistics, checks the loss and the global gradient norm, copies the
weights and optimizer state (see ``backup``) and vetoes the update on a NaN/Inf; its last 'post' hook checks
the weights and restores them from the copy if the update made them non-finite. On a failure the iteration
is replayed (same batch, same pre-update weights, same random state) to localise the birth and to replay it
in float64, a report and the last good state are written, and the policy (raise, warn, skip) decides what
happens next.
"""
from __future__ import annotations

from typing import Any

import chainer
import numpy as np
from chainer.dataset import convert
from chainer.training.updaters import StandardUpdater

from . import chainer_compat as compat
from .config import DebugConfig
from .dtype import check_float64, float64_converter
from .guard import POST_HOOK, PRE_HOOK, Session, guard_optimizers
from .report import Failure


def _is_device_spec(value: Any) -> bool:
    """Whether ``value`` is a device specifier (an int, a str, a ``chainer.backend.Device``) rather than a converter."""
    return isinstance(value, (int, str, chainer.backend.Device)) and not isinstance(value, bool)


def _device_form(args: tuple, kwargs: dict) -> tuple:
    """StandardUpdater's positional arguments, the MDN blog post's ``(iterator, optimizer, device)`` form turned
    into ``device=``; raises TypeError when a device is given both ways."""
    if len(args) >= 3 and _is_device_spec(args[2]):
        if len(args) > 3 or "device" in kwargs:
            raise TypeError(f"device given twice: {args[2]!r} as the third positional argument (the converter's "
                            "place) and again as device")
        kwargs["device"] = args[2]
        args = args[:2]
    return args


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
        args = _device_form(args, kwargs)
        super().__init__(*args, **kwargs)
        self.debug = debug
        self.out = out
        self.writer = writer
        guard_optimizers(self, self._ext)

    @property
    def _ext(self) -> Session:
        state = self.__dict__.get("_ext_state")
        if state is None:
            state = self.__dict__["_ext_state"] = Session(self)
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
        for guard in self._ext.guards.values():
            guard.float64_checked = False

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
        return compat.call_converter(self.converter, batch, self.input_device)

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
        """One iteration as StandardUpdater's: next batch, converter, ``optimizer.update(loss_func, *in_arrays)``.

        The guard, the statistics and the rollback run inside that call (the optimizer's hooks); the loss the
        forward pass returns is handed to the guard on the way.
        """
        iterator = self.get_iterator("main")
        optimizer = self.get_optimizer("main")
        in_arrays = self.next_batch()
        self.guarded_update(optimizer, in_arrays)
        if self.auto_new_epoch and iterator.is_new_epoch:
            optimizer.new_epoch(auto=True)

    def guarded_update(self, optimizer: chainer.Optimizer, in_arrays: Any) -> None:
        """``optimizer.update`` on ``in_arrays`` (spread as StandardUpdater spreads them) with the loss recorded
        and the batch kept for a replay."""
        st = self._ext
        debug = st.debug
        nf = debug.nonfinite
        check = nf.check
        target = optimizer.target
        guard = st.guards.get("main")
        if guard is None or guard.optimizer is not optimizer:
            guard = guard_optimizers(self, st).guards["main"]
        compat.place_hooks(optimizer, PRE_HOOK, POST_HOOK)  # hooks the user added since go after the guard
        if debug.float64 and not guard.float64_checked:
            check_float64(target)  # before the forward pass, where Chainer's type check would fail first
        rng = st.rng.capture(target.xp, st.seeder) if check and (nf.localize or nf.replay_float64) else None
        own = type(self).compute_loss is not GradientLoggingMixin.compute_loss
        lossfun = self.loss_func or target
        st.context = (self.compute_loss, in_arrays, rng)
        st.loss = None
        st.loss_var = None
        probe = None
        if own:
            lossfun = _Recorded(st, lambda *args, **kwargs: self.compute_loss(in_arrays)) if check else (
                lambda *args, **kwargs: self.compute_loss(in_arrays))
        elif check:
            if isinstance(lossfun, chainer.Link):
                probe = _LossProbe(st)
                lossfun.add_hook(probe, _LossProbe.name)
            else:
                lossfun = _Recorded(st, lossfun)
        try:
            if isinstance(in_arrays, tuple):
                optimizer.update(lossfun, *in_arrays)
            elif isinstance(in_arrays, dict):
                optimizer.update(lossfun, **in_arrays)
            else:
                optimizer.update(lossfun, in_arrays)
        finally:
            if probe is not None:
                lossfun.delete_hook(_LossProbe.name)
            st.context = None
            st.loss = None
            st.loss_var = None

    def serialize(self, serializer: Any) -> None:
        """Serialise the updater as StandardUpdater does, plus the toolkit's skip counters (under ``ext_nonfinite``)."""
        super().serialize(serializer)
        st = self._ext
        sub = serializer["ext_nonfinite"]
        try:
            failures = sub("failures", st.failures)
            skipped = sub("skipped", st.skipped)
        except KeyError:  # a snapshot written without the toolkit
            return
        if isinstance(serializer, chainer.serializer.Deserializer):
            st.failures, st.skipped = int(failures), int(skipped)


class _LossProbe(chainer.LinkHook):
    """Link hook on the loss Link during one ``optimizer.update``: hands the loss it returns to the guard."""

    name = "ext_loss_probe"

    def __init__(self, session: Session):
        self.session = session

    def forward_postprocess(self, args: Any) -> None:
        if args.link is not None and self.session.loss is None:
            _record(self.session, args.out)


class _Recorded:
    """A loss function that hands the loss it returns to the guard."""

    def __init__(self, session: Session, lossfun: Any):
        self.session, self.lossfun = session, lossfun

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        loss = self.lossfun(*args, **kwargs)
        _record(self.session, loss)
        return loss


def _record(session: Session, loss: Any) -> None:
    """Hand the loss's value (and, at statistics iterations, the loss Variable itself) to the guard."""
    if isinstance(loss, chainer.Variable):
        session.loss = _host_scalar(loss.array)
        logged, computed = session.stats_due(session.updater.iteration + 1)
        if computed and (logged or session.tb_report is not None):  # statistics that are reported
            session.loss_var = loss
    else:
        session.loss = _host_scalar(loss)


def _host_scalar(a: Any) -> float:
    if type(a) is np.ndarray:
        return float(a) if a.ndim == 0 else float(a.sum())
    return float(chainer.backend.CpuDevice().send(a).sum())


class GradientLoggingUpdater(GradientLoggingMixin, StandardUpdater):
    """A drop-in ``StandardUpdater`` (same arguments) with gradient logging, float64 mode and NaN/Inf guards.

    The MDN blog post's form ``GradientLoggingUpdater(train_iter, optimizer, device)`` works too: a device
    specifier (int, str, ``chainer.backend.Device``) as the third positional argument is the device, a callable
    the converter. ``debug`` is an ``extensions.DebugConfig`` (or its dict), usually set by ``extensions.install``.
    """

    def __init__(self, iterator: Any, optimizer: Any, converter: Any = convert.concat_examples, device: Any = None,
                 loss_func: Any = None, loss_scale: float | None = None, auto_new_epoch: bool = True, *,
                 input_device: Any = None, debug: DebugConfig | None = None, out: str | None = None,
                 writer: Any = None):
        if _is_device_spec(converter):
            if device is not None:
                raise TypeError(f"device given twice: {converter!r} as the third positional argument (the "
                                f"converter's place) and {device!r} as device")
            converter, device = convert.concat_examples, converter
        super().__init__(iterator, optimizer, converter=converter, device=device, loss_func=loss_func,
                         loss_scale=loss_scale, auto_new_epoch=auto_new_epoch, input_device=input_device,
                         debug=debug, out=out, writer=writer)
