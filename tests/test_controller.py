"""C: the tanh-linear map, per-agent batched weights, flat <-> (W, b), and atomic save/load."""
import numpy as np
import pytest

from wm_trainer.base.errors import UserError
from wm_trainer.models.controller import Controller


def test_flat_vector_round_trips_through_w_and_b():
    c = Controller(z_dim=4, hidden=6, action_dim=3)
    assert c.n_params == 3 * 10 + 3
    p = np.arange(c.n_params, dtype=np.float32)
    W, b = c.unflatten(p)
    assert W.shape == (3, 10) and b.shape == (3,)
    np.testing.assert_array_equal(b, [30, 31, 32])
    np.testing.assert_array_equal(c.flatten(W, b), p)


def test_act_batch_uses_each_agents_own_weights():
    rng = np.random.default_rng(0)
    c = Controller(z_dim=4, hidden=6, action_dim=2)
    params = rng.normal(size=(5, c.n_params)).astype(np.float32)
    z, h = rng.normal(size=(5, 4)), rng.normal(size=(5, 6))
    a = c.act_batch(params, z, h)
    assert a.shape == (5, 2) and np.all(np.abs(a) <= 1)
    for i in range(5):
        W, b = c.unflatten(params[i])
        np.testing.assert_allclose(a[i], np.tanh(W @ np.concatenate([z[i], h[i]]) + b), rtol=1e-5, atol=1e-6)
    shared = c.act_batch(params[0], z, h)
    np.testing.assert_allclose(shared[0], a[0], rtol=1e-6)
    with pytest.raises(ValueError, match="weight rows"):
        c.act_batch(params[:3], z, h)


def test_save_and_load(tmp_path):
    c = Controller(3, 5, 1, params=np.linspace(-1, 1, 9))
    c.save(tmp_path / "controller.npz")
    d = Controller.load(tmp_path / "controller.npz")
    assert (d.z_dim, d.hidden, d.action_dim) == (3, 5, 1)
    np.testing.assert_array_equal(d.params, c.params)
    with np.load(tmp_path / "controller.npz", allow_pickle=False) as f:
        assert f["W"].shape == (1, 8) and f["b"].shape == (1,)
    with pytest.raises(UserError, match="train-controller"):
        Controller.load(tmp_path / "missing.npz")


@pytest.mark.parametrize("env_id", ["VizdoomTakeCover-v1", "CarRacing-v3"])
def test_controller_outputs_map_to_each_envs_native_actions(env_id):
    from wm_trainer.games import spec

    adim = spec.action_dim(env_id)
    c = Controller(z_dim=3, hidden=4, action_dim=adim)
    rng = np.random.default_rng(0)
    a = c.act_batch(rng.normal(scale=5.0, size=(200, c.n_params)), rng.normal(size=(200, 3)), rng.normal(size=(200, 4)))
    assert a.shape == (200, adim) and np.all(np.abs(a) <= 1)
    native = [spec.native_action(env_id, x) for x in a]
    if env_id == spec.DOOM_ID:
        assert set(native) == {spec.DOOM_LEFT, spec.DOOM_NOOP, spec.DOOM_RIGHT}
        assert spec.native_action(env_id, np.array([-0.9])) == spec.DOOM_LEFT
        assert spec.native_action(env_id, np.array([0.9])) == spec.DOOM_RIGHT
    else:
        n = np.stack(native)
        assert np.all((n[:, 0] >= -1) & (n[:, 0] <= 1))  # steer
        assert np.all((n[:, 1] >= 0) & (n[:, 1] <= 1))  # gas = (a + 1) / 2
        assert np.all((n[:, 2] >= 0) & (n[:, 2] <= 1))  # brake = clip(a, 0, 1)
        np.testing.assert_allclose(spec.native_action(env_id, np.array([0.5, -1.0, -0.3])), [0.5, 0.0, 0.0])


def _train(cfg_path, out, *sets):
    from wm_trainer.cli import main

    args = ["train-controller", "-c", str(cfg_path), "--set", f"experiment.out_dir={out}",
            "--set", "controller.eval_every=0"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0


def test_dream_generations_log_and_resume_like_an_uninterrupted_run(tmp_path, make_tiny_run):
    import json

    from wm_trainer.base.storage import RunPaths

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cfg_path, cfg = make_tiny_run(straight)
    make_tiny_run(killed)
    # every generation's mean is scored, so stopping at 2 scores nothing a run killed there would not have
    _train(cfg_path, straight, "controller.generations=3", "controller.select_every=1")
    _train(cfg_path, killed, "controller.generations=2", "controller.select_every=1")  # "killed" after 2
    _train(cfg_path, killed, "controller.generations=3", "controller.select_every=1")  # resumes at 3

    a, b = RunPaths(straight / cfg.experiment.name), RunPaths(killed / cfg.experiment.name)
    log_a = json.loads((a.controller_dir / "log.json").read_text())
    log_b = json.loads((b.controller_dir / "log.json").read_text())
    assert [r["generation"] for r in log_a] == [1, 2, 3]
    assert log_a == log_b
    for row in log_a:  # fitness = steps survived in the dream, within the dream's cap
        assert 1 <= row["worst"] <= row["mean"] <= row["best"] <= cfg.env.max_steps
    ca, cb = Controller.load(a.controller_model), Controller.load(b.controller_model)
    np.testing.assert_array_equal(ca.params, cb.params)
    assert (ca.z_dim, ca.hidden, ca.action_dim) == (4, 8, 1)
    assert (a.controller_dir / "log.csv").read_text().splitlines()[0].startswith("generation,mean,best,worst,sigma")
    assert list((a.controller_dir / "tb").glob("events.out.tfevents.*"))


def test_the_time_budget_stops_training_and_a_rerun_keeps_it_stopped(tmp_path, capsys, make_tiny_run):
    import json

    from wm_trainer.base.storage import RunPaths

    cfg_path, cfg = make_tiny_run(tmp_path)
    _train(cfg_path, tmp_path, "controller.generations=5", "controller.max_minutes=0.00001")
    assert "stopped after generation 1" in capsys.readouterr().err
    _train(cfg_path, tmp_path, "controller.generations=5", "controller.max_minutes=0.00001")  # resumed: still done
    log_path = RunPaths(cfg.run_dir).controller_dir / "log.json"
    assert [r["generation"] for r in json.loads(log_path.read_text())] == [1]
    assert RunPaths(cfg.run_dir).controller_model.is_file()
    _train(cfg_path, tmp_path, "controller.generations=3", "controller.max_minutes=60")  # a larger budget resumes
    assert [r["generation"] for r in json.loads(log_path.read_text())] == [1, 2, 3]


def test_resume_with_a_different_population_is_a_user_error(tmp_path, capsys, make_tiny_run):
    from wm_trainer.cli import main

    cfg_path, _ = make_tiny_run(tmp_path)
    _train(cfg_path, tmp_path, "controller.generations=1")
    rc = main(["train-controller", "-c", str(cfg_path), "--set", f"experiment.out_dir={tmp_path}",
               "--set", "controller.population=6", "--set", "controller.generations=2"])
    assert rc == 2
    assert "population 4" in capsys.readouterr().err


def test_real_mode_fitness_runs_candidates_through_the_executor(tmp_path, make_tiny_run):
    import json

    from wm_trainer.base.storage import RunPaths

    cfg_path, cfg = make_tiny_run(tmp_path)
    _train(cfg_path, tmp_path, "controller.mode=real", "controller.generations=1",
           "controller.episodes_per_candidate=1", "env.max_steps=15")
    (row,) = json.loads((RunPaths(cfg.run_dir).controller_dir / "log.json").read_text())
    assert 0 < row["worst"] <= row["mean"] <= row["best"] <= 15  # Doom: +1 per tick, real episodes capped at 15


def test_real_mode_caps_training_episodes_while_its_evaluation_plays_them_whole(tmp_path, make_tiny_run):
    import json

    from wm_trainer.base.storage import RunPaths
    from wm_trainer.cli import main

    cfg_path, cfg = make_tiny_run(tmp_path)
    args = ["train-controller", "-c", str(cfg_path), "--set", f"experiment.out_dir={tmp_path}"]
    for s in ("controller.mode=real", "controller.generations=1", "controller.episodes_per_candidate=1",
              "env.max_steps=15", "controller.max_steps=5", "controller.patience=3", "controller.eval_every=1",
              "controller.eval_episodes=2"):
        args += ["--set", s]
    assert main(args) == 0
    (row,) = json.loads((RunPaths(cfg.run_dir).controller_dir / "log.json").read_text())
    # Doom pays +1 every tick, so patience never ends an episode: the cap ends every training episode at
    # 5 ticks, and the evaluation survives its 15 ticks
    assert row["worst"] == row["best"] == 5
    assert row["env_steps"] == 5 * cfg.controller.population
    assert row["eval_mean"] == 15


def test_dream_done_threshold_versus_the_corrected_bernoulli_hazard():
    from wm_trainer.models.memory import MDNRNN
    from wm_trainer.train_controller import dream_returns

    m = MDNRNN(z_dim=3, action_dim=1, hidden=6, mixtures=2, done_head=True, done_weight=10.0)
    m.done.W.array[...] = 0.0
    # trained with positives weighted x10, a head logit of log(10) + logit(p) means probability p
    p = 0.05
    m.done.b.array[...] = np.log(10.0) + np.log(p / (1 - p))  # = -0.64: the logit never crosses 0
    ctrl = Controller(3, 6, 1)
    pop = np.random.default_rng(0).normal(scale=0.1, size=(4, ctrl.n_params))
    z0 = np.random.default_rng(1).normal(size=(4 * 200, 3)).astype(np.float32)

    def fitness(done_mode: str) -> np.ndarray:  # mean steps survived per candidate over its 200 dreams
        steps = dream_returns(m, ctrl, np.repeat(pop, 200, axis=0), z0, 1.15, 300, seed=0, done_mode=done_mode)
        return steps.reshape(4, 200).mean(axis=1)

    capped, hazard = fitness("threshold"), fitness("sample")
    np.testing.assert_array_equal(capped, 300.0)
    # geometric lifetimes with mean 1 / p = 20 (the uncorrected sigmoid(-0.64) = 0.35 would give ~3)
    assert np.all((hazard > 16) & (hazard < 25)), hazard
    # a logit above 0 ends every agent at once under the threshold, but is a hazard only when sampled
    m.done.b.array[...] = 1.0
    assert np.all(fitness("threshold") == 1.0)
    p1 = 1 / (1 + np.exp(np.log(10.0) - 1.0))
    sampled = fitness("sample")
    assert np.all(np.abs(sampled - 1 / p1) < 1.5), (sampled, 1 / p1)


@pytest.mark.parametrize("config, count, inputs, bias", [
    ("doom_takecover.yaml", 1088, "zch", False),    # the paper's Doom C: [z, c, h], z 64, hidden 512, no bias
    ("carracing.yaml", 867, "zh", True),            # the paper's CarRacing C: [z, h] + bias, z 32, hidden 256
])
def test_paper_controller_parameter_counts(config, count, inputs, bias):
    from pathlib import Path

    from wm_trainer.config import load_config
    from wm_trainer.games.spec import action_dim
    from wm_trainer.models.controller import build_controller

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / config)
    ctrl = build_controller(cfg, action_dim(cfg.env.id))
    assert (ctrl.n_params, ctrl.inputs, ctrl.bias) == (count, inputs, bias)


def test_zch_controller_reads_z_c_h_in_that_order_and_round_trips(tmp_path):
    c = Controller(z_dim=2, hidden=3, action_dim=1, inputs="zch", bias=False)
    assert c.n_params == 8
    z, cell, h = np.array([[1.0, 2.0]]), np.array([[3.0, 4.0, 5.0]]), np.array([[6.0, 7.0, 8.0]])
    for k in range(8):
        c.params = np.eye(8, dtype=np.float32)[k] * 0.01
        np.testing.assert_allclose(c.act(z, h, cell), np.tanh(0.01 * (k + 1)), rtol=1e-6)
    with pytest.raises(ValueError, match="cell state"):
        c.act(z, h)
    c.params = np.arange(8, dtype=np.float32) / 10
    c.save(tmp_path / "c.npz")
    back = Controller.load(tmp_path / "c.npz")
    assert (back.inputs, back.bias, back.n_params) == ("zch", False, 8)
    np.testing.assert_array_equal(back.params, c.params)


def _rows(run_dir):
    import json

    from wm_trainer.base.storage import RunPaths

    return json.loads((RunPaths(run_dir).controller_dir / "log.json").read_text())


def _record_means(monkeypatch) -> dict:
    """{generation: the CMA-ES mean after it}, filled as training runs."""
    from wm_trainer.training.cmaes import CMAES

    means = {}
    original_tell = CMAES.tell

    def tell(self, X, fit):
        original_tell(self, X, fit)
        means[self.generation] = np.array(self.mean)

    monkeypatch.setattr(CMAES, "tell", tell)
    return means


def test_selection_keeps_the_best_dream_scored_mean_and_the_real_game_never_chooses(tmp_path, monkeypatch,
                                                                                   make_tiny_run):
    import wm_trainer.sim.rollout
    from wm_trainer.base.storage import RunPaths

    means = _record_means(monkeypatch)
    played = []
    original_play = wm_trainer.sim.rollout.play

    def spy_play(executor, weights, jobs, cfg, **kw):
        played.append(np.array(weights.params))
        return original_play(executor, weights, jobs, cfg, **kw)

    monkeypatch.setattr(wm_trainer.sim.rollout, "play", spy_play)
    runs = {}
    for name, every in (("quiet", "0"), ("watched", "1")):
        cfg_path, cfg = make_tiny_run(tmp_path / name)
        means.clear()
        _train(cfg_path, tmp_path / name, "controller.generations=6", "controller.select_every=2",
               "controller.select_rollouts=16", "controller.max_steps=30", "controller.sigma0=1.0",
               f"controller.eval_every={every}", "controller.eval_episodes=1", "env.max_steps=15")
        runs[name] = (RunPaths(cfg.run_dir), dict(means))
    paths, gen_means = runs["quiet"]
    rows = _rows(paths.root)
    scored = {r["generation"]: r["select_score"] for r in rows if r["select_score"] is not None}
    assert sorted(scored) == [2, 4, 6]
    best = max(scored, key=scored.get)
    assert all(r["kept_generation"] == max((g for g in scored if g <= r["generation"]), key=scored.get, default=None)
               for r in rows)
    kept = Controller.load(paths.controller_model)
    np.testing.assert_allclose(kept.params, gen_means[best].astype(np.float32))
    # every scored mean is on disk as a controller file, not only the kept one
    assert sorted(f.name for f in (paths.controller_dir / "scored").iterdir()) == [
        f"gen_{g:06d}.npz" for g in (2, 4, 6)]
    for g in (2, 4, 6):
        np.testing.assert_array_equal(Controller.load(paths.scored_controller(g)).params,
                                      gen_means[g].astype(np.float32))
    # real-game evaluations are logged for the kept controller and change nothing of what is kept
    watched_paths, _ = runs["watched"]
    np.testing.assert_array_equal(Controller.load(watched_paths.controller_model).params, kept.params)
    assert [r["select_score"] for r in _rows(watched_paths.root)] == [r["select_score"] for r in rows]
    assert len(played) == 6 and all(r["eval_mean"] is not None for r in _rows(watched_paths.root))
    kept_at = [r["kept_generation"] for r in _rows(watched_paths.root)]
    for g, params in enumerate(played, start=1):
        want = gen_means[kept_at[g - 1]] if kept_at[g - 1] is not None else None
        if want is not None:
            np.testing.assert_allclose(params[0], want.astype(np.float32))


def test_real_mode_keeps_the_best_mean_scored_on_fixed_training_tracks(tmp_path, monkeypatch, make_tiny_run):
    import wm_trainer.sim.rollout
    from wm_trainer.base.storage import RunPaths
    from wm_trainer.sim.rollout import eval_seeds, fitness_seeds, select_seeds

    means = _record_means(monkeypatch)
    played = []  # (seeds, cap, rows of weights) of every batch of real episodes
    original = wm_trainer.sim.rollout.Played.__init__

    def spy(self, executor, weights, jobs, cfg, repeat_prob=None, cap=0, patience=0):
        played.append(([j.seed for j in jobs], cap, len(weights.params)))
        original(self, executor, weights, jobs, cfg, repeat_prob, cap, patience)

    monkeypatch.setattr(wm_trainer.sim.rollout.Played, "__init__", spy)
    cfg_path, cfg = make_tiny_run(tmp_path)
    _train(cfg_path, tmp_path, "controller.mode=real", "controller.generations=5", "controller.select_every=2",
           "controller.select_episodes=3", "controller.episodes_per_candidate=1", "controller.sigma0=1.0",
           "env.max_steps=15", "controller.max_steps=5")
    rows = _rows(cfg.run_dir)
    scored = {r["generation"]: r["select_score"] for r in rows if r["select_score"] is not None}
    assert sorted(scored) == [2, 4, 5]  # every 2nd generation and the last
    # Doom pays +1 per tick: training episodes stop at the 5-tick cap, selection plays whole 15-tick episodes
    assert all(r["best"] <= 5 for r in rows) and all(5 < s <= 15 for s in scored.values())
    assert all((r["select_steps"] is not None) == (r["generation"] in scored) for r in rows)
    assert all(r["select_steps"] == 3 * r["select_score"] for r in rows if r["select_steps"] is not None)
    best = max(scored, key=scored.get)  # the first of equal scores stays kept
    assert all(r["kept_generation"] == max((g for g in scored if g <= r["generation"]), key=scored.get, default=None)
               for r in rows)
    np.testing.assert_allclose(Controller.load(RunPaths(cfg.run_dir).controller_model).params,
                               means[best].astype(np.float32))
    for g in scored:
        np.testing.assert_array_equal(Controller.load(RunPaths(cfg.run_dir).scored_controller(g)).params,
                                      means[g].astype(np.float32))
    assert not RunPaths(cfg.run_dir).scored_controller(1).exists()
    selections = [(seeds, cap) for seeds, cap, n in played if n == 1]
    assert selections == [(select_seeds(cfg.experiment.seed, 3), 0)] * 3  # the same tracks each time, uncapped
    trained = {s for seeds, cap, n in played if n > 1 for s in seeds}
    assert trained == {s for g in range(5) for s in fitness_seeds(cfg.experiment.seed, g, 1)}
    assert not set(select_seeds(cfg.experiment.seed, 3)) & (trained | set(eval_seeds(cfg.experiment.seed, 100)))


def test_a_spent_time_budget_scores_the_generation_it_ends_on(tmp_path, make_tiny_run):
    cfg_path, cfg = make_tiny_run(tmp_path)
    _train(cfg_path, tmp_path, "controller.mode=real", "controller.generations=5", "controller.select_every=0",
           "controller.select_episodes=2", "controller.max_minutes=0.00001", "env.max_steps=15")
    (row,) = _rows(cfg.run_dir)
    assert row["select_score"] is not None and row["kept_generation"] == 1


def _constant_done_logit(model_path, logit: float) -> None:
    """Rewrite M's weights so that its done head gives ``logit`` whatever the state."""
    with np.load(model_path) as f:
        arrays = dict(f)
    arrays["done/W"][...] = 0.0
    arrays["done/b"][...] = logit
    np.savez(model_path, **arrays)


def test_selection_stops_once_the_mean_survives_every_dream(tmp_path, make_tiny_run, capsys):
    from wm_trainer.base.storage import RunPaths

    cfg_path, cfg = make_tiny_run(tmp_path)
    # an M whose done head never fires: every dream reaches the cap, so the first scored mean ends training
    p = RunPaths(cfg.run_dir)
    _constant_done_logit(p.mdnrnn_model, -50.0)
    _train(cfg_path, tmp_path, "controller.generations=10", "controller.select_every=3",
           "controller.select_rollouts=8", "controller.max_steps=20")
    rows = _rows(p.root)
    assert [r["generation"] for r in rows] == [1, 2, 3] and rows[-1]["select_score"] == 20.0
    # the calibration saw it too: the collection policy outlives its 12-step real episodes in this dream
    import json

    cal = json.loads((p.controller_dir / "dream_calibration.json").read_text())
    assert cal["dream_mean"] == 20.0 and cal["real_mean"] == 12.0 and cal["real_episodes"] == 3
    assert cal["dream_over_real"] == pytest.approx(20 / 12)
    # ... which is a dream C exploits: the file and the user are told before C trains
    assert cal["exploitable"] is True
    assert "warning: M's dream is x1.67 easier than the game" in capsys.readouterr().err


def test_dream_calibration_reports_each_collection_policy_beside_its_own_real_episodes():
    from wm_trainer.train_controller import collection_policy_dream, dream_calibration

    def dream(policy, initial_z, seed):
        """A stand-in dream whose 'survival' is how often each agent's policy switched in 60 steps."""
        acts = np.stack([policy(initial_z, None, None) for _ in range(60)])
        return (np.diff(acts[..., 0], axis=0) != 0).sum(axis=0).astype(np.float64)

    real = {0: 100, 1: 50, 2: 300, 3: 70, 5: 30}  # episode 4 unreadable; cap 250
    dreamed = collection_policy_dream(dream, "VizdoomTakeCover-v1", np.zeros((64, 4), np.float32), [1.0, 0.0], 7)
    cal = dream_calibration(dreamed, real, [1.0, 0.0], 250)
    still, jitter = cal["by_repeat_prob"]
    assert still["repeat_prob"] == 1.0 and still["dream_mean"] == 0.0 and still["dream_rollouts"] == 32
    assert jitter["repeat_prob"] == 0.0 and jitter["dream_mean"] > 20
    assert still["real_episodes"] == 2 and still["real_mean"] == (100 + 250) / 2
    assert jitter["real_episodes"] == 3 and jitter["real_mean"] == (50 + 70 + 30) / 3
    assert cal["real_episodes"] == 5 and cal["real_mean"] == (100 + 50 + 250 + 70 + 30) / 5
    assert cal["dream_mean"] == pytest.approx((still["dream_mean"] + jitter["dream_mean"]) / 2)


def test_calibrate_done_bias_finds_the_bias_that_matches_the_real_survival():
    from wm_trainer.train_controller import calibrate_done_bias

    calls = []

    def survival(bias):
        calls.append(bias)
        return float(np.clip(600.0 - 150.0 * bias, 1.0, 1000.0))  # non-increasing in the bias, like a dream

    bias, got = calibrate_done_bias(survival, 360.0)
    assert got == pytest.approx(360.0, rel=0.01) and bias == pytest.approx(1.6, abs=0.03)
    assert calls[0] == 0.0 and len(calls) <= 16
    # a dream harder than the game is made easier
    bias, got = calibrate_done_bias(survival, 900.0)
    assert bias < 0 and got == pytest.approx(900.0, rel=0.01)
    # already calibrated: one dream, no shift
    calls.clear()
    assert calibrate_done_bias(survival, 603.0) == (0.0, 600.0) and calls == [0.0]
    # out of reach within the limit: the end that comes closest
    bias, got = calibrate_done_bias(lambda b: 1000.0 if b < 40 else 1.0, 300.0, limit=16.0)
    assert bias == 16.0 and got == 1000.0


def test_train_controller_calibrates_the_dream_to_the_game_and_resumes_with_that_bias(tmp_path, make_tiny_run):
    import json

    from wm_trainer.base.storage import RunPaths

    cfg_path, cfg = make_tiny_run(tmp_path)
    p = RunPaths(cfg.run_dir)
    # a done head with a constant small hazard: every dream outlives the 12-step real episodes at bias 0
    _constant_done_logit(p.mdnrnn_model, -4.0)
    sets = ("controller.dream_calibrate=true", "controller.dream_done=sample", "controller.select_every=1",
            "controller.select_rollouts=256", "controller.max_steps=40")
    _train(cfg_path, tmp_path, "controller.generations=1", *sets)
    cal = json.loads(p.dream_calibration.read_text())
    assert cal["real_mean"] == 12.0 and cal["uncalibrated"]["dream_mean"] > 30
    assert cal["done_bias"] > 0 and cal["dream_mean"] == pytest.approx(12.0, rel=0.05)
    assert cal["calibration_dreams"]["0"] == cal["uncalibrated"]["dream_mean"]
    # C trained in the calibrated dream: the first mean's dream score is near the game's, not the cap's
    assert _rows(p.root)[0]["select_score"] < 25
    # a resumed run trains with the bias on file (here one that ends every dream at its first step)
    cal["done_bias"] = 60.0
    p.dream_calibration.write_text(json.dumps(cal))
    _train(cfg_path, tmp_path, "controller.generations=2", *sets)
    assert [r["select_score"] for r in _rows(p.root)][1] == 1.0


def test_a_dream_no_easier_than_the_game_gets_no_warning(tmp_path, make_tiny_run, capsys):
    import json

    from wm_trainer.base.storage import RunPaths

    cfg_path, cfg = make_tiny_run(tmp_path)
    p = RunPaths(cfg.run_dir)
    _constant_done_logit(p.mdnrnn_model, 50.0)  # every dream ends at once, before the 12-step real episodes do
    _train(cfg_path, tmp_path, "controller.generations=1", "controller.select_rollouts=8", "controller.max_steps=20")
    cal = json.loads(p.dream_calibration.read_text())
    assert cal["dream_over_real"] < 1.0 and cal["exploitable"] is False
    assert "warning" not in capsys.readouterr().err
