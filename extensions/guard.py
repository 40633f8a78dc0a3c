"""The toolkit inside an optimizer's update: per-parameter statistics, the NaN/Inf guard, rollback and skip.

Chainer's ``Optimizer.update(lossfun, *args)`` runs: forward, cleargrads, backward, the 'pre' hooks,
``t += 1``, the update rules (only if ``is_safe_to_update()``), the 'post' hooks. An ``OptimizerGuard``
adds two hooks to an optimizer: the first 'pre' hook (statistics of the raw gradients, the guard on the
loss and the global gradient norm, the copy of weights and optimizer state that allows a rollback; on a
non-finite value the update rules are vetoed) and the last 'post' hook (on a veto ``t`` is put back, so a
skipped step leaves ``t``, the weights and the optimizer state as they were; else the weights are checked
and restored from the copy if the update made them non-finite). Any updater that calls
``optimizer.update`` gets them, one guard per optimizer: ``guard_optimizers(updater)`` or ``install``.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import chainer
import numpy as np

from . import chainer_compat as compat
from .arrays import fast_access, raw_grads
from .backup import UpdateBackup
from .config import DebugConfig
from .dtype import check_float64
from .errors import NonFiniteError
from .localize import Birth, localize
from .multinode import Collective, collective_of
from .replay import RngTracker, replay_float64
from .report import Failure, batch_arrays, report_path, update_counts, write_report
from .stats import STATS, GradSummary, HostGradients, gradient_summary, nonfinite_counts
from .tensorboard import add_histograms_safe

logger = logging.getLogger("extensions")

PRE_HOOK = "ext_guard"
POST_HOOK = "ext_guard_post"


class Session:
    """The toolkit's state for one updater: switches, outputs, counters, and a guard per optimizer."""

    def __init__(self, updater: Any) -> None:
        self.updater = updater
        self.debug = DebugConfig()
        self.out: str | None = None
        self.writer: Any = None
        self.seeder = np.random.default_rng()
        self.guards: dict[str, OptimizerGuard] = {}
        self.failures = 0
        self.skipped = 0
        self.last_failure: Failure | None = None
        self.rng = RngTracker()
        # (period, unit) of the trainer's LogReport/PlotReport triggers, found when training starts (see
        # ``install``); None: hand the statistics to the reporter at every statistics iteration
        self.log_schedule: list[tuple[float, str]] | None = None
        self.next_log = 0  # with a schedule in iterations only: no log is written before this iteration
        self.due: tuple[int, tuple[bool, bool]] = (-1, (False, False))  # ``stats_due``'s last answer
        self.tb_report: Any = None
        # (compute_loss, in_arrays, rng) of the updater's own iteration while it runs: what a replay needs
        self.context: tuple[Any, Any, Any] | None = None
        self.loss: float | None = None  # the loss of the update in progress, where the updater saw it
        # the loss Variable of a statistics iteration, held until the 'pre' hook: when a gradient is all zeros,
        # its graph says whether the parameter got no gradient at all (Chainer's update zero-fills those before
        # the hooks); None: unknown
        self.loss_var: chainer.Variable | None = None
        self.guard_calls = 0  # 'pre' hook calls so far (an updater that bypasses the optimizer makes none)

    def guard(self, name: str, optimizer: chainer.Optimizer) -> OptimizerGuard:
        """The guard of ``optimizer`` (registered as ``name``), its hooks added (first 'pre', last 'post')."""
        guard = self.guards.get(name)
        if guard is None or guard.optimizer is not optimizer:
            guard = self.guards[name] = OptimizerGuard(self, name, optimizer)
        guard.attach()
        return guard

    def prefix(self, name: str) -> str:
        """Reporter prefix for an optimizer's statistics: ``grad`` for a lone 'main', else ``grad/<name>``."""
        return "grad" if name == "main" and len(self.guards) <= 1 else f"grad/{name}"

    def stats_due(self, iteration: int) -> tuple[bool, bool]:
        """(whether the statistics go to the reporter, whether they are computed) at ``iteration``."""
        due = self.due
        if due[0] == iteration:
            return due[1]
        grads_config = self.debug.gradients
        every = grads_config.every
        logged = every > 0 and grads_config.report != "tensorboard" and (
            self.log_schedule is None or iteration >= self.next_log and self.logged_now(iteration))
        answer = logged, every > 0 and (iteration % every == 0 or (logged and self.log_schedule is not None))
        self.due = (iteration, answer)
        return answer

    def logged_now(self, iteration: int) -> bool:
        """Whether a LogReport/PlotReport of the schedule will write after this iteration's update."""
        schedule = self.log_schedule or ()
        logged = False
        for period, unit in schedule:
            if unit == "iteration":
                if (iteration - 1) // period != iteration // period:
                    logged = True
                continue
            try:
                current, previous = self.updater.epoch_detail, self.updater.previous_epoch_detail
            except AttributeError:  # an iterator without epochs: report rather than miss the log
                return True
            if (previous or 0.0) // period != current // period:
                return True
        if schedule and all(unit == "iteration" and float(period).is_integer() for period, unit in schedule):
            # the next iteration any of them writes: nothing to ask before it
            self.next_log = min(math.ceil((iteration // period + 1) * period) for period, _ in schedule)
        return logged


class _PreHook:
    timing = "pre"
    call_for_each_param = False
    name = PRE_HOOK

    def __init__(self, guard: OptimizerGuard):
        self.guard = guard

    def __call__(self, optimizer: chainer.Optimizer) -> None:
        self.guard.pre(optimizer)


class _PostHook:
    timing = "post"
    call_for_each_param = False
    name = POST_HOOK

    def __init__(self, guard: OptimizerGuard):
        self.guard = guard

    def __call__(self, optimizer: chainer.Optimizer) -> None:
        self.guard.post(optimizer)


class OptimizerGuard:
    """Statistics, guard and rollback for one optimizer, run by its hooks (see the module docstring)."""

    def __init__(self, session: Session, name: str, optimizer: chainer.Optimizer):
        self.session, self.name, self.optimizer = session, name, optimizer
        # (the target, parameter paths, parameters, whether ``arrays.raw_grads`` may read them)
        self.table: tuple[Any, list[str], list[chainer.Parameter], bool] | None = None
        self.grad_pass: HostGradients | None = None  # the fast gradient pass for this net, once seen
        self.grad_prefix = ""
        self.backup = UpdateBackup()
        self.float64_checked = False
        self.sqnorm: tuple[int, float] | None = None  # (optimizer.t, squared global norm) of this step
        self.vetoed = False  # this step's update rules are vetoed by the guard
        # (names, params, loss, squared norm, summary, iteration) of a step the 'post' hook must check
        self.pending: tuple[Any, ...] | None = None
        # a ChainerMN multi-node optimizer of several processes: the guard decides for all of them (``multinode``)
        self.collective: Collective | None = collective_of(optimizer)

    def attach(self) -> None:
        """Add the hooks to the optimizer if missing, and put them first ('pre') and last ('post')."""
        pre, post = compat.hook_dicts(self.optimizer)
        if not isinstance(pre.get(PRE_HOOK), _PreHook) or pre[PRE_HOOK].guard is not self:
            pre.pop(PRE_HOOK, None)
            self.optimizer.add_hook(_PreHook(self), PRE_HOOK, "pre")
        if not isinstance(post.get(POST_HOOK), _PostHook) or post[POST_HOOK].guard is not self:
            post.pop(POST_HOOK, None)
            self.optimizer.add_hook(_PostHook(self), POST_HOOK, "post")
        compat.place_hooks(self.optimizer, PRE_HOOK, POST_HOOK)

    def param_table(self, target: chainer.Link) -> tuple[Any, list[str], list[chainer.Parameter], bool]:
        """(target, parameter paths, parameters, whether ``arrays.raw_grads`` may read them), made once per target."""
        table = self.table
        if table is None or table[0] is not target:
            named = list(target.namedparams(include_uninit=True))
            params = [p for _, p in named]
            table = self.table = (target, [n.lstrip("/") for n, _ in named], params, fast_access(params))
            self.grad_pass = None
        return table

    def pre(self, optimizer: chainer.Optimizer) -> None:
        """After backward, before the update rules: statistics, the guard, the copy; a veto on NaN/Inf."""
        # on a small net this runs in a millisecond's iteration: each Python call or attribute chain saved is
        # a visible part of the toolkit's cost, hence the flat code
        st = self.session
        st.guard_calls += 1
        debug = st.debug
        check = debug.nonfinite.check
        iteration = st.updater.iteration + 1
        target = optimizer.target
        table = self.table
        if table is None or table[0] is not target:
            table = self.param_table(target)
        names, params = table[1], table[2]
        backup = self.backup
        if backup.delegated:  # an update that raised before the 'post' hook took its targets back
            backup.settle()
        self.vetoed = False
        self.pending = None
        if debug.float64 and not self.float64_checked:
            check_float64(target)  # parameters initialised lazily by the forward pass included
            self.float64_checked = True
        loss_value, st.loss = st.loss, None
        prefix = st.prefix(self.name)
        if prefix != self.grad_prefix:
            self.grad_prefix, self.grad_pass = prefix, None

        grads_config = debug.gradients
        logged, stats_now = st.stats_due(iteration)
        loss_var, st.loss_var = st.loss_var, None
        own_veto = check and compat.update_vetoed(optimizer)  # dynamic loss scaling found a NaN: its skip
        check = check and not own_veto
        summary = None
        total = 0.0
        grads = None
        if stats_now or check:
            grads = raw_grads(params) if table[3] else [p.grad for p in params]
            host = self.grad_pass
            result = host.table(grads) if host is not None else None
            if result is None:
                summary = gradient_summary(names, grads, stats_now)
                self.grad_pass = HostGradients.fitting(names, grads, prefix)
                total = summary.sqnorm
                report = summary.report_array(prefix) if summary.has_stats else None
                row_names, row = summary.names, summary.row
            else:
                total = result[0]
                report = (host.keys, result[1])
                row_names, row = host.names, result[1]
            if stats_now and report is not None and (logged or st.tb_report is not None):
                missing = _unreached(names, params, row_names, row, loss_var) if loss_var is not None else None
                if missing:  # Chainer's zeros are not theirs: report them missing
                    summary = gradient_summary(names, [None if n in missing else g for n, g in zip(names, grads)])
                    report = summary.report_array(prefix)
                if logged:
                    _report(dict(zip(report[0], report[1].tolist())))
                elif st.tb_report is not None:
                    st.tb_report.stage(report, iteration)
        hist = grads_config.histograms_every
        if st.writer is not None and hist > 0 and iteration % hist == 0:
            self._histograms(names, params, iteration)
        if grads_config.print:
            for name, param in target.namedparams(include_uninit=False):
                print(name, param.grad)
        if not check:
            return
        loss_ok = loss_value is None or math.isfinite(loss_value)
        grads_ok = math.isfinite(total)
        flags = None
        if self.collective is not None:  # every process learns what the others saw: one decision for all
            flags = self.collective.flags(not loss_ok, not grads_ok)
            failed = bool(flags.any())
        else:
            failed = not (loss_ok and grads_ok)
        if failed:
            self.vetoed = True
            compat.veto_update(optimizer)
            if summary is None or not summary.has_stats:
                summary = gradient_summary(names, grads, True)
            bad_loss = [] if flags is None else [int(r) for r in np.flatnonzero(flags[:, 0])]
            if not loss_ok:
                trigger = f"loss is {loss_value}"
            elif bad_loss:
                trigger = f"loss is non-finite on rank {', '.join(map(str, bad_loss))}"
            else:
                trigger = f"global gradient norm is {summary.global_norm}"
            self.session_failure(optimizer, trigger, "forward" if bad_loss or not loss_ok else "backward",
                                 loss_value, summary, {}, flags)
            return
        backup.finish(params, optimizer)
        self.sqnorm = (optimizer.t, total)
        self.pending = (names, params, loss_value, total, summary, iteration)

    def post(self, optimizer: chainer.Optimizer) -> None:
        """After the update rules: put ``t`` back after a veto; else check the weights, roll back if non-finite."""
        if self.vetoed:
            self.vetoed = False
            compat.clear_veto(optimizer)
            optimizer.t -= 1
            return
        pending, self.pending = self.pending, None
        if pending is None:
            return
        backup = self.backup
        if backup.delegated:
            backup.settle()
        names, params, loss_value, total, summary, iteration = pending
        if backup.params_finite(params):
            return
        bad = nonfinite_counts(names, [p.array for p in params])
        backup.restore(optimizer)
        # the gradients as they were before the update (its hooks may have changed them since)
        before = summary or GradSummary(total, tuple(names))
        self.session_failure(optimizer, "parameters after the update", "update", loss_value, before, bad)

    def _histograms(self, names: list[str], params: list[chainer.Parameter], step: int) -> None:
        sub = "" if self.grad_prefix == "grad" else f"{self.name}/"
        arrays = {f"grad/{sub}{name}": p.grad for name, p in zip(names, params) if p.grad is not None}
        arrays.update((f"param/{sub}{name}", p.array) for name, p in zip(names, params) if p.array is not None)
        add_histograms_safe(self.session.writer, arrays, step)

    def session_failure(self, optimizer: chainer.Optimizer, trigger: str, stage: str, loss_value: float | None,
                        summary: GradSummary, params_nonfinite: dict[str, tuple[int, int]],
                        flags: np.ndarray | None = None) -> None:
        """Count the failure, localise and replay it where the updater gave its batch, report, apply the policy.

        Under a multi-node optimizer every process comes here at the same iteration (``flags``: what each saw);
        the localisation and the float64 replay run on the processes where the value was born, and rank 0
        writes the report and the last good state.
        """
        st = self.session
        nf = st.debug.nonfinite
        st.failures += 1
        iteration = st.updater.iteration + 1
        target = optimizer.target
        out = st.out or "result"
        collective = self.collective
        writes = collective is None or collective.rank == 0
        if nf.policy != "raise":
            st.skipped += 1
            chainer.reporter.report({"nonfinite/skipped": float(st.skipped)})
        if nf.policy == "skip" and st.failures > 1:
            if writes:
                update_counts(out, st.skipped, st.failures, iteration)
            return

        _, names, params, _ = self.param_table(target)
        grads_nonfinite = summary.nonfinite or nonfinite_counts(names, [p.grad for p in params])
        context = st.context if self.name == "main" else None
        in_arrays = context[1] if context is not None else None
        birth: Birth | None = None
        replay_loss = None
        # this process's own gradients' NaN/Inf counts, from the localisation's replay (multi-node only)
        own_counts: dict[str, tuple[int, int]] | None = None
        multi = collective is not None and flags is not None
        # where to look: the processes whose loss was non-finite; if none was, every one (a backward birth)
        loss_here = multi and bool(flags[collective.rank, 0])
        look_here = not multi or loss_here or not flags[:, 0].any()
        if stage == "update":
            bad = sorted(params_nonfinite)
            rule = type(params[names.index(bad[0])].update_rule).__name__ if bad else None
            birth = Birth("update", "nan" if any(n for n, _ in params_nonfinite.values()) else "inf",
                          bad[0].rpartition("/")[0] or "/" if bad else None, rule, None)
        elif nf.localize and context is not None and look_here:
            own_counts = {} if multi else None
            birth, replay_loss = localize(context[0], in_arrays, target, context[2], nf.allow_inf_in,
                                          compat.loss_scale(optimizer), grad_counts=own_counts)
        born_here = birth is not None or loss_here or bool(own_counts)
        verdict = detail = None
        if nf.replay_float64 and stage != "update" and context is not None and (not multi or born_here):
            result = replay_float64(context[0], in_arrays, target, context[2])
            verdict, detail = result.verdict, result.detail
        rank = None
        ranks: list[dict] = []
        if multi:
            mine = {"rank": collective.rank, "loss": loss_value, "born": born_here,
                    "birth": birth.describe() if birth else None, "verdict": verdict, "grads_nonfinite": own_counts,
                    "detail": (birth, replay_loss, verdict, detail, batch_arrays(in_arrays) if born_here and
                               in_arrays is not None else None)}
            every = collective.gather(mine)
            if every is not None:  # rank 0: the report tells of the first process where the value was born
                first = next((info for info in every if info["born"]), None)
                for info in every:
                    if info is not first:
                        del info["detail"]
                if first is not None:
                    rank = first["rank"]
                    birth, replay_loss, verdict, detail, in_arrays = first.pop("detail")
                    loss_value = first["loss"]
                ranks = every
            else:
                in_arrays = None
        where = birth.where if birth else stage
        if len(st.guards) > 1 or self.name != "main":
            where = f"{self.name}: {where}"
        failure = Failure(
            iteration=iteration, where=where, trigger=trigger, policy=nf.policy,
            loss=loss_value, replay_loss=replay_loss, global_norm=summary.global_norm,
            grads_nonfinite=grads_nonfinite,
            params_nonfinite=params_nonfinite, missing_grads=summary.missing, birth=birth,
            verdict=verdict, verdict_detail=detail, skipped=st.skipped, failures=st.failures, rank=rank, ranks=ranks)
        path = report_path(out)
        if writes:  # the last good state is the same on every process: written once
            path = write_report(out, failure, target, optimizer, in_arrays)
        if multi:
            failure = collective.bcast(failure)  # every process raises (or warns) with rank 0's account
        st.last_failure = failure
        if nf.policy == "raise":
            raise NonFiniteError(failure.headline(), iteration=iteration, where=failure.where, link=failure.link,
                                 function=failure.function, verdict=failure.verdict, report_path=path)
        if nf.policy == "warn" and writes:
            logger.warning("update skipped:\n%s", failure.to_text())


def guard_optimizers(updater: Any, session: Session) -> Session:
    """Give every optimizer of ``updater`` (``get_all_optimizers()``) a guard of ``session``; returns it."""
    optimizers = updater.get_all_optimizers()
    for name in [n for n in session.guards if n not in optimizers]:
        del session.guards[name]
    for name, optimizer in optimizers.items():
        if getattr(optimizer, "target", None) is not None:  # one not set up yet is guarded at its first update
            session.guard(name, optimizer)
    return session


_ZERO_FRAC = 1 + STATS.index("zero_frac")


def _unreached(names: list[str], params: list[chainer.Parameter], row_names: tuple[str, ...], row: np.ndarray,
               loss: chainer.Variable) -> set[str]:
    """Names of the parameters ``loss``'s graph does not reach; only those whose gradient in ``row`` is all zeros
    are candidates, so the graph is walked only when one is (Chainer zero-fills a gradient no backward gave)."""
    zero = row[_ZERO_FRAC:1 + len(STATS) * len(row_names):len(STATS)] == 1.0
    if not zero.any():
        return set()
    candidates = {row_names[i] for i in np.flatnonzero(zero).tolist()}
    reached = reached_params(loss)
    return {n for n, p in zip(names, params) if n in candidates and id(p.node) not in reached}


def reached_params(loss: chainer.Variable) -> set[int]:
    """Ids of the parameter (leaf) nodes of ``loss``'s graph: the parameters its backward pass gives a gradient."""
    leaves: set[int] = set()
    creator = loss.creator_node
    stack = [creator] if creator is not None else []
    seen = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for var in node.inputs:
            if var.creator_node is None:
                if var.requires_grad:
                    leaves.add(id(var))
            else:
                stack.append(var.creator_node)
    return leaves


def _report(values: dict[str, float]) -> None:
    """``chainer.reporter.report(values)`` for plain floats, without its per-value Variable copy."""
    try:
        reporter = chainer.reporter.get_current_reporter()
    except IndexError:  # outside any reporter scope, as report() would be: nothing to do
        return
    reporter.observation.update(values)
