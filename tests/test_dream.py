"""The dream: batched stepping matches M, per-agent determinism, sampling at temperature, done rules."""
from __future__ import annotations

import chainer
import numpy as np
import pytest

from wm_trainer.base.storage import atomic_savez
from wm_trainer.models.mdn import mdn_moments
from wm_trainer.models.memory import MDNRNN
from wm_trainer.models.vision import ConvVAE
from wm_trainer.sim.dream import (
    DreamEnv,
    agent_keys,
    counter_uniform,
    counter_uniform32,
    decode_frames,
    initial_latents,
)

Z, A, H, K = 6, 2, 24, 3


def _model(done_head: bool = True, seed: int = 0) -> MDNRNN:
    np.random.seed(seed)
    return MDNRNN(Z, A, H, K, done_head=done_head)


def _rollout(env: DreamEnv, z0: np.ndarray, seeds, actions: np.ndarray):
    zs, hs, rs, ds = [], [], [], []
    env.reset(z0, seeds=seeds)
    for a in actions:
        z, h, r, d = env.step(a)
        zs.append(z), hs.append(h), rs.append(r), ds.append(d)
    return np.stack(zs), np.stack(hs), np.stack(rs), np.stack(ds)


def test_step_matches_mdnrnn_step_and_predict():
    m = _model()
    env = DreamEnv(m, temperature=1.0, max_steps=100, seed=0)
    rng = np.random.default_rng(1)
    z0 = rng.standard_normal((5, Z)).astype(np.float32)
    a = rng.uniform(-1, 1, (5, A)).astype(np.float32)
    env.reset(z0, seeds=np.arange(5))
    _, h, reward, done = env.step(a)
    with chainer.no_backprop_mode(), chainer.using_config("train", False):
        h_ref, _ = m.step(z0, a, None)
        _, _, _, done_logit = m.predict(h_ref)
    np.testing.assert_allclose(h, h_ref.array, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(done, done_logit.array > 0)
    np.testing.assert_array_equal(reward, np.ones(5, np.float32))


@pytest.mark.parametrize("done_head", [False, True])
def test_batch_equals_single_agent_runs_with_same_seeds(done_head):
    m = _model(done_head=done_head)
    if done_head:  # agents end at different times
        m.done.b.array[:] = -0.1
    env = DreamEnv(m, temperature=1.15, max_steps=50, seed=3)
    rng = np.random.default_rng(2)
    B, steps = 6, 15
    z0 = rng.standard_normal((B, Z)).astype(np.float32)
    acts = rng.uniform(-1, 1, (steps, B, A)).astype(np.float32)
    z0[5], acts[:, 5] = z0[0], acts[:, 0]
    seeds = np.array([11, 12, 13, 14, 15, 11])
    zb, hb, rb, db = _rollout(env, z0, seeds, acts)
    if done_head:
        assert len(set(rb.sum(0))) >= 3, "agents should end at different steps"
    for i in range(B):
        zi, hi, ri, di = _rollout(DreamEnv(m, temperature=1.15, max_steps=50, seed=99), z0[i:i + 1], seeds[i:i + 1],
                                acts[:, i:i + 1])
        np.testing.assert_allclose(zb[:, i], zi[:, 0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(hb[:, i], hi[:, 0], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(rb[:, i], ri[:, 0])
        np.testing.assert_array_equal(db[:, i], di[:, 0])
    # different seeds give different dreams; equal seeds and inputs give equal ones
    assert not np.allclose(zb[:, 0], zb[:, 1])
    np.testing.assert_allclose(zb[:, 0], zb[:, 5], rtol=1e-6)


def test_seed_drawn_streams_are_reproducible():
    m = _model()
    z0 = np.zeros((4, Z), np.float32)
    acts = np.zeros((10, 4, A), np.float32)
    r1 = _rollout(DreamEnv(m, seed=7), z0, None, acts)
    r2 = _rollout(DreamEnv(m, seed=7), z0, None, acts)
    r3 = _rollout(DreamEnv(m, seed=8), z0, None, acts)
    np.testing.assert_array_equal(r1[0], r2[0])
    assert not np.allclose(r1[0], r3[0])


def test_counter_uniforms_are_uniform_and_independent_of_batch():
    keys = agent_keys(np.arange(4000))
    u = counter_uniform(keys, 5, 8)
    assert u.min() > 0 and u.max() <= 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    np.testing.assert_array_equal(counter_uniform(keys[7:8], 5, 8), u[7:8])
    assert not np.array_equal(counter_uniform(keys, 6, 8), u)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_samples_follow_the_mixture(tau):
    """One step from a fixed state: sample mean/variance match the mixture's at temperature tau."""
    m = _model(done_head=False)
    env = DreamEnv(m, temperature=tau, max_steps=10, seed=0)
    B = 20000
    z0 = np.tile(np.linspace(-1, 1, Z, dtype=np.float32), (B, 1))
    a = np.full((B, A), 0.3, np.float32)
    env.reset(z0, seeds=np.arange(B))
    z, _, _, _ = env.step(a)
    with chainer.no_backprop_mode():
        h, _ = m.step(z0[:1], a[:1], None)
        logits, mu, log_std, _ = m.predict(h)
    logits_t = logits.array / tau
    sd_t = log_std.array + 0.5 * np.log(tau)  # sigma * sqrt(tau)
    mean, var = mdn_moments(logits_t, mu.array, sd_t)
    assert (np.abs(z.mean(0) - mean[0]) < 4 * np.sqrt(var[0] / B) + 1e-3).all()
    np.testing.assert_allclose(z.var(0), var[0], rtol=0.06)


def test_done_agents_stay_done_with_zero_reward_and_max_steps():
    m = _model()
    # force the done head: agents 0, 1 end at once, the others never
    m.done.W.array[:] = 0
    env = DreamEnv(m, temperature=1.0, max_steps=4, seed=0)
    z0 = np.zeros((4, Z), np.float32)
    env.reset(z0, seeds=np.arange(4))
    m.done.b.array[:] = 5.0
    env._prepare_weights()
    z1, h1, r1, d1 = env.step(np.zeros((4, A), np.float32))
    assert d1.all() and (r1 == 1).all()
    z2, h2, r2, d2 = env.step(np.ones((4, A), np.float32))
    assert d2.all() and (r2 == 0).all()
    np.testing.assert_array_equal(z2, z1)
    np.testing.assert_array_equal(h2, h1)
    m.done.b.array[:] = -5.0
    env = DreamEnv(m, temperature=1.0, max_steps=3, seed=0)
    env.reset(z0)
    dones = [env.step(np.zeros((4, A), np.float32))[3].copy() for _ in range(3)]
    assert not dones[0].any() and not dones[1].any() and dones[2].all()


def _lifetimes(env: DreamEnv, z0: np.ndarray, steps: int) -> np.ndarray:
    env.reset(z0, seeds=np.arange(len(z0)))
    alive = np.zeros(len(z0), np.int64)
    for _ in range(steps):
        alive += ~env.step(np.zeros((len(z0), A), np.float32))[3]
    return alive


@pytest.mark.parametrize("mode", ["threshold", "sample"])
def test_done_bias_shifts_the_done_logit_and_only_moves_where_each_dream_ends(mode):
    m = _model()
    z0 = np.random.default_rng(0).standard_normal((64, Z)).astype(np.float32)
    build = lambda bias: DreamEnv(m, temperature=1.0, max_steps=30, seed=0, done_mode=mode, done_bias=bias)  # noqa: E731
    lives = {b: _lifetimes(build(b), z0, 30) for b in (-50.0, -1.0, 0.0, 1.0, 50.0)}
    assert (lives[-50.0] == 29).all() and (lives[50.0] == 0).all()  # never / at once (the cap ends step 30)
    # the same dreams, ended no later as the bias grows (agent by agent), and a bias that matters
    assert (lives[-1.0] >= lives[0.0]).all() and (lives[0.0] >= lives[1.0]).all()
    assert lives[-1.0].sum() > lives[1.0].sum()
    # a zero bias is M as trained
    np.testing.assert_array_equal(lives[0.0], _lifetimes(DreamEnv(m, temperature=1.0, max_steps=30, seed=0,
                                                                  done_mode=mode), z0, 30))


@pytest.mark.parametrize("joint", [False, True])
def test_a_joint_mixture_moves_every_dimension_with_one_component(joint):
    """Two components at +-10 for every dim, equally likely: a joint M's samples are all + or all -."""
    m = MDNRNN(Z, A, H, 2, done_head=False, joint=joint)
    lin = m.mdn.linear
    lin.W.array[:] = 0.0
    b = lin.b.array.reshape(Z, 3, 2)  # (dim, part, mixture)
    b[:, 0] = [0.0, 0.0]  # equal logits
    b[:, 1] = [10.0, -10.0]  # means
    b[:, 2] = -5.0  # tiny sigma
    env = DreamEnv(m, temperature=1.0, max_steps=10, seed=0)
    env.reset(np.zeros((256, Z), np.float32), seeds=np.arange(256))
    z = env.step(np.zeros((256, A), np.float32))[0]
    signs = np.sign(z)
    coherent = (signs == signs[:, :1]).all(axis=1)
    if joint:
        assert coherent.all() and 0.35 < (signs[:, 0] > 0).mean() < 0.65
    else:
        assert coherent.mean() < 0.2  # 2 ** -(Z - 1) each, were the dims independent
    assert (np.abs(np.abs(z) - 10.0) < 0.1).all()


def test_calibrated_done_bias_reads_the_calibration_file(tmp_path):
    import json

    from wm_trainer.base.errors import UserError
    from wm_trainer.sim.dream import calibrated_done_bias

    path = tmp_path / "dream_calibration.json"
    assert calibrated_done_bias(path) == 0.0  # not calibrated: M as trained
    path.write_text(json.dumps({"dream_mean": 5.0}))
    assert calibrated_done_bias(path) == 0.0  # a calibration written before the bias existed
    path.write_text(json.dumps({"done_bias": 1.25}))
    assert calibrated_done_bias(path) == 1.25
    for bad in ("{", '{"done_bias": "x"}', '{"done_bias": NaN}', "[1]"):
        path.write_text(bad)
        with pytest.raises(UserError, match="dream_calibration.json"):
            calibrated_done_bias(path)


def test_initial_latents_and_decode_frames(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        atomic_savez(tmp_path / f"ep_{i:06d}.npz", mu=np.full((5, Z), float(i), np.float32),
                     logvar=np.full((5, Z), -20.0, np.float32), actions=np.zeros((5, A), np.float32),
                     rewards=np.zeros(5, np.float32), dones=np.zeros(5, bool))
    z = initial_latents(tmp_path, 10, rng)
    assert z.shape == (10, Z) and z.dtype == np.float32
    assert set(np.round(z[:, 0]).astype(int)) <= {0, 1, 2}
    vae = ConvVAE(Z)
    frames = decode_frames(vae, z, batch=4)
    assert frames.shape == (10, 64, 64, 3) and frames.dtype == np.uint8


def test_large_batch_on_worker_threads_equals_single_runs_odd_z():
    """A batch big enough for the threaded elementwise path (odd z: one unpaired normal) matches single runs."""
    np.random.seed(4)
    m = MDNRNN(5, 1, 16, 4, done_head=True)
    m.done.b.array[:] = 0.0
    B, steps = 300, 6
    rng = np.random.default_rng(5)
    z0 = rng.standard_normal((B, 5)).astype(np.float32)
    acts = rng.uniform(-1, 1, (steps, B, 1)).astype(np.float32)
    seeds = np.arange(B) * 7 + 1
    zb, hb, rb, db = _rollout(DreamEnv(m, temperature=1.15, max_steps=50), z0, seeds, acts)
    assert zb.shape == (steps, B, 5) and hb.shape == (steps, B, 16)
    assert 0 < db[-1].sum() < B, "some agents should end early, some not"
    for i in (0, 131, 299):
        zi, hi, ri, di = _rollout(DreamEnv(m, temperature=1.15, max_steps=50), z0[i:i + 1], seeds[i:i + 1],
                                acts[:, i:i + 1])
        np.testing.assert_allclose(zb[:, i], zi[:, 0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(hb[:, i], hi[:, 0], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(rb[:, i], ri[:, 0])
        np.testing.assert_array_equal(db[:, i], di[:, 0])


def test_counter_uniform32_is_uniform_distinct_and_independent_of_batch():
    keys = agent_keys(np.arange(3000))
    lo, hi = counter_uniform32(keys, 9, 16)
    assert lo.shape == hi.shape == (16, 3000) and lo.dtype == np.float32
    for u in (lo, hi):
        assert u.min() > 0 and u.max() <= 1
        assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    assert abs(np.corrcoef(lo.ravel(), hi.ravel())[0, 1]) < 0.02
    sub_lo, sub_hi = counter_uniform32(keys[5:6], 9, 16)
    np.testing.assert_array_equal(sub_lo[:, 0], lo[:, 5])
    np.testing.assert_array_equal(sub_hi[:, 0], hi[:, 5])
    assert not np.array_equal(counter_uniform32(keys, 10, 16)[0], lo)


def test_temperature_change_after_build_is_used():
    """Setting ``temperature`` on a built env re-folds it into the head (spread of samples shrinks)."""
    m = _model(done_head=False)
    env = DreamEnv(m, temperature=1.0, max_steps=10, seed=0)
    B = 4000
    z0 = np.zeros((B, Z), np.float32)
    a = np.zeros((B, A), np.float32)
    env.reset(z0, seeds=np.arange(B))
    wide = env.step(a)[0].var(0)
    env.temperature = 0.1
    env.reset(z0, seeds=np.arange(B))
    narrow = env.step(a)[0].var(0)
    assert (narrow < 0.5 * wide).all()
