"""Data-parallel training on ChainerMN: ``mpiexec -n 2`` on loopback (skipped without mpi4py or mpiexec).

A planted NaN on one process is skipped (or raised) by both at the same iteration, never a hang; two processes
train V as one process does on the same global batch; a two-process run killed mid-way resumes to the same
weights as an uninterrupted one. Each run has a timeout: a hang fails the test.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).resolve().parent / "mpi_worker.py"
ROOT = WORKER.parents[1]
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None,
                       reason="mpi4py is not installed (pip install -e '.[mpi]'; make test installs it)"),
    pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (the mpich wheel of the mpi extra brings one)"),
]


def run(n: int, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """The worker under ``mpiexec -n n`` (n = 0: alone, without mpiexec); a timeout fails the test."""
    cmd = [sys.executable, str(WORKER), *args]
    if n:
        cmd = [MPIEXEC, "-n", str(n), *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} hung ({timeout} s): {(e.stderr or b'')[-2000:]!r}")


def result(proc: subprocess.CompletedProcess) -> list[dict]:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_a_nan_on_one_process_is_skipped_by_both_with_equal_weights(tmp_path):
    ranks = result(run(2, "nan", "skip", str(tmp_path)))
    assert [r["skipped"] for r in ranks] == [1, 1]
    assert [r["t"] for r in ranks] == [5, 5]  # six iterations, the third skipped everywhere
    assert [r["iteration"] for r in ranks] == [6, 6]
    np.testing.assert_array_equal(ranks[0]["weights"], ranks[1]["weights"])
    report = (tmp_path / "nonfinite" / "report.txt").read_text()
    assert "Born on rank 1: NaN born in forward" in report and "(function log)" in report, report
    assert "rank 0: loss" in report and "rank 1: loss nan" in report


def test_a_nan_on_one_process_stops_both_under_raise(tmp_path):
    ranks = result(run(2, "nan", "raise", str(tmp_path)))
    assert [r["raised"]["iteration"] for r in ranks] == [3, 3]
    assert all("rank 1" in r["raised"]["message"] for r in ranks)
    assert [r["t"] for r in ranks] == [2, 2]
    np.testing.assert_array_equal(ranks[0]["weights"], ranks[1]["weights"])


def _vae_config(tmp_path, make_episodes, write_config, name: str, iterations: int) -> str:
    (tmp_path / name / "episodes").mkdir(parents=True)
    make_episodes(tmp_path / name / "episodes", n_episodes=4, length=12)
    return write_config(tmp_path, name, vae={"recon_every": 0, "max_iterations": iterations, "snapshot_every": 2})


def _weights(tmp_path, name: str) -> dict[str, np.ndarray]:
    with np.load(tmp_path / name / "vae.npz") as f:
        return {k: f[k] for k in f.files}


def test_two_processes_train_v_as_one_on_the_same_global_batch(tmp_path, make_episodes, write_config):
    one = _vae_config(tmp_path, make_episodes, write_config, "one", 4)
    two = _vae_config(tmp_path, make_episodes, write_config, "two", 4)
    proc = run(0, "vae", one)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run(2, "vae", two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _weights(tmp_path, "one"), _weights(tmp_path, "two")
    initial = _weights_of_untrained(tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        # Adam divides by sqrt(v): where a gradient is ~0, summation order alone moves single weights by up to lr,
        # so the check is on the whole update of each parameter, not element by element
        update_one, update_two = a[k] - initial[k], b[k] - initial[k]
        assert np.linalg.norm(update_one - update_two) <= 1e-3 * np.linalg.norm(update_one), k
    assert any(not np.allclose(a[k], initial[k]) for k in a)  # it trained
    # rank 0 alone writes: one log, snapshots of its own
    assert sorted(p.name for p in (tmp_path / "two" / "vae").glob("snapshot_iter_*")) == ["snapshot_iter_2",
                                                                                          "snapshot_iter_4"]


def _weights_of_untrained(tmp_path) -> dict[str, np.ndarray]:
    from wm_trainer.models.vision import ConvVAE

    np.random.seed(3)  # the configs' experiment.seed: V's initial weights
    return {name.lstrip("/"): p.array for name, p in ConvVAE(4, 0.5).namedparams()}


def test_a_killed_two_process_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, make_episodes,
                                                                                 write_config):
    whole = _vae_config(tmp_path, make_episodes, write_config, "whole", 8)
    killed = _vae_config(tmp_path, make_episodes, write_config, "killed", 8)
    assert run(2, "vae", whole).returncode == 0
    proc = run(2, "vae", killed, "5")
    assert proc.returncode != 0  # rank 1 was killed after iteration 5 (snapshot 4 on disk)
    assert not (tmp_path / "killed" / "vae.npz").exists()
    assert (tmp_path / "killed" / "vae" / "snapshot_iter_4").exists()
    proc = run(2, "vae", killed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _weights(tmp_path, "whole"), _weights(tmp_path, "killed")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
