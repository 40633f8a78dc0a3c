"""File modes: what the toolkit writes through a temp file gets the mode ``open`` would give it."""
from __future__ import annotations

import os


def current_umask() -> int:
    """The process's umask (read from /proc where it can be, so no other thread sees it changed)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def chmod_like_open(fd: int) -> None:
    """Give a ``mkstemp`` file (mode 0600) the mode a new file gets: 0666 less the umask."""
    if hasattr(os, "fchmod"):
        os.fchmod(fd, 0o666 & ~current_umask())
