"""The vectorized CarRacing road renderer draws gymnasium's pixels, and leaves other envs alone."""
from __future__ import annotations

import math

import numpy as np
import pytest

from wm_trainer.games import carracing_road

gym = pytest.importorskip("gymnasium")
pygame = pytest.importorskip("pygame")


def _frames(fast: bool, seed: int, steps: int) -> np.ndarray:
    """Observations of one random-action episode, with the vectorized road or gymnasium's own."""
    env = gym.make("CarRacing-v3")
    try:
        if fast:
            assert carracing_road.install(env)
        obs, _ = env.reset(seed=seed)
        frames = [obs]
        rng = np.random.default_rng(seed)
        for _ in range(steps):
            action = np.array([rng.uniform(-1, 1), rng.uniform(0, 1), rng.uniform(0, 0.2)], dtype=np.float32)
            obs, _, terminated, truncated, _ = env.step(action)
            frames.append(obs)
            if terminated or truncated:
                break
        if fast:  # a second track in the same env: the road arrays follow the new road
            obs, _ = env.reset(seed=seed + 100)
            frames.append(obs)
            for _ in range(20):
                frames.append(env.step(np.array([0.3, 1.0, 0.0], dtype=np.float32))[0])
        return np.array(frames)
    finally:
        env.close()


@pytest.mark.parametrize("seed", [0, 3])
def test_frames_are_gymnasiums_pixels(seed):
    fast = _frames(True, seed, 120)
    stock = _frames(False, seed, 120)
    env = gym.make("CarRacing-v3")
    try:
        obs, _ = env.reset(seed=seed + 100)
        second = [obs] + [env.step(np.array([0.3, 1.0, 0.0], dtype=np.float32))[0] for _ in range(20)]
    finally:
        env.close()
    stock = np.concatenate([stock, np.array(second)])
    assert fast.shape == stock.shape == (121 + 21, 96, 96, 3)
    assert len({f.tobytes() for f in stock}) > 100  # the camera moves: the frames differ from step to step
    np.testing.assert_array_equal(fast, stock)


@pytest.mark.parametrize("angle", [0.0, math.pi / 2, math.pi, 1.5 * math.pi, -math.pi / 2, 2 * math.pi, 1e-7,
                                   -3.0, 0.7, 5.9, 12.5, math.pi / 2 + 5e-7])
def test_rotation_is_pygames(angle):
    pts = np.random.default_rng(0).normal(0, 300, (7, 2))
    x, y = carracing_road._rotate(pts, angle)
    want = np.array([tuple(pygame.math.Vector2(tuple(p)).rotate_rad(angle)) for p in pts])
    np.testing.assert_array_equal(np.stack([x, y], axis=-1), want)


def test_install_leaves_other_envs_alone():
    class NotCarRacing:
        def _render_road(self, *a):
            return "stock"

    env = NotCarRacing()
    assert carracing_road.install(env) is False
    assert env._render_road() == "stock"
    cart = gym.make("CartPole-v1")
    assert carracing_road.install(cart) is False


def test_make_env_uses_it():
    from wm_trainer.games.real import open_env

    env = open_env("CarRacing-v3", 10)
    try:
        assert "_render_road" in vars(env.gym_env.unwrapped)
    finally:
        env.close()


@pytest.mark.parametrize("cap", [40, 31])
def test_frame_skip_holds_each_action_and_draws_only_the_frame_the_agent_sees(cap):
    from wm_trainer.games.real import open_env, random_policy

    actions = [random_policy("CarRacing-v3", np.random.default_rng(2))() for _ in range(cap)]
    with open_env("CarRacing-v3", cap) as every, open_env("CarRacing-v3", cap, frame_skip=2) as skip:
        np.testing.assert_array_equal(every.reset(seed=9), skip.reset(seed=9))
        done, t, seen = False, 0, None
        while not done:
            frame, ret, every_done = every.step(actions[t])  # the same action twice, one frame at a time
            held_both = not every_done
            if held_both:
                frame, reward, every_done = every.step(actions[t])
                ret += reward
            got, got_ret, done = skip.step(actions[t])
            assert "_render" not in vars(skip.gym_env.unwrapped)  # the drawing is back after the held frames
            # an episode that ends on a held frame shows the last frame drawn
            np.testing.assert_array_equal(got, frame if held_both else seen)
            seen = got
            assert got_ret == pytest.approx(ret) and done == every_done and skip.steps == every.steps
            t += 1
        assert skip.steps == cap and t == -(-cap // 2)  # the cap counts env frames, even mid-hold


def test_unrendered_skips_the_drawing_and_leaves_other_envs_alone(monkeypatch):
    env = gym.make("CarRacing-v3")
    try:
        env.reset(seed=1)
        drawn = []
        real_render = type(env.unwrapped)._render
        monkeypatch.setattr(type(env.unwrapped), "_render",
                            lambda self, *a, **k: drawn.append(1) or real_render(self, *a, **k))
        with carracing_road.unrendered(env):
            obs = env.step(np.array([0.0, 1.0, 0.0], dtype=np.float32))[0]
        assert drawn == [] and obs.shape == (96, 96, 3)
        env.step(np.array([0.0, 1.0, 0.0], dtype=np.float32))
        assert drawn == [1]
    finally:
        env.close()
    cart = gym.make("CartPole-v1")
    with carracing_road.unrendered(cart):
        assert "_render" not in vars(cart.unwrapped)
