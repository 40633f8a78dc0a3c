"""A killed run leaves no process behind: workers, forkserver, resource tracker and game processes end with it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wm_trainer.base.reaper import _start_time, children

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")


def _tree(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid`` (workers and games included): pid -> start time."""
    found, todo = {}, [pid]
    while todo:
        for child in children(todo.pop()):
            start = _start_time(child)
            if start is not None:
                found[child] = start
                todo.append(child)
    return found


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _alive(procs: dict[int, str]) -> list[str]:
    """Those of ``procs`` that are still the same live (non-zombie) process."""
    left = []
    for pid, start in procs.items():
        try:
            state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state != b"Z" and _start_time(pid) == start:
            left.append(f"{pid} {_name(pid)}")
    return left


def _config(tmp_path: Path, stage_lines: str) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"experiment: {{out_dir: {tmp_path}, name: run, seed: 1}}\n"
                   "env: {id: VizdoomTakeCover-v1, max_steps: 400}\n"
                   "parallel: {workers: 2}\n" + stage_lines)
    return cfg


def _as_from_a_terminal() -> None:
    # a shell starts background jobs with SIGINT ignored, and Python then installs no Ctrl-C handler: a test
    # run as `make test &` would otherwise send its Ctrl-C to a run that cannot hear it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "wm_trainer.cli", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_as_from_a_terminal)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _wait_for_games(proc: subprocess.Popen, n: int, timeout: float = 90, *, in_workers: bool = False
                    ) -> dict[int, str]:
    """The run's process tree once it has ``n`` game processes running (``in_workers``: not the main process's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tree = _tree(proc.pid)
        games = [p for p in tree if _name(p) == "vizdoom" and not (in_workers and _parent(p) == proc.pid)]
        if len(games) >= n:
            return tree
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    out, err = proc.communicate(timeout=10) if proc.poll() is not None else (b"", b"")
    proc.kill()
    pytest.fail(f"the run never had {n} games running: {err.decode()[-2000:]}")


def _assert_all_end(tree: dict[int, str], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while _alive(tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _alive(tree) == [], f"still alive {within} s after the run was killed"


def test_sigkill_of_collect_leaves_no_process(tmp_path):
    cfg = _config(tmp_path, "collect: {episodes: 200}\n")
    proc = _start(tmp_path, "collect", "-c", str(cfg))
    tree = _wait_for_games(proc, 2)
    time.sleep(0.5)
    tree.update(_tree(proc.pid))
    assert len(tree) >= 5, tree  # two workers, two games, the forkserver (and the resource tracker)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _assert_all_end(tree)


@pytest.mark.parametrize("sig, code, line", [(signal.SIGTERM, 143, "terminated; re-run the same command to resume"),
                                             (signal.SIGINT, 130, "interrupted; re-run the same command to resume")])
def test_sigterm_and_ctrl_c_of_collect_say_it_resumes_and_leave_no_process(tmp_path, sig, code, line):
    cfg = _config(tmp_path, "collect: {episodes: 200}\n")
    proc = _start(tmp_path, "collect", "-c", str(cfg))
    tree = _wait_for_games(proc, 2, in_workers=True)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code
    lines = [s for s in err.decode().splitlines() if s.startswith("wm-trainer")]
    assert lines == [f"wm-trainer: {line}"] and "Traceback" not in err.decode()
    _assert_all_end(tree)



def _start_later_stage(trained_tiny_run: Path, tmp_path: Path, stage: str, overrides: list[str]) -> subprocess.Popen:
    """``stage`` on a copy of the trained tiny run (without its controller for train-controller), long episodes."""
    import shutil

    shutil.copytree(trained_tiny_run, tmp_path, dirs_exist_ok=True)
    if stage == "train-controller":
        shutil.rmtree(tmp_path / "tiny_doom" / "controller")
        (tmp_path / "tiny_doom" / "controller.npz").unlink()
    sets = [f"experiment.out_dir={tmp_path}", "env.max_steps=2000", *overrides]
    return _start(tmp_path, stage, "-c", "configs/tiny_doom.yaml", *[a for s in sets for a in ("--set", s)])


@pytest.mark.parametrize("stage, overrides, games", [
    ("evaluate", ["evaluate.episodes=400"], 2),
    ("render", ["evaluate.gif_steps=100000"], 1),  # the agent GIF's game runs in the main process
    ("train-controller", ["controller.mode=real", "controller.generations=50"], 2),
])
def test_sigkill_of_a_later_stage_leaves_no_process(trained_tiny_run, tmp_path, stage, overrides, games):
    proc = _start_later_stage(trained_tiny_run, tmp_path, stage, overrides)
    tree = _wait_for_games(proc, games)
    time.sleep(0.3)
    tree.update(_tree(proc.pid))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _assert_all_end(tree)


@pytest.mark.parametrize("stage, overrides", [
    ("evaluate", ["evaluate.episodes=400"]),
    ("train-controller", ["controller.mode=real", "controller.generations=50", "controller.population=32"]),
])
def test_sigterm_of_a_later_stage_stops_at_once_without_playing_its_queued_episodes(trained_tiny_run, tmp_path,
                                                                                    stage, overrides):
    proc = _start_later_stage(trained_tiny_run, tmp_path, stage, overrides)
    tree = _wait_for_games(proc, 2)
    time.sleep(0.3)
    tree.update(_tree(proc.pid))
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 143, err.decode()[-2000:]
    assert "wm-trainer: terminated; re-run the same command to resume" in err.decode()
    # hundreds of queued episodes of up to 2,000 ticks are dropped, not played out before the run ends
    assert took < 10, f"{stage} took {took:.1f} s to stop"
    _assert_all_end(tree)


def test_sigkill_of_pipeline_leaves_no_process(tmp_path):
    proc = _start(tmp_path, "pipeline", "-c", "configs/tiny_doom.yaml", "--set", f"experiment.out_dir={tmp_path}",
                  "--set", "collect.episodes=200", "--set", "env.max_steps=400")
    tree = _wait_for_games(proc, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _assert_all_end(tree)
