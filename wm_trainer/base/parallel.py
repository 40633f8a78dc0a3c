"""One executor interface over a local process pool and Dask distributed.

``make_executor(cfg.parallel)`` gives an object with ``submit``, ``map``, ``as_completed`` and
``broadcast``. Work that a dead worker was running is run again: Dask reschedules it itself;
the local pool is rebuilt and the unfinished tasks resubmitted, so every submitted task
delivers exactly one result. ``broadcast(obj)`` ships an object (model weights) to each
worker once; pass the handle as a task argument and the task receives the object itself.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import shutil
import signal
import sys
import tempfile
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from . import reaper
from .errors import UserError

# Imported once by the forkserver, so a new or rebuilt pool's workers start without re-importing them.
FORKSERVER_PRELOAD = ["numpy", "gymnasium", "PIL.Image", "wm_trainer.collect"]

_BROADCAST_CACHE: collections.OrderedDict[str, Any] = collections.OrderedDict()
_BROADCAST_CACHE_SIZE = 8
_BROADCAST_LOCK = threading.Lock()
_WATCH_INTERVAL = 0.1  # seconds between the supervisor's checks for dead workers

log = logging.getLogger(__name__)


class WorkerLost(RuntimeError):
    """A task whose worker process died more times than the executor retries."""


def _load_broadcast(key: str, path: str) -> Any:
    """Worker side of a broadcast: read the object once per process, then serve it from a small cache."""
    with _BROADCAST_LOCK:
        if key in _BROADCAST_CACHE:
            _BROADCAST_CACHE.move_to_end(key)
            return _BROADCAST_CACHE[key]
    with open(path, "rb") as f:
        obj = pickle.load(f)
    with _BROADCAST_LOCK:
        _BROADCAST_CACHE[key] = obj
        while len(_BROADCAST_CACHE) > _BROADCAST_CACHE_SIZE:
            _BROADCAST_CACHE.popitem(last=False)
    return obj


class Broadcast:
    """A handle to an object written once for the local pool; unpickles in a worker as the object itself."""

    def __init__(self, key: str, path: Path, value: Any):
        self.key = key
        self.path = path
        self.value = value

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return _load_broadcast, (self.key, str(self.path))


def resolve(obj: Any) -> Any:
    """The object behind a broadcast handle (tasks in workers already receive the object itself)."""
    if isinstance(obj, Broadcast):
        return obj.value
    if type(obj).__name__ == "Future" and type(obj).__module__.startswith("distributed"):
        return obj.result()
    return obj


def _cores() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_blas_threads(workers: int) -> int:
    """BLAS threads per worker so that the pool's threads fill the cores without oversubscribing them."""
    return max(1, _cores() // max(1, workers))


def _worker_init(blas_threads: int = 0) -> None:
    # Workers as many as the cores, each with a BLAS pool as big as the machine, fight over the cores:
    # 100 evaluation episodes took 80 s with 2 threads per worker on 2 cores and 57 s with 1 (measured).
    if blas_threads > 0:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=blas_threads, user_api="blas")
    # Each worker leads its own process group, so the parent can also stop what a dead worker
    # started (a vizdoom game process outlives its killed owner). Ctrl-C is the parent's to handle.
    if hasattr(os, "setsid"):
        try:
            os.setsid()
        except OSError:
            pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A SIGKILLed run cannot stop its workers: they stop themselves (and their games) when it ends.
    reaper.watch_parent()


def _kill_groups(pids: Iterable[int]) -> None:
    """SIGKILL each (possibly already dead) worker and the process group it leads."""
    if not hasattr(os, "killpg"):
        return
    for pid in pids:
        try:
            leader = os.getpgid(pid) == pid
        except ProcessLookupError:
            leader = True  # the leader is gone; its group may still have members
        try:
            if leader:
                os.killpg(pid, signal.SIGKILL)
            else:
                # A worker still starting has not made its own group yet: it shares ours, so only the
                # worker itself is killed. Left alive, it would hold the result pipe open for good.
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _workers(pool: cf.ProcessPoolExecutor) -> dict[int, Any]:
    """The pool's worker processes by pid (CPython's private ``_processes``; empty when it has none)."""
    return getattr(pool, "_processes", None) or {}


def _has_dead_worker(procs: list[Any]) -> bool:
    """Whether any of these worker processes has exited."""
    return bool(procs) and bool(multiprocessing.connection.wait([p.sentinel for p in procs], timeout=0))


def _end_result_pipe(result_queue: Any) -> None:
    """Close this process's write end of a pool's result pipe, the last one once its workers are dead."""
    # A worker killed halfway through sending a result leaves the pool's manager thread blocked in
    # recv() for bytes that never come (and the other workers blocked on the write lock the dead one
    # held), so the pool never notices the death. EOF ends that recv(), and the pool breaks as usual.
    writer = getattr(result_queue, "_writer", None)
    if writer is not None:
        writer.close()


def _discard_pool(pool: cf.ProcessPoolExecutor, pids: set[int]) -> None:
    """Stop a broken pool without waiting: drop its queued calls, kill its workers' groups, end its result pipe."""
    result_queue = getattr(pool, "_result_queue", None)
    pids = pids | set(_workers(pool))
    pool.shutdown(wait=False, cancel_futures=True)
    _kill_groups(pids)
    _end_result_pipe(result_queue)


def _shut_down(pool: cf.ProcessPoolExecutor, pids: set[int], cancel: bool) -> None:
    """``pool.shutdown(wait=True)``, except that a worker dying halfway through sending a result cannot hang it."""
    manager = getattr(pool, "_executor_manager_thread", None)
    procs = list(_workers(pool).values())
    result_queue = getattr(pool, "_result_queue", None)
    pool.shutdown(wait=False, cancel_futures=cancel)
    dead_before = False
    while manager is not None and manager.is_alive():
        manager.join(_WATCH_INTERVAL)
        dead = manager.is_alive() and _has_dead_worker(procs)
        if dead and dead_before:  # a worker died a while ago and the pool still waits for it
            _kill_groups(pids)
            _end_result_pipe(result_queue)
        dead_before = dead
    if result_queue is not None:
        result_queue.close()


@dataclasses.dataclass(eq=False)
class _Task:
    outer: cf.Future
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    attempts: int = 0
    inner: cf.Future | None = None  # the pool's future for the current attempt; None while no pool runs it


def _fail(task: _Task, exc: BaseException) -> None:
    """Resolve a task's future with ``exc`` unless it is resolved already."""
    try:
        task.outer.set_exception(exc)
    except cf.InvalidStateError:
        pass


class LocalExecutor:
    """A process pool (forkserver on Linux, spawn elsewhere) that survives worker deaths."""

    def __init__(self, workers: int = 0, max_retries: int = 3, method: str | None = None):
        self.workers = workers or _cores()
        self.max_retries = max_retries
        if method is None:
            method = "forkserver" if sys.platform.startswith("linux") else "spawn"
        self._ctx = multiprocessing.get_context(method)
        if method == "forkserver":
            self._ctx.set_forkserver_preload(FORKSERVER_PRELOAD)  # no effect once the forkserver runs
        self._lock = threading.RLock()  # the pool, its generation and pids; held while submitting to the pool
        # Tasks of the current pool, each task's inner future and the retry queue's admission; taken in
        # pool callbacks, so never held while waiting on anything.
        self._tasks_lock = threading.Lock()
        self._generation = 0
        self.restarts = 0
        self._pids: set[int] = set()  # workers of the current pool, remembered for cleanup after a crash
        self._running: set[_Task] = set()  # tasks submitted to the current pool and not yet handed on
        self._pool = self._new_pool()
        self._retries: queue.Queue = queue.Queue()
        self._broadcast_dir: Path | None = None
        self._closed = False
        self._supervisor = threading.Thread(target=self._supervise, name="wm-pool-supervisor", daemon=True)
        self._supervisor.start()

    @property
    def n_workers(self) -> int:
        """Number of worker processes."""
        return self.workers

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(self.workers, mp_context=self._ctx, initializer=_worker_init,
                                      initargs=(worker_blas_threads(self.workers),))

    def worker_pids(self) -> list[int]:
        """Process ids of the pool's current workers (started on first use)."""
        procs = _workers(self._pool)
        return sorted(procs)

    def _restart(self, generation: int) -> None:
        """Replace a broken pool once per breakage (later callers of its generation do nothing); rerun its tasks."""
        with self._lock:
            if generation != self._generation or self._closed:
                return
            new = self._new_pool()  # the only step that may raise, and it comes before any change
            with self._tasks_lock:
                old, old_pids, orphans = self._pool, self._pids, self._running
                self._pool, self._pids, self._running = new, set(), set()
                for task in orphans:
                    task.inner = None  # its old pool's late callback now does nothing
            self._generation += 1
            self.restarts += 1
        try:
            _discard_pool(old, old_pids)
        except Exception:
            log.exception("stopping the workers of the replaced process pool failed")
        finally:
            for task in orphans:
                self._retry(task, generation, died=True)

    def _launch(self, task: _Task) -> None:
        while True:
            with self._lock:
                if self._closed:
                    _fail(task, RuntimeError("executor is shut down"))
                    return
                pool, generation = self._pool, self._generation
                try:
                    inner = pool.submit(task.fn, *task.args)
                except cf.process.BrokenProcessPool:
                    pass
                else:
                    self._pids.update(_workers(pool))
                    with self._tasks_lock:
                        task.inner = inner
                        self._running.add(task)
                    break
            self._restart(generation)
        inner.add_done_callback(functools.partial(self._on_done, task, generation))

    def _on_done(self, task: _Task, generation: int, inner: cf.Future) -> None:
        with self._tasks_lock:
            if task.inner is not inner:
                return  # a restart has handed the task on already
            task.inner = None
            self._running.discard(task)
        if inner.cancelled():  # by shutdown(cancel=True), or by the shutdown of a broken pool
            self._retry(task, generation, died=False)
            return
        exc = inner.exception()
        if isinstance(exc, cf.process.BrokenProcessPool):
            self._retry(task, generation, died=True)
        elif exc is not None:
            task.outer.set_exception(exc)
        else:
            task.outer.set_result(inner.result())

    def _retry(self, task: _Task, generation: int, died: bool) -> None:
        """Queue a task to run again; fail it instead once its workers died too often, or after shutdown."""
        name = getattr(task.fn, "__name__", task.fn)
        if died:
            task.attempts += 1
            if task.attempts > self.max_retries:
                _fail(task, WorkerLost(f"a worker process died {task.attempts} times running {name}"))
                return
        with self._tasks_lock:
            if not self._closed:
                self._retries.put((task, generation))
                return
        if died:
            _fail(task, WorkerLost(f"a worker process died running {name} and the executor is shut down"))
        else:
            _fail(task, RuntimeError("executor is shut down"))

    def _fail_running(self, generation: int, exc: BaseException) -> bool:
        """Fail every task of pool ``generation`` (if still the current one) with ``exc``; whether there was any."""
        with self._lock, self._tasks_lock:
            if generation != self._generation:
                return False
            tasks, self._running = self._running, set()
            for task in tasks:
                task.inner = None
        for task in tasks:
            _fail(task, exc)
        return bool(tasks)

    def _watch(self) -> None:
        """Replace the pool once one of its workers is dead, even when the pool itself has not noticed."""
        with self._lock:
            pool, generation = self._pool, self._generation
        if not _has_dead_worker(list(_workers(pool).values())):
            return
        try:
            self._restart(generation)
        except BaseException as e:
            if not self._fail_running(generation, e):
                raise

    def _supervise(self) -> None:
        while True:
            try:
                item = self._retries.get(timeout=_WATCH_INTERVAL)
            except queue.Empty:
                item = ()
            if item is None:
                return
            if item:
                task, generation = item
                try:
                    self._restart(generation)
                    self._launch(task)
                except BaseException as e:  # the task reports it; the supervisor goes on
                    _fail(task, e)
            try:
                self._watch()
            except BaseException:
                log.exception("the process pool's supervisor could not replace a pool with a dead worker")

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        """Run ``fn(*args)`` in a worker; the future resolves once, even if a worker dies on the way."""
        outer: cf.Future = cf.Future()
        outer.set_running_or_notify_cancel()
        self._launch(_Task(outer, fn, args))
        return outer

    def map(self, fn: Callable[..., Any], iterable: Iterable[Any]) -> Iterator[Any]:
        """``fn`` over the items in parallel; results in input order."""
        futures = [self.submit(fn, item) for item in iterable]
        return (f.result() for f in futures)

    def as_completed(self, futures: Iterable[cf.Future]) -> Iterator[cf.Future]:
        """Futures in the order they finish."""
        return cf.as_completed(list(futures))

    def broadcast(self, obj: Any) -> Broadcast:
        """Write ``obj`` once; workers read it once each and cache it. Pass the handle as a task argument."""
        if self._broadcast_dir is None:
            self._broadcast_dir = Path(tempfile.mkdtemp(prefix="wm-broadcast-"))
        key = uuid.uuid4().hex
        path = self._broadcast_dir / f"{key}.pkl"
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
        return Broadcast(key, path, obj)

    def release(self, handle: Broadcast) -> None:
        """Drop a broadcast object once no task will need it."""
        try:
            os.unlink(handle.path)
        except FileNotFoundError:
            pass

    def shutdown(self, cancel: bool = False) -> None:
        """Stop the workers (``cancel``: kill them and drop queued work) and remove broadcast files."""
        with self._lock, self._tasks_lock:
            if self._closed:
                return
            self._closed = True
            self._retries.put(None)
            pool, pids = self._pool, self._pids | set(_workers(self._pool))
        if cancel:
            _kill_groups(pids)
        _shut_down(pool, pids, cancel)
        if self._broadcast_dir is not None:
            shutil.rmtree(self._broadcast_dir, ignore_errors=True)

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.shutdown(cancel=exc_type is not None)


class DaskExecutor:
    """The same interface on Dask distributed: an existing scheduler, or a LocalCluster on loopback."""

    def __init__(self, address: str | None = None, workers: int = 0):
        try:
            import distributed
        except ImportError:
            raise UserError("parallel.backend: dask needs dask[distributed]: pip install 'dask[distributed]' "
                            "(or pip install -e '.[dask]')") from None
        self._distributed = distributed
        self._submitted: weakref.WeakSet = weakref.WeakSet()  # this run's futures still referenced, to cancel
        self.cluster = None
        if address:
            try:
                self.client = distributed.Client(address, timeout=15)
            except (OSError, TimeoutError, ValueError) as e:
                raise UserError(f"parallel.address: cannot reach the Dask scheduler at {address!r} ({e})") from None
        else:
            self.cluster = distributed.LocalCluster(
                n_workers=workers or os.cpu_count() or 1, threads_per_worker=1, processes=True,
                host="127.0.0.1", dashboard_address=None)
            self.client = distributed.Client(self.cluster)

    @property
    def n_workers(self) -> int:
        """Number of workers the scheduler knows now."""
        return len(self.client.scheduler_info().get("workers", {}))

    def worker_pids(self) -> dict[str, int]:
        """Worker address -> process id."""
        return self.client.run(os.getpid)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on a worker (impure: always runs, never deduplicated)."""
        future = self.client.submit(fn, *args, pure=False)
        self._submitted.add(future)
        return future

    def map(self, fn: Callable[..., Any], iterable: Iterable[Any]) -> Iterator[Any]:
        """``fn`` over the items in parallel; results in input order."""
        futures = self.client.map(fn, list(iterable), pure=False)
        self._submitted.update(futures)
        return (f.result() for f in futures)

    def as_completed(self, futures: Iterable[Any]) -> Iterator[Any]:
        """Futures in the order they finish."""
        return iter(self._distributed.as_completed(list(futures)))

    def broadcast(self, obj: Any) -> Any:
        """Scatter ``obj`` to every worker once; pass the handle as a task argument."""
        return self.client.scatter([obj], broadcast=True, hash=False)[0]

    def release(self, handle: Any) -> None:
        """Drop a scattered object."""
        handle.release()

    def shutdown(self, cancel: bool = False) -> None:
        """Disconnect (and stop the LocalCluster if this executor started it); ``cancel`` cancels this run's tasks.

        Disconnecting releases them anyway, as does a driver killed outright: the scheduler drops the tasks of a
        client it has lost (the cancel, sent just before, is sometimes lost with the connection). A task a worker
        is executing cannot be interrupted: it runs to its end and its result is dropped (tests/test_dask_kill.py).
        """
        if cancel:
            try:
                self.client.cancel(list(self._submitted))
            except Exception:  # noqa: BLE001 - a scheduler already gone has nothing left to cancel
                log.warning("could not cancel this run's Dask tasks", exc_info=True)
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> DaskExecutor:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.shutdown(cancel=exc_type is not None)


Executor = LocalExecutor | DaskExecutor


def make_executor(parallel_cfg: Any) -> Executor:
    """The executor ``parallel.backend`` asks for: a local process pool or Dask."""
    if parallel_cfg.backend == "dask":
        return DaskExecutor(parallel_cfg.address, parallel_cfg.workers)
    if parallel_cfg.backend == "local":
        return LocalExecutor(parallel_cfg.workers)
    raise UserError(f"parallel.backend: unknown backend {parallel_cfg.backend!r} (local or dask)")


@contextlib.contextmanager
def executor_scope(parallel_cfg: Any, executor: Executor | None = None) -> Iterator[Executor]:
    """``executor`` as given, or a new one from ``make_executor`` that ends with the block: after its work on a
    normal exit, at once (queued work dropped, workers and their games killed) on an exception, Ctrl-C or SIGTERM."""
    if executor is not None:
        yield executor
        return
    with make_executor(parallel_cfg) as own:
        yield own
