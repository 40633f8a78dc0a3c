"""A Dask run killed or stopped leaves the user's cluster up and idle: the scheduler drops the run's tasks."""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from wm_trainer.base.reaper import _start_time, children

distributed = pytest.importorskip("distributed", reason="the Dask backend needs dask[distributed]")
dask = pytest.importorskip("dask")

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")

TASK = "collect_one-"  # the key prefix of the run's tasks (Dask names an impure task after its function)
MAX_STEPS = 300  # short episodes: a task executing when the run ends finishes its episode within seconds


def _run_tasks_on_scheduler(dask_scheduler: Any) -> dict[str, str]:
    return {str(k): ts.state for k, ts in dask_scheduler.tasks.items() if str(k).startswith(TASK)}


def _run_tasks_on_worker(dask_worker: Any) -> dict[str, str]:
    return {str(k): ts.state for k, ts in dask_worker.state.tasks.items() if str(k).startswith(TASK)}


def _release(since: float, dask_scheduler: Any) -> tuple[float, float, dict[str, int]]:
    # when the scheduler last forgot a task of the run, when it last sent one to a worker, and how many it forgot
    # since ``since`` for each stimulus
    forgotten, sent, causes = 0.0, 0.0, collections.Counter()
    for t in dask_scheduler.transition_log:
        if not str(t.key).startswith(TASK):
            continue
        if t.finish == "processing":
            sent = max(sent, t.timestamp)
        elif t.finish == "forgotten" and t.timestamp > since:
            forgotten = max(forgotten, t.timestamp)
            causes[t.stimulus_id.rsplit("-", 1)[0]] += 1
    return forgotten, sent, dict(causes)


def _client_actions(since: float, dask_scheduler: Any) -> list[tuple[str, int | None]]:
    # the scheduler's record of clients cancelling tasks and going away since ``since``: (action, count), in order
    found = [(t, m["action"], m.get("count")) for topic, events in dask_scheduler.get_events().items()
             if str(topic).startswith("Client-") for t, m in events
             if t > since and isinstance(m, dict) and m.get("action") in ("cancel", "remove-client")]
    return [(action, count) for _, action, count in sorted(found)]


def _cpu_ticks(pid: int) -> int:
    """User plus system CPU time of ``pid`` in clock ticks (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _games(worker_pids: list[int]) -> dict[int, str | None]:
    """The vizdoom game processes the workers started: pid -> start time."""
    found, todo = {}, list(worker_pids)
    while todo:
        for child in children(todo.pop()):
            todo.append(child)
            if _name(child) == "vizdoom":
                found[child] = _start_time(child)
    return found


@pytest.fixture(scope="module")
def cluster():
    """The user's cluster: two single-thread worker processes the run does not own. Yields (client, worker pids)."""
    long_logs = dask.config.set({"distributed.admin.low-level-log-length": 100_000})  # every transition of a run
    with long_logs, distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                             dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        yield client, sorted(client.run(os.getpid).values())


def _as_from_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background shell job would start the run ignoring Ctrl-C


def _start_collect(tmp_path: Path, address: str) -> subprocess.Popen:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"experiment: {{out_dir: {tmp_path}, name: run, seed: 1}}\n"
                   f"env: {{id: VizdoomTakeCover-v1, max_steps: {MAX_STEPS}}}\n"
                   f"parallel: {{backend: dask, address: '{address}'}}\n"
                   "collect: {episodes: 1000}\n")
    return subprocess.Popen([sys.executable, "-m", "wm_trainer.cli", "collect", "-c", str(cfg)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_as_from_a_terminal)


def _wait_until_executing(proc: subprocess.Popen, client: Any, worker_pids: list[int], episodes: Path,
                          timeout: float = 90) -> dict[int, str | None]:
    """The workers' games once each worker plays an episode of the run and most of its tasks wait their turn.

    The run has saved an episode by then: it has submitted every task (the scheduler may still be receiving some).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        on_workers = client.run(_run_tasks_on_worker)
        games = _games(worker_pids)
        if (sum("executing" in tasks.values() for tasks in on_workers.values()) == 2 and len(games) == 2
                and any(episodes.glob("ep_*.npz"))):
            on_scheduler = list(client.run_on_scheduler(_run_tasks_on_scheduler).values())
            if on_scheduler.count("processing") >= 2 and on_scheduler.count("queued") > 100:
                return games
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    _, err = proc.communicate(timeout=10)
    pytest.fail(f"the run's tasks never played on both workers: {err.decode()[-2000:]}")


def _assert_cluster_idle_and_usable(client: Any, worker_pids: list[int], games: dict[int, str | None],
                                    signalled: float) -> dict[str, Any]:
    """Assert the cluster outlives the run; returns the seconds from the signal to each step and the release's causes.

    Within bounds the scheduler drops the run's tasks, sends none after that, and the same workers end what they
    were executing (Dask cannot interrupt a task in a worker thread: a released one plays its episode to the end
    and its result is dropped), then stay idle and run new work.
    """
    times: dict[str, Any] = {}
    while time.time() < signalled + 60 and "workers idle" not in times:
        if not client.run_on_scheduler(_run_tasks_on_scheduler) and not any(client.run(_run_tasks_on_worker).values()):
            times["workers idle"] = time.time() - signalled
        time.sleep(0.05)
    assert client.run_on_scheduler(_run_tasks_on_scheduler) == {}, "the scheduler still holds the run's tasks"
    assert "workers idle" in times, f"a worker still runs the run's tasks: {client.run(_run_tasks_on_worker)}"
    released, sent, times["forgotten by"] = client.run_on_scheduler(_release, signalled)
    times["scheduler released"] = released - signalled
    assert 0 <= times["scheduler released"] < 10 and times["workers idle"] < 30, times
    assert 0 < sent < released, "the scheduler sent a task of the run to a worker after it had dropped them"
    time.sleep(1)
    assert client.run_on_scheduler(_run_tasks_on_scheduler) == {} and not any(client.run(_run_tasks_on_worker).values())
    # the cluster is still up: the same workers, idle, and they run new work
    assert sorted(client.run(os.getpid).values()) == worker_pids
    assert all(n == 0 for n in client.run(lambda dask_worker: len(dask_worker.state.executing)).values())
    assert client.submit(pow, 3, 4, pure=False).result(timeout=30) == 81
    # the games that were playing are the workers' cached envs: they stay, idle, for the next run
    assert _games(worker_pids) == games
    before = {pid: _cpu_ticks(pid) for pid in games}
    time.sleep(1)
    assert all(_cpu_ticks(pid) - ticks <= 2 for pid, ticks in before.items()), "a game still plays"
    return times


def test_sigkill_of_a_dask_driver_releases_its_tasks_and_leaves_the_cluster_up(cluster, tmp_path):
    client, worker_pids = cluster
    proc = _start_collect(tmp_path, client.scheduler.address)
    games = _wait_until_executing(proc, client, worker_pids, tmp_path / "run" / "episodes")
    signalled = time.time()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    times = _assert_cluster_idle_and_usable(client, worker_pids, games, signalled)
    # the scheduler noticed the lost client and released all the tasks it held; an episode the driver saved just
    # before the kill was released by the driver itself, as every saved one is
    assert {action for action, _ in client.run_on_scheduler(_client_actions, signalled)} == {"remove-client"}
    assert "remove-client" in times["forgotten by"], times
    assert set(times["forgotten by"]) <= {"remove-client", "client-releases-keys"}, times
    print(f"after SIGKILL: {times}; games {games}")


@pytest.mark.parametrize("sig, code, line", [(signal.SIGTERM, 143, "terminated; re-run the same command to resume"),
                                             (signal.SIGINT, 130, "interrupted; re-run the same command to resume")],
                         ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_and_ctrl_c_of_a_dask_driver_drop_its_tasks_and_leave_the_cluster_up(cluster, tmp_path, sig, code,
                                                                                    line):
    client, worker_pids = cluster
    proc = _start_collect(tmp_path, client.scheduler.address)
    games = _wait_until_executing(proc, client, worker_pids, tmp_path / "run" / "episodes")
    signalled = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err.decode()[-2000:]
    assert [s for s in err.decode().splitlines() if s.startswith("wm-trainer")] == [f"wm-trainer: {line}"]
    assert "could not cancel" not in err.decode()
    times = _assert_cluster_idle_and_usable(client, worker_pids, games, signalled)
    # shutdown(cancel=True) sends the cancel, then disconnects at once; the last messages it sent are sometimes lost
    # with the connection, and the scheduler then releases the tasks of the client it lost, as after a SIGKILL; an
    # episode the driver saved before it stopped was released as every saved one is
    causes = times["forgotten by"]
    assert set(causes) & {"cancel-key", "remove-client"}, times
    assert set(causes) <= {"cancel-key", "remove-client", "client-releases-keys"}, times
    print(f"after {sig.name}: {times}; games {games}")
