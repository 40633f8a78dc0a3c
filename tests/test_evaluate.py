"""evaluate and render through the CLI: eval.json with both policies on the same seeds, GIFs and a PNG grid."""
from __future__ import annotations

import json

import numpy as np

from wm_trainer.cli import main
from wm_trainer.controller import Controller
from wm_trainer.storage import RunPaths


def test_evaluate_writes_json_and_prints_both_scores_then_render_writes_media(tmp_path, capsys):
    import imageio.v3 as iio
    from test_rollout import make_tiny_run

    cfg_path, cfg = make_tiny_run(tmp_path)
    p = RunPaths(cfg.run_dir)
    ctrl = Controller(cfg.vae.z_dim, cfg.mdnrnn.hidden, 1, params=np.full(13, 0.5))
    ctrl.save(p.controller_model)
    base = ["-c", str(cfg_path), "--set", f"experiment.out_dir={tmp_path}"]

    assert main(["evaluate", *base, "--episodes", "4"]) == 0
    out = capsys.readouterr().out
    res = json.loads(p.eval_json.read_text())
    assert res["episodes"] == 4 and len(res["seeds"]) == 4
    for who in ("agent", "random"):
        r = res[who]
        assert len(r["returns"]) == 4
        assert np.isclose(r["mean"], np.mean(r["returns"])) and np.isclose(r["std"], np.std(r["returns"]))
        assert all(0 < x <= cfg.env.max_steps for x in r["returns"])  # Doom: +1 per tick survived
        assert f"{who}: {r['mean']:.1f} ± {r['std']:.1f}" in out

    assert main(["render", *base]) == 0
    agent = iio.imread(p.media / "agent.gif", index=None)
    dream = iio.imread(p.media / "dream.gif", index=None)
    grid = iio.imread(p.media / "vae_reconstructions.png")
    assert 2 <= len(agent) <= cfg.evaluate.gif_steps + 1 and agent.shape[1:3] == (128, 128)
    assert 1 <= len(dream) <= cfg.evaluate.gif_steps and dream.shape[1:3] == (128, 128)
    assert grid.shape[:2] == (2 * 128, 8 * 128)


def test_evaluate_without_a_controller_is_one_line_error(tmp_path, capsys):
    from test_rollout import make_tiny_run

    cfg_path, _ = make_tiny_run(tmp_path)
    assert main(["evaluate", "-c", str(cfg_path), "--set", f"experiment.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "controller.npz" in err and "train-controller" in err and "Traceback" not in err
