"""The executor: local process pool and Dask, worker loss, broadcast once per worker."""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import Mock

import pytest

from wm_trainer.base import parallel
from wm_trainer.base.parallel import Broadcast, LocalExecutor, make_executor, resolve


def square(x: int) -> int:
    """A task that is easy to check."""
    return x * x


def fail(x: int) -> int:
    """A task that raises."""
    raise ValueError(f"bad item {x}")


def square_but_die_once(x: int, marker: str) -> tuple[int, int]:
    """Square x; the worker running item 3 kills itself the first time (the marker file remembers)."""
    time.sleep(0.05)
    if x == 3 and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return x, x * x


def slow_square(x: int) -> int:
    """A task slow enough to kill a worker in the middle of a map."""
    time.sleep(0.15)
    return x * x


class Weights:
    """A stand-in for model weights that records, in a file, every process that unpickles it."""

    def __init__(self, log: str, value: int):
        self.log = log
        self.value = value

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")


def use_weights(weights: Weights, x: int) -> tuple[int, int]:
    """A task that needs the broadcast object."""
    time.sleep(0.01)
    return os.getpid(), weights.value + x


def _parallel_cfg(**kw):
    # imported here, not at module level: workers import this module for its task functions,
    # and the config module pulls in the whole toolkit
    from wm_trainer.config import ParallelConfig

    return ParallelConfig(**kw)


def test_local_map_submit_and_errors():
    with make_executor(_parallel_cfg(backend="local", workers=2)) as ex:
        assert isinstance(ex, LocalExecutor) and ex.n_workers == 2
        assert list(ex.map(square, range(10))) == [i * i for i in range(10)]
        futures = [ex.submit(square, i) for i in range(5)]
        assert sorted(f.result() for f in ex.as_completed(futures)) == [0, 1, 4, 9, 16]
        with pytest.raises(ValueError, match="bad item 7"):
            ex.submit(fail, 7).result()
        assert ex.restarts == 0


def test_local_pool_survives_a_dead_worker(tmp_path):
    marker = str(tmp_path / "died")
    with LocalExecutor(workers=2) as ex:
        results = list(ex.map(square_item_die_once, [(i, marker) for i in range(12)]))
        assert os.path.exists(marker), "the worker never died: the test proved nothing"
        assert ex.restarts == 1
        # every item exactly once, in order, nothing lost or duplicated
        assert results == [(i, i * i) for i in range(12)]
        # the rebuilt pool keeps working
        assert list(ex.map(square, [5, 6])) == [25, 36]


def square_item_die_once(item: tuple[int, str]) -> tuple[int, int]:
    """``map`` passes one argument: unpack it for square_but_die_once."""
    return square_but_die_once(*item)


def test_broadcast_reaches_each_worker_once(tmp_path):
    log = tmp_path / "unpickled.txt"
    with LocalExecutor(workers=2) as ex:
        handle = ex.broadcast(Weights(str(log), 100))
        assert isinstance(handle, Broadcast) and resolve(handle).value == 100
        results = [f.result() for f in [ex.submit(use_weights, handle, i) for i in range(30)]]
        assert sorted(r[1] for r in results) == [100 + i for i in range(30)]
        pids = {r[0] for r in results}
        loads = log.read_text().split()
        # once per worker process, not once per task
        assert len(loads) == len(set(loads)) and set(map(int, loads)) == pids
        ex.release(handle)
        assert not handle.path.exists()


def test_dask_worker_killed_mid_map_loses_nothing():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        cfg = _parallel_cfg(backend="dask", address=cluster.scheduler_address)
        with make_executor(cfg) as ex:
            ex.client.wait_for_workers(2, timeout=30)
            pids = ex.worker_pids()
            assert len(pids) == 2
            handle = ex.broadcast({"offset": 1000})
            assert resolve(handle) == {"offset": 1000}
            futures = [ex.submit(slow_square, i) for i in range(16)]
            done = ex.as_completed(futures)
            first = next(done).result()  # fetched once: its data may live on the worker about to die
            assert first in {i * i for i in range(16)}
            victim = sorted(pids.values())[0]
            os.kill(victim, signal.SIGKILL)
            results = sorted([first] + [f.result() for f in done])
            assert results == sorted(i * i for i in range(16))
            assert victim not in ex.worker_pids().values()
            assert list(ex.map(square, range(4))) == [0, 1, 4, 9]


def square_but_die_mid_send_once(x: int, marker: str) -> int:
    """Square x; the first call dies as if SIGKILLed halfway through sending a big result (write lock held)."""
    if not os.path.exists(marker):
        Path(marker).touch()
        frame = sys._getframe()
        while "result_queue" not in frame.f_locals:  # the pool's _process_worker, which called this task
            frame = frame.f_back
        result_queue = frame.f_locals["result_queue"]
        result_queue._wlock.acquire()
        os.write(result_queue._writer.fileno(), struct.pack("!i", 1 << 20) + bytes(1000))
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def test_local_pool_survives_a_worker_killed_halfway_through_sending_a_result(tmp_path):
    marker = str(tmp_path / "died")
    ex = LocalExecutor(workers=2)
    assert ex.submit(square, 2).result(timeout=30) == 4  # the first pool and its manager thread are up
    pool = ex._pool
    manager, result_queue = pool._executor_manager_thread, pool._result_queue
    pids = set(pool._processes)
    try:
        futures = [ex.submit(square_but_die_mid_send_once, i, marker) for i in range(6)]
        pids |= set(pool._processes or ())  # the second worker starts here, while the first one dies
        done, _ = cf.wait(futures, timeout=20)
        assert len(done) == 6, "tasks were lost with the worker"
        assert [f.result() for f in futures] == [i * i for i in range(6)]
        assert os.path.exists(marker) and ex.restarts == 1
        # the old pool's manager thread got out of its recv(): left there, it would hang the interpreter's exit
        manager.join(timeout=10)
        assert not manager.is_alive()
        ex.shutdown()
    finally:
        if manager.is_alive():  # free what the failed run left stuck, so the test cannot hang the suite
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            result_queue._writer.close()
            manager.join(timeout=10)
            ex.shutdown(cancel=True)


def blas_threads() -> int:
    """The BLAS thread count in this process."""
    from threadpoolctl import threadpool_info

    return max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")


@pytest.mark.parametrize("workers", [1, 2])
def test_the_pools_blas_threads_fill_the_cores_without_oversubscribing_them(workers):
    cores = len(os.sched_getaffinity(0))
    with LocalExecutor(workers=workers) as ex:
        assert ex.submit(blas_threads).result(timeout=60) == max(1, cores // workers)
    assert parallel.worker_blas_threads(4 * cores) == 1


def test_a_worker_that_has_not_made_its_own_group_yet_is_killed_and_our_group_is_spared():
    # A worker still starting shares the run's process group: killing "its group" would kill the run,
    # and skipping it would leave it holding the dead pool's result pipe open.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert os.getpgid(child.pid) == os.getpgid(0)
        parallel._kill_groups([child.pid])
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_a_failure_inside_the_supervisor_reaches_the_task_and_the_supervisor_goes_on(tmp_path, caplog):
    with LocalExecutor(workers=1) as ex:
        make_pool = ex._new_pool
        injected: list[str] = []

        def new_pool_whose_first_submit_fails():
            pool = make_pool()
            submit = pool.submit

            def failing_submit(*args):
                if not injected:
                    injected.append("submit")
                    raise OSError("cannot start a worker process (injected)")
                return submit(*args)

            pool.submit = failing_submit
            return pool

        ex._new_pool = new_pool_whose_first_submit_fails
        # the worker dies, the supervisor restarts the pool, and relaunching on the new pool fails
        lost = ex.submit(square_but_die_once, 3, str(tmp_path / "died1"))
        with pytest.raises(OSError, match="injected"):
            lost.result(timeout=20)
        # the supervisor survived: another death is still retried, and a failing cleanup of the
        # replaced pool is logged without losing the task
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(parallel, "_kill_groups", Mock(side_effect=OSError("killpg failed (injected)")))
            assert ex.submit(square_but_die_once, 3, str(tmp_path / "died2")).result(timeout=20) == (3, 9)
        assert ex.restarts == 2 and "killpg failed (injected)" in caplog.text


def test_shutdown_with_cancel_resolves_every_future():
    ex = LocalExecutor(workers=1)
    assert ex.submit(square, 2).result(timeout=30) == 4  # the worker is up
    futures = [ex.submit(slow_square, i) for i in range(6)]
    ex.shutdown(cancel=True)
    done, _ = cf.wait(futures, timeout=20)
    assert len(done) == 6, "futures left unresolved by shutdown"
    assert all(isinstance(f.exception(), RuntimeError) for f in futures)


def test_dask_shutdown_with_cancel_leaves_the_runs_futures_cancelled():
    pytest.importorskip("distributed")
    from wm_trainer.base.parallel import DaskExecutor

    ex = DaskExecutor(workers=1)
    futures = [ex.submit(time.sleep, 30) for _ in range(3)]
    ex.shutdown(cancel=True)
    assert all(f.cancelled() for f in futures)
