"""The pre-update copy of parameters and optimizer state that lets a non-finite update be rolled back.

Parameters and update-rule state do not change between one optimizer update and the next: the
forward and backward passes only read them. The copy is taken right before the update, into
reused buffers (a fresh 50 MB allocation per step would cost as much in page faults as the copy
itself), one ``concatenate`` per dtype. An update rule may save what it overwrites itself, block by
block while each block is in cache, at about a third of the cost of a separate copy: see
``SAVE_PROTOCOL``.
"""
from __future__ import annotations

import operator
from typing import Any

import chainer
import numpy as np

from . import chainer_compat as compat
from . import kernels
from .arrays import fast_access, raw_arrays
from .stats import all_finite

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
"""
# below this many bytes of weights and state the copy is one ``concatenate`` per dtype, cheaper than asking each
# rule to save its own (on a net whose iteration takes a millisecond, those calls cost 30 us)
DELEGATE_BYTES = 1 << 20

_OWN_HOOK_MODULES = ("extensions.clipping", "extensions.guard")  # the guard's hooks copy first, check after


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
        self.n_params = 0  # parameters with an array, as of the last plan
        self.buffers: dict[Any, Any] = {}  # dtype -> the saved values, flat
        self.rules: list[tuple[Any, int, bool]] = []  # (rule, its t, whether it had no state) per rule
        self.optimizer_t = 0
        # a small host net's parameter arrays, their flat views and the compiled check for their one dtype: the
        # post-update check is then one call per array, with no gather (None: the general path)
        self.small: tuple[list[Any], list[np.ndarray], Any, bool] | None = None

    def finish(self, params: list[chainer.Parameter], optimizer: chainer.Optimizer) -> None:
        """Save every parameter and float state array (and each rule's ``t``) as they are now."""
        self.optimizer_t = optimizer.t
        arrays, self.rules = _collect(params)
        if len(arrays) != len(self.arrays) or not all([a is b for a, b in zip(arrays, self.arrays)]):
            self._plan(params, arrays)  # first call, or arrays initialised or replaced since the last plan
        self.untouched = set()
        self.verified = set()
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
        self.delegated = []

    def params_finite(self, params: list[chainer.Parameter]) -> bool:
        """Whether every parameter is finite after the update (those whose rule found what it wrote finite
        are not read again)."""
        verified, self.verified = self.verified, set()  # this update's verdicts only
        small = self.small
        if small is not None and not verified:
            arrays = raw_arrays(params) if small[3] else [p.array for p in params]
            if len(arrays) == len(small[0]) and all(map(operator.is_, arrays, small[0])):
                return all(map(small[2], small[1]))
        return all_finite([p.array for p in params if id(p) not in verified] if verified else
                          [p.array for p in params])

    def restore(self, optimizer: chainer.Optimizer) -> None:
        """Write the saved values back into the same arrays (put back where the update replaced one); forget
        state the update created."""
        for a, place, rule, owner, key in self.entries:
            if id(rule) in self.untouched:
                continue
            chainer.backend.get_array_module(a).copyto(a, place.reshape(a.shape))
            if key is None:
                if owner.array is not a:
                    owner.array = a
            elif owner.get(key) is not a:
                owner[key] = a
        for rule, t, had_no_state in self.rules:
            rule.t = t
            if had_no_state:
                compat.reset_rule_state(rule)
        optimizer.t = self.optimizer_t

    def _plan(self, params: list[chainer.Parameter], arrays: list[Any]) -> None:
        on_host = all([type(a) is np.ndarray for a in arrays])
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
            size = sum([a.size for a in group])
            buf = self.buffers.get(dtype)
            if buf is None or buf.size != size or chainer.backend.get_array_module(buf) is not xp:
                self.buffers[dtype] = xp.empty(size, dtype)
        self.entries, self.by_rule = [], []
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
        small = on_host and sum([a.nbytes for a in arrays]) < DELEGATE_BYTES
        self.small = None
        weights = [p.array for p in params]
        if small and weights and all([a is not None and a.dtype == arrays[0].dtype and a.flags.c_contiguous
                                        for a in weights]):
            self.small = (weights, [a.reshape(-1) for a in weights], kernels.all_finite_for(arrays[0].dtype),
                          fast_access(params))
        if not on_host or len(places) != len(arrays) or small:
            self.by_rule = []  # on a device, an array listed twice, or a small net: one copy of it all
        else:
            self.by_rule = [entry for entry in self.by_rule if hasattr(entry[1], "saves_overwritten")]

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

    def _copy(self, skip: set[int]) -> None:
        """Copy every array into its place, but those of the rules in ``skip`` (they save themselves)."""
        if not skip and all([type(buf) is np.ndarray for buf in self.buffers.values()]):
            for dtype, group in self.groups.items():  # one call per dtype
                np.concatenate(group, axis=None, out=self.buffers[dtype])
            return
        for a, place, rule, _, _ in self.entries:
            if id(rule) not in skip:
                chainer.backend.get_array_module(a).copyto(place, a.reshape(-1))
