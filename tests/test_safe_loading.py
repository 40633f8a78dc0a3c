"""Every file a stage loads is read with pickling off: a poisoned or truncated file is one line, nothing run."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from wm_trainer import cli

ROOT = Path(__file__).resolve().parents[1]


# load point: (files under the run, the stage that loads them, its overrides)
LOAD_POINTS = {
    "V weights": (["vae.npz"], "render", []),
    "M weights": (["mdnrnn.npz"], "render", []),
    "C weights": (["controller.npz"], "evaluate", []),
    "V snapshot": (["vae/snapshot_iter_2", "vae/snapshot_iter_3"], "train-vae", ["vae.max_iterations=5"]),
    "M snapshot": (["mdnrnn/snapshot_iter_2", "mdnrnn/snapshot_iter_3"], "train-mdnrnn", ["mdnrnn.iterations=5"]),
    "CMA-ES state": (["controller/cmaes.npz"], "train-controller", ["controller.generations=4"]),
    "latents": (["latents/ep_000000.npz", "latents/ep_000001.npz", "latents/ep_000002.npz"],
                "train-controller", ["controller.generations=4"]),
}


def _run(tmp_path, stage, overrides, capsys) -> tuple[int, list[str]]:
    sets = [f"experiment.out_dir={tmp_path}", *overrides]
    code = cli.main([stage, "-c", str(ROOT / "configs/tiny_doom.yaml"), *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("wm-trainer")]


def _copy(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    return tmp_path / "tiny_doom"


@pytest.mark.parametrize("point", list(LOAD_POINTS))
def test_poisoned_file_is_one_line_and_runs_nothing(trained_tiny_run, tmp_path, capsys, point, poison):
    files, stage, overrides = LOAD_POINTS[point]
    run = _copy(trained_tiny_run, tmp_path)
    marker = tmp_path / "marker"
    if point == "CMA-ES state":
        (run / "controller.npz").unlink()  # so the stage resumes from its state
    for name in files:
        with np.load(run / name) as f:
            keys = list(f.files)
        poison(run / name, marker, keys)
    code, lines = _run(tmp_path, stage, overrides, capsys)
    assert not marker.exists()
    assert code == 2 and len(lines) == 1, lines
    assert any(str(run / name) in lines[0] for name in files) and "key '" in lines[0], lines[0]
    assert "holds a pickled Python object" in lines[0]


@pytest.mark.parametrize("point", list(LOAD_POINTS))
def test_truncated_file_is_one_line(trained_tiny_run, tmp_path, capsys, point):
    files, stage, overrides = LOAD_POINTS[point]
    run = _copy(trained_tiny_run, tmp_path)
    if point == "CMA-ES state":
        (run / "controller.npz").unlink()
    for name in files:
        raw = (run / name).read_bytes()
        (run / name).write_bytes(raw[: len(raw) // 2])
    code, lines = _run(tmp_path, stage, overrides, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert any(str(run / name) in lines[0] for name in files), lines[0]


@pytest.mark.parametrize("damage", ["poison", "truncate"])
def test_bad_episode_is_named_skipped_and_runs_nothing(trained_tiny_run, tmp_path, capsys, damage, poison):
    run = _copy(trained_tiny_run, tmp_path)
    marker = tmp_path / "marker"
    bad = run / "episodes" / "ep_000001.npz"
    if damage == "poison":
        with np.load(bad) as f:
            poison(bad, marker, list(f.files))
    else:
        bad.write_bytes(bad.read_bytes()[:5000])
    shutil.rmtree(run / "latents")
    with pytest.warns(RuntimeWarning, match="ep_000001.npz"):
        code, _ = _run(tmp_path, "encode", [], capsys)
    assert code == 0 and not marker.exists()
