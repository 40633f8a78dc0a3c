"""How many CPUs this process may use (its affinity where the OS tells it, else the machine's count)."""
from __future__ import annotations

import os


def usable_cores() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
