"""`wm-trainer train-mdnrnn` under the toolkit's Trainer: resume, a missing input, float64."""
from __future__ import annotations

import numpy as np
import yaml

from wm_trainer import cli
from wm_trainer.base.storage import RunPaths
from wm_trainer.training.mdnrnn_updater import MDNRNNUpdater


def test_train_mdnrnn_cli_resumes_the_same_run(tmp_path, monkeypatch, latents_run, npz_arrays):
    full = latents_run(tmp_path, 6, "full")
    assert cli.main(["train-mdnrnn", "-c", full]) == 0
    part = latents_run(tmp_path, 4, "part")
    assert cli.main(["train-mdnrnn", "-c", part]) == 0  # "killed" after 4 iterations (snapshot at 4)
    calls = []
    original = MDNRNNUpdater.compute_loss
    monkeypatch.setattr(MDNRNNUpdater, "compute_loss", lambda self, a: calls.append(1) or original(self, a))
    assert cli.main(["train-mdnrnn", "-c", part, "--set", "mdnrnn.iterations=6"]) == 0  # resumes at 4
    assert len(calls) == 2
    a = npz_arrays(RunPaths(tmp_path / "full").mdnrnn_model)
    b = npz_arrays(RunPaths(tmp_path / "part").mdnrnn_model)
    assert a.keys() == b.keys() and a
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)
    log = (RunPaths(tmp_path / "part").mdnrnn_dir / "log").read_text()
    assert '"iteration": 6' in log and '"main/nll"' in log and '"main/done"' in log


def test_train_mdnrnn_without_latents_is_a_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"experiment": {"name": "empty", "out_dir": str(tmp_path)}}))
    assert cli.main(["train-mdnrnn", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "wm-trainer encode" in err and len(err.strip().splitlines()) == 1


def test_train_mdnrnn_float64_switch(tmp_path, latents_run):
    cfg = latents_run(tmp_path, 2, "f64")
    assert cli.main(["train-mdnrnn", "-c", cfg, "--float64"]) == 0
    with np.load(RunPaths(tmp_path / "f64").mdnrnn_model) as d:
        assert d.files and all(d[k].dtype == np.float64 for k in d.files)


def test_train_mdnrnn_with_a_joint_mixture_trains_the_joint_nll(tmp_path, latents_run, monkeypatch):
    import wm_trainer.models.memory as memory
    from wm_trainer.config import load_config
    from wm_trainer.models.memory import load_mdnrnn

    cfg = latents_run(tmp_path, 2, "joint")
    seen = []
    original = memory.joint_mdn_nll_packed
    monkeypatch.setattr(memory, "joint_mdn_nll_packed", lambda *a, **k: seen.append(1) or original(*a, **k))
    assert cli.main(["train-mdnrnn", "-c", cfg, "--set", "mdnrnn.mixture=joint"]) == 0
    assert len(seen) == 2  # one loss per iteration, the joint one
    run_cfg = load_config(RunPaths(tmp_path / "joint").root / "config.yaml")
    assert run_cfg.mdnrnn.mixture == "joint"
    assert load_mdnrnn(RunPaths(tmp_path / "joint").mdnrnn_model, run_cfg, 1).joint
