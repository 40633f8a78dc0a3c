"""evaluate and render through the CLI: eval.json with both policies on the same seeds, GIFs and a PNG grid."""
from __future__ import annotations

import json

import numpy as np

from wm_trainer.base.storage import RunPaths
from wm_trainer.cli import main
from wm_trainer.models.controller import Controller


def test_evaluate_writes_json_and_prints_both_scores_then_render_writes_media(tmp_path, capsys, make_tiny_run):
    import imageio.v3 as iio

    cfg_path, cfg = make_tiny_run(tmp_path)
    p = RunPaths(cfg.run_dir)
    ctrl = Controller(cfg.vae.z_dim, cfg.mdnrnn.hidden, 1, params=np.full(13, 0.5))
    ctrl.save(p.controller_model)
    base = ["-c", str(cfg_path), "--set", f"experiment.out_dir={tmp_path}"]

    assert main(["evaluate", *base, "--episodes", "4"]) == 0
    out = capsys.readouterr().out
    res = json.loads(p.eval_json.read_text())
    assert res["episodes"] == 4 and len(res["seeds"]) == 4
    for who in ("agent", "random", "random_iid"):
        r = res[who]
        assert len(r["returns"]) == 4
        assert np.isclose(r["mean"], np.mean(r["returns"])) and np.isclose(r["std"], np.std(r["returns"]))
        assert all(0 < x <= cfg.env.max_steps for x in r["returns"])  # Doom: +1 per tick survived
        assert f"{who}: {r['mean']:.1f} ± {r['std']:.1f}" in out
    m = res["margin_vs_random"]
    a, b = np.array(res["agent"]["returns"]), np.array(res["random"]["returns"])
    assert np.isclose(m["lead"], a.mean() - b.mean())
    if m["standard_errors"] is not None:
        assert np.isclose(m["standard_errors"], m["lead"] / np.sqrt(a.var(ddof=1) / 4 + b.var(ddof=1) / 4))
    assert "agent - random (sticky): " in out

    assert main(["render", *base]) == 0
    agent = iio.imread(p.media / "agent.gif", index=None)
    dream = iio.imread(p.media / "dream.gif", index=None)
    grid = iio.imread(p.media / "vae_reconstructions.png")
    assert 2 <= len(agent) <= cfg.evaluate.gif_steps + 1 and agent.shape[1:3] == (128, 128)
    assert 1 <= len(dream) <= cfg.evaluate.gif_steps and dream.shape[1:3] == (128, 128)
    assert grid.shape[:2] == (2 * 128, 8 * 128)

    # the dream GIF is the dream C trained in: with train-controller's calibrated done bias on file
    p.dream_calibration.parent.mkdir(parents=True, exist_ok=True)
    p.dream_calibration.write_text(json.dumps({"done_bias": 60.0}))  # ends the dream at its first step
    assert main(["render", *base]) == 0
    assert len(iio.imread(p.media / "dream.gif", index=None)) == 2


def test_evaluate_scores_another_controller_file_beside_it_and_leaves_eval_json(tmp_path, capsys, make_tiny_run):
    cfg_path, cfg = make_tiny_run(tmp_path)
    p = RunPaths(cfg.run_dir)
    Controller(cfg.vae.z_dim, cfg.mdnrnn.hidden, 1, params=np.full(13, 0.5)).save(p.controller_model)
    other = p.scored_controller(40)
    other.parent.mkdir(parents=True)
    Controller(cfg.vae.z_dim, cfg.mdnrnn.hidden, 1, params=np.full(13, -0.5)).save(other)
    base = ["-c", str(cfg_path), "--set", f"experiment.out_dir={tmp_path}", "--episodes", "4"]
    assert main(["evaluate", *base]) == 0
    kept = json.loads(p.eval_json.read_text())
    capsys.readouterr()

    # the kept controller, agent only: the same episodes, written beside it
    assert main(["evaluate", *base, "--agent-only"]) == 0
    again = json.loads(p.controller_model.with_suffix(".eval.json").read_text())
    assert again["agent"]["returns"] == kept["agent"]["returns"] and "random" not in again
    out = capsys.readouterr().out
    assert "agent: " in out and "random" not in out

    assert main(["evaluate", *base, "--controller", str(other), "--agent-only"]) == 0
    res = json.loads(other.with_suffix(".eval.json").read_text())
    assert res["controller"] == str(other) and res["seeds"] == kept["seeds"]
    assert set(res) >= {"agent", "episodes"} and not {"random", "random_iid", "margin_vs_random"} & set(res)
    assert f"eval: {other.with_suffix('.eval.json')}" in capsys.readouterr().out
    assert json.loads(p.eval_json.read_text()) == kept  # the run's eval.json untouched

    assert main(["evaluate", *base, "--controller", str(tmp_path / "nope.npz")]) == 2
    err = capsys.readouterr().err
    assert "nope.npz" in err and "Traceback" not in err
    wrong = tmp_path / "other_run.npz"  # a controller of a run with another V
    Controller(cfg.vae.z_dim + 1, cfg.mdnrnn.hidden, 1).save(wrong)
    assert main(["evaluate", *base, "--controller", str(wrong)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "other_run.npz" in err and f"z_dim {cfg.vae.z_dim + 1}" in err
    assert not wrong.with_suffix(".eval.json").exists()


def test_evaluate_without_a_controller_is_one_line_error(tmp_path, capsys, make_tiny_run):
    cfg_path, _ = make_tiny_run(tmp_path)
    assert main(["evaluate", "-c", str(cfg_path), "--set", f"experiment.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "controller.npz" in err and "train-controller" in err and "Traceback" not in err


def test_random_baselines_sticky_vs_iid(tmp_path, capsys, make_tiny_run):
    """evaluate reports the sticky collection policy as `random` and a fresh uniform action per step as `random_iid`."""
    import concurrent.futures as cf

    from wm_trainer.evaluate import evaluate

    class InlineExecutor:
        """Runs tasks in this process and records the random-policy repeat probability each task got."""

        n_workers = 2  # episodes are cut into about one task per worker

        def __init__(self):
            self.repeat_probs = []

        def broadcast(self, obj):
            return obj

        def release(self, handle):
            pass

        def submit(self, fn, *args):
            self.repeat_probs.append(args[5])  # _task(weights, jobs, env id, max_steps, n_envs, repeat_prob, ...)
            fut = cf.Future()
            fut.set_result(fn(*args))
            return fut

    _, cfg = make_tiny_run(tmp_path, "parallel.envs_per_worker=2")
    ctrl = Controller(cfg.vae.z_dim, cfg.mdnrnn.hidden, 1, params=np.full(13, 0.5))
    ctrl.save(RunPaths(cfg.run_dir).controller_model)
    ex = InlineExecutor()
    res = evaluate(cfg, episodes=4, executor=ex)
    # 2 tasks of 2 episodes each: agent (its repeat prob is unused), sticky random, i.i.d. random
    assert ex.repeat_probs == [0.9, 0.9, 0.9, 0.9, 0.0, 0.0]
    saved = json.loads(RunPaths(cfg.run_dir).eval_json.read_text())
    for who in ("agent", "random", "random_iid"):
        assert saved[who]["mean"] == res[who]["mean"] and len(saved[who]["returns"]) == 4
    assert "sticky" in saved["random"]["policy"] and "i.i.d." in saved["random_iid"]["policy"]


def test_random_policy_repeat_probability_zero_changes_action_every_step_at_random():
    """repeat_prob=0 draws a fresh uniform action each step (about 2/3 of steps change); 0.9 rarely changes."""
    from wm_trainer.games.real import random_policy

    def change_rate(repeat_prob: float) -> tuple[float, np.ndarray]:
        pol = random_policy("VizdoomTakeCover-v1", np.random.default_rng(0), repeat_prob)
        acts = np.array([pol()[0] for _ in range(3000)])
        return float(np.mean(acts[1:] != acts[:-1])), acts

    iid, acts = change_rate(0.0)
    sticky, _ = change_rate(0.9)
    assert 0.62 < iid < 0.71 and sticky < 0.1
    assert set(np.unique(acts)) == {-1.0, 0.0, 1.0}
    assert all(abs(np.mean(acts == v) - 1 / 3) < 0.03 for v in (-1.0, 0.0, 1.0))


def test_margin_in_standard_errors():
    from wm_trainer.evaluate import margin

    rng = np.random.default_rng(0)
    agent, base = rng.normal(500, 200, 100), rng.normal(360, 190, 100)
    m = margin(agent, base)
    se = np.sqrt(agent.var(ddof=1) / 100 + base.var(ddof=1) / 100)
    assert np.isclose(m["standard_error"], se) and np.isclose(m["standard_errors"], (agent.mean() - base.mean()) / se)
    assert margin(np.full(5, 3.0), np.full(5, 3.0))["standard_errors"] is None
