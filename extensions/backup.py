"""The pre-update copy of parameters and optimizer state that lets a non-finite update be rolled back.

Parameters and update-rule state do not change between one optimizer update and the next:
the forward and backward passes only read them. So a big copy is started on a worker thread
before the forward pass (NumPy releases the GIL while it copies) and only waited for right
before the update; a small one (under ``BACKGROUND_BYTES``) is taken there directly. Buffers
are reused from one iteration to the next: a fresh 50 MB allocation per step costs as much in
page faults as the copy itself.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Any

import chainer
import numpy as np

BACKGROUND_BYTES = 1 << 22

_jobs: queue.SimpleQueue | None = None
_jobs_lock = threading.Lock()


def _worker(jobs: queue.SimpleQueue) -> None:
    while True:
        jobs.get()()


def _forget_worker() -> None:
    global _jobs
    _jobs = None  # a forked child has the queue but not the thread: start its own on first use


os.register_at_fork(after_in_child=_forget_worker)


def _submit(job: Any) -> None:
    """Run ``job()`` on the one background copy thread (started on first use; a daemon, idle when unused)."""
    global _jobs
    with _jobs_lock:
        if _jobs is None:
            _jobs = queue.SimpleQueue()
            threading.Thread(target=_worker, args=(_jobs,), name="extensions-backup", daemon=True).start()
    _jobs.put(job)


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
        state = rule._state
        rules.append((rule, rule.t, state is None))
        if state:
            arrays.extend([v for v in state.values() if getattr(v, "dtype", None) is not None and v.dtype.kind == "f"])
    return arrays, rules


class UpdateBackup:
    """Copy of every parameter and float update-rule state array, restorable bit for bit after a failed update.

    Call ``start`` before the forward pass, ``finish`` right before ``optimizer.update()``
    and, if the update left a non-finite weight, ``restore``.
    """

    def __init__(self) -> None:
        self.buffers: dict[Any, Any] = {}
        self.groups: dict[Any, list[Any]] = {}
        self.arrays: list[Any] = []
        self.rules: list[tuple[Any, int, bool]] = []
        self.optimizer_t = 0
        self._done: threading.Event | None = None  # set when the background copy has finished
        self._error: BaseException | None = None
        self._ready = False  # a background copy of self.arrays was started
        self._nbytes = 0  # size of the last copy: decides whether the next one runs in the background

    def start(self, params: list[chainer.Parameter], optimizer: chainer.Optimizer) -> None:
        """Begin copying in the background if the last copy was big (a small one is left to ``finish``)."""
        self._wait()
        self._ready = False
        if self._nbytes < BACKGROUND_BYTES:
            return
        arrays, _ = _collect(params)
        if not all(type(a) is np.ndarray for a in arrays):
            return
        if len(arrays) != len(self.arrays) or any(a is not b for a, b in zip(arrays, self.arrays)):
            self._plan(arrays)
        self._ready = True
        done = self._done = threading.Event()
        _submit(lambda: self._copy_in_background(done))

    def finish(self, params: list[chainer.Parameter], optimizer: chainer.Optimizer) -> None:
        """Complete the copy: wait for the background one, or copy now if none ran or arrays changed since."""
        self._wait()
        arrays, self.rules = _collect(params)
        self.optimizer_t = optimizer.t
        same = len(arrays) == len(self.arrays) and all([a is b for a, b in zip(arrays, self.arrays)])
        if not same:  # first call, or parameters initialised or replaced since the last plan
            self._plan(arrays)
        if not (same and self._ready):  # a small copy (or the background one copied other arrays)
            self._copy()
        self._ready = False

    def restore(self, optimizer: chainer.Optimizer) -> None:
        """Write the saved values back into the same arrays; forget state the update created."""
        for dtype, group in self.groups.items():
            flat = self.buffers[dtype]
            xp = chainer.backend.get_array_module(flat)
            offset = 0
            for a in group:
                xp.copyto(a, flat[offset:offset + a.size].reshape(a.shape))
                offset += a.size
        for rule, t, had_no_state in self.rules:
            rule.t = t
            if had_no_state:
                rule._state = None
        optimizer.t = self.optimizer_t

    def _plan(self, arrays: list[Any]) -> None:
        self.arrays = arrays
        self._nbytes = sum([a.nbytes for a in arrays])
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

    def _copy(self) -> None:
        for dtype, group in self.groups.items():
            buf = self.buffers[dtype]
            if type(buf) is np.ndarray:
                np.concatenate(group, axis=None, out=buf)
            else:
                xp = chainer.backend.get_array_module(buf)
                offset = 0
                for a in group:
                    xp.copyto(buf[offset:offset + a.size], a.ravel())
                    offset += a.size

    def _copy_in_background(self, done: threading.Event) -> None:
        try:
            self._copy()
        except BaseException as e:  # handed to the training thread by _wait
            self._error = e
        finally:
            done.set()

    def _wait(self) -> None:
        if self._done is not None:
            self._done.wait()
            self._done = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
