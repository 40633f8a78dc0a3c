"""The pre-update copy of parameters and optimizer state that lets a non-finite update be rolled back.

Parameters and update-rule state do not change between one optimizer update and the next: the
forward and backward passes only read them. The copy is taken right before the update.

- A small net (under ``ARENA_BYTES`` on the host) has its parameters and float optimizer state moved
  into one flat array per dtype (each parameter's ``array`` and each state entry becomes a view of
  it; values and shapes unchanged). The copy is then one ``copyto`` and the post-update check one
  reduction, instead of a NumPy call per array: on a net whose iteration takes a millisecond the
  per-call overhead is what the toolkit costs. Arrays replaced since (``to_device``, a loaded
  snapshot, a rule that swaps its state) are noticed by identity and the layout is made again.
- A big one is copied into reused buffers (a fresh 50 MB allocation per step would cost as much in
  page faults as the copy itself). An update rule may save what it overwrites itself, block by
  block while each block is in cache, at about a third of the cost of a separate copy: see
  ``SAVE_PROTOCOL``.
"""
from __future__ import annotations

import operator
from itertools import chain
from typing import Any

import chainer
import numpy as np

from . import chainer_compat as compat
from . import kernels
from .arrays import fast_access, iter_arrays, raw_arrays
from .stats import all_finite

ARENA_BYTES = 1 << 22

SAVE_PROTOCOL = """How an update rule saves the values its update overwrites (``UpdateBackup`` uses it when it can).

The rule has a method ``saves_overwritten(param) -> bool``: whether its next update of ``param``
can honour a save target. Before ``optimizer.update()`` the backup sets the rule's attribute
``save_overwritten = (param_out, {state key: out})`` (flat arrays of the parameter's and state
entries' sizes and dtypes). When ``update_core`` runs with it set, the rule writes every value of
the parameter and of those state entries into the outputs before it changes it, then sets
``save_overwritten`` to None. A rule that returns without writing anything leaves it set.
A rule may also set ``overwritten_finite`` to whether every value it then wrote into the
parameter is finite (checked right after writing, while much of it is cached); the post-update
check trusts a True and reads the parameter itself otherwise.
The backup hands out targets only when the optimizer's and the rules' pre-update hooks are
Chainer's gradient hooks or the toolkit's clipping (a hook that writes a parameter before
``update_core`` would make the saved values differ from those before the update).

A rule may go further with ``update_stays_finite(param, grad_bound) -> bool``: whether its next
update of ``param`` can only write finite values into it and its state, for gradients with every
|g| <= ``grad_bound`` (e.g. from bounds it keeps on |p| and its state). When every parameter's rule
says so, and no hook can make a gradient larger or write a parameter (only gradient clipping
before the update, nothing after it, no loss scale below 1), the backup copies nothing: it sets
``check_overwritten = True`` on each rule instead, which then checks what it writes and sets
``overwritten_finite`` as above. Should the update still leave a non-finite value (a parameter
written in place outside the optimizer since, so that a rule's bounds no longer held), there is
nothing to restore, and ``restore`` raises ``UnsavedUpdateError``.
"""
_SCALE_DOWN_HOOKS = ("chainer.optimizer_hooks.gradient_clipping.GradientClipping",
                     "extensions.clipping.GradientClipping")  # hooks that only ever make gradients smaller


_OWN_HOOK_MODULES = ("extensions.clipping", "extensions.guard")  # the guard's hooks copy first, check after


class UnsavedUpdateError(RuntimeError):
    """An update shown to stay finite (so not saved) left a non-finite value: nothing to roll back to."""


_ALIGN = 16  # elements: each array of an arena starts on a 64-byte boundary for float32


def _is_float(v: Any) -> bool:
    """Whether a state entry is a float array (what the update overwrites; counters and the like are not)."""
    return getattr(v, "dtype", None) is not None and v.dtype.kind == "f"


def _collect(params: list[chainer.Parameter]) -> tuple[list[Any], list[tuple[Any, int, bool]]]:
    """The arrays the update will overwrite (parameters, float state) and (rule, t, had no state) per rule."""
    arrays: list[Any] = []
    rules = []
    for p in params:
        a = p.array
        if a is None:
            continue
        arrays.append(a)
        rule = p.update_rule
        if rule is None:
            continue
        state = compat.STATE_OF(rule)
        rules.append((rule, rule.t, state is None))
        if state:
            arrays.extend([v for v in state.values() if _is_float(v)])
    return arrays, rules


def _slots(params: list[chainer.Parameter]) -> list[tuple[Any, Any, Any]]:
    """(array, owner, key) for every array ``_collect`` lists: owner a Parameter (key None) or a state dict."""
    out = []
    for p in params:
        if p.array is None:
            continue
        out.append((p.array, p, None))
        rule = p.update_rule
        state = compat.STATE_OF(rule) if rule is not None else None
        if state:
            out.extend((v, state, k) for k, v in state.items() if _is_float(v))
    return out


def _gradient_hooks_only(hooks: dict[str, Any]) -> bool:
    """Whether every hook in ``hooks`` is one that changes gradients only (Chainer's, the toolkit's clipping)."""
    for hook in hooks.values():
        module = type(hook).__module__
        if not (module.startswith("chainer.optimizer_hooks") or module in _OWN_HOOK_MODULES):
            return False
    return True


def _scale_down_hooks_only(hookable: Any) -> bool:
    """Whether ``hookable`` (an optimizer's or a rule's) has no post-update hook and only pre-update hooks that
    can only make gradients smaller (gradient clipping)."""
    if hookable is None:
        return True
    pre, post = compat.hookable_dicts(hookable)
    if any(type(h).__module__ != "extensions.guard" for h in post.values()):
        return False
    return all(f"{type(h).__module__}.{type(h).__qualname__}" in _SCALE_DOWN_HOOKS or type(h).__module__ ==
               "extensions.guard" for h in pre.values())


def _padded(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


_rule_of = operator.attrgetter("update_rule")
_state_of = compat.STATE_OF
_t_of = operator.attrgetter("t")
_rule_state_of = compat.RULE_STATE_OF


class _ArenaWatch:
    """What an arena plan assumed about the parameters and their rules, checked in one C-level pass.

    The plan assumed: every parameter's array (None if uninitialised); every float state entry,
    read back through ``update_rule._state`` (so a replaced rule or state dict shows as replaced
    arrays); the length of every state dict (an entry added); and, for parameters whose rule
    had no state or that had no rule, that rule, still stateless. ``probe`` reads all of them,
    and each rule's ``t``, as one list built from chained ``map`` calls and compares it with the
    plan's: on a net whose iteration takes a millisecond, each further call is a visible cost.
    """

    def __init__(self, params: list[chainer.Parameter]):
        self.source = params  # the list itself: callers that keep passing it are checked by identity
        self.params = list(params)
        self.arrays = raw_arrays(self.params)
        param_rules = list(map(_rule_of, self.params))
        self.rules = [r for r in param_rules if r is not None]
        states = list(map(_state_of, self.rules))
        self.no_state = [s is None for s in states]
        with_rule = [p for p, r in zip(self.params, param_rules) if r is not None]
        self.stateful = [p for p, st in zip(with_rule, states) if st is not None]
        entries = [(p, k, v) for p, st in zip(with_rule, states) if st is not None
                   for k, v in st.items() if _is_float(v)]
        self.entry_params = [p for p, _, _ in entries]
        self.entry_keys = [k for _, k, _ in entries]
        # parameters without a rule, or whose rule had no state: their rule (or None) must stay, stateless
        bare = [(p, r) for p, r in zip(self.params, param_rules) if r is None or compat.STATE_OF(r) is None]
        self.bare_params = [p for p, _ in bare]
        self.bare_with_rule = [p for p, r in bare if r is not None]
        # ids of objects this watch keeps alive, so no other object can take one of them meanwhile
        self.kept = (self.arrays, [v for _, _, v in entries], [r for _, r in bare])
        self.expected = ([id(a) for a in self.arrays] + [id(v) for _, _, v in entries]
                         + [len(st) for st in states if st is not None] + [id(r) for _, r in bare]
                         + [id(None)] * len(self.bare_with_rule))
        self.size = len(self.expected)

    def params_intact(self) -> bool:
        """Whether every parameter still holds the array it held at the plan."""
        return all(map(operator.is_, iter_arrays(self.params), self.arrays))

    def probe(self, params: list[chainer.Parameter]) -> list[int] | None:
        """Each rule's ``t`` if ``params`` are the planned ones with every array, rule and state entry as
        planned; else None."""
        if params is not self.source and (len(params) != len(self.params)
                                          or not all(map(operator.is_, params, self.params))):
            return None
        try:
            seen = list(chain(map(id, iter_arrays(self.params)),
                              map(id, map(dict.get, map(_rule_state_of, self.entry_params), self.entry_keys)),
                              map(len, map(_rule_state_of, self.stateful)),
                              map(id, map(_rule_of, self.bare_params)),
                              map(id, map(_rule_state_of, self.bare_with_rule)),
                              map(_t_of, self.rules)))
        except (AttributeError, TypeError):  # a rule removed, a state dict gone
            return None
        size = self.size
        return seen[size:] if seen[:size] == self.expected else None


class UpdateBackup:
    """Copy of every parameter and float update-rule state array, restorable bit for bit after a failed update.

    Call ``finish`` right before ``optimizer.update()``, then ``params_finite`` (or any check of
    your own) and, if the update left a non-finite weight, ``restore``.
    """

    def __init__(self) -> None:
        self.arrays: list[Any] = []  # what the last plan copies, in ``_collect`` order (identity checks)
        self.groups: dict[Any, list[Any]] = {}  # dtype -> arrays, in the order of the buffer
        # (array, its flat place in a buffer, its rule, its owner: a Parameter or a state dict, state key or None)
        self.entries: list[tuple[Any, Any, Any, Any, Any]] = []
        self.by_rule: list[tuple[chainer.Parameter, Any, Any, dict[str, Any]]] = []  # (param, rule, place, state)
        self.delegated: list[tuple[Any, chainer.Parameter]] = []  # (rule, its parameter) given a save target
        self.untouched: set[int] = set()  # ids of delegated rules whose update did not run
        self.verified: set[int] = set()  # ids of parameters whose rule found all it wrote finite
        self.unsaved = False  # this update was shown to stay finite: no copy was made (see SAVE_PROTOCOL)
        self.n_params = 0  # parameters with an array, as of the last plan
        self.buffers: dict[Any, Any] = {}  # dtype -> the saved values, flat
        self.arena: dict[Any, np.ndarray] = {}  # dtype -> flat array the arrays are views of (small nets)
        self.param_end: dict[Any, int] = {}  # dtype -> elements of the arena holding parameters (they come first)
        self.param_views: list[tuple[chainer.Parameter, np.ndarray]] = []
        self.state_views: list[tuple[dict[str, Any], str, np.ndarray]] = []
        self.watch: _ArenaWatch | None = None  # what the arena plan assumed (None: no arena)
        self.copies: list[tuple[np.ndarray, np.ndarray]] = []  # (saved values, arena) per dtype
        self.checks: list[np.ndarray] = []  # the arena's parameters, per dtype
        # (rule, its t, whether it had no state) per rule; None when ``begin`` kept only ``ts`` (the watch's rules)
        self.rules: list[tuple[Any, int, bool]] | None = []
        self.ts: list[int] = []
        self.check_first: Any = None  # the compiled finiteness check for the first (usually only) dtype
        self.pair: tuple[np.ndarray, np.ndarray] | None = None  # (arena, its copy) when of one dtype
        self.optimizer_t = 0
        self.replans = 0  # plans made in a row (arrays replaced at every step)

    def _as_planned(self, params: list[chainer.Parameter], optimizer: chainer.Optimizer) -> bool:
        """Whether the arena is as planned; if so, note the optimizer's and each rule's ``t`` for ``restore``."""
        watch = self.watch
        ts = None if watch is None else watch.probe(params)
        if ts is None:
            return False
        self.optimizer_t = optimizer.t
        self.replans = 0
        self.rules = None
        self.ts = ts
        return True

    def begin(self, params: list[chainer.Parameter], optimizer: chainer.Optimizer
              ) -> tuple[np.ndarray, np.ndarray] | None:
        """When the arena is as planned and of one dtype, note each rule's ``t`` and return (arena, copy) for
        the caller to copy (e.g. ``gradient_summary(save=...)``, inside its pass over the gradients); else
        None: call ``finish``."""
        if len(self.copies) != 1 or not self._as_planned(params, optimizer):
            return None
        return self.pair

    def finish(self, params: list[chainer.Parameter], optimizer: chainer.Optimizer,
               grad_bound: float | None = None) -> None:
        """Save every parameter and float state array (and each rule's ``t``) as they are now; with
        ``grad_bound`` (no gradient has a larger |value|), save nothing when the update is shown to stay finite."""
        if self._as_planned(params, optimizer):
            for saved, flat in self.copies:
                saved[...] = flat
            return
        self.optimizer_t = optimizer.t
        arrays, self.rules = _collect(params)
        if len(arrays) != len(self.arrays) or not all([a is b for a, b in zip(arrays, self.arrays)]) or self.arena:
            # first call, or arrays initialised or replaced since the last plan; an update rule that
            # replaces its arrays every step (Chainer's fp32 update of float16 weights) gets no arena
            self.replans += 1
            self._plan(params, arrays, arena=self.replans < 5)
        else:
            self.replans = 0
        self.untouched = set()
        self.verified = set()
        self.unsaved = False
        if self.arena:
            for saved, flat in self.copies:
                saved[...] = flat
            return
        if grad_bound is not None and self.by_rule and self._stays_finite(optimizer, grad_bound):
            self.unsaved = True
            return
        self.delegated = self._delegate(optimizer) if self.by_rule else []
        self._copy({id(rule) for rule, _ in self.delegated})

    def settle(self) -> None:
        """After ``optimizer.update()``: note which rules given a save target did not run (their arrays are as
        they were) and take the targets back."""
        for rule, param in self.delegated:
            if rule.save_overwritten is not None:
                rule.save_overwritten = None
                self.untouched.add(id(rule))
            elif getattr(rule, "overwritten_finite", None) is True:
                self.verified.add(id(param))
            rule.overwritten_finite = None
            if self.unsaved:
                rule.check_overwritten = False
        self.delegated = []

    def params_finite(self, params: list[chainer.Parameter]) -> bool:
        """Whether every parameter is finite after the update: from the arena in one reduction, or array by
        array when there is none (or the update replaced a parameter's array)."""
        if self.watch is None or not self.watch.params_intact():
            verified, self.verified = self.verified, set()  # this update's verdicts only
            return all_finite([p.array for p in params if id(p) not in verified] if verified else
                              [p.array for p in params])
        # one compiled pass (or NumPy's largest |value|): no BLAS dot, whose call costs several times its work
        # on a small net, and no sum, which would overflow on big finite values and warn on inf - inf
        if len(self.checks) == 1:
            return self.check_first(self.checks[0])
        return all(map(kernels.all_finite, self.checks))

    def restore(self, optimizer: chainer.Optimizer) -> None:
        """Write the saved values back into the same arrays (put back where the update replaced one); forget
        state the update created. ``UnsavedUpdateError`` if this update was not saved (see SAVE_PROTOCOL)."""
        if self.unsaved:
            raise UnsavedUpdateError(
                "every update rule had shown this update to stay finite, so no copy was made to restore: a "
                "parameter or optimizer state must have been changed in place outside the optimizer, past its "
                "rule's bounds")
        if self.arena:
            for dtype, flat in self.arena.items():
                np.copyto(flat, self.buffers[dtype])
            for p, view in self.param_views:  # put back arrays the update replaced
                p.array = view
            for state, key, view in self.state_views:
                state[key] = view
        else:
            for a, place, rule, owner, key in self.entries:
                if id(rule) in self.untouched:
                    continue
                chainer.backend.get_array_module(a).copyto(a, place.reshape(a.shape))
                if key is None:
                    if owner.array is not a:
                        owner.array = a
                elif owner.get(key) is not a:
                    owner[key] = a
        rules = self.rules if self.rules is not None else zip(self.watch.rules, self.ts, self.watch.no_state)
        for rule, t, had_no_state in rules:
            rule.t = t
            if had_no_state:
                compat.reset_rule_state(rule)
        optimizer.t = self.optimizer_t

    def _plan(self, params: list[chainer.Parameter], arrays: list[Any], arena: bool = True) -> None:
        self.arena, self.param_end, self.param_views, self.state_views = {}, {}, [], []
        self.watch, self.copies, self.checks = None, [], []
        on_host = all([type(a) is np.ndarray for a in arrays])
        if (arena and on_host and sum([a.nbytes for a in arrays]) < ARENA_BYTES
                and len({id(a) for a in arrays}) == len(arrays) and fast_access(params)):
            self._make_arena(params)
            arrays, _ = _collect(params)
        self.arrays = arrays
        groups: dict[Any, list[Any]] = {}
        for a in arrays:
            group = groups.get(a.dtype)
            if group is None:
                group = groups[a.dtype] = []
            group.append(a)
        self.groups = groups
        for dtype, group in groups.items():
            xp = chainer.backend.get_array_module(group[0])
            size = self.arena[dtype].size if self.arena else sum([a.size for a in group])
            buf = self.buffers.get(dtype)
            if buf is None or buf.size != size or chainer.backend.get_array_module(buf) is not xp:
                self.buffers[dtype] = xp.empty(size, dtype)
        self.entries, self.by_rule = [], []
        if self.arena:
            self.watch = _ArenaWatch(params)
            self.copies = [(self.buffers[dtype], flat) for dtype, flat in self.arena.items()]
            self.checks = [flat[:self.param_end[dtype]] for dtype, flat in self.arena.items()]
            self.check_first = kernels.all_finite_for(self.checks[0].dtype)
            self.pair = (self.copies[0][1], self.copies[0][0])
            return
        offsets = dict.fromkeys(groups, 0)
        places = {}
        for a in arrays:
            at = offsets[a.dtype]
            places[id(a)] = self.buffers[a.dtype][at:at + a.size]
            offsets[a.dtype] = at + a.size
        self.n_params = 0
        for a, owner, key in _slots(params):  # a parameter, then its state entries
            if key is None:
                self.n_params += 1
                rule = owner.update_rule
                self.by_rule.append((owner, rule, places[id(a)], {}))
            else:
                self.by_rule[-1][3][key] = places[id(a)]
            self.entries.append((a, places[id(a)], rule, owner, key))
        if not on_host or len(places) != len(arrays):  # on a device, or an array listed twice: copy it all
            self.by_rule = []
        else:
            self.by_rule = [entry for entry in self.by_rule if hasattr(entry[1], "saves_overwritten")]

    def _stays_finite(self, optimizer: chainer.Optimizer, grad_bound: float) -> bool:
        """Whether every parameter's rule shows its update stays finite (see SAVE_PROTOCOL); if so, set them to
        check what they write and list them in ``delegated``."""
        if len(self.by_rule) != self.n_params or not _scale_down_hooks_only(compat.hookable_of(optimizer)) or not (
                compat.loss_scale(optimizer) is None or compat.loss_scale(optimizer) >= 1):
            return False
        shown = True
        for param, rule, _, _ in self.by_rule:  # every rule is asked: each derives its bounds for this step
            stays = getattr(rule, "update_stays_finite", None)
            if (stays is None or not _scale_down_hooks_only(compat.hookable_of(rule))
                    or not stays(param, grad_bound)):
                shown = False
        if shown:
            self.delegated = []
            for param, rule, _, _ in self.by_rule:
                rule.check_overwritten = True
                rule.overwritten_finite = None
                self.delegated.append((rule, param))
        return shown

    def _delegate(self, optimizer: chainer.Optimizer) -> list[tuple[Any, chainer.Parameter]]:
        """Hand a save target to every rule that can save what it overwrites (see ``SAVE_PROTOCOL``)."""
        hookable = compat.hookable_of(optimizer)
        if hookable is not None and not _gradient_hooks_only(compat.hookable_dicts(hookable)[0]):
            return []
        out = []
        for param, rule, place, state in self.by_rule:
            if rule is None or not _gradient_hooks_only(compat.hookable_dicts(compat.hookable_of(rule))[0]):
                continue
            if rule.saves_overwritten(param):
                rule.save_overwritten = (place, state)
                rule.overwritten_finite = None
                out.append((rule, param))
        return out

    def _make_arena(self, params: list[chainer.Parameter]) -> None:
        """Move the parameters, then the float state, of each dtype into one flat array and point them at it."""
        by_dtype: dict[Any, list[tuple[Any, Any, Any]]] = {}
        for slot in _slots(params):
            by_dtype.setdefault(slot[0].dtype, []).append(slot)
        for dtype, slots in by_dtype.items():
            slots.sort(key=lambda s: s[2] is not None)  # parameters first (stable: their order is kept)
            flat = np.zeros(sum([_padded(a.size) for a, _, _ in slots]), dtype)
            offset = end = 0
            for a, owner, key in slots:
                view = flat[offset:offset + a.size].reshape(a.shape)
                np.copyto(view, a)
                if key is None:
                    owner.array = view
                    self.param_views.append((owner, view))
                    end = offset + a.size
                else:
                    owner[key] = view
                    self.state_views.append((owner, key, view))
                offset += _padded(a.size)
            self.arena[dtype] = flat
            self.param_end[dtype] = end

    def _copy(self, skip: set[int]) -> None:
        """Copy every array into its place, but those of the rules in ``skip`` (they save themselves)."""
        if not skip and all([type(buf) is np.ndarray for buf in self.buffers.values()]):
            for dtype, group in self.groups.items():  # one call per dtype
                np.concatenate(group, axis=None, out=self.buffers[dtype])
            return
        for a, place, rule, _, _ in self.entries:
            if id(rule) not in skip:
                chainer.backend.get_array_module(a).copyto(place, a.reshape(-1))
