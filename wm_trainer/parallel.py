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
import dataclasses
import multiprocessing
import os
import pickle
import queue
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

# Imported once by the forkserver, so a new or rebuilt pool's workers start without re-importing them.
FORKSERVER_PRELOAD = ["numpy", "gymnasium", "PIL.Image", "wm_trainer.collect"]

_BROADCAST_CACHE: collections.OrderedDict[str, Any] = collections.OrderedDict()
_BROADCAST_CACHE_SIZE = 8
_BROADCAST_LOCK = threading.Lock()


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


def _worker_init() -> None:
    # Each worker leads its own process group, so the parent can also stop what a dead worker
    # started (a vizdoom game process outlives its killed owner). Ctrl-C is the parent's to handle.
    if hasattr(os, "setsid"):
        try:
            os.setsid()
        except OSError:
            pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _kill_groups(pids: Iterable[int]) -> None:
    """SIGKILL the process group of each (possibly already dead) worker."""
    if not hasattr(os, "killpg"):
        return
    for pid in pids:
        try:
            if os.getpgid(pid) != pid:
                continue
        except ProcessLookupError:
            pass  # the leader is gone; its group may still have members
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@dataclasses.dataclass
class _Task:
    outer: cf.Future
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    attempts: int = 0


class LocalExecutor:
    """A process pool (forkserver on Linux, spawn elsewhere) that survives worker deaths."""

    def __init__(self, workers: int = 0, max_retries: int = 3, method: str | None = None):
        self.workers = workers or os.cpu_count() or 1
        self.max_retries = max_retries
        if method is None:
            method = "forkserver" if sys.platform.startswith("linux") else "spawn"
        self._ctx = multiprocessing.get_context(method)
        if method == "forkserver":
            self._ctx.set_forkserver_preload(FORKSERVER_PRELOAD)  # no effect once the forkserver runs
        self._lock = threading.RLock()
        self._generation = 0
        self.restarts = 0
        self._pids: set[int] = set()  # workers of the current pool, remembered for cleanup after a crash
        self._pool = self._new_pool()
        self._retries: queue.Queue = queue.Queue()
        self._supervisor = threading.Thread(target=self._supervise, name="wm-pool-supervisor", daemon=True)
        self._supervisor.start()
        self._broadcast_dir: Path | None = None
        self._closed = False

    @property
    def n_workers(self) -> int:
        """Number of worker processes."""
        return self.workers

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(self.workers, mp_context=self._ctx, initializer=_worker_init)

    def worker_pids(self) -> list[int]:
        """Process ids of the pool's current workers (started on first use)."""
        procs = getattr(self._pool, "_processes", None) or {}
        return sorted(procs)

    def _restart(self, generation: int) -> None:
        """Replace a broken pool, once per breakage (later callers of the same generation do nothing)."""
        with self._lock:
            if generation != self._generation or self._closed:
                return
            old, old_pids = self._pool, self._pids
            self._pool, self._pids = self._new_pool(), set()
            self._generation += 1
            self.restarts += 1
        old.shutdown(wait=False, cancel_futures=True)
        _kill_groups(old_pids)

    def _launch(self, task: _Task) -> None:
        while True:
            with self._lock:
                if self._closed:
                    task.outer.set_exception(RuntimeError("executor is shut down"))
                    return
                pool, generation = self._pool, self._generation
                try:
                    inner = pool.submit(task.fn, *task.args)
                    self._pids.update(getattr(pool, "_processes", None) or ())
                    break
                except cf.process.BrokenProcessPool:
                    pass
            self._restart(generation)
        inner.add_done_callback(lambda f: self._on_done(task, generation, f))

    def _on_done(self, task: _Task, generation: int, inner: cf.Future) -> None:
        if inner.cancelled():
            if self._closed:
                task.outer.cancel()
            else:  # cancelled by the shutdown of a broken pool: run it again
                self._retries.put((task, generation))
            return
        exc = inner.exception()
        if isinstance(exc, cf.process.BrokenProcessPool):
            task.attempts += 1
            if task.attempts > self.max_retries:
                name = getattr(task.fn, "__name__", task.fn)
                task.outer.set_exception(WorkerLost(f"a worker process died {task.attempts} times running {name}"))
            else:
                self._retries.put((task, generation))
        elif exc is not None:
            task.outer.set_exception(exc)
        else:
            task.outer.set_result(inner.result())

    def _supervise(self) -> None:
        while True:
            item = self._retries.get()
            if item is None:
                return
            task, generation = item
            self._restart(generation)
            self._launch(task)

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
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool, pids = self._pool, set(self._pids)
        self._retries.put(None)
        if cancel:
            _kill_groups(pids | set(getattr(pool, "_processes", None) or ()))
        pool.shutdown(wait=True, cancel_futures=cancel)
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
        return self.client.submit(fn, *args, pure=False)

    def map(self, fn: Callable[..., Any], iterable: Iterable[Any]) -> Iterator[Any]:
        """``fn`` over the items in parallel; results in input order."""
        futures = self.client.map(fn, list(iterable), pure=False)
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
        """Disconnect (and stop the LocalCluster if this executor started it)."""
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
