"""Real-env rollouts: lockstepped, batched V/M/C give the same episodes as one env at a time, seeds fixed."""
from __future__ import annotations

import chainer
import numpy as np
import pytest

from wm_trainer.base.storage import RunPaths
from wm_trainer.models.controller import Controller
from wm_trainer.models.memory import build_mdnrnn
from wm_trainer.models.vision import ConvVAE
from wm_trainer.sim.rollout import AgentWeights, Job, _chunks, close_envs, play, run_jobs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, make_tiny_run):
    _, cfg = make_tiny_run(tmp_path_factory.mktemp("rollout"))
    p = RunPaths(cfg.run_dir)
    vae = ConvVAE(cfg.vae.z_dim)
    chainer.serializers.load_npz(str(p.vae_model), vae)
    mdn = build_mdnrnn(cfg, 1)
    chainer.serializers.load_npz(str(p.mdnrnn_model), mdn)
    ctrl = Controller(cfg.vae.z_dim, cfg.mdnrnn.hidden, 1)
    # agents that steer hard one way or the other on their own inputs
    params = np.random.default_rng(1).normal(scale=3.0, size=(3, ctrl.n_params)).astype(np.float32)
    yield cfg, AgentWeights.from_models(vae, mdn, params)
    close_envs()


def test_lockstep_batch_equals_one_env_at_a_time(tiny):
    cfg, weights = tiny
    jobs = [Job(row, seed) for row in range(3) for seed in (11, 12)]
    batched = run_jobs(weights, jobs, cfg.env, 25, n_envs=4)
    single = [run_jobs(weights, [j], cfg.env, 25, n_envs=1)[0] for j in jobs]
    assert [(r.row, r.seed) for r in batched] == [(j.row, j.seed) for j in jobs]
    assert [(r.ret, r.steps) for r in batched] == [(r.ret, r.steps) for r in single]
    assert all(0 < r.steps <= 25 for r in batched)


def test_recorded_episode_has_a_frame_per_step(tiny):
    cfg, weights = tiny
    (res,) = run_jobs(weights, [Job(0, 5)], cfg.env, 10, n_envs=1, record=True)
    assert len(res.frames) == res.steps + 1
    assert res.frames[0].shape == (64, 64, 3) and res.frames[0].dtype == np.uint8


def test_play_on_the_process_pool_matches_in_process_and_random_policy_runs(tiny):
    from wm_trainer.base.parallel import LocalExecutor

    cfg, weights = tiny
    jobs = [Job(row, seed) for row in (0, 2) for seed in (3, 4, 5)]
    local = [r.ret for r in run_jobs(weights, jobs, cfg.env, cfg.env.max_steps, n_envs=2)]
    with LocalExecutor(workers=2) as ex:
        pooled = play(ex, weights, jobs, cfg)
        rand1 = play(ex, None, jobs[:3], cfg)
        rand2 = play(ex, None, jobs[:3], cfg)
    np.testing.assert_array_equal(pooled, local)
    np.testing.assert_array_equal(rand1, rand2)
    assert pooled.shape == (6,) and np.all(pooled > 0)


def test_tasks_are_about_one_per_worker_so_lanes_refill_instead_of_idling():
    jobs = [Job(0, s) for s in range(100)]
    assert [len(c) for c in _chunks(jobs, 16, 2)] == [50, 50]  # not 7 tasks each as long as its longest episode
    assert [len(c) for c in _chunks(jobs[:8], 16, 2)] == [4, 4]  # both workers busy on a few episodes
    assert [len(c) for c in _chunks(jobs, 4, 1)] == [16] * 6 + [4]  # bounded: a lost worker reruns little
    assert [j for c in _chunks(jobs, 16, 3) for j in c] == jobs  # every job once, in order


class _InProcess:
    """The executor interface, run in this process (so a test can break an env here)."""

    def broadcast(self, obj):
        return obj

    def release(self, handle):
        pass

    def submit(self, fn, *args):
        from concurrent.futures import Future

        f = Future()
        f.set_result(fn(*args))
        return f


def test_a_crashed_emulator_costs_a_replay_not_the_generation(tiny, monkeypatch):
    from wm_trainer.games import real

    cfg, weights = tiny
    jobs = [Job(0, 21), Job(1, 22), Job(2, 23)]
    close_envs()
    expected = play(_InProcess(), weights, jobs, cfg)
    close_envs()
    real_make, crashes = real.make_env, []

    def flaky_make(env_cfg, max_steps=None):
        env = real_make(env_cfg, max_steps)
        if not crashes:  # the first env built dies on its 5th step
            real_step, count = env.step, [0]

            def step(action):
                count[0] += 1
                if count[0] == 5:
                    crashes.append(1)
                    raise RuntimeError("Unexpected ViZDoom instance crash.")
                return real_step(action)

            env.step = step
        return env

    monkeypatch.setattr(real, "make_env", flaky_make)
    got = play(_InProcess(), weights, jobs, cfg)
    assert crashes == [1]
    np.testing.assert_array_equal(got, expected)
    close_envs()


@pytest.mark.parametrize("cap, patience, skip", [(7, 0, 1), (0, 4, 1), (30, 4, 1), (7, 0, 2), (31, 4, 2)])
def test_training_episodes_end_at_the_cap_or_after_patience_steps_without_reward(cap, patience, skip):
    from wm_trainer.games.real import open_env, random_policy
    from wm_trainer.games.spec import EnvSpec

    env_id, seeds = "CarRacing-v3", (21, 22, 23)
    spec = EnvSpec(env_id, skip)
    got = run_jobs(None, [Job(0, s) for s in seeds], spec, 60, n_envs=2, repeat_prob=0.5, cap=cap,
                   patience=patience)
    with open_env(env_id, 60, skip) as env:  # the same episodes stepped by hand, the rule applied here in env steps
        for seed, res in zip(seeds, got):
            env.reset(seed=seed)
            policy = random_policy(env_id, np.random.default_rng(seed), 0.5)
            ret, idle, done = 0.0, 0, False
            while not done:
                before = env.steps
                _, reward, done = env.step(policy())
                ret += reward
                idle = 0 if reward > 0 else idle + env.steps - before
                done = done or (cap and env.steps >= cap) or (patience > 0 and idle >= patience)
            assert (res.ret, res.steps) == pytest.approx((ret, env.steps))
    full = run_jobs(None, [Job(0, s) for s in seeds], spec, 60, n_envs=2, repeat_prob=0.5)
    assert all(r.steps <= f.steps for r, f in zip(got, full))
    assert any(r.steps < f.steps for r, f in zip(got, full))  # the rule ended some episode early
    assert all(f.steps == 60 or f.ret < -50 for f in full)  # whole episodes count env steps, frame skip or not
    if cap:
        assert all(r.steps <= cap + skip - 1 for r in got)
