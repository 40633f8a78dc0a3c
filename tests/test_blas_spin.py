"""The package shortens OpenBLAS's idle spin when it is imported before numpy, never over the user's value."""
from __future__ import annotations

import os
import subprocess
import sys

SHOW = "import wm_trainer, os; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"


def _run(code: str, **env: str) -> str:
    e = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"} | env
    done = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_imported_first_it_sets_a_short_spin():
    assert _run(SHOW) == "4"


def test_the_users_value_and_an_already_loaded_numpy_are_left_alone():
    assert _run(SHOW, OPENBLAS_THREAD_TIMEOUT="20") == "20"
    assert _run("import numpy; " + SHOW) == "None"  # too late to matter: OpenBLAS read its settings already
