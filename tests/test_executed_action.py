"""M is fed the action the game executes: the same mapping in the game, the dream, the real rollout and M's data."""
from __future__ import annotations

import functools

import numpy as np

from wm_trainer.config import EnvConfig
from wm_trainer.games import real, spec
from wm_trainer.games.spec import CARRACING_ID, DOOM_ID, executed_action
from wm_trainer.models.memory import MDNRNN
from wm_trainer.sim.dream import DreamEnv

GRID = np.linspace(-1.0, 1.0, 61, dtype=np.float32)[:, None]  # controller outputs, including in-between values


def test_doom_executed_action_is_what_the_game_presses():
    value_of = {spec.DOOM_LEFT: -1.0, spec.DOOM_NOOP: 0.0, spec.DOOM_RIGHT: 1.0}
    mapped = executed_action(DOOM_ID, GRID)
    assert set(np.unique(mapped)) == {-1.0, 0.0, 1.0}
    for a, m in zip(GRID, mapped):
        assert m[0] == value_of[spec.native_action(DOOM_ID, a)], a
        assert spec.native_action(DOOM_ID, m) == spec.native_action(DOOM_ID, a)  # same button pressed
    np.testing.assert_array_equal(executed_action(DOOM_ID, mapped), mapped)  # recorded actions map to themselves


def test_carracing_executed_action_is_the_native_action_in_controller_space():
    rng = np.random.default_rng(0)
    a = rng.uniform(-1.5, 1.5, size=(200, 3)).astype(np.float32)
    mapped = executed_action(CARRACING_ID, a)
    for raw, m in zip(a, mapped):
        np.testing.assert_allclose(spec.native_action(CARRACING_ID, m), spec.native_action(CARRACING_ID, raw))
    assert (mapped[:, 2] >= 0).all()
    np.testing.assert_array_equal(executed_action(CARRACING_ID, mapped), mapped)


def test_the_game_cannot_tell_in_between_outputs_from_their_executed_action():
    """0.2 plays exactly as 0 and 0.6 as 1: M could learn nothing else from the game for them."""
    def play(actions):
        with real.make_env(EnvConfig(id=DOOM_ID, max_steps=40)) as env:
            frames = [env.reset(seed=3)]
            for a in actions:
                frames.append(env.step(np.array([a], np.float32))[0])
        return np.stack(frames)

    raw = [0.2, 0.6, 0.6, -0.9, -0.3, 0.34] * 4
    np.testing.assert_array_equal(play(raw), play(executed_action(DOOM_ID, np.array(raw))))


def test_the_dream_feeds_m_the_executed_action():
    np.random.seed(0)
    m = MDNRNN(z_dim=3, action_dim=1, hidden=8, mixtures=2, done_head=True)
    z0 = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    raw = np.array([[0.2], [0.6], [-0.5], [-0.2], [0.9]], np.float32)
    mapped_env = DreamEnv(m, temperature=1.15, seed=4, action_map=functools.partial(executed_action, DOOM_ID))
    plain_env = DreamEnv(m, temperature=1.15, seed=4)
    mapped_env.reset(z0, seeds=np.arange(5))
    plain_env.reset(z0, seeds=np.arange(5))
    for _ in range(4):
        got = mapped_env.step(raw)
        want = plain_env.step(executed_action(DOOM_ID, raw))
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(mapped_env.cell(), plain_env.cell())


def test_the_real_rollout_feeds_m_the_executed_action_and_a_sampled_z(tmp_path, make_tiny_run):
    """The real rollout steps M with what the game executes (not C's raw output), on z ~ N(mu, sigma)."""

    from wm_trainer.base.storage import RunPaths
    from wm_trainer.models.controller import build_controller
    from wm_trainer.models.memory import load_mdnrnn
    from wm_trainer.models.vision import load_vae
    from wm_trainer.sim.rollout import AgentWeights, Job, close_envs, run_jobs

    _, cfg = make_tiny_run(tmp_path)
    p = RunPaths(cfg.run_dir)
    vae, mdn = load_vae(p.vae_model, cfg.vae.z_dim), load_mdnrnn(p.mdnrnn_model, cfg, 1)
    ctrl = build_controller(cfg, 1)
    params = np.random.default_rng(2).normal(scale=0.5, size=(1, ctrl.n_params)).astype(np.float32)
    weights = AgentWeights.from_models(vae, mdn, params, ctrl)
    rebuilt_vae, rebuilt_mdn = weights.models()
    seen = []
    step = rebuilt_mdn.step
    rebuilt_mdn.step = lambda z, a, state: seen.append((np.array(z), np.array(a))) or step(z, a, state)
    encode = rebuilt_vae.encode
    mus = []
    rebuilt_vae.encode = lambda x: mus.append(encode(x)) or mus[-1]
    try:
        (res,) = run_jobs(weights, [Job(0, 7)], cfg.env, 30, n_envs=1)
        # the same again: the sampled z is a function of the episode's seed
        (again,) = run_jobs(weights, [Job(0, 7)], cfg.env, 30, n_envs=1)
    finally:
        close_envs()
    assert res.steps == again.steps
    n = res.steps
    acts = np.concatenate([a for _, a in seen[:n]])
    assert set(np.unique(acts)) <= {-1.0, 0.0, 1.0} and len(np.unique(acts)) > 1
    zs = np.concatenate([z for z, _ in seen[:n]])
    mu = np.concatenate([m.array for m, _ in mus[:n]])
    sigma = np.exp(0.5 * np.concatenate([lv.array for _, lv in mus[:n]]))
    eps = (zs - mu) / sigma
    assert not np.allclose(zs, mu) and 0.5 < eps.std() < 1.5  # z = mu + sigma eps, eps ~ N(0, 1)
    np.testing.assert_array_equal(zs, np.concatenate([z for z, _ in seen[n:2 * n]]))
