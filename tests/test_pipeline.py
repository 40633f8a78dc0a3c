"""`wm-trainer pipeline` on a tiny config: every stage end to end, then a re-run that skips them all."""
from __future__ import annotations

import json
from pathlib import Path

from wm_trainer.base.storage import RunPaths
from wm_trainer.cli import main

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_doom.yaml"
STAGES = ["collect", "train-vae", "encode", "train-mdnrnn", "train-controller", "evaluate", "render"]


def test_pipeline_end_to_end_then_skips_complete_stages(tmp_path, capsys):
    args = ["pipeline", "-c", str(TINY), "--set", f"experiment.out_dir={tmp_path}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for i, stage in enumerate(STAGES, 1):
        assert f"[{i}/7] {stage}: running" in out
    assert "random: " in out and "random_iid: " in out  # both baselines, labelled
    p = RunPaths(tmp_path / "tiny_doom")
    assert len(list(p.episodes.glob("ep_*.npz"))) == 3 and len(list(p.latents.glob("ep_*.npz"))) == 3
    for f in (p.vae_model, p.mdnrnn_model, p.controller_model, p.eval_json):
        assert f.is_file(), f
    res = json.loads(p.eval_json.read_text())
    assert res["episodes"] == 3 and {"agent", "random", "random_iid"} <= set(res)
    media = {"agent.gif", "dream.gif", "vae_reconstructions.png", "vae_check.json"}
    assert {f.name for f in p.media.iterdir()} == media

    assert main(args) == 0
    out = capsys.readouterr().out
    assert all(f"{stage}: complete, skipped" in out for stage in STAGES), out

    # more generations asked: C resumes from its saved CMA-ES state, and what depends on C runs again
    assert main(args + ["--set", "controller.generations=3"]) == 0
    out = capsys.readouterr().out
    for stage in STAGES[:4]:
        assert f"{stage}: complete, skipped" in out
    for stage in STAGES[4:]:
        assert f"{stage}: running" in out
    log = json.loads((p.controller_dir / "log.json").read_text())
    assert [r["generation"] for r in log] == [1, 2, 3]


def test_carracing_pipeline_end_to_end_with_c_trained_in_the_real_env(tmp_path, capsys):
    cfg = Path(__file__).resolve().parents[1] / "configs" / "tiny_carracing.yaml"
    assert main(["pipeline", "-c", str(cfg), "--set", f"experiment.out_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    for i, stage in enumerate(STAGES, 1):
        assert f"[{i}/7] {stage}: running" in out
    p = RunPaths(tmp_path / "tiny_carracing")
    res = json.loads(p.eval_json.read_text())
    assert res["env"] == "CarRacing-v3" and res["controller_mode"] == "real" and res["episodes"] == 2
    assert all(len(res[k]["returns"]) == 2 for k in ("agent", "random", "random_iid"))
    log = json.loads((p.controller_dir / "log.json").read_text())
    assert [r["generation"] for r in log] == [1, 2]
    assert all(r["select_score"] is not None and r["select_steps"] == 30 for r in log)  # 1 whole 30-step track
    assert (p.media / "agent.gif").is_file()

    # a spent time budget ends C before its generations, and the pipeline counts C complete; a larger one resumes it
    budget = ["--set", "controller.generations=6", "--set", "controller.max_minutes=0.00001"]
    assert main(["pipeline", "-c", str(cfg), "--set", f"experiment.out_dir={tmp_path}"] + budget) == 0
    assert "train-controller: complete, skipped" in capsys.readouterr().out
    assert main(["pipeline", "-c", str(cfg), "--set", f"experiment.out_dir={tmp_path}",
                 "--set", "controller.generations=3", "--set", "controller.max_minutes=60"]) == 0
    assert "train-controller: running" in capsys.readouterr().out
    log = json.loads((p.controller_dir / "log.json").read_text())
    assert [r["generation"] for r in log] == [1, 2, 3] and all(r["env_steps"] > 0 for r in log)
