"""The speed paths of real-env evaluation: plain task arguments, and Doom rendered at 160x120."""
from __future__ import annotations

import pickle

import numpy as np

from wm_trainer.config import load_config
from wm_trainer.games.real import make_env
from wm_trainer.games.spec import DOOM_ID
from wm_trainer.sim.rollout import Job, close_envs, play, run_jobs


class _RecordingExecutor:
    """Runs tasks in this process and keeps the pickled size and content of their arguments."""

    def __init__(self):
        self.args = []

    def broadcast(self, obj):
        return obj

    def release(self, handle):
        pass

    def submit(self, fn, *args):
        from concurrent.futures import Future

        self.args.append(args)
        f = Future()
        f.set_result(fn(*args))
        return f


def test_worker_tasks_get_plain_values_not_the_config(tmp_path, make_tiny_run):
    """Unpickling a task's arguments must not import the config module (and the toolkit behind it)."""
    from wm_trainer.games.spec import EnvSpec

    _, cfg = make_tiny_run(tmp_path)
    ex = _RecordingExecutor()
    rets = play(ex, None, [Job(0, 3), Job(0, 4), Job(0, 5)], cfg)
    assert rets.shape == (3,) and (rets > 0).all()
    for args in ex.args:
        blob = pickle.dumps(args[1:])  # everything but the broadcast weights handle
        assert b"wm_trainer.config" not in blob and b"extensions" not in blob
        assert args[2] == EnvSpec(cfg.env.id, 1)  # the env as plain values: its id and frame skip
    # the same episodes through run_jobs with the EnvConfig object agree (same env, same seeds)
    direct = [r.ret for r in run_jobs(None, [Job(0, 3), Job(0, 4), Job(0, 5)], cfg.env, cfg.env.max_steps, 2)]
    np.testing.assert_array_equal(rets, direct)
    close_envs()


def test_doom_renders_small_and_frames_stay_64x64_and_deterministic():
    cfg = load_config(None, [f"env.id={DOOM_ID}"])
    with make_env(cfg.env, 30) as env:
        assert env.gym_env.unwrapped.game.get_screen_width() == 160
        first = env.reset(seed=7)
        frames = [env.step(np.array([1.0]))[0] for _ in range(5)]
        again = env.reset(seed=7)
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert 20 < first.mean() < 235 and first.std() > 5  # a scene, not a blank or saturated frame
    assert all(f.shape == (64, 64, 3) for f in frames)
    with make_env(DOOM_ID, 30) as env:  # an env id alone (what worker tasks get) builds the same env
        np.testing.assert_array_equal(env.reset(seed=7), first)
