"""Nothing of a run outlives it: game processes the main process starts, and pool workers whose run died.

A SIGKILLed process runs no clean-up, so each side watches the other:

- ``watch_parent()`` (in each pool worker): a thread waits for the multiprocessing parent's sentinel,
  which becomes ready when the run's main process ends however it ends, then kills the worker's own
  process group (the worker and the vizdoom games it started).
- ``track_new_children()`` (in the main process): a game process started by the main process itself
  (``render``'s agent GIF) is registered with a small guard
  process that reads the run's pipe until EOF, i.e. until the run has ended, then SIGKILLs whatever
  registered process is still the same process (same start time).
"""
from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import IO

_GUARD = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
registered = [line.split() for line in sys.stdin]
for pid, start in registered:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[19].decode() != start:
                continue
        os.kill(int(pid), signal.SIGKILL)
    except (OSError, IndexError, ValueError):
        pass
"""

_guard: subprocess.Popen | None = None
_guard_lock = threading.Lock()


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (with the pid, it names one process for good), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def children(pid: int) -> set[int]:
    """Live direct children of ``pid`` (from /proc; empty where there is no /proc)."""
    found = set()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != b"Z":
            found.add(int(name))
    return found


def _guard_pipe() -> IO[bytes] | None:
    global _guard
    with _guard_lock:
        if _guard is None:
            try:
                _guard = subprocess.Popen([sys.executable, "-S", "-c", _GUARD], stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            except OSError:
                return None
        return _guard.stdin


def register(pids: set[int]) -> None:
    """Have the guard process SIGKILL these processes once the run's main process has ended."""
    pipe = _guard_pipe() if pids else None
    if pipe is None:
        return
    lines = [f"{pid} {start}\n" for pid in pids if (start := _start_time(pid)) is not None]
    try:
        pipe.write("".join(lines).encode("ascii"))
        pipe.flush()
    except OSError:
        pass


@contextlib.contextmanager
def track_new_children(poll: float = 0.05) -> Iterator[None]:
    """In the run's main process, register the processes started in the block (a game's emulator).

    They are registered as they appear (checked every ``poll`` seconds), not only when the block ends:
    a game starts long before the call that starts it returns.
    """
    if multiprocessing.parent_process() is not None or not os.path.isdir("/proc"):
        yield  # a worker: its own group is killed when the run ends
        return
    me = os.getpid()
    _guard_pipe()
    known = children(me)
    done = threading.Event()

    def register_new() -> None:
        new = children(me) - known
        known.update(new)
        register(new)

    def watch() -> None:
        while not done.wait(poll):
            register_new()

    watcher = threading.Thread(target=watch, name="wm-track-children", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        register_new()


def _kill_own_group_when_parent_ends(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    if os.getpgid(0) == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(1)


def watch_parent() -> None:
    """In a pool worker: end this worker and its process group as soon as the run's main process ends."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return
    threading.Thread(target=_kill_own_group_when_parent_ends, args=(parent.sentinel,),
                     name="wm-parent-watch", daemon=True).start()
